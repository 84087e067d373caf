"""The right final state, always: each scenario in which every server could agree on a wrong state,
repeated many times end to end."""
import json
import signal
from collections import Counter

import pytest

from harness import (HubClient, broker_config, custom_states, restart, start_agent, subscribed,
                     wait_until)
from zmqami.rules import aggregate_device_states

TRIALS = 20
# A user changes a presence four times quickly on one server.
SEQUENCE = [("away", "", "lunch"), ("dnd", "", "meeting"), ("available", "", ""),
            ("away", "", "back at 2")]


def presences(standin):
    return {name: tuple(value) for name, value in standin.control.presences().items()}


def settle(source, servers) -> None:
    """A last change on source, seen everywhere: the echoes of every write before it are in."""
    for round_ in ("available", "away"):
        source.control.set_presence("CustomPresence:sentinel", round_)
        for server in servers:
            wait_until(lambda: presences(server).get("CustomPresence:sentinel") ==
                       (round_, "", ""), message="the sentinel everywhere")


def play_sequences(source, servers) -> dict:
    """TRIALS presentities, each changed through SEQUENCE on source; the user's last values."""
    for trial in range(TRIALS):
        for status, subtype, message in SEQUENCE:
            source.control.set_presence(f"CustomPresence:t{trial}", status, subtype, message)
    return {f"CustomPresence:t{trial}": SEQUENCE[-1] for trial in range(TRIALS)}


def assert_everywhere(servers, expected) -> None:
    for server in servers:
        wait_until(lambda: all(presences(server).get(name) == value
                               for name, value in expected.items()),
                   message="the user's last presence on every server")
    settle(servers[0], servers)
    for server in servers:  # and still so once every echo has come back
        shown = presences(server)
        assert {name: shown.get(name) for name in expected} == expected


def slow_servers(standins, count):
    """Servers that answer each action 20 ms late, over res_zmq_manager and AMI alike (over AMI
    the response comes before the events the action caused, so a second write can be sent before
    the first one's echo is back)."""
    servers = standins(count, ami_port=0)
    for server in servers:
        server.control.set_mode("slow", delay_ms=20)
    return servers


@pytest.mark.parametrize("ami", [(), (0, 1, 2), (1,)], ids=["module", "AMI", "mixed"])
def test_quick_presence_changes_end_on_the_last_value_through_the_broker(standins, broker, ami):
    servers = slow_servers(standins, 3)
    broker(servers, ami=ami, presence="yes")
    assert_everywhere(servers, play_sequences(servers[0], servers))


@pytest.mark.parametrize("ami", [(), (0, 1, 2)], ids=["module", "AMI"])
def test_quick_presence_changes_end_on_the_last_value_through_agents(standins, agents, ami):
    servers = slow_servers(standins, 3)
    agents(servers, ami=ami, PRESENCE=True)
    assert_everywhere(servers, play_sequences(servers[0], servers))


def test_a_server_removed_by_a_reload_leaves_no_frozen_phones(standins, broker, tmp_path):
    a, b, s3 = standins(3)
    script = broker([a, b, s3], resync_interval="0.3")
    s3.control.set_device("SIP/300", "INUSE")
    for server in (a, b):
        wait_until(lambda: custom_states(server).get("Custom:SIP/300") == "INUSE")
    config = tmp_path / "config0.ini"
    config.write_text(broker_config([a, b], resync_interval="0.3"))
    script.proc.send_signal(signal.SIGHUP)
    script.wait_for_output("0 added, 1 removed")
    s3.control.set_device("SIP/300", "NOT_INUSE")  # the call ends; nobody relays it any more
    for server in (a, b):  # shown as down_state, not as the call that ended
        wait_until(lambda: custom_states(server).get("Custom:SIP/300") == "UNAVAILABLE",
                   message="the removed server's phone shown UNAVAILABLE")
    a.control.set_device("Custom:SIP/300", "NOT_INUSE", publish=False)  # the admin resets it
    for server in (a, b):  # three anti-entropy rounds: nothing writes it again
        reads = device_list_reads(server)
        wait_until(lambda: device_list_reads(server) >= reads + 3, message="anti-entropy")
    assert custom_states(a)["Custom:SIP/300"] == "NOT_INUSE"
    assert custom_states(b)["Custom:SIP/300"] == "UNAVAILABLE"
    script.wait_for_output("Forgot the states of server-3; 1 of its devices now show UNAVAILABLE")


