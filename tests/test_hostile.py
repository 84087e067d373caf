"""What a hostile review did to harm Asterisk or stop the programs, each done again end to end."""
import json
import re
import signal
import socket
import time
from types import SimpleNamespace

import pytest
import zmq

from harness import (AMI_SECRET, AMI_USER, HubClient, Script, broker_config, custom_states,
                     flood_until_packed, free_port, presence_event, python_settings, run_script,
                     start_agent, subscribed, wait_until)
from zmqami.ami import format_action

OWN_ACTIONS = {"ping", "devicestatelist", "presencestatelist"}  # keep-alives and resyncs
EMOJI = "\U0001f600"  # 4 bytes in UTF-8


def actions_run(standin) -> set:
    """The actions a stand-in ran, as Asterisk picked them (the first Action header, any case)."""
    return set(standin.control.state()["actions_run"])


def assert_alive(*servers) -> None:
    for server in servers:
        assert server.control.state()["crashes"] == []


# --- 1. the allow-list, checked on the Action header Asterisk will run -----------------------------

BYPASSES = [
    {"action": "ModuleLoad", "Action": "Ping", "LoadType": "unload", "Module": "chan_sip.so"},
    {"Action": "Ping", "ACTION": "Hangup", "Channel": "/.*/"},
    {"Action": "Ping", "aCtIoN": "Originate", "Channel": "SIP/100", "Exten": "100",
     "Context": "default", "Priority": "1"},
    {"Action": "Ping", "Async": "true", "async": "false"},
]


@pytest.mark.parametrize("over_ami", [True, False], ids=["AMI", "res_zmq_manager"])
def test_an_action_hidden_behind_a_second_action_header_never_runs(standins, agents, hub,
                                                                    context, over_ami):
    x, = standins(1, ami_port=0)
    agents([x], ami=(0,) if over_ami else ())
    client = HubClient(context, hub, name="Attacker")
    client.ping_until_pong("X")
    for action in BYPASSES:
        client.received.clear()
        client.send("X", "AsteriskAction", data=action)
        status = client.wait_for("AsteriskActionStatus", "X")["x_data"][0]
        assert status["Response"] == "Error" and "one header to Asterisk" in status["Message"]
    # An ActionID of any case is the caller's: the agent's own replaces it, and it comes back.
    client.received.clear()
    client.send("X", "AsteriskAction", data={"Action": "Ping", "actionid": "mine"})
    status = client.wait_for("AsteriskActionStatus", "X")["x_data"][0]
    assert status["Response"] == "Success" and status["ActionID"] == "mine"
    assert actions_run(x) <= OWN_ACTIONS
    assert_alive(x)


def test_the_stand_in_runs_the_first_action_header_as_asterisk_does(standins, context):
    """So that the tests above would see the bypass if it came back."""
    x, = standins(1, ami_port=0)
    with socket.create_connection(("127.0.0.1", x.ami_port)) as conn:
        login = format_action({"Action": "Login", "Username": AMI_USER, "Secret": AMI_SECRET,
                               "Events": "off"})
        conn.sendall(login + b"action: CoreStatus\r\nAction: Ping\r\n\r\n")
        wait_until(lambda: "corestatus" in actions_run(x), message="CoreStatus to run")
    assert "ping" not in actions_run(x)


# --- 2. nothing sent may overflow res_zmq_manager -------------------------------------------------

def module_requests_fit(standin) -> None:
    """Every request the module stand-in received fits within half of the module's buffers."""
    for raw in standin.control.requests():
        request = json.loads(raw)
        for key, value in request.items():
            assert len(f"{key}: {value}".encode("utf-8")) <= 1024, key
        assert sum(len(f"{k}: {v}\r\n".encode()) for k, v in request.items()) <= 5120


def test_an_action_too_large_for_the_module_is_refused_not_sent(standins, agents, hub, context):
    x, = standins(1)
    agents([x])
    client = HubClient(context, hub, name="Console")
    client.ping_until_pong("X")
    # Within the general limits (4000 bytes a value), far beyond what the module can take.
    client.send("X", "AsteriskAction", data={"Action": "Ping", "A": EMOJI * 990,
                                              "B": EMOJI * 990})
    status = client.wait_for("AsteriskActionStatus", "X")["x_data"][0]
    assert status["Response"] == "Error" and "res_zmq_manager" in status["Message"]
    module_requests_fit(x)
    assert_alive(x)


def list_reads(standin) -> int:
    return standin.control.state()["actions_run"].get("presencestatelist", 0)


