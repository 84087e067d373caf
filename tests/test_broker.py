"""python broker.py config.ini, end to end, against stand-in Asterisk servers on 127.0.0.1."""
import re
import signal

import pytest

from harness import ROOT, SUBSCRIBED, mirrored, run_script, setvars, subscribed, wait_until
from testing.standins import CALL_EVENTS
from zmqami.standin import module_json


def test_a_state_reaches_every_other_server_and_nothing_goes_back(standins, broker):
    a, b, c = standins(3)
    script = broker([a, b, c])
    a.control.set_device("SIP/100", "RINGING")
    for other in (b, c):
        wait_until(mirrored(other, "SIP/100", "RINGING"), message="RINGING on the others")
    c.control.set_device("PJSIP/alice", "BUSY")
    for other in (a, b):
        wait_until(mirrored(other, "PJSIP/alice", "BUSY"), message="BUSY on the others")
    # (a resync when a stand-in boots may write the same state twice)
    assert {s["Variable"] for s in setvars(a)} == {"DEVICE_STATE(Custom:PJSIP/alice)"}
    assert {s["Variable"] for s in setvars(c)} == {"DEVICE_STATE(Custom:SIP/100)"}
    action = setvars(b)[0]
    assert set(action) == {"Action", "ActionID", "Variable", "Value"}
    assert action["Action"] == "Setvar" and len(action["ActionID"]) == 32
    assert script.stop() == 0


def test_custom_devices_and_unknown_are_not_relayed(standins, broker):
    a, b = standins(2)
    broker([a, b])
    a.control.set_device("Custom:SIP/7", "INUSE")    # a mirror, or a dialplan's own Custom:
    a.control.set_device("SIP/101", "UNKNOWN")        # Asterisk refuses to set UNKNOWN
    a.control.set_device("SIP/102", "INUSE")          # a good event after them still arrives
    wait_until(mirrored(b, "SIP/102", "INUSE"), message="the good event")
    assert {s["Variable"] for s in setvars(b)} == {"DEVICE_STATE(Custom:SIP/102)"}


def test_presence_is_relayed_whole_once_and_its_echo_suppressed(standins, broker):
    a, b, c = standins(3)
    broker([a, b, c], presence="yes")
    a.control.set_presence("CustomPresence:100", "away", "lunch", "Back at 2, promise")
    for other in (b, c):
        wait_until(lambda: other.control.presences().get("CustomPresence:100")
                   == ["away", "lunch", "Back at 2, promise"], message="presence on the others")
    # B and C published the echo of our write before these events, on the same socket: once
    # these arrive on A, the echoes have been seen (and must not have been relayed).
    b.control.set_device("SIP/b", "INUSE")
    c.control.set_device("SIP/c", "INUSE")
    wait_until(lambda: {"Custom:SIP/b", "Custom:SIP/c"} <= set(a.control.devices()),
               message="the markers on A")
    assert [s for s in setvars(a) if "PRESENCE" in s["Variable"]] == []
    presence_writes = [s for s in setvars(b) if "PRESENCE" in s["Variable"]]
    assert presence_writes[0]["Value"].endswith(",e")    # base64: the message has a comma
    # A genuine change on B right after is relayed (the original dropped it for 3 s).
    b.control.set_presence("CustomPresence:100", "available")
    wait_until(lambda: a.control.presences().get("CustomPresence:100") == ["available", "", ""],
               message="B's genuine change on A")


# What res_zmq_manager's PUB never sends the broker: no subscription of the broker's matches it
# (asterisk.EVENT_SUBSCRIPTIONS), so it stays in Asterisk.
UNSUBSCRIBED = [b"not json", b"\xff\xfe\x00", b"[1, 2]", b'"Ping"', b"", b"{}", b'{"Event": 5}',
                b"[" * 50000, b'{"Event":"VarSet","Variable":"x","Value":"y"}']