def device_list_reads(standin) -> int:
    return standin.control.state()["actions_run"].get("devicestatelist", 0)


def test_a_device_reported_by_two_servers_shows_their_combination(standins, broker, processes):
    """SIP/100 is registered on A and in a call; B reports it UNAVAILABLE (not registered there).
    Whatever the order the reports come in, C shows INUSE, as a hint over both would."""
    a = processes("a")
    b, c = standins(2)
    broker([a, b, c], ping_interval="0.2", server_timeout="1")
    states = [("INUSE", "UNAVAILABLE"), ("RINGING", "UNAVAILABLE"), ("RINGING", "INUSE"),
              ("NOT_INUSE", "UNAVAILABLE"), ("INUSE", "UNAVAILABLE")]
    for trial, (on_a, on_b) in enumerate(states * 4):  # 20 trials, the order of reports varies
        first, second = ((a, on_a), (b, on_b)) if trial % 2 else ((b, on_b), (a, on_a))
        first[0].control.set_device("SIP/100", first[1])
        second[0].control.set_device("SIP/100", second[1])
        combined = aggregate_device_states([on_a, on_b])
        wait_until(lambda: custom_states(c).get("Custom:SIP/100") == combined and
                   custom_states(a).get("Custom:SIP/100") == on_b and
                   custom_states(b).get("Custom:SIP/100") == on_a,
                   message=f"C to show {combined} for A {on_a} and B {on_b}")
    # A dies: only its share shows down_state; B's own report still counts.
    a.kill()
    wait_until(lambda: custom_states(c).get("Custom:SIP/100") == "UNAVAILABLE")
    b.control.set_device("SIP/100", "NOT_INUSE")  # the phone registers on B
    wait_until(lambda: custom_states(c).get("Custom:SIP/100") == "NOT_INUSE",
               message="B's report combined with A's down-state")


# --- a quick restart -------------------------------------------------------------------------------

def quick_restart(processes, server, name, **options):
    """kill -9 and start again at once, on the same ports, with Asterisk's database (Custom:
    states only): its phones have not registered again yet.  Its boot events come once the
    program under test has subscribed again."""
    server = restart(processes, server, name, loadzmq_delay=None, **options)
    wait_until(lambda: subscribed(server),
               message="a subscription to the restarted server")
    server.control.boot()
    return server


def restart_trials(processes, restarted, name, mirror, trials: int) -> None:
    """Each trial: a phone in a call on the server, a quick restart of the server (the phone not
    registered again yet: shown UNAVAILABLE on mirror), then the phone back."""
    for trial in range(trials):
        restarted.control.set_device("SIP/100", "INUSE")
        wait_until(lambda: custom_states(mirror).get("Custom:SIP/100") == "INUSE")
        restarted = quick_restart(processes, restarted, name)
        wait_until(lambda: custom_states(mirror).get("Custom:SIP/100") == "UNAVAILABLE",
                   message=f"trial {trial}: the phone not registered again shown UNAVAILABLE")
        restarted.control.set_device("SIP/100", "NOT_INUSE")  # it registers again
        wait_until(lambda: custom_states(mirror).get("Custom:SIP/100") == "NOT_INUSE")


def test_a_quick_restart_shows_phones_not_registered_again_as_down(standins, broker, processes):
    a = processes("a")
    b, = standins(1)
    # server_timeout is long: only its boot events tell that it restarted.
    broker([a, b], ping_interval="0.2", server_timeout="600", resync_interval="0")
    restart_trials(processes, a, "a", b, trials=5)


def test_an_agent_shows_its_asterisks_phones_not_registered_again_as_down(standins, agents,
                                                                          processes):
    x = processes("x")
    y, = standins(1)
    agents([x, y], RESYNC_INTERVAL=0)
    restart_trials(processes, x, "x", y, trials=3)


