"""What every source server last reported, and what its mirrors should show everywhere else.

Shared by the broker (one entry per Asterisk server) and the agent (one entry per peer agent).
It is what makes resynchronisation possible without asking the servers: a server that restarts
is given every known state again, a server that goes down has its devices shown as ``down_state``
on the others, and a list read from a server (DeviceStateList, PresenceStateList) is compared
with what is known, so that a missed event or a stale mirror is repaired.

Memory is bounded: one small entry per variable, at most max_per_source variables per source
and at most max_sources sources (a flood of distinct devices or origins is refused, not stored,
and never written into Asterisk's database as Custom: devices).
"""
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Set

from .rules import (CUSTOM_DEVICE, BadInput, StateUpdate, check_name, device_state_update,
                    presence_update)

DEVICE_PREFIX = "DEVICE_STATE("

OnBadItem = Callable[[Dict[str, Any], BadInput], None]
IsWriting = Callable[[str], bool]  # Outbox.is_unsettled of the server the list came from


@dataclass
class ListReading:
    """What a server's DeviceStateList or PresenceStateList showed, against what is known."""
    changed: List[StateUpdate] = field(default_factory=list)   # its own states that are news
    current: List[StateUpdate] = field(default_factory=list)   # all its own states, as now known
    repairs: List[StateUpdate] = field(default_factory=list)   # its mirrors that show a wrong state


class Entry:
    """The last state a source reported for one variable, and when an event changed it."""
    __slots__ = ("value", "source", "changed_at")

    def __init__(self, value: str, source: str, changed_at: float) -> None:
        self.value = value
        self.source = source
        self.changed_at = changed_at


