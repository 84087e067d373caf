"""python server.py and python agent.py, end to end: a hub, agents, stand-in Asterisk servers."""
import json
import signal
import subprocess
import sys

import pytest
import zmq.auth

from harness import (ROOT, HubClient, Script, all_mirrored, flood_until_packed, mirrored,
                     python_settings, run_script, setvars, wait_until)
from zmqami.status import fetch_status


def test_a_state_change_reaches_the_other_agents_and_not_its_own(standins, agents, hub, context):
    x, y, z = standins(3)
    agents([x, y, z])
    monitor = HubClient(context, hub, name="monitor", topics=["[*]"])
    x.control.set_device("SIP/100", "RINGING")
    for other in (y, z):
        wait_until(mirrored(other, "SIP/100", "RINGING"), message="RINGING on Y and Z")
    event = monitor.wait_for("AsteriskEvent", "X")
    assert event["x_data"] == {"Event": "DeviceStateChange", "Device": "SIP/100",
                               "State": "RINGING"}
    # The SetVar the original agent sent: its ActionID is the envelope's uuid.
    assert setvars(y)[0] == {"Action": "SetVar", "ActionID": event["uuid"],
                             "Variable": "DEVICE_STATE(Custom:SIP/100)", "Value": "RINGING"}
    assert setvars(x) == []


def test_every_state_of_an_agentstates_is_written_and_stays_writable(standins, agents, hub,
                                                                     context):
    """An AgentStates carries many states in one message, with one uuid: each write needs an
    ActionID of its own.  (With the message's uuid on all of them, all but one stayed "in
    flight" for ever, and no later change of those devices was written again.)"""
    y, = standins(1)
    agents([y])
    peer = HubClient(context, hub, name="P")
    devices = [f"SIP/{i}" for i in range(5)]
    peer.send("*", "AgentStates", heartbeat="30", events=[
        {"Event": "DeviceStateChange", "Device": device, "State": "INUSE"} for device in devices])
    for device in devices:
        wait_until(mirrored(y, device, "INUSE"), message=f"{device} INUSE from the AgentStates")
    for device in devices:
        peer.send("*", "AsteriskEvent", heartbeat="30",
                  data={"Event": "DeviceStateChange", "Device": device, "State": "RINGING"})
    for device in devices:
        wait_until(mirrored(y, device, "RINGING"), message=f"{device}'s next change")
    action_ids = [setvar["ActionID"] for setvar in setvars(y)]
    assert len(action_ids) == len(set(action_ids))


def test_states_taken_together_go_together_unless_an_original_agent_may_listen(
        standins, agents, hub, context, tmp_path):
    x, y = standins(2)
    monitor = HubClient(context, hub, name="monitor", topics=["[*]"])
    status = f"ipc://{tmp_path}/Y.status"
    (packing,), (auto,) = agents([x], PACK_EVENTS=True), agents([y], names="Y",
                                                                STATUS_SOCKET=status)
    flood_until_packed(x, y, monitor, "X")
    for pack in monitor.find("AsteriskEvents", "X"):
        assert 2 <= len(pack["x_events"]) <= 50
        assert all(event.keys() == {"Event", "Device", "State"} for event in pack["x_events"])
    # 'auto': nothing together in the first five minutes, when an original agent may not have
    # reported yet; each change in an AsteriskEvent of its own, as the original sent it.
    devices = [f"SIP/{i}" for i in range(50)]
    y.control.set_devices({device: "RINGING" for device in devices})
    wait_until(all_mirrored(x, devices, "RINGING"), message="50 devices RINGING")
    assert not monitor.find("AsteriskEvents", "Y")
    assert len(monitor.find("AsteriskEvent", "Y")) >= 50
    # An original agent's Ping report (no x_heartbeat) is heard by the agent that would pack.
    old = HubClient(context, hub, name="Old")
    old.send("AsteriskStats", "AsteriskActionStatus",
             data={"Action": "Ping", "Response": "Success", "Timestamp": "1.0"})
    auto.wait_for_output("An original agent (Old) is on the network")
    assert not packing.lines("An original agent")
    assert fetch_status(status)["totals"]["states_together"].startswith(
        "no: original agent Old heard")


