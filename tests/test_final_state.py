"""The right final state, always: each scenario in which every server could agree on a wrong state,
repeated many times end to end."""
import pytest

from harness import wait_until

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