def anti_entropy_rounds(servers, rounds: int = 3) -> None:
    """Wait until each server's presences were read rounds more times."""
    reads = [list_reads(server) for server in servers]
    for server, before in zip(servers, reads):
        wait_until(lambda: list_reads(server) >= before + rounds, message="anti-entropy rounds")


def test_an_agent_never_mirrors_a_presence_too_large_for_its_module(standins, agents, hub,
                                                                     context):
    x, y = standins(2)
    scripts = agents([x, y], PRESENCE=True, RESYNC_INTERVAL=0.3)
    client = HubClient(context, hub, name="Peer", topics=["[Peer]", "[*]"])
    client.send("*", "AsteriskEvent", data=presence_event("CustomPresence:7", "away", message="lunch"))
    for standin in (x, y):
        wait_until(lambda: standin.control.presences().get("CustomPresence:7") ==
                   ["away", "", "lunch"])
    # A comma: base64, x4/3.  Within the general limit (4000 bytes), far beyond the module's.
    long_message = "lunch, " + EMOJI * 900
    client.send("*", "AsteriskEvent", data=presence_event("CustomPresence:7", "dnd",
                                                          message=long_message))
    for script in scripts:
        script.wait_for_output("Not writing PRESENCE_STATE(CustomPresence:7) on Asterisk")
    client.received.clear()
    # The value that could not be mirrored starts no repair loop: the stale one on the agents'
    # Asterisk servers is not taken for a change and sent to everyone.
    anti_entropy_rounds([x, y])
    client.poll()
    sent_by_agents = [body for _, body in client.received if body["origin"] in ("X", "Y")]
    assert sent_by_agents and "CustomPresence:7" not in json.dumps(sent_by_agents)
    for standin, script in zip((x, y), scripts):
        assert standin.control.presences()["CustomPresence:7"] == ["away", "", "lunch"]
        assert len(script.lines("Not writing")) == 1
        module_requests_fit(standin)
        assert_alive(standin)


def test_a_broker_relays_a_long_presence_to_ami_servers_only(standins, broker):
    a, b, c = standins(3, ami_port=0)
    script = broker([a, b, c], ami=(0, 1), presence="yes", resync_interval="0.3")
    a.control.set_presence("CustomPresence:9", "away", "", "lunch")
    for standin in (b, c):
        wait_until(lambda: standin.control.presences().get("CustomPresence:9") ==
                   ["away", "", "lunch"])
    long_message = "back at 2, " + "x" * 3000   # fine over AMI, too long for the module
    a.control.set_presence("CustomPresence:9", "dnd", "", long_message)
    wait_until(lambda: b.control.presences().get("CustomPresence:9") ==
               ["dnd", "", long_message])
    script.wait_for_output("Not writing PRESENCE_STATE(CustomPresence:9) on server-3")
    anti_entropy_rounds([a, b, c])
    # C's stale presence was not taken for a change and relayed back.
    for standin in (a, b):
        assert standin.control.presences()["CustomPresence:9"] == ["dnd", "", long_message]
    assert c.control.presences()["CustomPresence:9"] == ["away", "", "lunch"]
    assert len(script.lines("Not writing")) == 1
    module_requests_fit(c)
    assert_alive(a, b, c)


# --- 3. every res_zmq_manager server is warned about, once, at start --------------------------------

def test_each_res_zmq_manager_server_is_warned_about_once(standins, broker, agents):
    a, b = standins(2, ami_port=0)
    script = broker([a, b], ami=(1,))
    warning = "is reached through res_zmq_manager, which crashes Asterisk 15+"
    script.wait_for_output("server-1 " + warning)
    a.control.set_device("SIP/1", "INUSE")
    wait_until(lambda: custom_states(b).get("Custom:SIP/1") == "INUSE")
    assert len(script.lines(warning)) == 1 and "res_zmq_manager on Asterisk 15+" in \
        script.lines(warning)[0]
    module_agent, ami_agent = agents([a, b], ami=(1,))
    module_agent.wait_for_output("Asterisk " + warning)
    assert not ami_agent.lines(warning)


# --- 4. nothing read from the status socket can end a program -----------------------------------

def hostile_status_requests(context, address: str) -> None:
    """Requests no --status sends: several frames, an empty one, oversized, a peer that leaves."""
    for frames in ([b"", b"status", b"more"], [b"", b""], [b"", b"x" * 5000],
                   [b"", b"a", b"b", b"c"]):
        dealer = context.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(address)
        dealer.send_multipart(frames)
        if len(frames[-1]) < 1000:  # larger than the socket takes: the peer is dropped instead
            assert dealer.poll(10_000), f"no answer to {frames!r}"
            assert b'"program"' in dealer.recv_multipart()[-1]
        dealer.close()