def test_unknown_and_custom_devices_are_not_relayed(standins, agents, hub, context):
    x, y = standins(2)
    agents([x, y])
    x.control.set_device("Custom:SIP/7", "INUSE")
    x.control.set_device("SIP/101", "UNKNOWN")
    # The same from a Python 2 agent, which relayed Custom: devices and trusted its receivers.
    old_agent = HubClient(context, hub, name="Old")
    old_agent.send("*", "AsteriskEvent", data={"Event": "DeviceStateChange",
                                               "Device": "Custom:SIP/8", "State": "INUSE"})
    old_agent.send("*", "AsteriskEvent", data={"Event": "DeviceStateChange",
                                               "Device": "SIP/9", "State": "UNKNOWN"})
    x.control.set_device("SIP/102", "INUSE")
    wait_until(mirrored(y, "SIP/102", "INUSE"), message="the good event")
    old_agent.send("*", "AsteriskEvent", data={"Event": "DeviceStateChange",
                                               "Device": "SIP/103", "State": "BUSY"})
    wait_until(mirrored(y, "SIP/103", "BUSY"), message="the Python 2 agent's event")
    # (a resync when Y's Asterisk boots may write the same state twice)
    assert {s["Variable"] for s in setvars(y)} == {"DEVICE_STATE(Custom:SIP/102)",
                                                   "DEVICE_STATE(Custom:SIP/103)"}


def test_an_asterisk_action_runs_on_the_target_and_is_answered_to_the_caller(
        standins, agents, hub, context):
    x, y = standins(2)
    agents([x, y])
    client = HubClient(context, hub, name="Console")
    client.ping_until_pong("Y")
    client.send("Y", "AsteriskAction", data={"Action": "Ping", "ActionID": "console-1"})
    status = client.wait_for("AsteriskActionStatus", "Y")
    assert status["x_data"][0]["Response"] == "Success"
    assert status["x_data"][0]["ActionID"] == "console-1"
    assert any('"Ping"' in r for r in y.control.requests())


@pytest.mark.parametrize("action, reason", [
    ({"Action": "Getvar", "Variable": "DEVICE_STATE(Custom:SIP/100)"}, "crashes Asterisk"),
    ({"Action": "Status"}, "crashes Asterisk"),
    ({"Action": "Setvar", "Variable": "X", "Value": "1\nAction: Originate"}, "control character"),
])
def test_actions_that_would_harm_asterisk_never_reach_it(standins, agents, hub, context,
                                                         action, reason):
    x, = standins(1)
    agents([x])
    client = HubClient(context, hub, name="Console")
    client.ping_until_pong("X")
    client.send("X", "AsteriskAction", data=action)
    status = client.wait_for("AsteriskActionStatus", "X")
    assert status["x_data"][0]["Response"] == "Error" and reason in status["x_data"][0]["Message"]
    own_actions = {"Ping", "DeviceStateList", "PresenceStateList"}  # keep-alives and resyncs
    assert {json.loads(r)["Action"] for r in x.control.requests()} <= own_actions
    assert x.control.state()["mode"] == "normal"


def test_originate_is_refused_unless_allowed(standins, agents, hub, context):
    x, = standins(1)
    agents([x])
    client = HubClient(context, hub, name="Console")
    client.ping_until_pong("X")
    client.send("X", "AsteriskAction", data={"Action": "Originate", "Channel": "SIP/100",
                                             "Application": "Wait", "Async": "true"})
    status = client.wait_for("AsteriskActionStatus", "X")
    assert status["x_data"] == [{"Response": "Error", "Message": "Refused by agent X: Originate "
                                 "is not allowed on this node (ALLOWED_ACTIONS)"}]
    assert not [r for r in x.control.requests() if "Originate" in r]


