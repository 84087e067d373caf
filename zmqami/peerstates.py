"""What an agent's peers say of their states, mirrored on its Asterisk: an ``AsteriskEvent``
(one change), an ``AsteriskEvents`` (changes sent together, outgoing.py) or an ``AgentStates``
(a peer's every state, when asked).  Each state is checked and may be dropped on its own."""
import logging
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from .envelope import Envelope
from .peers import Peers
from .relay import Relay
from .rules import BadInput, relayed_update
from .states import StateTable

log = logging.getLogger("agent")

Drop = Callable[..., None]  # inbox.drop(message, why, raw=b"")


class PeerStates:
    def __init__(self, states: StateTable, relay: Relay, peers: Peers, drop: Drop) -> None:
        self.states = states
        self.relay = relay
        self.peers = peers
        self.drop = drop
        self.kinds: Tuple[bool, bool, bool] = (True, False, False)  # DEVICE_STATE, PRESENCE, MWI

    def apply_event(self, message: Envelope) -> None:
        # (written with the message's uuid as its ActionID, as the original agent wrote it)
        self.apply(message, message.field("data"), action_id=message.uuid)

    def apply_events(self, message: Envelope) -> None:
        """A peer's changes, sent together: each as an AsteriskEvent's (each written with an
        ActionID of its own: in flight at once, they could not share the message's)."""
        for event in self.events_of(message) or ():
            self.apply(message, event)

    def apply_states(self, message: Envelope) -> None:
        events = self.events_of(message)
        if events is None:
            return
        for event in events:
            self.apply(message, event, snapshot=True)
        log.info("Received %d states from %s", len(events), message.origin)

    def events_of(self, message: Envelope) -> Optional[List[Any]]:
        events = message.field("events")
        if isinstance(events, list):
            return events
        self.drop(message, "x_events is not a list")
        return None

    def apply(self, message: Envelope, data: Any, snapshot: bool = False,
              action_id: str = "") -> None:
        """A peer's state (an AsteriskEvent's x_data, or one of its AgentStates): mirror it here
        (action_id: of the write; by default a new one).

        A presence is taken only if it changed no earlier than the one known (its ChangedAt;
        without one, an event is a change seen now, a snapshot's value the oldest of all)."""
        origin = message.origin
        try:
            if not isinstance(data, dict):
                raise BadInput("not an object")
            update = relayed_update(data, *self.kinds)
            self.states.check_room(origin, update)
        except BadInput as exc:
            self.drop(message, str(exc), repr(data).encode())
            return
        stale = message.age > 0 and self.peers.is_down(origin)  # a stopped peer's (NATS)
        if update is None or not self.states.record(origin, update, changed_at(data, snapshot),
                                                    down=stale):
            return
        log.debug("Other device: %s - %s (from %s).", update.variable, update.value, origin)
        self.relay.write_mirrors(update.variable, action_id)


def changed_at(data: Dict[str, Any], snapshot: bool) -> Optional[float]:
    """A peer's ChangedAt (wall clock), if it is a sane one; else None (now) for an event and 0
    for a snapshot (AgentStates).  A time ahead of ours counts as now: a peer whose clock is
    ahead must not make its value unbeatable."""
    value = data.get("ChangedAt")
    try:
        wall = -1.0 if value is None else float(value)  # (None: a device state's, no exception)
    except (TypeError, ValueError, OverflowError):
        wall = -1.0
    if not wall >= 0:  # (also NaN)
        return 0.0 if snapshot else None
    return min(wall, time.time())
