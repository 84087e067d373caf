"""Fuzzing: every parser with hypothesis, then thousands of random frames at running processes."""
import json
import random
import socket

import zmq
from hypothesis import example, given, settings
from hypothesis import strategies as st

from harness import HubClient, custom_states, wait_until
from zmqami.asterisk import decode_reply
from zmqami.config import ConfigError, Setting, is_url, load_broker_config, load_settings
from zmqami.envelope import parse_frames, parse_message
from zmqami.rules import MAX_ACTION_BYTES, BadInput, action_bytes, safe_action

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.text(max_size=10), children, max_size=5), max_leaves=15)
frames = st.lists(st.binary(max_size=200), max_size=4)
envelope_bodies = st.fixed_dictionaries(
    {}, optional={"msg_type": json_values | st.sampled_from(["AsteriskEvent", "AgentPing"]),
                  "uuid": json_values | st.text(max_size=70), "origin": json_values | st.text(),
                  "x_data": json_values}).map(lambda body: json.dumps(body).encode())


@given(st.one_of(frames, st.tuples(st.binary(max_size=30), envelope_bodies).map(list)))
def test_envelope_parsers_raise_only_bad_input(message):
    for parse in (parse_frames, parse_message):
        try:
            envelope = parse(message)
        except BadInput:
            continue
        assert isinstance(envelope.msg_type, str)


@given(st.one_of(st.binary(), json_values.map(lambda v: json.dumps(v).encode())))
def test_reply_parser_raises_only_bad_input(raw):
    try:
        reply = decode_reply(raw)
    except BadInput:
        return
    assert all(isinstance(item, dict) for item in reply)


@given(json_values | st.dictionaries(st.text(max_size=20), json_values | st.text()))
def test_safe_action_output_is_always_safe(action):
    try:
        checked = safe_action(action)
    except BadInput:
        return
    assert action_bytes(checked) <= MAX_ACTION_BYTES
    assert len({key.lower() for key in checked}) == len(checked) and next(iter(checked)) == "Action"
    assert all(isinstance(v, str) and not any(ord(c) < 32 for c in v) for v in checked.values())
    assert checked["Action"].lower() not in ("getvar", "status")


ini_lines = st.lists(st.one_of(
    st.sampled_from(["[general]", "[servers]", "[server-1]", "sections = server-1",
                     "addr = 127.0.0.1", "cmd_port = 1", "evt_port = 2", "log_level = info"]),
    st.text(max_size=40)), max_size=12).map("\n".join)


@given(ini_lines)
@example("[servers]\nsections = server-1\n\x0c0")  # a continuation line: a name with a newline
def test_ini_loader_raises_only_config_errors(tmp_path, text):
    path = tmp_path / "fuzz.ini"
    path.write_text(text, encoding="utf-8", errors="surrogateescape")
    try:
        load_broker_config(str(path))
    except ConfigError as error:
        assert all(line.startswith(str(path)) and "\n" not in line for line in error.errors)


@settings(max_examples=50)  # each example writes and runs a file
@given(json_values)
def test_settings_loader_raises_only_config_errors(tmp_path, value):
    path = tmp_path / "fuzz_settings.py"
    path.write_text(f"URL = {value!r}\n")
    try:
        load_settings(str(path), {"URL": Setting("tcp://127.0.0.1:1", is_url)})
    except ConfigError as error:  # a wrong value, or (repr of inf, nan) not Python at all
        assert all(line.startswith(f"{path}: ") and "\n" not in line for line in error.errors)


# --- end to end ----------------------------------------------------------------------------------

FUZZ_MESSAGES = 2000


def random_frames(rng: random.Random):
    """Random bytes, random JSON shapes, and almost-valid envelopes and events."""
    kind = rng.randrange(5)
    if kind == 0:
        return [rng.randbytes(rng.randrange(0, 300)) for _ in range(rng.randrange(1, 4))]
    if kind == 1:
        return [b"[*]", rng.randbytes(rng.randrange(0, 300))]
    junk = rng.choice([None, 1, -1.5, "x" * rng.randrange(300), [], {}, ["Ping"], {"a": {"b": []}},
                       "SIP/1\r\nAction: Originate", True])
    fields = ["msg_type", "uuid", "origin", "x_data", "x_events", "Event", "Device", "State",
              "Presentity", "Status", "Message"]
    body = {rng.choice(fields): junk for _ in range(rng.randrange(6))}
    if kind == 3:
        body.update(msg_type=rng.choice(["AsteriskEvent", "AsteriskEvents", "AgentStates",
                                         "AsteriskAction", "AgentHeartbeat", "AgentStateRequest",
                                         "AgentPing"]),
                    uuid="f" * 32, origin="Fuzzer")
    if kind == 4:
        body.update(Event=rng.choice(["DeviceStateChange", "PresenceStateChange", "LoadZmq"]))
    return [b"[*]", json.dumps(body).encode()]


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def raw_tcp_garbage(url: str, rng: random.Random) -> None:
    host, port = url.rsplit("/", 1)[1].rsplit(":", 1)
    for _ in range(20):
        with socket.create_connection((host, int(port))) as conn:
            conn.sendall(rng.randbytes(rng.randrange(1, 500)))


def test_fuzz_a_running_hub_agents_and_broker(standins, agents, hub, broker, context):
    rng = random.Random(20261126)
    x, y, z = standins(3)
    agent_scripts = agents([x, y], PRESENCE=True, KEEP_ALIVE_INTERVAL=0.5)
    broker_script = broker([x, z], presence="yes")
    processes = [hub.script] + agent_scripts + [broker_script]
    x.control.set_device("SIP/warm", "INUSE")
    wait_until(lambda: custom_states(y).get("Custom:SIP/warm") == "INUSE")
    wait_until(lambda: custom_states(z).get("Custom:SIP/warm") == "INUSE")
    before = [rss_mb(p.proc.pid) for p in processes]

    client = HubClient(context, hub, name="Fuzzer")
    raw_tcp_garbage(hub.pull_url, rng)
    raw_tcp_garbage(hub.pub_url, rng)
    xsub = context.socket(zmq.XSUB)        # random subscriptions on the hub's PUB
    xsub.connect(hub.pub_url)
    for i in range(FUZZ_MESSAGES):
        client.send_frames(*random_frames(rng))                  # the hub, and the agents behind
        x.control.publish_raw(*random_frames(rng)[-1:])           # the agent's and broker's Asterisk
        if i % 10 == 0:
            xsub.send(rng.randbytes(rng.randrange(1, 40)))
    xsub.close()

    x.control.set_device("SIP/after-fuzz", "BUSY")
    wait_until(lambda: custom_states(y).get("Custom:SIP/after-fuzz") == "BUSY",
               message="a good event through the agents after the fuzz")
    wait_until(lambda: custom_states(z).get("Custom:SIP/after-fuzz") == "BUSY",
               message="a good event through the broker after the fuzz")
    for process, rss_before in zip(processes, before):
        assert process.proc.poll() is None, process.output()
        assert rss_mb(process.proc.pid) < rss_before + 50, process.name
        assert "Traceback" not in process.output()
    assert {json.loads(r)["Action"] for r in x.control.requests()} <= {
        "Ping", "DeviceStateList", "PresenceStateList", "SetVar", "Setvar"}


def test_text_from_the_network_cannot_forge_log_lines():
    from zmqami.stats import printable
    assert printable("X\r\n2026-01-01 - broker - INFO - forged") == \
        "X\\x0d\\x0a2026-01-01 - broker - INFO - forged"
    assert printable("x" * 500).endswith("...") and len(printable("x" * 500)) == 103
    assert printable(None) == "None"