# What reaches it, and is checked, counted and dropped.
HOSTILE = [
    b'{"Event":"DeviceStateChange"', b'{"Event":"DeviceStateChange"}\xff',
    b'{"Event":"Reload",' + b"[" * 50000, b'{"Event":"LoadZmq"]', b'{"Privilege":' + b"[" * 50000,
    b'{"Device":"SIP/1","State":"BUSY"}', b'{"State":5}',
    b'{"Event":"DeviceStateChange"}',
    b'{"Event":"DeviceStateChange","Device":5,"State":"INUSE"}',
    b'{"Event":"DeviceStateChange","Device":"SIP/1","State":null}',
    b'{"Event":"DeviceStateChange","Device":"SIP/1","State":"FOO"}',
    b'{"Event":"DeviceStateChange","Device":"SIP/1\\nAction: Originate","State":"INUSE"}',
    b'{"Event":"DeviceStateChange","Device":"SIP/1","State":"INUSE\\r\\nChannel: SIP/9"}',
    b'{"Event":"PresenceStateChange","Presentity":"CustomPresence:1","Status":"away",'
    b'"Subtype":"","Message":"hi\\nAction: Originate"}',
    b'{"Event":"PresenceStateChange","Presentity":"CustomPresence:1","Status":"zzz"}',
]


def test_hostile_input_is_logged_once_counted_dropped_and_the_broker_goes_on(standins, broker):
    a, b = standins(2)
    script = broker([a, b], presence="yes", count_messages="yes")
    for raw in UNSUBSCRIBED + HOSTILE:
        a.control.publish_raw(raw)
    a.control.publish_raw(b'{"Event":"DeviceStateChange"}', b"two frames")
    a.control.set_device("SIP/200", "BUSY")
    wait_until(mirrored(b, "SIP/200", "BUSY"), message="the good event after the hostile ones")
    assert {s["Variable"] for s in setvars(b)} == {"DEVICE_STATE(Custom:SIP/200)"}
    assert script.stop() == 0
    warnings = script.lines("Dropped input from server-1")
    assert len(warnings) == 1, script.output()          # once, not once per message
    statistics = script.lines("Statistics:")[-1]
    assert f"{len(HOSTILE) + 1} dropped" in statistics, statistics
    assert "Traceback" not in script.output()


def test_a_hung_server_is_reconnected_after_request_timeout_and_gets_the_state(standins, broker):
    a, b, c = standins(3)
    b.control.set_mode("hung")
    script = broker([a, b, c], request_timeout="200")
    a.control.set_device("SIP/100", "INUSE")
    wait_until(mirrored(c, "SIP/100", "INUSE"), message="the state on the live server")
    script.wait_for_output("Did not receive REP from server-2 within 200 ms")
    b.control.set_mode("normal")
    wait_until(mirrored(b, "SIP/100", "INUSE"), message="the state on the server back")
    script.wait_for_output("server-2 answers again")
    assert len(script.lines("Did not receive REP from server-2")) == 1


def test_statistics_verbose_messages_and_ami_trace(standins, broker, tmp_path):
    a, b = standins(2)
    script = broker([a, b], count_messages="yes", verbose_messages="yes")
    a.control.set_device("SIP/300", "ONHOLD")
    wait_until(mirrored(b, "SIP/300", "ONHOLD"), message="the state")
    script.wait_for_output('"Variable": "DEVICE_STATE(Custom:SIP/300)"')   # verbose_messages
    assert script.stop() == 0
    assert "1 events relayed" in script.lines("Statistics:")[-1]
    assert "server-2: " in script.lines("Statistics:")[-1]


def events_in(script, server: str) -> int:
    return int(re.search(rf"{server}: (\d+) events in", script.lines("Statistics:")[-1])[1])


def test_only_the_events_the_broker_uses_leave_asterisk(standins, broker):
    """res_zmq_manager publishes every event of Asterisk (a call: 34, 6 of them states); its PUB
    keeps what no subscription of the broker's matches."""
    a, b = standins(2)
    script = broker([a, b], count_messages="yes")
    wait_until(lambda: a.control.state()["subscriptions"] == SUBSCRIBED,
               message="the broker's subscriptions at the publisher")
    for _ in range(500):
        a.control.publish_raw(module_json(CALL_EVENTS[1]))  # VarSet: kept in Asterisk
    a.control.set_device("SIP/500", "INUSE")
    wait_until(mirrored(b, "SIP/500", "INUSE"), message="the state after 500 VarSet events")
    assert script.stop() == 0
    assert events_in(script, "server-1") < 10, script.lines("Statistics:")[-1]


