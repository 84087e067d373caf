"""The delivery policy to one server: newest state wins, one write per device in flight, retries."""
import time

from zmqami.asterisk import MAX_IN_FLIGHT, LinkStats, Outbox
from zmqami.rules import StateUpdate


def device(name, state):
    return StateUpdate(f"DEVICE_STATE(Custom:{name})", state)


def send_all(outbox):
    sent = []
    while True:
        request = outbox.next_request()
        if request is None:
            return sent
        outbox.sent(request, time.monotonic())
        sent.append(request)


def ok(action_id):
    return [{"Response": "Success", "ActionID": action_id, "Message": "Variable Set"}]


def new_outbox():
    return Outbox("B", timeout=1.0, stats=LinkStats())


def test_a_newer_state_replaces_one_not_yet_sent():
    outbox = new_outbox()
    for i, state in enumerate(["RINGING", "INUSE", "NOT_INUSE"]):
        outbox.write_state(device("SIP/100", state), f"id{i}")
    sent = send_all(outbox)
    assert [r.payload()["Value"] for r in sent] == ["NOT_INUSE"]


def test_one_write_per_device_in_flight_keeps_the_order_of_states():
    outbox = new_outbox()
    outbox.write_state(device("SIP/100", "RINGING"), "a")
    assert [r.action_id for r in send_all(outbox)] == ["a"]
    outbox.write_state(device("SIP/100", "INUSE"), "b")
    outbox.write_state(device("SIP/100", "NOT_INUSE"), "c")
    assert send_all(outbox) == []           # waits for RINGING's reply
    outbox.reply("a", ok("a"))
    assert [r.payload()["Value"] for r in send_all(outbox)] == ["NOT_INUSE"]


def test_a_lost_write_is_sent_again_unless_superseded():
    outbox = new_outbox()
    outbox.write_state(device("SIP/100", "RINGING"), "a")
    outbox.write_state(device("SIP/200", "BUSY"), "b")
    send_all(outbox)
    outbox.write_state(device("SIP/200", "NOT_INUSE"), "c")
    outbox.requeue_in_flight()              # the connection was reset
    assert sorted(r.payload()["Value"] for r in send_all(outbox)) == ["NOT_INUSE", "RINGING"]


def test_a_reply_shows_older_requests_were_lost():
    outbox = new_outbox()
    outbox.write_state(device("SIP/1", "BUSY"), "a")
    outbox.write_state(device("SIP/2", "BUSY"), "b")
    send_all(outbox)
    outbox.reply("b", ok("b"))              # REP answers in order: "a" never arrived
    assert [r.action_id for r in send_all(outbox)] == ["a"]
    assert outbox.stats.acknowledged == 1


def test_an_acknowledgement_read_without_decoding_completes_its_write_and_only_it():
    outbox = new_outbox()
    replies = []
    outbox.write_state(device("SIP/1", "BUSY"), "a")
    outbox.write_state(device("SIP/2", "BUSY"), "b")
    outbox.send_action({"Action": "Ping"}, replies.append)
    send_all(outbox)
    ping = next(iter(outbox.in_flight))      # one-shot actions go first
    assert not outbox.acknowledged(ping)     # not a write: its reply is decoded and handed on
    assert not outbox.acknowledged("unknown")
    outbox.reply(ping, [{"Response": "Success", "ActionID": ping, "Ping": "Pong"}])
    assert outbox.acknowledged("a") and outbox.stats.acknowledged == 1
    assert outbox.acknowledged("b") and outbox.stats.acknowledged == 2
    assert send_all(outbox) == [] and not outbox.in_flight and replies[0][0]["Ping"] == "Pong"


def test_an_acknowledgement_past_older_writes_shows_they_were_lost():
    outbox = new_outbox()
    outbox.write_state(device("SIP/1", "BUSY"), "a")
    outbox.write_state(device("SIP/2", "BUSY"), "b")
    send_all(outbox)
    assert outbox.acknowledged("b")          # REP answers in order: "a" never arrived
    assert [r.action_id for r in send_all(outbox)] == ["a"]


