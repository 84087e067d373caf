"""An agent's own states on their way to its peers through the hub.

Each state goes in an ``AsteriskEvent`` of its own, as the original agent sent it.  Under load a
wake-up of the agent's loop takes many states from its Asterisk at once; then, if no original
agent listens, they go together in one ``AsteriskEvents`` (``x_events``: the x_data of each, in
order): one message for the hub to relay and for each peer to read, instead of one per state.
An original agent ignores a msg_type it does not know, so it would miss those states: with
PACK_EVENTS = 'auto' an agent packs only once it has heard no original agent for
ORIGINAL_AGENT_QUIET seconds (an original agent reports its Asterisk's Ping to
``[AsteriskStats]`` every KEEP_ALIVE_INTERVAL, 30 s by default, and sends AsteriskEvent for each
of its own states, all without x_heartbeat).  Over NATS each state has its key: never packed.
Any other message the agent sends (Agent.send) first sends the states queued before it, so that
its peers see everything in the order it happened.
"""
import logging
import time
from typing import Any, Callable, Dict, List, Optional

from .envelope import ALL, Envelope, is_heartbeat
from .loop import EventLoop

log = logging.getLogger("agent")

PACKED = "AsteriskEvents"
# States per AsteriskEvents: a presence's x_data is at most about 25 KB (a name of 200 bytes, a
# subtype and a message of 4000, escaped as JSON), so a message stays far below HUB_MAX_BYTES.
PACK_MAX = 200
ORIGINAL_AGENT_QUIET = 300.0  # s without a word from an original agent before 'auto' packs
# What an original agent sends of its own accord: its states, its Ping reports, its pongs.  (A
# client without x_heartbeat, e.g. one that sends AsteriskAction, is not an agent.)
ORIGINAL_AGENT_SENDS = ("AsteriskEvent", "AsteriskActionStatus", "AgentPong")

Send = Callable[..., None]  # agent.transmit(target, msg_type, **fields)


class StateSender:
    """mode: True (every agent on the network packs), False (never), 'auto' (see above);
    packing: False over NATS."""

    def __init__(self, loop: EventLoop, send: Send, mode: Any, packing: bool,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.loop = loop
        self.clock = clock
        self.send = send
        self.mode = mode
        self.packing = packing
        self.queued: List[Dict[str, Any]] = []
        self.quiet_since = clock()  # of original agents ('auto')
        self.original_agent = ""  # the last one heard, while packing waits for quiet

    def add(self, data: Dict[str, Any]) -> None:
        """A state for every peer (an AsteriskEvent's x_data): sent once this wake-up's are in."""
        self.queued.append(data)
        self.loop.soon(self.flush)

    def flush(self) -> None:
        if not self.queued:
            return
        queued, self.queued = self.queued, []
        if len(queued) > 1 and self.may_pack():
            for start in range(0, len(queued), PACK_MAX):
                self.send(ALL, PACKED, events=queued[start:start + PACK_MAX])
            return
        for data in queued:
            self.send(ALL, "AsteriskEvent", data=data)

    def may_pack(self) -> bool:
        if not self.packing or self.mode is False:
            return False
        if self.mode is True:
            return True
        if self.clock() - self.quiet_since < ORIGINAL_AGENT_QUIET:
            return False
        if self.original_agent:
            log.info("No original agent heard for %g s (the last: %s): states now go together "
                     "under load.", ORIGINAL_AGENT_QUIET, self.original_agent)
            self.original_agent = ""
        return True

    def status(self) -> Optional[str]:
        """Whether states go together, and why (--status); None over NATS."""
        if not self.packing:
            return None
        if self.mode != "auto":
            return f"{'yes' if self.mode else 'no'} (PACK_EVENTS = {self.mode})"
        quiet = self.clock() - self.quiet_since
        if quiet >= ORIGINAL_AGENT_QUIET:
            return f"yes (no original agent heard for {ORIGINAL_AGENT_QUIET:g} s)"
        if self.original_agent:
            return f"no: original agent {self.original_agent} heard {quiet:.0f} s ago"
        return f"not yet: no original agent heard in the {quiet:.0f} s since the start"

    def heard(self, message: Envelope) -> None:
        """Any message from the network: one an original agent sent puts packing off.  (On the
        path of every message: over NATS, where nothing is packed, it returns at once.)"""
        if not self.packing or message.msg_type not in ORIGINAL_AGENT_SENDS or \
                is_heartbeat(message.field("heartbeat")):
            return
        if not self.original_agent and self.mode == "auto":
            log.info("An original agent (%s) is on the network: each state goes in a message "
                     "of its own until none is heard for %g s.", message.origin,
                     ORIGINAL_AGENT_QUIET)
        elif not self.original_agent and self.mode is True:
            log.warning("An original agent (%s) is on the network: it misses the states sent "
                        "together (PACK_EVENTS = True); set PACK_EVENTS = 'auto' until every "
                        "agent is of this version.", message.origin)
        self.original_agent = str(message.origin)
        self.quiet_since = self.clock()