def test_events_whose_headers_come_in_any_order_are_all_relayed(standins, broker):
    """Asterisk built with jansson before 2.8 writes an event's headers in an order jansson does
    not define: a subscription to '{"Event":"DeviceStateChange"' alone would lose the states
    whose name is not first."""
    a, b = standins(2)
    broker([a, b], presence="yes")
    state = {"Event": "DeviceStateChange", "Privilege": "call,all", "Device": "SIP/1",
             "State": "BUSY"}
    for n, first in enumerate(("Privilege", "Device", "State")):
        device = f"SIP/{600 + n}"
        event = dict(state, Device=device)
        a.control.publish_raw(module_json({first: event[first], **event}))
        wait_until(mirrored(b, device, "BUSY"), message=f"a state whose {first} comes first")
    presence = {"Event": "PresenceStateChange", "Privilege": "call,all",
                "Presentity": "CustomPresence:600", "Status": "away", "Subtype": "",
                "Message": "lunch"}
    a.control.publish_raw(module_json({"Message": "lunch", **presence}))
    wait_until(lambda: b.control.presences().get("CustomPresence:600") == ["away", "", "lunch"],
               message="a presence whose Message comes first")


def test_ami_trace_logs_every_message_of_that_server(standins, tmp_path):
    from harness import Script, broker_config
    a, b = standins(2)
    text = broker_config([a, b]).replace("name = server-1\n", "name = server-1\nami_trace = yes\n")
    (tmp_path / "trace.ini").write_text(text)
    script = Script("broker.py", str(tmp_path / "trace.ini"), log_dir=tmp_path)
    try:
        wait_until(lambda: subscribed(a, 1) and subscribed(b))
        a.control.set_device("SIP/400", "RINGING")
        script.wait_for_output("Got message from server-1:")
        a.control.publish_raw(b'{"Event":"VarSet","Variable":"traced","Value":"1"}')
        script.wait_for_output('"Variable": "traced"')  # traced: every event, not those used
        b.control.set_device("SIP/401", "RINGING")
        wait_until(mirrored(a, "SIP/401", "RINGING"))
        assert not script.lines("Got message from server-2")
    finally:
        script.kill()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_ctrl_c_stop_cleanly_with_status_0(standins, broker, signum):
    a, b = standins(2)
    script = broker([a, b])
    assert script.stop(signum) == 0
    assert script.lines("exiting")
    assert "Traceback" not in script.output()


def test_without_arguments_it_prints_usage():
    result = run_script("broker.py")
    assert result.returncode == 2
    assert "python broker.py config.ini" in result.stderr


def test_example_config_starts_and_logs_its_connections(tmp_path):
    from harness import Script
    script = Script("broker.py", "example_config.ini", log_dir=tmp_path)
    script.wait_for_output("Connecting to Console 2 over AMI at 127.0.0.1:15038 as zmq-ami")
    assert script.stop(signal.SIGINT) == 0


def test_demo_runs_and_ends_by_itself():
    result = run_script("broker.py", "--demo", timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Every change reached every other server." in result.stdout
    # It shows the config it ran with, not the path of a file removed at its end.
    assert "[servers]\n    sections = asterisk-1, asterisk-2, asterisk-3" in result.stdout
    assert "demo_config.ini" not in result.stdout


def test_demo_takes_no_config_file_check_or_status():
    for extra in (["--check-config"], ["example_config.ini"], ["--status"]):
        result = run_script("broker.py", "--demo", *extra)
        assert result.returncode == 2 and "--demo runs the broker on stand-in servers of its " \
            "own" in result.stderr, result.stderr


def test_counts_read_as_english(tmp_path):
    text = (ROOT / "example_config.ini").read_text().replace(
        "sections = server-1, server-2", "sections = server-1")
    text = text[:text.index("[server-2]")]
    (tmp_path / "one.ini").write_text(text)
    result = run_script("broker.py", "--check-config", str(tmp_path / "one.ini"))
    assert result.returncode == 0 and "OK (1 server)" in result.stdout, result.stderr