def test_an_allowed_originate_is_always_sent_async(standins, agents, hub, context):
    x, = standins(1)
    agents([x], ALLOWED_ACTIONS=["Ping", "Originate", "Getvar"])
    client = HubClient(context, hub, name="Console")
    client.ping_until_pong("X")
    client.send("X", "AsteriskAction", data={"Action": "Originate", "Channel": "SIP/100",
                                             "Application": "Wait", "Data": "2", "async": "no"})
    status = client.wait_for("AsteriskActionStatus", "X")
    assert status["x_data"][0]["Message"] == "Originate successfully queued"
    sent = [json.loads(r) for r in x.control.requests() if "Originate" in r]
    assert sent[0]["Async"] == "true" and "async" not in sent[0]
    # Listed or not, an action that crashes Asterisk through res_zmq_manager is refused.
    client.received.clear()
    client.send("X", "AsteriskAction", data={"Action": "Getvar", "Variable": "X"})
    assert "crashes Asterisk" in client.wait_for("AsteriskActionStatus", "X")["x_data"][0]["Message"]


def test_agent_ping_is_answered_and_keep_alive_reaches_asterisk_stats(standins, agents, hub,
                                                                      context):
    x, = standins(1)
    stats = HubClient(context, hub, name="stats", topics=["[AsteriskStats]"])
    agents([x], KEEP_ALIVE_INTERVAL=0.2)
    report = stats.wait_for("AsteriskActionStatus", "X")
    assert report["x_data"]["Action"] == "Ping" and report["x_data"]["Response"] == "Success"
    # The original's fields, and x_heartbeat, which an original agent ignores.
    assert set(report) == {"msg_type", "uuid", "origin", "x_data", "x_heartbeat"}
    wait_until(lambda: "Message AgentPing from X to [X]" in hub.script.output(),
               message="the agent's own AgentPing through the hub")


def test_agent_answers_ping_while_its_asterisk_is_down(tmp_path, hub, context):
    client = HubClient(context, hub, name="Console")
    dead = f"tcp://127.0.0.1:{__import__('harness').free_port()}"
    config = python_settings(tmp_path / "agent_dead.py", SYSTEM_NAME="Lonely",
                             ASTERISK_CMD_URL=dead, ASTERISK_EVT_URL=dead, ASTERISK_TIMEOUT=200,
                             KEEP_ALIVE_INTERVAL=0.3, ZMQ_PUB_URL=hub.pull_url,
                             ZMQ_SUB_URL=hub.pub_url, PID_FILE=str(tmp_path / "dead.pid"))
    script = Script("agent.py", str(config), log_dir=tmp_path)
    try:
        client.ping_until_pong("Lonely")
        script.wait_for_output("asterisk_ping unknown reply")
        client.received.clear()
        client.ping_until_pong("Lonely")
        assert len(script.lines("asterisk_ping unknown reply")) == 1
        assert len(script.lines("Did not receive REP from Asterisk")) == 1
    finally:
        script.kill()


def test_presence_between_agents_with_echo_suppressed(standins, agents, hub, context):
    x, y, z = standins(3)
    agents([x, y, z], PRESENCE=True)
    x.control.set_presence("CustomPresence:100", "dnd", "meeting", "In a meeting, back at 3")
    for other in (y, z):
        wait_until(lambda: other.control.presences().get("CustomPresence:100")
                   == ["dnd", "meeting", "In a meeting, back at 3"], message="presence on Y, Z")
    y.control.set_device("SIP/y", "INUSE")   # after Y's echo, on the same socket
    z.control.set_device("SIP/z", "INUSE")
    wait_until(lambda: {"Custom:SIP/y", "Custom:SIP/z"} <= set(x.control.devices()),
               message="markers on X")
    assert [s for s in setvars(x) if "PRESENCE" in s["Variable"]] == []


def test_reload_events_are_relayed_as_the_original_did(standins, agents, hub, context):
    x, = standins(1)
    agents([x])
    monitor = HubClient(context, hub, name="monitor", topics=["[*]"])
    x.control.publish_raw(b'{"Event":"Reload","Privilege":"system,all","Module":"res_pjsip.so",'
                          b'"Status":"2"}')
    event = monitor.wait_for("AsteriskEvent", "X")
    assert event["x_data"] == {"Event": "Reload", "Status": "2", "Module": "res_pjsip.so"}


