"""The relay core without sockets: what is written where, for the broker's servers and an agent's
peers alike (the end-to-end tests run the same rules through real processes)."""
import logging
import time
from typing import Dict, List, Tuple

from harness import device_event, presence_event
from zmqami.relay import Relay
from zmqami.rules import PresenceEchoFilter, StateUpdate
from zmqami.states import ListReading, StateTable
from zmqami.stats import DropLog

log = logging.getLogger("test-relay")
SIP1 = "DEVICE_STATE(Custom:SIP/1)"
PRESENCE = "PRESENCE_STATE(CustomPresence:1)"


class FakeOutbox:
    def __init__(self) -> None:
        self.unsettled: set = set()

    def is_unsettled(self, variable: str) -> bool:
        return variable in self.unsettled


class FakeLink:
    """What the relay uses of an AsteriskLink: its writes, echoes and list reads, recorded."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.writes: List[Tuple[str, str, bytes]] = []   # (variable, value, encoded)
        self.outbox = FakeOutbox()
        self.echoes = PresenceEchoFilter()
        self.lists: Dict[str, object] = {}               # action -> its callback

    def write_state(self, update, action_id, verb="Setvar", encoded=None) -> None:
        self.writes.append((update.variable, update.value, encoded))
        if update.is_presence:
            self.echoes.sent(update)

    def is_echo(self, update) -> bool:
        return self.echoes.is_echo(update)

    def read_list(self, action, on_list) -> None:
        self.lists[action] = on_list

    def answer(self, action: str, items: List[dict]) -> None:
        self.lists.pop(action)([{"Response": "Success"}] + items, time.monotonic())

    def written(self) -> List[Tuple[str, str]]:
        return [(variable, value) for variable, value, _ in self.writes]


def presence(status: str, message: str = "") -> dict:
    return presence_event("CustomPresence:1", status, message=message)


def broker_relay(*names: str, down_state: str = "UNAVAILABLE") -> Tuple[Relay, Dict[str, FakeLink]]:
    relay = Relay(StateTable(down_state), DropLog(log), log, device_state=True, presence=True)
    links = {name: FakeLink(name) for name in names}
    relay.links = dict(links)
    return relay, links


def test_an_event_is_written_on_every_other_server_with_the_same_bytes():
    relay, links = broker_relay("A", "B", "C")
    relay.take_event("A", links["A"], device_event("SIP/1", "INUSE"))
    assert links["A"].writes == []
    assert links["B"].written() == links["C"].written() == [(SIP1, "INUSE")]
    assert links["B"].writes[0][2] is links["C"].writes[0][2]  # encoded once
    relay.take_event("A", links["A"], device_event("SIP/1", "INUSE"))  # no change: no write
    assert len(links["B"].writes) == 1 and relay.changes == 1


def test_a_device_on_two_servers_shows_the_others_share_on_each():
    relay, links = broker_relay("A", "B", "C")
    relay.take_event("A", links["A"], device_event("SIP/1", "INUSE"))
    relay.take_event("B", links["B"], device_event("SIP/1", "UNAVAILABLE"))
    assert links["A"].written()[-1] == (SIP1, "UNAVAILABLE")  # B's share, on A
    assert links["B"].written()[-1] == (SIP1, "INUSE")        # A's share, on B
    assert links["C"].written()[-1] == (SIP1, "INUSE")        # both, combined


def test_a_presence_echo_is_not_relayed_and_a_genuine_change_is():
    relay, links = broker_relay("A", "B")
    relay.take_event("A", links["A"], presence("away", "lunch"))
    assert links["B"].written() == [(PRESENCE, "away,,lunch")]
    relay.take_event("B", links["B"], presence("away", "lunch"))  # B's echo of our write
    assert links["A"].writes == []
    relay.take_event("B", links["B"], presence("dnd"))            # a user on B
    assert links["A"].written() == [(PRESENCE, "dnd")]


def test_resync_writes_the_others_states_but_no_presence_before_the_first_read():
    relay, links = broker_relay("A", "B")
    relay.take_event("A", links["A"], device_event("SIP/1", "BUSY"))
    relay.take_event("A", links["A"], presence("away"))
    links["B"].writes.clear()
    first = relay.resync("B")
    assert first and links["B"].written() == [(SIP1, "BUSY")]
    relay.read_lists("B", repair=False, first=first)
    links["B"].answer("DeviceStateList", [])
    links["B"].answer("PresenceStateList", [])
    links["B"].writes.clear()
    assert not relay.resync("B")  # read once: presences are written from now on
    assert sorted(links["B"].written()) == [(SIP1, "BUSY"), (PRESENCE, "away")]


def test_a_source_down_shows_down_state_then_its_state_again():
    relay, links = broker_relay("A", "B")
    relay.take_event("A", links["A"], device_event("SIP/1", "INUSE"))
    assert relay.source_down("A") == [SIP1]
    assert links["B"].written()[-1] == (SIP1, "UNAVAILABLE")
    assert relay.source_up("A") == [SIP1]
    assert links["B"].written()[-1] == (SIP1, "INUSE")


def test_a_forgotten_source_is_shown_down_once_and_never_written_again():
    relay, links = broker_relay("A", "B")
    relay.take_event("A", links["A"], device_event("SIP/1", "INUSE"))
    del relay.links["A"]
    assert relay.forget_source("A") == [SIP1]
    assert links["B"].written()[-1] == (SIP1, "UNAVAILABLE")
    links["B"].writes.clear()
    relay.resync("B")
    assert links["B"].writes == []


def test_after_a_restart_a_device_its_list_no_longer_shows_is_down_elsewhere():
    relay, links = broker_relay("A", "B")
    gone = []
    relay.on_gone = lambda source, variable: gone.append((source, variable))
    relay.take_event("A", links["A"], device_event("SIP/1", "INUSE"))
    relay.read_lists("A", repair=False)
    links["A"].answer("DeviceStateList", [])  # SIP/1 has not registered again
    links["A"].answer("PresenceStateList", [])
    assert links["B"].written()[-1] == (SIP1, "UNAVAILABLE") and gone == [("A", SIP1)]


def test_anti_entropy_relays_a_missed_change_and_repairs_a_wrong_mirror():
    relay, links = broker_relay("A", "B")
    relay.take_event("A", links["A"], device_event("SIP/1", "INUSE"))
    read: List[List[ListReading]] = []
    relay.read_lists("B", repair=True, on_read=read.append)
    links["B"].answer("DeviceStateList", [
        {"Event": "DeviceStateChange", "Device": "Custom:SIP/1", "State": "NOT_INUSE"},  # wrong
        {"Event": "DeviceStateChange", "Device": "SIP/2", "State": "RINGING"}])          # missed
    links["B"].answer("PresenceStateList", [])
    assert links["B"].written()[-1] == (SIP1, "INUSE")
    assert links["A"].written() == [("DEVICE_STATE(Custom:SIP/2)", "RINGING")]
    assert len(read) == 1 and len(read[0]) == 2


def test_without_a_state_file_one_differing_server_wins_and_a_tie_is_left_alone():
    relay, links = broker_relay("A", "B", "C")
    relay.first_presences = {}
    values = {"A": "away", "B": "away", "C": "dnd"}  # C changed it while nobody relayed
    for name, status in values.items():
        relay.read_lists(name, repair=False, first=True)
        links[name].answer("DeviceStateList", [])
        links[name].answer("PresenceStateList", [dict(presence(status), ActionID="x")])
    assert links["A"].written() == links["B"].written() == [(PRESENCE, "dnd")]
    relay, links = broker_relay("A", "B")
    relay.first_presences = {}
    for name, status in (("A", "away"), ("B", "dnd")):
        relay.read_lists(name, repair=False, first=True)
        links[name].answer("DeviceStateList", [])
        links[name].answer("PresenceStateList", [presence(status)])
    assert links["A"].writes == links["B"].writes == [] and relay.unresolved == {PRESENCE}


def test_an_agent_writes_its_peers_states_and_announces_its_own():
    relay = Relay(StateTable("UNAVAILABLE"), DropLog(log), log, True, False, verb="SetVar")
    mine = FakeLink("Asterisk")
    relay.links = {"Moscow": mine}
    announced = []
    relay.on_change = lambda source, update: announced.append(update)
    relay.take_event("Moscow", mine, device_event("SIP/1", "RINGING"))
    assert announced == [StateUpdate(SIP1, "RINGING")] and mine.writes == []
    relay.states.record("Paris", StateUpdate("DEVICE_STATE(Custom:SIP/9)", "BUSY"))
    relay.write_mirrors("DEVICE_STATE(Custom:SIP/9)", "uuid-of-the-message")
    assert mine.written() == [("DEVICE_STATE(Custom:SIP/9)", "BUSY")]
    assert b'"Action": "SetVar"' in mine.writes[0][2]