def test_a_restarting_asterisk_is_read_once_fully_booted_over_ami(standins, broker, processes):
    """Asterisk accepts AMI logins before its modules are loaded: the broker waits for
    FullyBooted before it reads the lists and writes, instead of failing until anti-entropy."""
    a = processes("a", ami_port=0)
    b, = standins(1)
    script = broker([a, b], ami=(0,), ping_interval="0.2", server_timeout="600",
                    resync_interval="0")
    b.control.set_device("SIP/200", "BUSY")
    wait_until(lambda: custom_states(a).get("Custom:SIP/200") == "BUSY")
    a.kill()
    b.control.set_device("SIP/200", "NOT_INUSE")                  # missed while it restarts
    a = restart(processes, a, "a", modules_delay=1.5)
    a.control.set_device("SIP/100", "INUSE", publish=False)       # only its list shows it
    wait_until(lambda: custom_states(a).get("Custom:SIP/200") == "NOT_INUSE" and
               custom_states(b).get("Custom:SIP/100") == "INUSE",
               message="the restarted server read and written once fully booted")
    assert not script.lines("Invalid/unknown command") and not script.lines("refused Setvar")


def test_a_list_read_that_failed_is_tried_again(standins, broker):
    a, b = standins(2)
    a.control.set_device("SIP/1", "INUSE", publish=False)  # only a list read can find it
    a.control.set_mode("slow", delay_ms=1500)              # its first answers come too late
    script = broker([a, b], request_timeout="300", resync_interval="0")
    script.wait_for_output("Could not read the DeviceStateList of server-1: no answer; trying "
                           "again in 1 s")
    a.control.set_mode("normal")
    wait_until(lambda: custom_states(b).get("Custom:SIP/1") == "INUSE",
               message="the list read again, without anti-entropy")


# --- a start must not undo a change made while the broker was down ----------------------------------

LUNCH, BACK = ["away", "", "lunch"], ["available", "", "back"]


def set_everywhere(servers, value) -> None:
    for server in servers:
        server.control.set_presence("CustomPresence:5", *value, publish=False)


def shows(servers, value) -> bool:
    return all(server.control.presences().get("CustomPresence:5") == value for server in servers)


def test_a_change_made_while_the_broker_was_stopped_wins_at_start(standins, broker, tmp_path):
    a, b, c = standins(3)
    state_file = tmp_path / "broker.state"
    for trial in range(5):
        set_everywhere([a, b, c], LUNCH)           # (the state file says otherwise, or nothing)
        script = broker([a, b, c], presence="yes", state_file=str(state_file))
        script.wait_for_output("Read the presences of")  # lunch known: a change since the file
        assert script.stop() == 0                  # saved at exit
        assert '"away,,lunch"' in state_file.read_text()
        c.control.set_presence("CustomPresence:5", *BACK, publish=False)  # while it is stopped
        (a if trial % 2 else c).control.set_mode("slow", delay_ms=50)  # who answers first varies
        script = broker([a, b, c], presence="yes", state_file=str(state_file))
        wait_until(lambda: shows([a, b, c], BACK), message=f"trial {trial}: C's change everywhere")
        for server in (a, c):
            server.control.set_mode("normal")
        assert script.stop() == 0


def test_without_a_state_file_the_one_server_that_differs_wins(standins, broker):
    for trial in range(5):
        a, b, c = standins(3)
        set_everywhere([a, b], LUNCH)
        set_everywhere([c], BACK)
        (a, b, c)[trial % 3].control.set_mode("slow", delay_ms=50)
        script = broker([a, b, c], presence="yes")
        wait_until(lambda: shows([a, b, c], BACK), message=f"trial {trial}: C's value everywhere")
        script.kill()


def test_without_a_state_file_a_tie_is_logged_and_left_alone(standins, broker):
    a, b, c = standins(3)
    for server, value in ((a, LUNCH), (b, BACK), (c, ["dnd", "", "meeting"])):
        set_everywhere([server], value)
    script = broker([a, b, c], presence="yes", resync_interval="0.3")
    script.wait_for_output("1 presences differ between the servers")
    for server in (a, b, c):  # each restarts in turn (its boot events): no resync picks one
        reads = server.control.state()["actions_run"].get("presencestatelist", 0)
        server.control.boot()
        wait_until(lambda: server.control.state()["actions_run"].get("presencestatelist", 0)
                   > reads, message="the restarted server read")
    for server in (a, b, c):  # nor does anti-entropy
        reads = server.control.state()["actions_run"].get("presencestatelist", 0)
        wait_until(lambda: server.control.state()["actions_run"].get("presencestatelist", 0)
                   >= reads + 2)
    assert [s.control.presences()["CustomPresence:5"] for s in (a, b, c)] == \
        [LUNCH, BACK, ["dnd", "", "meeting"]]
    a.control.set_presence("CustomPresence:5", "away", "", "out")  # a genuine change: relayed
    wait_until(lambda: shows([a, b, c], ["away", "", "out"]))


