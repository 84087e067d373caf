"""The stand-in Asterisk answers like the two real Asterisk 20 servers of the captures."""
import json
from pathlib import Path

import pytest
import zmq

from harness import wait_until

CAPTURES = Path(__file__).resolve().parent / "captures" / "asterisk"
INDEX = json.loads((CAPTURES / "index.json").read_text())["cases"]
# Actions the stand-in does not play: their answers depend on dialplan hints, SIP peers, the CLI.
NOT_PLAYED = ("28_", "50_", "51_", "52_", "53_", "55_", "56_")
# Devices B's database held before the capture run (they show in its DeviceStateList).
B_DATABASE = {"SIP/toA": "NOT_INUSE", "Custom:101": "RINGINUSE", "Custom:100": "NOT_INUSE",
              "Custom:nohint": "BUSY"}


def replayed_cases(instance):
    return [case for case in INDEX
            if case["instance"] == instance and case["socket"] == "reply"
            and case["request_raw"] is not None and not case["timeout_no_reply"]
            and not case["file"].startswith(NOT_PLAYED)]


def captured_events(case):
    """The relay-relevant events the real server published after this request, as bytes."""
    prefix = case["file"].replace("_reply.raw", "_evt_")
    files = sorted(CAPTURES.glob(prefix + "*.raw"))
    events = [f.read_bytes() for f in files]
    return [e for e in events if json.loads(e)["Event"] in ("DeviceStateChange",
                                                          "PresenceStateChange")]


def normalise(reply):
    """Replace what changes from run to run (Ping's timestamp) and the order of list items."""
    for item in reply:
        if "Timestamp" in item:
            item["Timestamp"] = "*"
    if len(reply) > 2 and reply[0].get("EventList") == "start":
        reply[1:-1] = sorted(reply[1:-1], key=lambda item: json.dumps(item, sort_keys=True))
    return reply


@pytest.mark.parametrize("instance", ["A", "B"])
def test_replies_and_events_match_the_captures(standins, context, instance):
    standin, = standins(1)
    if instance == "B":
        for device, state in B_DATABASE.items():
            standin.control.set_device(device, state)
    events = context.socket(zmq.SUB)
    events.setsockopt(zmq.SUBSCRIBE, b"")
    events.connect(f"tcp://127.0.0.1:{standin.evt_port}")
    wait_until(lambda: standin.control.state()["subscriptions"], message="subscription")
    command = context.socket(zmq.REQ)
    command.setsockopt(zmq.RCVTIMEO, 5000)
    command.connect(f"tcp://127.0.0.1:{standin.cmd_port}")

    cases = replayed_cases(instance)
    assert len(cases) > 15
    for case in cases:
        command.send(case["request_raw"].encode("utf-8"))
        reply = command.recv()
        expected = (CAPTURES / case["file"]).read_bytes()
        if b"Timestamp" not in expected and b"EventList" not in expected:
            assert reply == expected, case["description"]
        assert normalise(json.loads(reply)) == normalise(json.loads(expected)), case["description"]
        # A marker event ends what this request made the server publish.
        standin.control.publish_raw(b'{"Event":"Marker"}')
        published = []
        while True:
            event = events.recv()
            if event == b'{"Event":"Marker"}':
                break
            if json.loads(event)["Event"] not in ("LoadZmq", "FullyBooted"):
                published.append(event)
        if not case["file"].startswith(("31_", "32_", "33_")):  # calls the stand-in cannot make
            assert published == captured_events(case), case["description"]


def test_loadzmq_is_published_as_the_module_publishes_it(standins, context):
    events = context.socket(zmq.SUB)
    events.setsockopt(zmq.SUBSCRIBE, b"")
    standin, = standins(1, loadzmq_delay=0.5)
    events.connect(f"tcp://127.0.0.1:{standin.evt_port}")
    wait_until(lambda: standin.control.state()["subscriptions"], message="subscription")
    assert events.recv() == (CAPTURES / "00_loadzmq__A_evt.raw").read_bytes()
    assert json.loads(events.recv())["Event"] == "FullyBooted"


@pytest.mark.parametrize("action", ["Getvar", "Status"])
def test_actions_that_crash_asterisk_make_the_stand_in_play_dead(standins, context, action):
    standin, = standins(1)
    command = context.socket(zmq.REQ)
    command.setsockopt(zmq.RCVTIMEO, 300)
    command.connect(f"tcp://127.0.0.1:{standin.cmd_port}")
    command.send_json({"Action": action})
    with pytest.raises(zmq.Again):
        command.recv()
    assert standin.control.state()["mode"] == "crashed"


def test_hung_and_slow_modes(standins, context):
    standin, = standins(1)
    standin.control.set_mode("hung")
    command = context.socket(zmq.REQ)
    command.setsockopt(zmq.RCVTIMEO, 300)
    command.setsockopt(zmq.LINGER, 0)
    command.connect(f"tcp://127.0.0.1:{standin.cmd_port}")
    command.send_json({"Action": "Ping"})
    with pytest.raises(zmq.Again):
        command.recv()
    assert standin.control.state()["requests"] == 1   # it read the request
    command.close()
    standin.control.set_mode("slow", delay_ms=50)
    command = context.socket(zmq.REQ)
    command.setsockopt(zmq.RCVTIMEO, 5000)
    command.connect(f"tcp://127.0.0.1:{standin.cmd_port}")
    command.send_json({"Action": "Ping"})
    assert command.recv_json()[0]["Ping"] == "Pong"


def numeric_ping(pairs: int) -> bytes:
    """A Ping whose header lines (each number read as "(null)") are about twice its JSON."""
    return json.dumps({"Action": "Ping", **{f"k{i:04}": 0 for i in range(pairs)}},
                      separators=(",", ":")).encode()


@pytest.mark.parametrize("request_raw, crashes", [
    (numeric_ping(681), False),  # 6,827 bytes of JSON, 10,229 of header lines
    (numeric_ping(682), True),   # 10,244 bytes of header lines: over the module's 10,240
    (json.dumps({"Action": "Ping", "ActionID": "x" * 2038}).encode(), False),  # a 2,048-byte line
    (json.dumps({"Action": "Ping", "ActionID": "x" * 2039}).encode(), True),   # its reply's line
])
def test_the_stand_in_dies_where_the_module_overflows_its_buffers(standins, context, request_raw,
                                                                  crashes):
    standin, = standins(1)
    command = context.socket(zmq.REQ)
    command.setsockopt(zmq.RCVTIMEO, 300 if crashes else 5000)
    command.setsockopt(zmq.LINGER, 0)
    command.connect(f"tcp://127.0.0.1:{standin.cmd_port}")
    command.send(request_raw)
    if crashes:
        with pytest.raises(zmq.Again):
            command.recv()
        assert "overflows the module" in standin.control.state()["crashes"][0]
    else:
        assert json.loads(command.recv())[0]["Response"] == "Success"
        assert standin.control.state()["mode"] == "normal"


@pytest.mark.parametrize("length, crashes", [(4087, False), (4088, True)])
def test_an_event_line_over_the_module_buffer_kills_it(standins, length, crashes):
    standin, = standins(1)
    standin.control.set_presence("CustomPresence:1", "away", message="m" * length)  # Message: ...
    state = standin.control.state()
    assert (state["mode"] == "crashed") == crashes, state["crashes"]
