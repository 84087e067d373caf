"""Filters per server (publish_filter, accept_filter; an agent's PUBLISH_FILTER, ACCEPT_FILTER):
what is taken from a server and what is written to it, by relaying, resync and repair alike."""
import pytest

from harness import custom_states, wait_until


@pytest.mark.parametrize("topology", ["broker", "agents"])
def test_filters_choose_what_is_taken_and_written_through_resync_too(standins, broker, agents,
                                                                     topology):
    a, b, c = standins(3)
    if topology == "broker":
        broker([a, b, c], server_keys={0: {"publish_filter": "^PJSIP/"},
                                       2: {"accept_filter": "^pjsip/1"}})
    else:
        agents([a], names="X", PUBLISH_FILTER="^PJSIP/")
        agents([b], names="Y")
        agents([c], names="Z", ACCEPT_FILTER="^pjsip/1")
    for device in ("PJSIP/100", "PJSIP/200", "SIP/300"):
        a.control.set_device(device, "INUSE")
    b.control.set_device("PJSIP/101", "BUSY")
    wait_until(lambda: custom_states(b) == {"Custom:PJSIP/100": "INUSE",
                                            "Custom:PJSIP/200": "INUSE"}, message="B's mirrors")
    wait_until(lambda: custom_states(c).get("Custom:PJSIP/101") == "BUSY", message="C's")
    assert set(custom_states(c)) == {"Custom:PJSIP/100", "Custom:PJSIP/101"}
    c.control.boot()  # C restarts: its resync writes nothing its filter refuses either
    wait_until(lambda: c.control.state()["actions_run"].get("devicestatelist", 0) >= 2)
    b.control.set_device("PJSIP/199", "RINGING")  # (a barrier: written after the resync)
    wait_until(lambda: custom_states(c).get("Custom:PJSIP/199") == "RINGING")
    assert set(custom_states(c)) == {"Custom:PJSIP/100", "Custom:PJSIP/101", "Custom:PJSIP/199"}
    assert not [r for r in c.control.requests() if "PJSIP/200" in r or "SIP/300" in r]