class StateTable:
    def __init__(self, down_state: Optional[str], max_per_source: int = 10_000,
                 max_sources: int = 1_000) -> None:
        self.down_state = down_state
        self.max_per_source = max_per_source
        self.max_sources = max_sources
        self.entries: Dict[str, Entry] = {}  # variable -> what its source reported last
        self.shown_down: Set[str] = set()    # device variables shown as down_state
        self.per_source: Counter = Counter()  # source -> how many variables it owns

    def refusal(self, source: str, variable: str) -> Optional[str]:
        """Why a new variable of source is not taken (a table bound), or None."""
        entry = self.entries.get(variable)
        if entry is not None and entry.source == source:
            return None
        if self.per_source[source] >= self.max_per_source:
            return f"more than {self.max_per_source} states of one source: ignored"
        if source not in self.per_source and len(self.per_source) >= self.max_sources:
            return f"more than {self.max_sources} sources: ignored"
        return None

    def record(self, source: str, update: StateUpdate) -> bool:
        """Remember what a source reported in an event; True if its mirrors must change."""
        return self._remember(source, update, time.monotonic())

    def record_listed(self, source: str, update: StateUpdate, asked_at: float) -> bool:
        """Like record, for a state read from a list asked for at asked_at.

        An event handled after the list was asked for may be newer than the list: it wins.
        """
        entry = self.entries.get(update.variable)
        if entry is not None and entry.changed_at > asked_at:
            return False
        return self._remember(source, update, asked_at)

    def _remember(self, source: str, update: StateUpdate, when: float) -> bool:
        news = self.expected(update.variable) != update.value  # what the mirrors show now
        old = self.entries.get(update.variable)
        if old is None or old.source != source:
            self.per_source[source] += 1
            if old is not None:
                self._disown(old.source)
        self.entries[update.variable] = Entry(update.value, source, when)
        self.shown_down.discard(update.variable)
        return news

    def _disown(self, source: str) -> None:
        self.per_source[source] -= 1
        if self.per_source[source] <= 0:
            del self.per_source[source]

    def owner(self, variable: str) -> Optional[str]:
        entry = self.entries.get(variable)
        return None if entry is None else entry.source

    def mirrors_for(self, server: str) -> Iterator[StateUpdate]:
        """Every state the other sources' mirrors should show on server."""
        for variable, entry in self.entries.items():
            if entry.source != server:
                yield StateUpdate(variable, self.expected(variable))

    def expected(self, variable: str) -> Optional[str]:
        """What the mirror of variable should show, or None if no source reported it."""
        entry = self.entries.get(variable)
        if entry is None:
            return None
        if variable in self.shown_down:
            return self.down_state
        return entry.value

    def set_down(self, source: str) -> List[StateUpdate]:
        """The source is down: the updates that show its devices as down_state (none to keep them).

        They show down_state until the source reports them again (an event or its list).
        """
        if not self.down_state:
            return []
        newly_down = [variable for variable, entry in self.entries.items()
                      if entry.source == source and variable.startswith(DEVICE_PREFIX)
                      and variable not in self.shown_down]
        self.shown_down.update(newly_down)
        return [StateUpdate(variable, self.down_state) for variable in newly_down]

    def remove_source(self, source: str) -> List[StateUpdate]:
        """The source is gone for good (removed from the config): the updates that show its
        devices as down_state one last time (none without a down_state); then every state it
        reported is forgotten, so that no repair ever writes it again."""
        updates = self.set_down(source)
        for variable in [v for v, entry in self.entries.items() if entry.source == source]:
            del self.entries[variable]
            self.shown_down.discard(variable)
        self.per_source.pop(source, None)
        return updates

    def read_device_list(self, server: str, items: List[Dict[str, Any]], asked_at: float,
                         writing: IsWriting, on_bad: OnBadItem) -> ListReading:
        """Compare a server's DeviceStateList items with what is known.

        A mirror that is being written is not judged: the list may predate the write.
        """
        reading = ListReading()
        for item in items:
            mirror = mirror_variable(item)
            if mirror is not None:
                expected = self.expected(mirror)
                if expected and self.owner(mirror) != server and not writing(mirror) \
                        and str(item.get("State")).upper() != expected:
                    reading.repairs.append(StateUpdate(mirror, expected))
                continue
            try:
                update = device_state_update(item)
                self.check_room(server, update)
            except BadInput as exc:
                on_bad(item, exc)
                continue
            if update is not None:
                self._read_own(server, update, asked_at, reading)
        return reading

    def read_presence_list(self, server: str, items: List[Dict[str, Any]], asked_at: float,
                           after_restart: bool, writing: IsWriting,
                           on_bad: OnBadItem) -> ListReading:
        """Compare a server's PresenceStateList items with what is known.

        A presentity has the same name on every server, so a difference is either a change whose
        event was missed, or (after_restart) a stale value from the server's own database, which
        the resync has just overwritten, or a write of ours the list predates (writing).
        """
        reading = ListReading()
        for item in items:
            try:
                update = presence_update(item)
                self.check_room(server, update)
            except BadInput as exc:
                on_bad(item, exc)
                continue
            if update is None:
                continue
            expected = self.expected(update.variable)
            if writing(update.variable):
                continue
            if expected is None or (not after_restart and update.value != expected):
                self._read_own(server, update, asked_at, reading)
            elif self.owner(update.variable) == server:
                reading.current.append(StateUpdate(update.variable, expected))
        return reading

    def check_room(self, source: str, update: Optional[StateUpdate]) -> None:
        """BadInput if the table has no room for update of source (see refusal)."""
        why = update and self.refusal(source, update.variable)
        if why:
            raise BadInput(why)

    def _read_own(self, server: str, update: StateUpdate, asked_at: float,
                  reading: ListReading) -> None:
        if self.record_listed(server, update, asked_at):
            reading.changed.append(update)
        reading.current.append(StateUpdate(update.variable, self.entries[update.variable].value))


def mirror_variable(item: dict) -> Optional[str]:
    """The variable a DeviceStateList item of a Custom: device mirrors, e.g. Custom:SIP/100."""
    device = item.get("Device")
    if not isinstance(device, str) or not device.startswith(CUSTOM_DEVICE):
        return None
    try:
        check_name("Device", device)
    except BadInput:
        return None
    return f"DEVICE_STATE({device})"