def test_hostile_status_requests_are_answered_and_end_nothing(standins, agents, hub, broker,
                                                               context, tmp_path):
    x, y = standins(2)
    agent_status = f"ipc://{tmp_path}/agent.status"
    broker_status = f"ipc://{tmp_path}/broker.status"
    agent, = agents([x], STATUS_SOCKET=agent_status)
    broker_script = broker([x, y], status_socket=broker_status)
    hub_config = tmp_path / "hub_status.py"
    hub_config.write_text((tmp_path / "server_config.py").read_text()
                          .replace(hub.pull_url, f"tcp://127.0.0.1:{free_port()}")
                          .replace(hub.pub_url, f"tcp://127.0.0.1:{free_port()}") +
                          f"STATUS_SOCKET = 'ipc://{tmp_path}/hub.status'\n")
    hub_script = Script("server.py", str(hub_config), log_dir=tmp_path, name="hub_status")
    hub_script.wait_for_output("Started")
    for address in (agent_status, broker_status, f"ipc://{tmp_path}/hub.status"):
        hostile_status_requests(context, address)
    for script, config in ((agent, tmp_path / "agent_X.py"), (hub_script, hub_config),
                           (broker_script, tmp_path / "config0.ini")):
        assert script.proc.poll() is None, script.output()
        assert run_script(script.script, "--status", str(config)).returncode == 0
        assert "Traceback" not in script.output()


# --- 5. addresses and intervals checked at load, IPv6 that works --------------------------------

BROKER_MISTAKES = [
    ("addr = 127.0.0.1", "addr = pbx 3.example.com", "[server-1] addr: 'pbx 3.example.com' is not"),
    ("addr = 127.0.0.1", "addr = 127.0.0.1:5000", "[server-1] addr: '127.0.0.1:5000' is not an IP"),
    ("addr = 127.0.0.1", "addr = -bad-.example", "[server-1] addr: '-bad-.example' is not"),
    ("sections = server-1, server-2", "sections = ,", "[servers] sections: names no server"),
    ("[general]", "[general]\nresync_interval = 1e-6", "[general] resync_interval: 1e-6 is not 0"),
    ("[general]", "[general]\nping_interval = 0.001", "[general] ping_interval: 0.001 is not"),
    ("[general]", "[general]\nstatus_socket = tcp://127.0.0.1", "[general] status_socket:"),
]


def two_servers(tmp_path, standins, *change):
    a, b = standins(2)
    text = broker_config([a, b])
    text = text.replace(f"cmd_port = {b.cmd_port}", f"cmd_port = {a.cmd_port}").replace(
        f"evt_port = {b.evt_port}", f"evt_port = {a.evt_port}") if not change else \
        text.replace(change[0], change[1], 1)
    path = tmp_path / "mistake.ini"
    path.write_text(text)
    return path


@pytest.mark.parametrize("mistake", BROKER_MISTAKES + [None], ids=lambda m: m and m[1])
def test_check_config_rejects_what_a_start_rejects(tmp_path, standins, mistake):
    if mistake is None:  # two sections for one server
        path, expected = two_servers(tmp_path, standins), "[server-2] addr: the same server as"
    else:
        path, expected = two_servers(tmp_path, standins, *mistake[:2]), mistake[2]
    for args in (["--check-config", str(path)], [str(path)]):
        result = run_script("broker.py", *args)
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
        assert f"{path}: {expected}" in result.stderr and "Traceback" not in result.stderr


def test_a_reload_with_a_bad_address_is_refused_and_the_broker_runs_on(standins, broker,
                                                                        tmp_path):
    a, b = standins(2)
    script = broker([a, b])
    config = tmp_path / "config0.ini"
    config.write_text(config.read_text().replace("addr = 127.0.0.1", "addr = pbx 3.example.com",
                                                 1))
    script.proc.send_signal(signal.SIGHUP)
    script.wait_for_output("Reload failed, running on as before")
    a.control.set_device("SIP/1", "INUSE")
    wait_until(lambda: custom_states(b).get("Custom:SIP/1") == "INUSE")
    assert script.proc.poll() is None and "Traceback" not in script.output()