HUB_GARBAGE = [
    [b"only one frame"], [b"[*]", b"{}", b"three"], [b"no brackets", b'{"msg_type": "AgentPing"}'],
    [b"[*]", b"not json"], [b"[*]", b"[1, 2]"], [b"[*]", b'{"msg_type": 5}'],
    [b"[*]", b"\xff\xfe"], [b"[*]", b"[" * 50000],
]
AGENT_GARBAGE = [
    {"msg_type": "AsteriskEvent", "uuid": "u1", "origin": "Evil", "x_data": "not a dict"},
    {"msg_type": "AsteriskEvent", "origin": "Evil", "x_data": {}},
    {"msg_type": "AsteriskEvent", "uuid": "u2\nAction: Originate", "origin": "Evil",
     "x_data": {"Event": "DeviceStateChange", "Device": "SIP/1", "State": "INUSE"}},
    {"msg_type": "AsteriskEvent", "uuid": "u3", "origin": "[Evil]", "x_data": {}},
    {"msg_type": "AsteriskEvent", "uuid": "u4", "origin": "Evil",
     "x_data": {"Event": "DeviceStateChange", "Device": "SIP/1\r\nAction: Originate",
                "State": "INUSE"}},
    {"msg_type": "AgentPing", "uuid": "u5", "origin": 42},
    {"msg_type": "AsteriskAction", "uuid": "u6", "origin": "Evil", "x_data": ["Ping"]},
    {"msg_type": "SomethingNew", "uuid": "u7", "origin": "Newer", "x_future": 1},
    {"msg_type": "AsteriskEvents", "uuid": "u8", "origin": "Evil", "x_events": {"not": "a list"}},
    {"msg_type": "AsteriskEvents", "uuid": "u9", "origin": "Evil", "x_events": [
        {"Event": "DeviceStateChange", "Device": "SIP/1\r\nAction: Originate", "State": "INUSE"}]},
]


def test_malformed_frames_and_envelopes_are_survived(standins, agents, hub, context):
    x, y = standins(2)
    scripts = agents([x, y])
    client = HubClient(context, hub, name="Evil")
    for frames in HUB_GARBAGE:
        client.send_frames(*frames)
    for body in AGENT_GARBAGE:
        client.send_frames(b"[*]", json.dumps(body).encode())
    # A barrier: each agent answers a ping sent after the garbage on the same connection, so
    # the hub and both agents have had all of it (the hub takes its senders' messages in
    # turn: another agent's may be relayed before the garbage, as on a busy machine it was).
    client.ping_until_pong("X")
    client.ping_until_pong("Y")
    x.control.set_device("SIP/500", "RINGING")
    wait_until(mirrored(y, "SIP/500", "RINGING"), message="a good event after the garbage")
    assert {s["Variable"] for s in setvars(y)} == {"DEVICE_STATE(Custom:SIP/500)"}
    assert all(script.proc.poll() is None for script in scripts + [hub.script])
    assert len(hub.script.lines("Dropped input from agents")) == 1
    assert hub.script.stop() == 0
    assert f"{len(HUB_GARBAGE)} dropped" in hub.script.lines("messages relayed")[-1]
    assert "Message SomethingNew from Newer" in hub.script.output()   # unknown types relayed
    for script in scripts:
        assert script.stop() == 0
        assert "Traceback" not in script.output()
        assert f"{len(AGENT_GARBAGE) - 1 - 1} dropped" in script.lines("hub messages")[-1]


def test_the_message_counter_is_logged_every_100_messages(standins, agents, hub, context):
    x, = standins(1)
    script, = agents([x])
    client = HubClient(context, hub, name="Chatty")
    for _ in range(100):
        client.send("*", "AgentPong")
    script.wait_for_output("Message counter: 100")


