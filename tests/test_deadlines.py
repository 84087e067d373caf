"""Nothing waits for ever: every stage of a connection has a deadline, a down server's queue holds
only the states it must get, the state file is checked like input, and no list read overflows
res_zmq_manager's buffers."""
import json
import time

import pytest

from harness import mirrored, restart, wait_until
from zmqami.status import fetch_status

# How a server on the manager port misbehaves (the stand-in's AMI_FAULTS), or "hung": it stops
# answering anything, the Login of each new connection included.
FAULTS = ["banner", "silent", "no_actionid", "hung"]


def misbehave(server, fault):
    """The server misbehaves from now on; returns how many connections it had been offered."""
    before = server.control.state()["ami_connections"]
    if fault == "hung":
        server.control.set_mode("hung")  # the session open now stops answering too
    else:
        server.control.ami_fault(fault)  # the session open now is closed: a new one is made
    return before


def heal(server, fault):
    if fault == "hung":
        server.control.set_mode("normal")
    else:
        server.control.ami_fault(None, keep=True)


def reconnected(server, before):
    """The relay made a new connection since the fault: one that misbehaves (a fault applies to
    the connections accepted while it is set; a hung server ignores the Login sent on it)."""
    return lambda: server.control.state()["ami_connections"] > before


@pytest.mark.parametrize("fault", FAULTS)
def test_a_misbehaving_ami_server_is_mirrored_again_by_the_broker_and_an_agent(
        standins, broker, agents, fault):
    # Two pairs of servers, one relayed by the broker, one by two agents: the same fault at once.
    to_broker, from_broker, to_agent, from_agent = standins(4, ami_port=0)
    scripts = {"broker": broker([to_broker, from_broker], ami=(0,), ping_interval="0.5",
                                server_timeout="2"),
               "agent": agents([to_agent, from_agent], ami=(0,), KEEP_ALIVE_INTERVAL=0.5,
                               ASTERISK_TIMEOUT=1000)[0]}
    pairs = {"broker": (to_broker, from_broker), "agent": (to_agent, from_agent)}
    for target, source in pairs.values():
        source.control.set_device("SIP/1", "INUSE")
        wait_until(mirrored(target, "SIP/1", "INUSE"))
    before = {relay: misbehave(target, fault) for relay, (target, _) in pairs.items()}
    for relay, (target, source) in pairs.items():
        source.control.set_device("SIP/1", "BUSY")
        wait_until(reconnected(target, before[relay]),
                   message=f"a connection that misbehaves ({relay}, {fault})")
    for target, _ in pairs.values():
        heal(target, fault)
    healthy = time.monotonic()
    for relay, (target, _) in pairs.items():
        wait_until(mirrored(target, "SIP/1", "BUSY"), message=f"{relay}: the server mirrored again")
        print(f"converged: {relay}, AMI server back after '{fault}': mirrored "
              f"{time.monotonic() - healthy:.2f} s after healthy")  # (pytest -s; not asserted)
    for script in scripts.values():
        assert script.proc.poll() is None
        if fault == "banner":  # the other service's greeting is shown, the secret never sent
            assert script.lines("not Asterisk's manager interface: its first line is 'SSH-2.0-")


def test_a_down_servers_queue_holds_one_state_per_variable_and_no_health_checks(
        standins, broker, processes, tmp_path):
    a = processes("a", ami_port=0)
    b, = standins(1)
    address = f"ipc://{tmp_path}/broker.status"
    broker([a, b], ami=(0,), ping_interval="0.2", server_timeout="1", status_socket=address)

    def server(name):
        return next(s for s in fetch_status(address)["servers"] if s["name"] == name)
    wait_until(lambda: server("server-1")["up"] is True)
    a.kill()
    wait_until(lambda: server("server-1")["up"] is False, message="server-1 seen down")
    pings = server("server-2")["actions_sent"].get("ping", 0)
    # Ten health checks later (each one a Ping queued for server-1 before): nothing waits.
    wait_until(lambda: server("server-2")["actions_sent"].get("ping", 0) >= pings + 10)
    assert server("server-1")["queued"] == 0
    events = server("server-2")["events"]
    for device, state in (("SIP/1", "INUSE"), ("SIP/2", "INUSE"), ("SIP/1", "BUSY"),
                          ("SIP/3", "RINGING"), ("SIP/2", "NOT_INUSE")):
        b.control.set_device(device, state)
    wait_until(lambda: server("server-2")["events"] >= events + 5)
    assert server("server-1")["queued"] == 3  # three devices changed, each once in the queue
    a = restart(processes, a, "a")
    for device, state in (("SIP/1", "BUSY"), ("SIP/2", "NOT_INUSE"), ("SIP/3", "RINGING")):
        wait_until(mirrored(a, device, state), message=f"{device} on the server back")
    wait_until(lambda: server("server-1")["queued"] == 0)