def test_anti_entropy_before_every_first_read_is_in_takes_no_side(standins, broker):
    """A server slow to answer its first read: the others' anti-entropy reads, answered
    meanwhile, must not take their presences for changes (they were relayed as such, and the
    tie was decided by which server answered first: found on a busy machine)."""
    a, b, c = standins(3)
    values = (LUNCH, BACK, ["dnd", "", "meeting"])
    for server, value in zip((a, b, c), values):
        set_everywhere([server], value)
    b.control.set_mode("slow", delay_ms=600)  # its first read is the last one in
    script = broker([a, b, c], presence="yes", resync_interval="0.2", request_timeout="5000")
    script.wait_for_output("1 presences differ between the servers")
    b.control.set_mode("normal")
    for server in (a, b, c):  # a few rounds of anti-entropy later, still each its own
        reads = server.control.state()["actions_run"].get("presencestatelist", 0)
        wait_until(lambda: server.control.state()["actions_run"].get("presencestatelist", 0)
                   >= reads + 2)
    assert [s.control.presences()["CustomPresence:5"] for s in (a, b, c)] == list(values)


def test_a_broken_state_file_does_not_stop_the_start(standins, broker, tmp_path):
    a, b = standins(2)
    state_file = tmp_path / "broker.state"
    state_file.write_text('{"version": 1, "presences": {"PRESENCE_STATE(CustomPres')  # cut
    script = broker([a, b], presence="yes", state_file=str(state_file))
    script.wait_for_output("cannot use the saved states")
    a.control.set_presence("CustomPresence:1", "dnd")
    wait_until(lambda: b.control.presences().get("CustomPresence:1") == ["dnd", "", ""])
    assert script.stop() == 0
    assert "dnd" in state_file.read_text()  # written whole at exit


# --- the same for an agent ---------------------------------------------------------------------------

def restart_agent(tmp_path, hub, context, script, name, standin, **settings):
    assert script.stop() == 0  # SIGTERM: the state file is written at exit
    script = start_agent(tmp_path, name, standin, ZMQ_PUB_URL=hub.pull_url,
                         ZMQ_SUB_URL=hub.pub_url, **settings)
    client = HubClient(context, hub, name="Restarter")
    client.ping_until_pong(name)
    client.close()
    return script


@pytest.mark.parametrize("changed_on, state_file", [
    ("its own Asterisk", True), ("another", True),
    ("another", False)])  # (a change on its own Asterisk needs the file to be told apart)
def test_a_change_made_while_an_agent_was_stopped_wins(standins, agents, hub, context, tmp_path,
                                                       changed_on, state_file):
    x, y, z = standins(3)
    settings = dict(PRESENCE=True)
    files = {name: dict(STATE_FILE=str(tmp_path / f"{name}.state")) if state_file else {}
             for name in "XYZ"}
    scripts = [agents([server], names=name, **files[name], **settings)[0]
               for name, server in zip("XYZ", (x, y, z))]
    for trial in range(3):
        x.control.set_presence("CustomPresence:5", *LUNCH)
        wait_until(lambda: shows([x, y, z], LUNCH), message="lunch everywhere")
        script = scripts[2]
        assert script.stop() == 0  # agent Z is stopped
        source = z if changed_on == "its own Asterisk" else x
        source.control.set_presence("CustomPresence:5", *BACK, publish=source is x)
        if source is x:
            wait_until(lambda: shows([x, y], BACK))
        heard = [len(peer.lines("states from Z")) for peer in scripts[:2]]
        scripts[2] = restart_agent(tmp_path, hub, context, script, "Z", z, **files["Z"],
                                   **settings)
        wait_until(lambda: shows([x, y, z], BACK),
                   message=f"trial {trial}: the change made on {changed_on} everywhere")
        for peer, before in zip(scripts[:2], heard):  # Z's states, read at its start, are in
            wait_until(lambda: len(peer.lines("states from Z")) > before)
        for other in (x, y):  # and did not bring lunch back anywhere
            assert other.control.presences()["CustomPresence:5"] == BACK