def test_ipv6_end_to_end_on_the_loopback(standins, tmp_path, context):
    """The broker, the hub and the agents on ::1, res_zmq_manager and AMI alike."""
    a, b, c = standins(3, host="::1", ami_port=0)
    config = tmp_path / "ipv6.ini"
    config.write_text(broker_config([a, b, c], ami=(2,)).replace("addr = 127.0.0.1", "addr = ::1"))
    broker_script = Script("broker.py", str(config), log_dir=tmp_path, name="broker6")
    wait_until(lambda: subscribed(a) and subscribed(b)
               and c.control.state()["ami_sessions"], message="the broker to reach ::1")
    a.control.set_device("SIP/6", "RINGING")
    for standin in (b, c):
        wait_until(lambda: custom_states(standin).get("Custom:SIP/6") == "RINGING")
    broker_script.kill()

    hub_urls = dict(PUB_BIND_URL=f"tcp://[::1]:{free_port('::1')}",
                    SUB_BIND_URL=f"tcp://[::1]:{free_port('::1')}")
    hub = Script("server.py", str(python_settings(tmp_path / "hub6.py", **hub_urls)),
                 log_dir=tmp_path, name="hub6")
    hub.wait_for_output("Started")
    for name, standin in (("X", a), ("Y", b)):
        start_agent(tmp_path, name, standin, host="::1", ZMQ_PUB_URL=hub_urls["SUB_BIND_URL"],
                    ZMQ_SUB_URL=hub_urls["PUB_BIND_URL"])
    context.setsockopt(zmq.IPV6, 1)
    client = HubClient(context, SimpleNamespace(pull_url=hub_urls["SUB_BIND_URL"],
                                                pub_url=hub_urls["PUB_BIND_URL"]), name="Six")
    for name in ("X", "Y"):
        client.ping_until_pong(name)
    b.control.set_device("SIP/7", "BUSY")
    wait_until(lambda: custom_states(a).get("Custom:SIP/7") == "BUSY",
               message="a state from Y to X through the hub on ::1")
    client.close()


# --- 6. a flood from one hub client cannot exhaust an agent ---------------------------------------

def test_a_flood_of_devices_and_origins_is_bounded(standins, agents, hub, context):
    x, = standins(1)
    script, = agents([x], MAX_PEERS=20, MAX_DEVICES_PER_PEER=50)
    client = HubClient(context, hub, name="Flooder")
    client.ping_until_pong("X")
    # Distinct devices from one origin, then heartbeats from many; in batches smaller than the
    # hub's send queue to one agent (1000 messages), each handled before the next is sent: a PUB
    # drops what a subscriber busy beyond its queue has not taken, and on a busy machine a
    # flood of 4000 at once lost hundreds on the way (not counted as dropped by the agent).
    messages = [dict(data={"Event": "DeviceStateChange", "Device": f"SIP/{i}", "State": "INUSE"},
                     msg_type="AsteriskEvent") for i in range(2000)]
    messages += [dict(origin=f"p{i}", heartbeat="30", asterisk="up", msg_type="AgentHeartbeat")
                 for i in range(2000)]
    messages += [dict(origin="Last", heartbeat="30", asterisk="up", msg_type="AgentHeartbeat")]
    for batch, start in enumerate(range(0, len(messages), 250)):
        for message in messages[start:start + 250]:
            client.send("*", **message)
        # Then a change of a device it mirrors: once X shows it, X has handled all before it.
        # (An AgentPong cannot tell: it may answer an earlier ping, and X stopped too early.)
        marker = ("BUSY", "RINGING")[batch % 2]
        client.send("*", "AsteriskEvent", data={"Event": "DeviceStateChange",
                                                "Device": "SIP/0", "State": marker})
        wait_until(lambda: custom_states(x).get("Custom:SIP/0") == marker,
                   message=f"batch {batch} handled")
    wait_until(lambda: len(custom_states(x)) == 50, message="the first 50 devices mirrored")
    assert len(script.lines("Peer p")) == 20 and not script.lines("Peer Last is up")
    # One warning a minute for all that, every drop counted.
    assert len(script.lines("Dropped input from")) == 1
    assert "more than 50 states of one source" in script.output()
    assert script.stop() == 0
    dropped = int(script.lines("Received SIGTERM")[0].split(", ")[1].split()[0])
    assert dropped == (2000 - 50) + (2001 - 20)


# --- 8. a new agent must not crash an original hub ------------------------------------------------

