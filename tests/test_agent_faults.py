"""The agent network through faults: agents, Asterisk servers and hubs killed and restarted."""
from conftest import RunningHub
from harness import HubClient, custom_states, play, restart, setvars, wait_until

FAST = dict(KEEP_ALIVE_INTERVAL=0.3, PEER_TIMEOUT=1.0, ASTERISK_TIMEOUT=300)


def test_a_dead_agent_shows_down_state_and_converges_after_its_restart(standins, agents):
    x, y, z = standins(3)
    agent_x, agent_y, agent_z = agents([x, y, z], **FAST)
    x.control.set_device("SIP/100", "INUSE")
    for other in (y, z):
        wait_until(lambda: custom_states(other).get("Custom:SIP/100") == "INUSE")
    agent_x.proc.kill()
    for other in (y, z):
        wait_until(lambda: custom_states(other).get("Custom:SIP/100") == "UNAVAILABLE",
                   message="down_state for the dead agent's phones")
    agent_y.wait_for_output("Peer X is down (silent for 1 s): 1 of its devices now show UNAVAILABLE")
    y.control.set_device("SIP/200", "BUSY")        # X's Asterisk misses this while X is dead
    x.control.set_device("SIP/100", "NOT_INUSE")   # and X's phone hangs up meanwhile
    agent_x = agent_x.restart()                    # its pid file is stale: replaced
    wait_until(lambda: custom_states(x).get("Custom:SIP/200") == "BUSY",
               message="the restarted agent to fetch the peers' states")
    for other in (y, z):
        wait_until(lambda: custom_states(other).get("Custom:SIP/100") == "NOT_INUSE",
                   message="the restarted agent's real states on the peers")
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
    wait_until(lambda: custom_states(y).get("Custom:SIP/100") == "UNAVAILABLE",
               message="down_state while X's Asterisk is down")
    agent_y.wait_for_output("Peer X is down (its Asterisk is down)")
    y.control.set_device("SIP/200", "NOT_INUSE")    # X's database will still say BUSY
    x = restart(processes, x, "x")
    x.control.set_device("SIP/100", "NOT_INUSE")     # the phone registers again
    wait_until(lambda: custom_states(x).get("Custom:SIP/200") == "NOT_INUSE",
               message="the stale mirror on the restarted Asterisk")
    wait_until(lambda: custom_states(y).get("Custom:SIP/100") == "NOT_INUSE",
               message="X's real state back on Y")
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
    wait_until(lambda: custom_states(y) == expected, message="Y to hold X's truth")


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
        wait_until(lambda: custom_states(y) == expected, message="everything through the other hub")
        action_ids = [s["ActionID"] for s in setvars(y)]
        assert len(action_ids) == len(set(action_ids))   # each message applied once
    finally:
        second.script.kill()