def test_writes_given_one_action_id_each_get_their_own_in_flight():
    outbox = new_outbox()
    for device_name in ("SIP/1", "SIP/2", "SIP/3"):  # an AgentStates: one uuid for its states
        outbox.write_state(device(device_name, "BUSY"), "uuid")
    sent = send_all(outbox)
    assert len({r.action_id for r in sent}) == 3 and sent[0].action_id == "uuid"
    assert len({r.wire() for r in sent}) == 3
    for request in sent:
        assert outbox.acknowledged(request.action_id)
    assert not outbox.in_flight and not outbox.busy


def test_a_reply_without_action_id_belongs_to_the_oldest_request():
    outbox = new_outbox()
    replies = []
    outbox.send_action({"Action": "NoSuchAction"}, replies.append)
    send_all(outbox)
    outbox.reply(None, [{"Response": "Error"}, {"Message": "Internal error."}])
    assert replies == [[{"Response": "Error"}, {"Message": "Internal error."}]]


def test_one_shot_actions_get_their_own_action_id_back_and_none_when_lost():
    outbox = new_outbox()
    replies = []
    outbox.send_action({"Action": "Ping", "ActionID": "mine"}, replies.append)
    outbox.send_action({"Action": "Ping"}, replies.append)
    first, second = send_all(outbox)
    assert first.payload()["ActionID"] != "mine"
    outbox.reply(first.action_id, [{"Response": "Success", "ActionID": first.action_id}])
    outbox.requeue_in_flight()
    assert replies == [[{"Response": "Success", "ActionID": "mine"}], None]


def test_a_refused_write_is_counted_and_not_sent_again():
    outbox = new_outbox()
    outbox.write_state(device("SIP/1", "BUSY"), "a")
    send_all(outbox)
    outbox.reply("a", [{"Response": "Error", "ActionID": "a", "Message": "Variable not set"}])
    assert outbox.stats.refused == 1 and send_all(outbox) == [] and len(outbox) == 0


def test_in_flight_is_bounded_and_the_rest_waits_conflated():
    outbox = new_outbox()
    for i in range(MAX_IN_FLIGHT + 5):
        outbox.write_state(device(f"SIP/{i}", "INUSE"), f"id{i}")
    assert len(send_all(outbox)) == MAX_IN_FLIGHT
    assert len(outbox) == 5


def test_a_server_that_refuses_every_write_is_logged_once_not_per_write(caplog):
    outbox = new_outbox()
    for i in range(5):
        outbox.write_state(device(f"SIP/{i}", "BUSY"), f"id{i}")
    send_all(outbox)
    for i in range(5):
        outbox.reply(f"id{i}", [{"Response": "Error", "ActionID": f"id{i}",
                                 "Message": "Variable not set"}])
    assert outbox.stats.refused == 5
    assert len([r for r in caplog.records if "refused Setvar" in r.getMessage()]) == 1


def test_a_request_that_can_never_be_sent_is_answered_with_an_error():
    outbox = new_outbox()
    replies = []
    outbox.send_action({"Action": "Ping"}, replies.append)
    outbox.refuse(outbox.next_request(), "not sent: bad value")
    assert replies == [[{"Response": "Error", "Message": "not sent: bad value"}]]
    outbox.write_state(device("SIP/1", "BUSY"), "a")
    outbox.refuse(outbox.next_request(), "not sent: bad value")
    assert outbox.stats.refused == 1 and len(outbox) == 0 and not outbox.busy


def test_the_queue_counts_states_only_and_a_health_check_goes_first():
    outbox = new_outbox()
    outbox.write_state(device("SIP/1", "INUSE"), "a")
    outbox.send_action({"Action": "DeviceStateList"}, lambda reply: None)
    outbox.send_action({"Action": "Ping"}, lambda reply: None, first=True)
    assert len(outbox) == 1  # one state; actions are not what a down server is kept
    assert [r.payload()["Action"] for r in send_all(outbox)] == ["Ping", "DeviceStateList", "Setvar"]


def test_one_shot_actions_not_sent_are_answered_none_at_once():
    outbox = new_outbox()
    replies = []
    outbox.write_state(device("SIP/1", "INUSE"), "a")
    for _ in range(3):
        outbox.send_action({"Action": "Ping"}, replies.append)
    outbox.fail_one_shots()
    assert replies == [None, None, None] and len(outbox) == 1
    assert [r.payload()["Action"] for r in send_all(outbox)] == ["Setvar"]
