"""What every source server last reported, and what its mirrors should show everywhere else.

Shared by the broker (one entry per Asterisk server) and the agent (one entry per peer agent).
It is what makes resynchronisation possible without asking the servers: a server that restarts
is given every known state again, a server that goes down has its devices shown as ``down_state``
on the others, and a list read from a server (DeviceStateList, PresenceStateList) is compared
with what is known, so that a missed event or a stale mirror is repaired.

Memory is bounded by the number of devices and presentities: one value per variable and source.
"""
import time
from typing import Dict, Iterator, List, Optional, Set

from .rules import CUSTOM_DEVICE, BadInput, StateUpdate, check_name

DEVICE_PREFIX = "DEVICE_STATE("


class StateTable:
    def __init__(self, down_state: Optional[str]) -> None:
        self.down_state = down_state
        self.known: Dict[str, Dict[str, str]] = {}   # source -> variable -> value
        self.owner: Dict[str, str] = {}              # variable -> source that reported it last
        self.changed_at: Dict[str, float] = {}       # variable -> when an event last changed it
        self.shown_down: Set[str] = set()            # device variables shown as down_state

    def record(self, source: str, update: StateUpdate) -> bool:
        """Remember what a source reported in an event; True if its mirrors must change."""
        self.changed_at[update.variable] = time.monotonic()
        return self._remember(source, update)

    def record_listed(self, source: str, update: StateUpdate, asked_at: float) -> bool:
        """Like record, for a state read from a list asked for at asked_at.

        An event handled after the list was asked for may be newer than the list: it wins.
        """
        if self.changed_at.get(update.variable, 0.0) > asked_at:
            return False
        return self._remember(source, update)

    def _remember(self, source: str, update: StateUpdate) -> bool:
        values = self.known.setdefault(source, {})
        previous_owner = self.owner.get(update.variable)
        self.owner[update.variable] = source
        news = (values.get(update.variable) != update.value or previous_owner != source
                or update.variable in self.shown_down)
        self.shown_down.discard(update.variable)
        values[update.variable] = update.value
        return news

    def mirrors_for(self, server: str) -> Iterator[StateUpdate]:
        """Every state the other sources' mirrors should show on server."""
        for variable, source in self.owner.items():
            if source != server:
                yield StateUpdate(variable, self.expected(variable))

    def expected(self, variable: str) -> Optional[str]:
        """What the mirror of variable should show, or None if no source reported it."""
        source = self.owner.get(variable)
        if source is None:
            return None
        if variable in self.shown_down:
            return self.down_state
        return self.known[source][variable]

    def set_down(self, source: str) -> List[StateUpdate]:
        """The source is down: the updates that show its devices as down_state (none to keep them).

        They show down_state until the source reports them again (an event or its list).
        """
        if not self.down_state:
            return []
        newly_down = [variable for variable in self.known.get(source, {})
                      if variable.startswith(DEVICE_PREFIX) and self.owner.get(variable) == source
                      and variable not in self.shown_down]
        self.shown_down.update(newly_down)
        return [StateUpdate(variable, self.down_state) for variable in newly_down]

    def forget(self, source: str) -> None:
        for variable in self.known.pop(source, {}):
            if self.owner.get(variable) == source:
                del self.owner[variable]
                self.shown_down.discard(variable)


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
