"""The broker through faults: hung and dead servers, crashes and restarts, lost events."""
from harness import (converge, custom_states, flood_while_stopped, free_port, play, restart,
                     subscribed, wait_until)
from zmqami.standin import Standin

FAST = dict(ping_interval="0.2", server_timeout="1", request_timeout="300")


def dead_server() -> Standin:
    """Ports that nothing listens on: a server that is down."""
    return Standin(free_port(), free_port(), control=None)


def test_a_hung_and_a_dead_server_do_not_delay_the_live_ones(standins, broker):
    source, hung, live = standins(3)
    hung.control.set_mode("hung")
    script = broker([source, hung, dead_server(), live], **FAST)
    expected = play(source, 200, 50)
    converge("broker, 200 events with a hung and a dead server: all on the live one",
             lambda: custom_states(live) == expected)
    script.wait_for_output("server-2 is down")
    script.wait_for_output("server-3 is down")
    assert len(script.lines("Did not receive REP from server-2")) == 1
    assert len(script.lines("server-2 is down")) == 1


def test_down_state_while_a_server_is_dead_then_truth_after_its_restart(
        standins, broker, processes):
    a = processes("a")
    b, c = standins(2)
    script = broker([a, b, c], **FAST)
    a.control.set_device("SIP/100", "INUSE")
    c.control.set_device("SIP/300", "RINGING")
    for standin, device, state in ((b, "SIP/100", "INUSE"), (c, "SIP/100", "INUSE"),
                                   (a, "SIP/300", "RINGING")):
        wait_until(lambda: custom_states(standin).get("Custom:" + device) == state)
    a.kill()
    # Its phones show UNAVAILABLE on the others while it is down.
    for standin in (b, c):
        converge("broker, kill -9 of a server: its phones UNAVAILABLE on the others "
                 "(server_timeout 1 s)",
                 lambda: custom_states(standin).get("Custom:SIP/100") == "UNAVAILABLE")
    script.wait_for_output("1 device of server-1: now UNAVAILABLE")
    c.control.set_device("SIP/300", "NOT_INUSE")      # a change a dead server misses
    b.control.set_device("SIP/200", "BUSY")
    traffic = play(b, 100, 20, prefix="T/")           # and traffic while it is down
    a = restart(processes, a, "a")                    # its database still says RINGING
    a.control.set_device("SIP/100", "NOT_INUSE")       # the phone registers again
    truth = dict(traffic, **{"Custom:SIP/300": "NOT_INUSE", "Custom:SIP/200": "BUSY"})
    converge("broker, restart of a killed server: it holds the truth",
             lambda: custom_states(a) == truth)
    for standin in (b, c):
        converge("broker, restart of a killed server: its real states on the others",
                 lambda: custom_states(standin).get("Custom:SIP/100") == "NOT_INUSE")
    assert len(script.lines("server-1 is down")) == 1
    assert len(script.lines("server-1 is up again")) == 1


def test_a_quick_restart_is_seen_by_its_boot_events(standins, broker, processes):
    a = processes("a")
    b, = standins(1)
    # server_timeout is long: only LoadZmq / FullyBooted can tell that the server restarted.
    script = broker([a, b], ping_interval="0.2", server_timeout="600", resync_interval="0")
    b.control.set_device("SIP/200", "RINGING")
    wait_until(lambda: custom_states(a).get("Custom:SIP/200") == "RINGING")
    a.kill()
    b.control.set_device("SIP/200", "NOT_INUSE")
    # The module publishes LoadZmq 2 s after it loads; here it is published once the broker has
    # subscribed again, so that the test never depends on how fast the broker reconnects.
    a = restart(processes, a, "a", loadzmq_delay=None)
    wait_until(lambda: subscribed(a),
               message="the broker to subscribe to the restarted server")
    a.control.boot()
    converge("broker, quick restart seen by LoadZmq: stale mirror rewritten",
             lambda: custom_states(a).get("Custom:SIP/200") == "NOT_INUSE")
    script.wait_for_output("server-1 published")


def test_anti_entropy_repairs_lost_events_and_drifted_mirrors(standins, broker):
    a, b = standins(2)
    script = broker([a, b], ping_interval="0.2", resync_interval="0.5")
    a.control.set_device("SIP/1", "RINGING")
    wait_until(lambda: custom_states(b).get("Custom:SIP/1") == "RINGING")
    a.control.set_device("SIP/1", "INUSE", publish=False)       # the event is lost
    b.control.set_device("Custom:SIP/1", "BUSY", publish=False)  # and the mirror drifted
    a.control.set_device("SIP/2", "ONHOLD", publish=False)
    converge("broker, anti-entropy (resync_interval 0.5 s): lost events and a drifted mirror",
             lambda: custom_states(b) == {"Custom:SIP/1": "INUSE", "Custom:SIP/2": "ONHOLD"})
    script.wait_for_output("Read the devices of server-1")


def test_a_broker_held_for_seconds_reads_the_servers_again(standins, broker, processes):
    """A broker stopped (a paused VM) while A publishes a flood misses what res_zmq_manager
    dropped meanwhile, the final states among them: once it runs again and has read what
    waited, it reads A's states again."""
    a = processes("a", loadzmq_delay=None)  # (no boot events: they would start a resync)
    b, = standins(1, loadzmq_delay=None)
    # No anti-entropy, and timeouts longer than the pause: only the pause itself can tell.
    script = broker([a, b], resync_interval="0", ping_interval="60", server_timeout="600",
                    request_timeout="60000")
    final = flood_while_stopped(script, a)
    converge("broker, paused during a flood beyond the module's buffer: read again",
             lambda: {d: s for d, s in custom_states(b).items() if d.startswith("Custom:F/")}
             == final)
    assert len(script.lines("The broker did not run for")) == 1


def test_presence_survives_a_restart_and_lost_events(standins, broker, processes):
    a = processes("a")
    b, = standins(1)
    broker([a, b], presence="yes", resync_interval="0.5", **FAST)
    b.control.set_presence("CustomPresence:7", "away", "", "Lunch")
    wait_until(lambda: a.control.presences().get("CustomPresence:7") == ["away", "", "Lunch"])
    a.kill()
    b.control.set_presence("CustomPresence:7", "dnd", "", "Meeting")
    a = restart(processes, a, "a")                 # its database still says away
    wait_until(lambda: a.control.presences().get("CustomPresence:7") == ["dnd", "", "Meeting"],
               message="the presence after the restart")
    # A change whose event is lost.  (Made again until it holds: a resync that the restart's
    # boot events start may still overwrite A's presence with the known one just after.)
    def lost_change_relayed():
        if a.control.presences().get("CustomPresence:7") != ["available", "", ""]:
            a.control.set_presence("CustomPresence:7", "available", publish=False)
        return b.control.presences().get("CustomPresence:7") == ["available", "", ""]
    wait_until(lost_change_relayed, message="anti-entropy to relay the presence")
