"""hinted_only: a server is written only what its own dialplan hints show (ExtensionStateList,
read again at each resync, each anti-entropy round and after a Reload event)."""
import json

import pytest

from harness import custom_states, wait_until

HINT_100 = {"100": "PJSIP/100&Custom:PJSIP/100,CustomPresence:100"}
HINT_200 = {"200": "PJSIP/200&Custom:PJSIP/200,CustomPresence:200"}


def play(a) -> None:
    for device in ("PJSIP/100", "PJSIP/200"):
        a.control.set_device(device, "INUSE")
    for presence in ("CustomPresence:100", "CustomPresence:200"):
        a.control.set_presence(presence, "away")


@pytest.mark.parametrize("topology", ["broker", "agents"])
def test_only_what_its_hints_name_is_written_and_a_reload_adds_the_new_ones(
        standins, broker, agents, topology):
    a, b = standins(2)
    b.control.set_hints(HINT_100)
    if topology == "broker":
        broker([a, b], presence="yes", resync_interval="0",
               server_keys={1: {"hinted_only": "yes"}})
    else:
        agents([a], names="X", PRESENCE=True, RESYNC_INTERVAL=0)
        agents([b], names="Y", PRESENCE=True, RESYNC_INTERVAL=0, HINTED_ONLY=True)
    play(a)
    wait_until(lambda: custom_states(b) == {"Custom:PJSIP/100": "INUSE"}
               and b.control.presences().get("CustomPresence:100") == ["away", "", ""],
               message="what hint 100 shows, on B")
    assert "CustomPresence:200" not in b.control.presences()
    b.control.set_hints({**HINT_100, **HINT_200}, reload=True)  # dialplan reload
    wait_until(lambda: custom_states(b).get("Custom:PJSIP/200") == "INUSE"
               and b.control.presences().get("CustomPresence:200") == ["away", "", ""],
               message="what the new hint shows, at once")


def test_a_newly_hinted_device_gets_its_state_within_an_anti_entropy_round(standins, broker):
    a, b = standins(2)
    broker([a, b], hinted_only="yes", resync_interval="0.3")
    play(a)
    b.control.set_device("PJSIP/900", "BUSY")  # (a barrier: A's hints name nothing either)
    wait_until(lambda: a.control.state()["actions_run"].get("extensionstatelist", 0) >= 2)
    assert custom_states(b) == {} and custom_states(a) == {}
    b.control.set_hints(HINT_200)  # without a reload: anti-entropy reads it
    wait_until(lambda: custom_states(b) == {"Custom:PJSIP/200": "INUSE"},
               message="the newly hinted device, one anti-entropy round later")


def test_a_hint_too_long_for_the_modules_list_is_never_asked_for(standins, broker):
    """res_zmq_manager copies each line of a list reply into 2048 bytes: a hint naming many
    devices would kill Asterisk in ExtensionStateList.  Seen in an ExtensionStatus event, it
    keeps that list from being read (and the stand-in, which plays dead as Asterisk dies,
    alive)."""
    a, b = standins(2, loadzmq_delay=None)
    script = broker([a, b], hinted_only="yes", resync_interval="0")
    wait_until(lambda: b.control.state()["actions_run"].get("extensionstatelist", 0) >= 1)
    hint = "&".join(f"PJSIP/{n}" for n in range(300)) + "&Custom:PJSIP/1"  # a 2.7 KB line
    b.control.publish_raw(json.dumps({"Event": "ExtensionStatus", "Privilege": "call,all",
                                      "Exten": "1", "Context": "default", "Hint": hint,
                                      "Status": "0", "StatusText": "Idle"}).encode())
    b.control.set_hints({"1": hint}, reload=True)
    script.wait_for_output("Not reading the ExtensionStateList of server-2")
    assert b.control.state()["actions_run"].get("extensionstatelist", 0) == 1
    assert b.control.state()["crashes"] == []
