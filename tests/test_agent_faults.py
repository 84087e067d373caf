"""The agent network through faults: agents, Asterisk servers and hubs killed and restarted."""
from conftest import RunningHub
from harness import (HubClient, converge, custom_states, flood_while_stopped, play, restart,
                     setvars, wait_until)

FAST = dict(KEEP_ALIVE_INTERVAL=0.3, PEER_TIMEOUT=1.0, ASTERISK_TIMEOUT=300)


def test_a_dead_agent_shows_down_state_and_converges_after_its_restart(standins, agents):
    x, y, z = standins(3)
    agent_x, agent_y, agent_z = agents([x, y, z], **FAST)
    x.control.set_device("SIP/100", "INUSE")
    for other in (y, z):
        wait_until(lambda: custom_states(other).get("Custom:SIP/100") == "INUSE")
    agent_x.proc.kill()
    for other in (y, z):
        converge("agents, kill -9 of an agent: its phones UNAVAILABLE (PEER_TIMEOUT 1 s)",
                 lambda: custom_states(other).get("Custom:SIP/100") == "UNAVAILABLE")
    agent_y.wait_for_output("Peer X is down (silent for 1 s): 1 of its devices now show UNAVAILABLE")
    y.control.set_device("SIP/200", "BUSY")        # X's Asterisk misses this while X is dead
    x.control.set_device("SIP/100", "NOT_INUSE")   # and X's phone hangs up meanwhile
    agent_x = agent_x.restart()                    # its pid file is stale: replaced
    converge("agents, restart of a killed agent: the peers' states on its Asterisk",
             lambda: custom_states(x).get("Custom:SIP/200") == "BUSY")
    for other in (y, z):
        converge("agents, restart of a killed agent: its real states on the peers",
                 lambda: custom_states(other).get("Custom:SIP/100") == "NOT_INUSE")
    agent_x.wait_for_output("which is not running: replacing it")


def test_its_asterisk_killed_and_restarted_under_an_agent(standins, agents, processes):
    x = processes("x")
    y, = standins(1)
    agent_x, agent_y = agents([x, y], **FAST)
    x.control.set_device("SIP/100", "RINGING")
    y.control.set_device("SIP/200", "BUSY")
    wait_until(lambda: custom_states(y).get("Custom:SIP/100") == "RINGING")
    wait_until(lambda: custom_states(x).get("Custom:SIP/200") == "BUSY")
    x.kill()
    converge("agents, kill -9 of an Asterisk: its phones UNAVAILABLE on the peers",
             lambda: custom_states(y).get("Custom:SIP/100") == "UNAVAILABLE")
    agent_y.wait_for_output("Peer X is down (its Asterisk is down)")
    y.control.set_device("SIP/200", "NOT_INUSE")    # X's database will still say BUSY
    x = restart(processes, x, "x")
    x.control.set_device("SIP/100", "NOT_INUSE")     # the phone registers again
    converge("agents, restart of a killed Asterisk: its stale mirror rewritten",
             lambda: custom_states(x).get("Custom:SIP/200") == "NOT_INUSE")
    converge("agents, restart of a killed Asterisk: its real state on the peers",
             lambda: custom_states(y).get("Custom:SIP/100") == "NOT_INUSE")
    assert len(agent_x.lines("Asterisk is down")) == 1


def test_the_hub_killed_and_restarted_during_traffic(standins, agents, hub):
    x, y = standins(2)
    agents([x, y], **FAST)
    play(x, 100, 20)
    hub.script.proc.kill()
    play(x, 100, 20, prefix="PJSIP/")                # while the hub is dead
    hub.restart()
    expected = {}
    expected.update(play(x, 100, 20))
    expected.update(play(x, 100, 20, prefix="PJSIP/"))
    converge("agents, kill -9 and restart of the hub during 400 changes: Y holds X's truth",
             lambda: custom_states(y) == expected)


def test_with_two_hubs_killing_one_loses_nothing(standins, agents, hub, tmp_path, context):
    second = RunningHub(tmp_path, "second")
    try:
        x, y = standins(2)
        agents([x, y], hubs=[hub, second], **FAST)
        HubClient(context, second, name="probe").ping_until_pong("Y")   # Y is on both
        first_half = play(x, 100, 25)
        wait_until(lambda: custom_states(y) == first_half)
        hub.script.proc.kill()
        expected = play(x, 100, 25, prefix="PJSIP/")
        expected.update(first_half)
        converge("agents, kill -9 of one of two hubs during 200 changes: nothing lost",
                 lambda: custom_states(y) == expected)
        action_ids = [s["ActionID"] for s in setvars(y)]
        assert len(action_ids) == len(set(action_ids))   # each message applied once
    finally:
        second.script.kill()


def test_agent_anti_entropy_repairs_lost_events_and_drifted_mirrors(standins, agents):
    x, y = standins(2)
    agents([x, y], RESYNC_INTERVAL=0.5, **FAST)
    x.control.set_device("SIP/1", "RINGING")
    wait_until(lambda: custom_states(y).get("Custom:SIP/1") == "RINGING")
    x.control.set_device("SIP/1", "INUSE", publish=False)        # the event is lost
    y.control.set_device("Custom:SIP/1", "BUSY", publish=False)   # and Y's mirror drifted
    x.control.set_device("SIP/2", "ONHOLD", publish=False)
    converge("agents, anti-entropy (RESYNC_INTERVAL 0.5 s): lost events, drifted mirror",
             lambda: custom_states(y) == {"Custom:SIP/1": "INUSE", "Custom:SIP/2": "ONHOLD"})


def test_an_agent_held_for_seconds_reads_its_asterisk_again(standins, agents, processes):
    """As the broker's: an agent stopped (a paused VM) while its Asterisk publishes a flood
    misses what res_zmq_manager dropped; once it has read what waited, it sends its states
    again."""
    x = processes("x", loadzmq_delay=None)  # (no boot events: they would start a resync)
    y, = standins(1, loadzmq_delay=None)
    # No anti-entropy, and timeouts longer than the pause: only the pause itself can tell.
    agent_x, _ = agents([x, y], RESYNC_INTERVAL=0, ASTERISK_TIMEOUT=60000,
                        KEEP_ALIVE_INTERVAL=60)
    final = flood_while_stopped(agent_x, x)
    converge("agents, paused during a flood beyond the module's buffer: read again",
             lambda: {d: s for d, s in custom_states(y).items() if d.startswith("Custom:F/")}
             == final)
    assert len(agent_x.lines("The agent did not run for")) == 1