def test_an_asterisk_restarted_with_a_stale_presence_does_not_spread_it(standins, agents, hub,
                                                                        context):
    """Its Asterisk (not the agent) restarts and lists a presence otherwise than it last
    reported (a database older than its last change): the list after a restart is not news,
    as at the broker.  (Agent.read_own_states lost its caller's first flag, so every read
    after a restart was taken for anti-entropy and the old value went to every peer.)"""
    x, y, z = standins(3)
    agents([x, y, z], names="XYZ", PRESENCE=True, RESYNC_INTERVAL=0)  # no anti-entropy
    listener = HubClient(context, hub, name="listener", topics=["[*]"])
    z.control.set_presence("CustomPresence:5", *LUNCH)  # read once: not the first read any more
    wait_until(lambda: shows([x, y, z], LUNCH), message="lunch everywhere")
    z.control.set_presence("CustomPresence:5", *BACK, publish=False)  # its database, restored
    listener.find("AgentStates", "Z")
    listener.received.clear()
    z.control.boot()
    states = listener.wait_for("AgentStates", "Z")["x_events"]  # what Z read after the restart
    assert [(e["Status"], e["Subtype"], e["Message"]) for e in states
            if e.get("Presentity") == "CustomPresence:5"] == [tuple(LUNCH)]
    z.control.set_presence("CustomPresence:sentinel", "dnd")  # relayed after the AgentStates
    wait_until(lambda: all(s.control.presences().get("CustomPresence:sentinel") == ["dnd", "", ""]
                           for s in (x, y)), message="the sentinel on the peers")
    assert [s.control.presences()["CustomPresence:5"] for s in (x, y)] == [LUNCH, LUNCH]
    listener.close()


def test_asterisk_22_endpoints_unavailable_from_boot_are_no_storm(standins, broker):
    """Asterisk 22 lists every PJSIP endpoint UNAVAILABLE from boot, on every server that has
    it in pjsip.conf: each is a share of the device, the phone's real state wins where it is
    registered, no mirror is written more than the start needs, and the log has a line per
    server, not per device."""
    endpoints = [f"PJSIP/{number}" for number in range(1, 501)]
    # (already booted: a LoadZmq in the middle, on a busy machine, would resync them again)
    a, b = standins(2, endpoints=endpoints, loadzmq_delay=None)
    a.control.set_device("PJSIP/7", "NOT_INUSE", publish=False)  # registered on A before
    # (a write is sent again only if not answered within request_timeout: none is, here)
    script = broker([a, b], resync_interval="0", request_timeout="20000")
    wait_until(lambda: len(custom_states(b)) == 500 and len(custom_states(a)) == 500,
               message="every endpoint mirrored")
    assert custom_states(b)["Custom:PJSIP/7"] == "NOT_INUSE"  # A's share: registered there
    assert custom_states(a)["Custom:PJSIP/7"] == "UNAVAILABLE"  # B's share

    def written_on_b():
        return Counter(json.loads(r)["Variable"] for r in b.control.requests()
                       if "Custom:PJSIP/" in r)
    # Once each; twice at most, for a server that came up while the other's list was being
    # written to it (its resync writes everything known again).
    assert max(written_on_b().values()) <= 2
    before = written_on_b()["DEVICE_STATE(Custom:PJSIP/9)"]
    b.control.set_device("PJSIP/9", "NOT_INUSE")  # B's own share changes: A's mirror only
    wait_until(lambda: custom_states(a).get("Custom:PJSIP/9") == "NOT_INUSE")
    a.control.set_device("PJSIP/7", "INUSE")  # a call on A (and a barrier)
    wait_until(lambda: custom_states(b).get("Custom:PJSIP/7") == "INUSE")
    assert written_on_b()["DEVICE_STATE(Custom:PJSIP/9)"] == before  # (it showed A's share)
    assert len(script.output().splitlines()) < 20