def test_pid_file_rules(standins, agents, hub, tmp_path):
    x, = standins(1)
    script, = agents([x])
    pid_file = tmp_path / "agent_X.pid"
    assert pid_file.read_text().strip() == str(script.proc.pid)
    second = run_script("agent.py", str(tmp_path / "agent_X.py"))
    assert second.returncode == 1
    assert second.stderr.strip() == f"{pid_file} already exists (agent running as pid " \
                                     f"{script.proc.pid}), exiting."
    assert script.stop() == 0
    assert not pid_file.exists()
    # A pid file left by a process that is gone is replaced, with a warning.
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    pid_file.write_text(gone + "\n")
    again = Script("agent.py", str(tmp_path / "agent_X.py"), log_dir=tmp_path, name="again")
    try:
        again.wait_for_output(f"names pid {gone}, which is not running: replacing it")
        again.wait_for_output("Connected to the hub")  # running, its signal handlers set
        wait_until(lambda: pid_file.read_text().strip() == str(again.proc.pid))
        assert again.stop(signal.SIGINT) == 0
        assert not pid_file.exists()
    finally:
        again.kill()


@pytest.mark.parametrize("script, settings, expected", [
    ("agent.py", "KEEP_ALIVE_INTERVAL = 'often'\n", "KEEP_ALIVE_INTERVAL: must be a number of"),
    ("agent.py", "KEEP_ALIVE_INTERVAL = 1e-6\n", "from 0.1 to 86400"),
    ("agent.py", "RESYNC_INTERVAL = 0.0001\n", "RESYNC_INTERVAL: must be a number of seconds"),
    ("agent.py", "ASTERISK_TIMEOUT = 0.5\n", "ASTERISK_TIMEOUT: must be a number of millisec"),
    ("agent.py", "ZMQ_PUB_URL = 'tcp://127.0.0.1'\n", "ZMQ_PUB_URL: 'tcp://127.0.0.1' has no port"),
    ("agent.py", "ZMQ_SUB_URL = ['tcp://hub two:4']\n", "'hub two' is not a host name"),
    ("agent.py", "ASTERISK_AMI_URL = 'tcp://127.0.0.1:None'\n", "has no port"),
    ("agent.py", "ASTERISK_CMD_URL = 'tcp://::1:1967'\n", "IPv6 address goes in brackets"),
    ("agent.py", "ASTERISK_EVT_URL = 'udp://127.0.0.1:1'\n", "must be a ZeroMQ address"),
    ("agent.py", "SYSTEM_NAME = '[Moscow]'\n", "SYSTEM_NAME: must be a name"),
    ("agent.py", "PRESENCE = 'yes'\n", "PRESENCE: must be True or False"),
    ("agent.py", "PACK_EVENTS = 1\n", "PACK_EVENTS: must be True, False or 'auto'"),
    ("agent.py", "LOG_LEVEL = 'loud'\n", "LOG_LEVEL: must be one of debug, info, warning, error"),
    ("agent.py", "ZMQ_PUB_URL = 5556\n", "ZMQ_PUB_URL: must be a ZeroMQ address"),
    ("agent.py", "SYSTEM_NAME = 'x\n", "line 1"),
    ("agent.py", "NATS_URLS = ['nats://127.0.0.1']\n", "NATS_URLS: 'nats://127.0.0.1' has no port"),
    ("agent.py", "NATS_URLS = 'tcp://127.0.0.1:4222'\n", "must be a NATS address such as"),
    ("agent.py", "NATS_URLS = ['nats://a:b@127.0.0.1:4222']\n", "give credentials in NATS_USER"),
    ("agent.py", "NATS_REPLICAS = 3.0\n", "NATS_REPLICAS: must be a whole number of replicas"),
    ("agent.py", "NATS_BUCKET = 'states.all'\n", "NATS_BUCKET: must be a bucket name"),
    ("agent.py", "NATS_SUBJECT_PREFIX = 'pbx.>'\n", "NATS_SUBJECT_PREFIX: must be a subject"),
    ("agent.py", "NATS_URLS = ['nats://127.0.0.1:4222']\nNATS_TLS_CERT = 'c.pem'\n",
     "NATS_TLS_KEY: needed too"),
    ("agent.py", "NATS_URLS = ['nats://127.0.0.1:4222']\nNATS_CREDS_FILE = '/nonexistent.creds'\n",
     "NATS_CREDS_FILE: cannot read /nonexistent.creds"),
    ("server.py", "PUB_BIND_URL = None\n", "PUB_BIND_URL: must be a ZeroMQ address"),
    ("server.py", "SUB_BIND_URL = 'tcp://127.0.0.1:0x'\n", "SUB_BIND_URL: 'tcp://127.0.0.1:0x' has no"),
    ("server.py", "SUB_BIND_URL = PUB_BIND_URL = 'tcp://127.0.0.1:55599'\n", "_BIND_URL: cannot bind"),
])
def test_settings_errors_print_one_line_and_exit_2(tmp_path, script, settings, expected):
    path = tmp_path / "settings.py"
    # (an agent's own pid file: not the checkout's, which a test running beside may hold)
    path.write_text(settings + f"PID_FILE = {str(tmp_path / 'agent.pid')!r}\n" *
                    (script == "agent.py"))
    result = run_script(script, str(path))
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and str(path) in result.stderr
    assert expected in result.stderr


