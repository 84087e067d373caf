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
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

from .rules import MAILBOX_PREFIX, BadInput, StateUpdate, aggregate_device_states

DEVICE_PREFIX = "DEVICE_STATE("

OnRefused = Callable[[StateUpdate, str], None]  # a listed state the table has no room for
IsWriting = Callable[[str], bool]  # Outbox.is_unsettled of the server the list came from
Mirror = Tuple[str, str]  # (the variable a listed Custom: device mirrors, the state it shows)


@dataclass
class ListReading:
    """What a server's DeviceStateList or PresenceStateList showed, against what is known."""
    changed: List[StateUpdate] = field(default_factory=list)   # its own states that are news
    current: List[StateUpdate] = field(default_factory=list)   # all its own states, as now known
    repairs: List[StateUpdate] = field(default_factory=list)   # its mirrors that show a wrong state
    gone: List[str] = field(default_factory=list)  # its devices it no longer lists: shown down


class Entry:
    """The last state one source reported for one variable, and when an event changed it
    (changed_at: this process's monotonic clock; wall: wall-clock time, kept in a state file)."""
    __slots__ = ("value", "changed_at", "wall", "down")

    def __init__(self, value: str, changed_at: float, wall: float) -> None:
        self.value = value
        self.changed_at = changed_at
        self.wall = wall
        self.down = False  # its source is down: its share shows down_state


class Reports:
    """What each source reports for one variable: source -> Entry, in the order first reported,
    with the part of a dict's interface that StateTable uses.

    Nearly every variable has one source: it is held in two slots, in a third of the memory of a
    dict of one key (about 140 bytes less per device); a dict takes over from a second source on.
    """
    __slots__ = ("_source", "_entry", "_many")

    def __init__(self) -> None:
        self._source: Optional[str] = None
        self._entry: Optional[Entry] = None
        self._many: Optional[Dict[str, Entry]] = None

    def __len__(self) -> int:
        if self._many is not None:
            return len(self._many)
        return 0 if self._source is None else 1

    def __contains__(self, source: object) -> bool:
        if self._many is not None:
            return source in self._many
        return self._source is not None and source == self._source

    def get(self, source: str, default: Optional[Entry] = None) -> Optional[Entry]:
        if self._many is not None:
            return self._many.get(source, default)
        return self._entry if self._source is not None and source == self._source else default

    def __getitem__(self, source: str) -> Entry:
        entry = self.get(source)
        if entry is None:
            raise KeyError(source)
        return entry

    def __setitem__(self, source: str, entry: Entry) -> None:
        if self._many is not None:
            self._many[source] = entry
        elif self._source is None or source == self._source:
            self._source, self._entry = source, entry
        else:
            self._many = {self._source: self._entry, source: entry}
            self._source = self._entry = None

    def __delitem__(self, source: str) -> None:
        if self._many is not None:
            del self._many[source]
        elif self._source is not None and source == self._source:
            self._source = self._entry = None
        else:
            raise KeyError(source)

    def __iter__(self) -> Iterator[str]:
        if self._many is not None:
            return iter(self._many)
        return iter(() if self._source is None else (self._source,))

    def items(self) -> Iterable[Tuple[str, Entry]]:
        if self._many is not None:
            return self._many.items()
        return () if self._source is None else ((self._source, self._entry),)

    def values(self) -> Sequence[Entry]:
        """(reversible, as a dict's)"""
        if self._many is not None:
            return list(self._many.values())
        return () if self._source is None else (self._entry,)