# --- the state file ---------------------------------------------------------------------------------

LUNCH = ["away", "", "lunch"]


def state_file_with(path, presences):
    path.write_text(json.dumps({"version": 1, "presences": presences}))
    return path


def test_a_state_file_stamped_a_day_ahead_loses_to_a_later_change(standins, broker, tmp_path):
    a, b = standins(2)
    for server in (a, b):
        server.control.set_presence("CustomPresence:5", *LUNCH)
    state_file = state_file_with(tmp_path / "broker.state", {
        "PRESENCE_STATE(CustomPresence:5)": ["away,,lunch", "server-1", time.time() + 86400]})
    script = broker([a, b], presence="yes", state_file=str(state_file))
    for server in (a, b):  # both read: the start is over
        wait_until(lambda: server.control.state()["actions_run"].get("presencestatelist"))
    b.control.set_presence("CustomPresence:5", "available")  # a real change, after the file's
    wait_until(lambda: a.control.presences()["CustomPresence:5"] == ["available", "", ""],
               message="the change on B written on A")
    assert len(script.lines("ahead of this machine's clock")) == 1


def test_a_state_file_entry_that_asterisk_could_not_send_is_skipped(standins, broker, tmp_path):
    a, b = standins(2)
    injected = "PRESENCE_STATE(CustomPresence:5\r\nAction: Originate\r\nChannel: Local/1)"
    state_file = state_file_with(tmp_path / "broker.state", {
        injected: ["away,,lunch", "server-1", time.time()],
        "PRESENCE_STATE(CustomPresence:6)": ["away,,lunch", "server-1", time.time()]})
    script = broker([a, b], presence="yes", state_file=str(state_file), resync_interval="0.3")
    script.wait_for_output("1 saved presences (1 skipped, such as: Presentity")
    for server in (a, b):  # read twice: what the file holds was compared with both
        wait_until(lambda: server.control.state()["actions_run"].get("presencestatelist", 0) >= 2)
    a.control.set_presence("CustomPresence:7", "dnd")
    wait_until(lambda: b.control.presences().get("CustomPresence:7") == ["dnd", "", ""])
    for server in (a, b):
        assert not [r for r in server.control.requests() if "Originate" in r]


def test_a_state_file_larger_than_its_entries_could_need_is_not_read(standins, broker, tmp_path):
    a, b = standins(2)
    entry = ["away,,lunch", "server-1", time.time()]
    state_file = state_file_with(tmp_path / "broker.state", {
        f"PRESENCE_STATE(CustomPresence:{i})": entry for i in range(20_000)})  # about 1 MB
    script = broker([a, b], presence="yes", state_file=str(state_file), max_devices="5")
    script.wait_for_output("cannot use the saved states (")
    assert "more than 10 presences could take" in script.output()
    a.control.set_presence("CustomPresence:1", "dnd")
    wait_until(lambda: b.control.presences().get("CustomPresence:1") == ["dnd", "", ""])


# --- res_zmq_manager's reply-line buffer ------------------------------------------------------------

def test_a_module_server_holding_a_long_presence_is_not_asked_for_its_list(standins, broker):
    s1, s2 = standins(2)
    ami, = standins(1, ami_port=0)
    script = broker([s1, s2, ami], ami=(2,), presence="yes")

    def reads(action):
        return s1.control.state()["actions_run"].get(action, 0)
    wait_until(lambda: reads("presencestatelist"))
    # About 4 KB: its event line fits the module's 4096-byte event buffer; a list reply holding
    # it would overflow the 2048-byte reply-line buffer and kill Asterisk.
    long_message = "x" * 3990
    s1.control.set_presence("CustomPresence:9", "away", "", long_message)
    wait_until(lambda: ami.control.presences().get("CustomPresence:9") ==
               ["away", "", long_message], message="the long presence on the AMI server")
    presence_reads, device_reads = reads("presencestatelist"), reads("devicestatelist")
    s1.control.boot()  # a restart: the broker reads its lists again
    wait_until(lambda: reads("devicestatelist") > device_reads, message="its devices read")
    script.wait_for_output("Not reading the PresenceStateList of server-1")
    state = s1.control.state()
    assert state["crashes"] == [] and state["mode"] == "normal"
    assert reads("presencestatelist") == presence_reads
    s1.control.set_presence("CustomPresence:9", "available")  # short again: read again
    wait_until(lambda: reads("presencestatelist") > presence_reads,
               message="its presences read once none is too long")
    assert s1.control.state()["crashes"] == []