@pytest.mark.parametrize("script, settings, expected", [
    ("agent.py", "CURVE_SECRET_KEY_FILE = '{tmp}/x.key_secret'\n",
     "CURVE_SERVER_KEY_FILE: needed too when CURVE is on"),
    ("agent.py", "CURVE_SERVER_KEY_FILE = '{tmp}/none.key'\n"
                 "CURVE_SECRET_KEY_FILE = '{tmp}/x.key_secret'\n",
     "CURVE_SERVER_KEY_FILE: cannot read a public key from"),
    ("agent.py", "NATS_URLS = ['nats://127.0.0.1:4222']\nNATS_TLS_KEY = 'k.pem'\n",
     "NATS_TLS_CERT: needed too"),
    ("agent.py", "NATS_URLS = ['nats://127.0.0.1:4222']\nNATS_TLS_CA = '{tmp}/none.pem'\n",
     "NATS_TLS_CA: cannot use"),
    ("server.py", "CURVE_CLIENTS_DIR = '{tmp}'\n", "CURVE_SECRET_KEY_FILE: needed too"),
    ("server.py", "CURVE_SECRET_KEY_FILE = '{tmp}/x.key_secret'\n"
                  "CURVE_CLIENTS_DIR = '{tmp}/none'\n", "CURVE_CLIENTS_DIR: must name the folder"),
])
def test_check_config_rejects_each_mistake_across_settings_as_a_start_does(
        tmp_path, script, settings, expected):
    """Settings that only make sense together, and the files they name: --check-config used
    to pass them as OK, and only a start failed."""
    zmq.auth.create_certificates(str(tmp_path), "x")  # x.key, x.key_secret: a good key pair
    (tmp_path / "x.key_secret").chmod(0o600)
    path = tmp_path / "settings.py"
    path.write_text(settings.format(tmp=tmp_path) +
                    f"PID_FILE = {str(tmp_path / 'agent.pid')!r}\n" * (script == "agent.py"))
    for args in (["--check-config", str(path)], [str(path)]):
        result = run_script(script, *args)
        assert result.returncode == 2 and expected in result.stderr, (args, result.stderr)
        assert all(line.startswith(f"{path}: ") for line in result.stderr.splitlines())


def test_default_settings_files_are_valid_and_on_loopback():
    from zmqami.agent_settings import AGENT_SETTINGS
    from zmqami.config import load_settings
    from zmqami.hub import HUB_SETTINGS
    for name, schema in (("agent_config.py", AGENT_SETTINGS), ("server_config.py", HUB_SETTINGS)):
        settings = load_settings(str(ROOT / name), schema)  # (an unknown name: an error)
        # The file shows plain AMI as the first choice; the defaults keep the original's way.
        assert all(value == schema[key].default for key, value in settings.items()
                   if key not in ("ASTERISK_AMI_USER", "ASTERISK_AMI_SECRET")), name
        assert all("127.0.0.1" in value for value in settings.values()
                   if isinstance(value, str) and "://" in value)


def test_sigterm_stops_hub_and_agent_with_status_0(standins, agents, hub, tmp_path):
    x, = standins(1)
    script, = agents([x])
    assert (tmp_path / "agent_X.pid").exists()
    assert script.stop() == 0 and hub.script.stop() == 0
    assert "Exiting." in script.output() and "ESB - exit." in hub.script.output()
    assert not (tmp_path / "agent_X.pid").exists()