class StateTable:
    """What each source reported, per variable.

    A device may be reported by several sources (a phone registered on A that B reports
    UNAVAILABLE): the mirror on a server shows what every *other* source reports, combined as
    Asterisk combines device states (rules.aggregate_device_states).  A presence has no owner:
    the newest report replaces the others.
    """

    def __init__(self, down_state: Optional[str], max_per_source: int = 10_000,
                 max_sources: int = 1_000, unverified_wall: Optional[float] = None) -> None:
        self.down_state = down_state
        # The wall-clock time given to a presence first read from a list (not seen changing):
        # None, now; the agent gives 0, older than any change a peer saw.
        self.unverified_wall = unverified_wall
        self.max_per_source = max_per_source
        self.max_sources = max_sources
        self.entries: Dict[str, Reports] = {}  # variable -> source -> its last report
        self.per_source: Counter = Counter()  # source -> how many variables it reports

    def refusal(self, source: str, variable: str) -> Optional[str]:
        """Why a new variable of source is not taken (a table bound), or None."""
        if source in self.entries.get(variable, ()):
            return None
        if self.per_source[source] >= self.max_per_source:
            return f"more than {self.max_per_source} states of one source: ignored"
        if source not in self.per_source and len(self.per_source) >= self.max_sources:
            return f"more than {self.max_sources} sources: ignored"
        return None

    def check_room(self, source: str, update: Optional[StateUpdate]) -> None:
        """BadInput if the table has no room for update of source (see refusal)."""
        why = update and self.refusal(source, update.variable)
        if why:
            raise BadInput(why)

    def record(self, source: str, update: StateUpdate, wall: Optional[float] = None,
               down: bool = False) -> bool:
        """Remember what a source reported in an event; True if a mirror may change.

        wall: when the change happened (wall clock, as a peer says); a presence older than the
        one known is not taken.  None: now.  down: the report of a source known to be down (a
        stopped agent's, read from a store): its share shows down_state at once.
        """
        news = self._remember(source, update, time.monotonic(), wall)
        if down and self.down_state and update.has_owner:
            self.entries[update.variable][source].down = True
        return news

    def record_listed(self, source: str, update: StateUpdate, asked_at: float) -> bool:
        """Like record, for a state read from a list asked for at asked_at.

        An event handled after the list was asked for may be newer than the list: it wins.
        """
        entry = self.entries.get(update.variable, {}).get(source)
        if entry is not None and entry.changed_at > asked_at:
            return False
        # (A presence first read from a list may be a stale one from Asterisk's database; a
        # voicemail server's counts are read from its messages: never stale.)
        wall = self.unverified_wall if update.is_presence and \
            update.variable not in self.entries else None
        return self._remember(source, update, asked_at, wall)

    def wall(self, variable: str, source: str) -> float:
        """When the source's report of variable changed (wall clock)."""
        return self.entries[variable][source].wall

    def _remember(self, source: str, update: StateUpdate, when: float,
                  wall: Optional[float] = None) -> bool:
        reports = self.entries.get(update.variable)
        if reports is None:
            reports = self.entries[update.variable] = Reports()
        if wall is None:
            wall = time.time()
        if not update.has_owner:  # a presence or a mailbox: the newest report is its value
            if any(entry.wall > wall for entry in reports.values()):
                return False  # an older change than the one known, told late
            news = self.expected(update.variable) != update.value
            for old_source in [s for s in reports if s != source]:
                del reports[old_source]
                self._disown(old_source)
        else:
            old = reports.get(source)
            news = old is None or old.down or old.value != update.value
        if source not in reports:
            self.per_source[source] += 1
        reports[source] = Entry(update.value, when, wall)
        return news

    def presence_snapshot(self) -> Dict[str, Tuple[str, str, float]]:
        """The presences and voicemail lamps (no owner: the newest report wins), for a state
        file: variable -> (value, source, wall-clock time)."""
        snapshot = {}
        for variable, reports in self.entries.items():
            if not variable.startswith(DEVICE_PREFIX):
                for source, entry in reports.items():
                    snapshot[variable] = (entry.value, source, entry.wall)
        return snapshot

    def restore(self, saved: Dict[str, Tuple[str, str, float]]) -> None:
        """Take the presences a state file kept (as known before any event of this run)."""
        for variable, (value, source, wall) in saved.items():
            if self.refusal(source, variable) is None:
                self.entries[variable] = reports = Reports()
                reports[source] = Entry(value, 0.0, wall)
                self.per_source[source] += 1

    def _disown(self, source: str) -> None:
        self.per_source[source] -= 1
        if self.per_source[source] <= 0:
            del self.per_source[source]

    def shown(self, entry: Entry) -> str:
        return self.down_state if entry.down and self.down_state else entry.value

    def owner(self, variable: str) -> Optional[str]:
        """The one source that reports variable, or None (nobody, or several)."""
        reports = self.entries.get(variable)
        return next(iter(reports)) if reports is not None and len(reports) == 1 else None

    def mirror_value(self, variable: str, server: str) -> Optional[str]:
        """What the mirror of variable should show on server: what the other sources report,
        combined; None if no other source reports it."""
        reports = self.entries.get(variable)
        if not reports:
            return None
        if len(reports) == 1:  # the common case, on the path of every event
            (source, entry), = reports.items()
            return None if source == server else self.shown(entry)
        values = [self.shown(entry) for source, entry in reports.items() if source != server]
        if not values:
            return None
        return aggregate_device_states(values) if variable.startswith(DEVICE_PREFIX) \
            else values[-1]

    def mirrors_for(self, server: str) -> Iterator[StateUpdate]:
        """Every state the other sources' mirrors should show on server."""
        for variable in self.entries:
            value = self.mirror_value(variable, server)
            if value is not None:
                yield StateUpdate(variable, value)

    def expected(self, variable: str) -> Optional[str]:
        """A presence's known value (its newest report), or None."""
        reports = self.entries.get(variable)
        if not reports:
            return None
        return self.shown(next(reversed(reports.values())))

    def set_down(self, source: str) -> List[str]:
        """The source is down: the variables whose mirrors change because its share of each
        now shows down_state (none when down_state keeps the last state).

        Its share shows down_state until the source reports it again (an event or its list).
        """
        if not self.down_state:
            return []
        newly_down = []
        for variable, reports in self.entries.items():
            entry = reports.get(source)
            if entry is not None and not entry.down and variable.startswith(DEVICE_PREFIX):
                entry.down = True
                newly_down.append(variable)
        return newly_down

    def set_up(self, source: str) -> List[str]:
        """The source is up again and what it last reported still holds (NATS: the bucket
        brings each change): the variables whose share shows its report again."""
        back = []
        for variable, reports in self.entries.items():
            entry = reports.get(source)
            if entry is not None and entry.down:
                entry.down = False
                back.append(variable)
        return back

    def remove_source(self, source: str) -> List[str]:
        """The source is gone for good (removed from the config): the variables whose mirrors
        change.  Its devices show down_state one last time where nobody else reports them (left
        alone without a down_state); then everything it reported is forgotten, so that no repair
        ever writes it again."""
        changed = []
        for variable in [v for v, reports in self.entries.items() if source in reports]:
            reports = self.entries[variable]
            if len(reports) > 1:  # the others' share alone, from now on
                del reports[source]
                changed.append(variable)
            elif self.down_state and variable.startswith(DEVICE_PREFIX):
                reports[source].down = True  # shown once (mirror_value), forgotten by forget()
                changed.append(variable)
            else:
                del self.entries[variable]
        self.per_source.pop(source, None)
        return changed

    def forget(self, variables: List[str], source: str) -> None:
        """Drop what remove_source kept for one last write."""
        for variable in variables:
            reports = self.entries.get(variable, {})
            if list(reports) == [source]:
                del self.entries[variable]

    def read_device_list(self, server: str, own: List[StateUpdate], mirrors: List[Mirror],
                         asked_at: float, writing: IsWriting, on_refused: OnRefused,
                         after_restart: bool = False) -> ListReading:
        """Compare what a server's DeviceStateList showed (its own devices' states, and what its
        Custom: mirrors show) with what is known.

        A mirror that is being written is not judged: the list may predate the write.  After a
        restart, a device of the server's that its list no longer shows (a phone that has not
        registered again) has its share shown as down_state until it reports again.
        """
        reading = ListReading()
        for mirror, shown in mirrors:
            expected = self.mirror_value(mirror, server)
            if expected and not writing(mirror) and shown != expected:
                reading.repairs.append(StateUpdate(mirror, expected))
        listed = set()
        for update in own:
            why = self.refusal(server, update.variable)
            if why:
                on_refused(update, why)
                continue
            listed.add(update.variable)
            self._read_own(server, update, asked_at, reading)
        if after_restart and self.down_state:
            for variable, reports in self.entries.items():
                entry = reports.get(server)
                if entry is not None and not entry.down and variable not in listed and \
                        variable.startswith(DEVICE_PREFIX) and entry.changed_at <= asked_at:
                    entry.down = True
                    reading.gone.append(variable)
        return reading

    def read_lamps_held(self, server: str, held: Dict[str, str],
                        writing: IsWriting) -> ListReading:
        """Compare the lamps a server written with MWIUpdate holds (MWIGet) with what they should
        show: each that differs, or that it lost, is repaired."""
        reading = ListReading()
        for variable in self.entries:
            if variable.startswith(MAILBOX_PREFIX) and not writing(variable):
                expected = self.mirror_value(variable, server)
                if expected is not None and held.get(variable) != expected:
                    reading.repairs.append(StateUpdate(variable, expected))
        return reading

    def read_presence_list(self, server: str, listed: List[StateUpdate], asked_at: float,
                           after_restart: bool, writing: IsWriting,
                           on_refused: OnRefused) -> ListReading:
        """Compare the presences a server's PresenceStateList showed with what is known.

        A presentity has the same name on every server, so a difference is either a change whose
        event was missed, or (after_restart) a stale value from the server's own database, which
        the resync has just overwritten, or a write of ours the list predates (writing).
        """
        reading = ListReading()
        for update in listed:
            why = self.refusal(server, update.variable)
            if why:
                on_refused(update, why)
                continue
            expected = self.expected(update.variable)
            if writing(update.variable):
                continue
            if expected is None or (not after_restart and update.value != expected):
                self._read_own(server, update, asked_at, reading)
            elif self.owner(update.variable) == server:
                reading.current.append(StateUpdate(update.variable, expected))
        return reading

    def _read_own(self, server: str, update: StateUpdate, asked_at: float,
                  reading: ListReading) -> None:
        if self.record_listed(server, update, asked_at):
            reading.changed.append(update)
        entry = self.entries.get(update.variable, {}).get(server)
        if entry is not None:  # (none: a newer presence of another source was kept)
            reading.current.append(StateUpdate(update.variable, entry.value))


def decide_first_presences(first: Dict[str, Dict[str, str]]) -> Tuple[
        Dict[str, Tuple[str, str]], List[str]]:
    """Without a state file: each presence's value at the first read of every server, decided.

    The same everywhere (or on the only servers that have it): that value.  One server differs
    and every other one (two at least) agrees: that server changed it while nobody relayed, and
    its value wins.  Anything else cannot be told apart: unresolved.
    Returns ({variable: (server, value)}, [unresolved variables]).
    """
    decided: Dict[str, Tuple[str, str]] = {}
    unresolved = []
    for variable in sorted({v for values in first.values() for v in values}):
        held = {server: values[variable] for server, values in first.items() if variable in values}
        counts = Counter(held.values())
        if len(counts) == 1:
            decided[variable] = next(iter(held.items()))
            continue
        odd = [value for value, count in counts.items() if count == 1]
        if len(counts) == 2 and len(odd) == 1 and len(held) >= 3:
            server = next(s for s, value in held.items() if value == odd[0])
            decided[variable] = (server, odd[0])
        else:
            unresolved.append(variable)
    return decided, unresolved