def test_every_message_of_a_new_agent_survives_the_original_hub(standins, tmp_path, context):
    pull, pub = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    hub = Script("tests/original_hub.py", pull, pub, log_dir=tmp_path, name="original_hub")
    hub.wait_for_output("Started")
    (x,), (y,) = standins(1, voicemail="voicemail"), standins(1, voicemail="external")
    urls = dict(ZMQ_PUB_URL=pull, ZMQ_SUB_URL=pub)
    for name, standin, lamps in (("X", x, "none"), ("Y", y, "external")):
        start_agent(tmp_path, name, standin, PRESENCE=True, KEEP_ALIVE_INTERVAL=0.3,
                    RESYNC_INTERVAL=0.3, MWI=True, MWI_WRITE=lamps, PACK_EVENTS=True, **urls)
    client = HubClient(context, SimpleNamespace(pull_url=pull, pub_url=pub), name="Console")
    client.ping_until_pong("X")
    client.ping_until_pong("Y")
    x.control.set_device("SIP/1", "INUSE")
    x.control.set_presence("CustomPresence:1", "away", "", "lunch")
    x.control.publish_raw(json.dumps({"Event": "Reload", "Module": "x", "Status": "0"}).encode())
    client.send("X", "AsteriskAction", data={"Action": "Ping"})
    client.send("X", "AsteriskAction", data={"Action": "Originate"})  # refused: an error answer
    x.control.set_mailbox("100@default", 1, 0)  # a voicemail lamp (MessageWaiting)
    wait_until(lambda: custom_states(y).get("Custom:SIP/1") == "INUSE")
    wait_until(lambda: y.control.mailboxes().get("100@default") == [1, 0])
    monitor = HubClient(context, SimpleNamespace(pull_url=pull, pub_url=pub), name="monitor",
                        topics=["[*]"])
    flood_until_packed(x, y, monitor, "X")
    x.control.set_mode("hung")  # the next AsteriskAction is answered with null
    client.send("X", "AsteriskAction", data={"Action": "Ping"})
    for msg_type in ("AgentPing", "AgentPong", "AgentHeartbeat", "AgentStateRequest",
                     "AgentStates", "AsteriskEvent", "AsteriskEvents", "AsteriskAction",
                     "AsteriskActionStatus"):
        hub.wait_for_output(f"relayed {msg_type}")
    wait_until(lambda: [m for m in client.find("AsteriskActionStatus", "X") if m["x_data"] is None],
               message="an AsteriskActionStatus with null data")
    assert hub.proc.poll() is None, hub.output()


# --- 7. two agents with one SYSTEM_NAME -------------------------------------------------------------

def test_two_agents_with_one_system_name_are_told_about_it(standins, hub, tmp_path):
    x, y = standins(2)
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    first = start_agent(tmp_path / "one", "Moscow", x, ZMQ_PUB_URL=hub.pull_url,
                        ZMQ_SUB_URL=hub.pub_url, KEEP_ALIVE_INTERVAL=0.2,
                        STATUS_SOCKET=f"ipc://{tmp_path}/one.status")
    second = start_agent(tmp_path / "two", "Moscow", y, ZMQ_PUB_URL=hub.pull_url,
                         ZMQ_SUB_URL=hub.pub_url, KEEP_ALIVE_INTERVAL=0.2)
    for script in (first, second):
        script.wait_for_output("Another agent also calls itself Moscow")
    status = lambda: run_script("agent.py", "--status",  # noqa: E731
                                str(tmp_path / "one" / "agent_Moscow.py")).stdout
    wait_until(lambda: re.search(r"messages from another agent with my name: [1-9]", status()),
               message="the status to show the clash")
    assert len(first.lines("Another agent also calls itself")) == 1  # once a minute


def test_a_presence_stamped_in_the_future_neither_wins_for_ever_nor_stops_an_agent(
        standins, agents, hub, context):
    x, = standins(1)
    script, = agents([x], PRESENCE=True, RESYNC_INTERVAL=0.3)
    client = HubClient(context, hub, name="Skewed", topics=["[Skewed]", "[*]"])
    for stamp in ("nan", "-5", 10 ** 400, str(time.time() + 600)):  # last: a clock 10 min ahead
        client.send("*", "AsteriskEvent", data={
            "Event": "PresenceStateChange", "Presentity": "CustomPresence:1", "Status": "away",
            "Subtype": "", "Message": "lunch", "ChangedAt": stamp})
    wait_until(lambda: x.control.presences().get("CustomPresence:1") == ["away", "", "lunch"])
    # The user changes it on X, and only anti-entropy can see it: it wins, the agent goes on.
    x.control.set_presence("CustomPresence:1", "available", publish=False)
    wait_until(lambda: [body for body in client.find("AgentStates", "X")
                        if "available" in json.dumps(body["x_events"])],
               message="X's own change sent to the peers")
    assert script.proc.poll() is None and "Traceback" not in script.output()
