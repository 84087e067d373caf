"""Which of an agent's states go together (AsteriskEvents) and which one by one (outgoing.py)."""
import pytest

from zmqami.envelope import HUB_MAX_BYTES, Envelope, build
from zmqami.loop import EventLoop
from zmqami.outgoing import ORIGINAL_AGENT_QUIET, PACK_MAX, StateSender


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def sender(mode, packing=True):
    """A StateSender, the messages it sends (msg_type, number of states), and its clock."""
    sent, clock = [], Clock()

    def send(target, msg_type, data=None, events=None):
        assert target == "*"
        sent.append((msg_type, 1 if events is None else len(events)))
    return StateSender(EventLoop(), send, mode, packing, clock=clock), sent, clock


def take(states, count):
    """count states taken in one wake-up of the loop, then sent."""
    for i in range(count):
        states.add({"Event": "DeviceStateChange", "Device": f"SIP/{i}", "State": "INUSE"})
    states.flush()


def message(msg_type, heartbeat=None):
    body = {"msg_type": msg_type, "uuid": "u", "origin": "Old"}
    if heartbeat is not None:
        body["x_heartbeat"] = heartbeat
    return Envelope(b"[AsteriskStats]", body)


@pytest.mark.parametrize("mode, packing, expected", [
    (True, True, [("AsteriskEvents", 3)]),
    (False, True, [("AsteriskEvent", 1)] * 3),
    (True, False, [("AsteriskEvent", 1)] * 3),   # over NATS: each state has its key
    ("auto", True, [("AsteriskEvent", 1)] * 3),  # not before five quiet minutes
])
def test_states_taken_together_go_together_only_where_packing_is_safe(mode, packing, expected):
    states, sent, _ = sender(mode, packing)
    take(states, 3)
    assert sent == expected


def test_a_single_state_goes_as_the_original_sent_it():
    states, sent, _ = sender(True)
    take(states, 1)
    assert sent == [("AsteriskEvent", 1)]


def test_a_pack_holds_at_most_pack_max_states():
    states, sent, _ = sender(True)
    take(states, 2 * PACK_MAX + 5)
    assert sent == [("AsteriskEvents", PACK_MAX)] * 2 + [("AsteriskEvents", 5)]


def test_auto_packs_only_while_no_original_agent_has_been_heard_for_five_minutes():
    states, sent, clock = sender("auto")
    clock.now += ORIGINAL_AGENT_QUIET
    take(states, 3)
    assert sent == [("AsteriskEvents", 3)]
    # What new agents and clients send puts nothing off: they carry x_heartbeat, or are not
    # what an agent sends of its own accord.
    for heard in (message("AsteriskActionStatus", heartbeat="30"), message("AsteriskAction"),
                  message("AgentPing"), message("SomethingNew")):
        states.heard(heard)
    sent.clear()
    take(states, 3)
    assert sent == [("AsteriskEvents", 3)]
    # An original agent's Ping report: one state a message for the next five minutes.
    states.heard(message("AsteriskActionStatus"))
    assert states.status() == "no: original agent Old heard 0 s ago"
    clock.now += ORIGINAL_AGENT_QUIET - 1
    sent.clear()
    take(states, 3)
    assert sent == [("AsteriskEvent", 1)] * 3
    states.heard(message("AsteriskEvent"))  # its states keep it so
    clock.now += ORIGINAL_AGENT_QUIET - 1
    sent.clear()
    take(states, 3)
    assert sent == [("AsteriskEvent", 1)] * 3
    clock.now += 1
    sent.clear()
    take(states, 3)
    assert sent == [("AsteriskEvents", 3)]
    assert states.status() == "yes (no original agent heard for 300 s)"


@pytest.mark.parametrize("mode, packing, expected", [
    (True, True, "yes (PACK_EVENTS = True)"), (False, True, "no (PACK_EVENTS = False)"),
    ("auto", True, "not yet: no original agent heard in the 0 s since the start"),
    ("auto", False, None)])
def test_the_status_says_whether_states_go_together(mode, packing, expected):
    assert sender(mode, packing)[0].status() == expected


def test_a_full_pack_of_the_largest_presences_fits_a_hub_message():
    text = "é" * 2000  # the most a subtype or message may hold (4000 bytes), 12,000 as JSON
    event = {"Event": "PresenceStateChange", "Presentity": "CustomPresence:" + "x" * 185,
             "Status": "away", "Subtype": text, "Message": text, "ChangedAt": "1764800000.000"}
    frames = build("*", "AsteriskEvents", "Moscow", events=[event] * PACK_MAX, heartbeat="30")
    assert len(frames[1]) < HUB_MAX_BYTES / 2


def test_an_original_agent_heard_while_always_packing_is_told_once(caplog):
    states, sent, _ = sender(True)
    for _ in range(3):
        states.heard(message("AgentPong"))
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "Old" in warnings[0] and "PACK_EVENTS" in warnings[0]
    take(states, 3)
    assert sent == [("AsteriskEvents", 3)]  # (as set: every agent is said to be of this version)
