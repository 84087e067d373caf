"""What an agent receives from its network, before any of it is acted on: each message parsed,
taken once (a message comes by every hub), told apart from a namesake's (another agent with the
same SYSTEM_NAME), its sender proven over NATS, and its sender's liveness noted."""
import logging
from typing import Callable, Dict, List, Optional

from .envelope import Envelope, RecentIds, parse_message
from .natsnet import carries_state
from .peers import Peers
from .rules import BadInput
from .stats import DropLog, Throttle, held_back

log = logging.getLogger("agent")

COUNTER_EVERY = 100        # the original's "Message counter" line
SEEN_UUIDS = 10_000        # messages remembered to apply each once when they come by two hubs

Handler = Callable[[Envelope], None]


class Inbox:
    def __init__(self, name: str, network: object, drops: DropLog, peers: Peers,
                 handlers: Dict[str, Handler], hear: Handler = lambda message: None) -> None:
        self.name = name
        self.network = network   # its proves_origin and source (the name drops are counted under)
        self.drops = drops
        self.peers = peers
        self.handlers = handlers  # by msg_type
        self.hear = hear  # every peer's message, known or not, before its handler
        self.seen = RecentIds(SEEN_UUIDS)
        self.sent = RecentIds(SEEN_UUIDS)  # its own messages' uuids, to tell a namesake's
        self.received = 0
        self.name_clashes = 0
        self.clash_warnings = Throttle()
        self.unproven_origins = 0  # NATS: values whose origin their key does not prove

    def take(self, frames: List[bytes], age: float = 0.0, owner: Optional[str] = None) -> None:
        """A message from the network; from a NATS bucket (owner: whose key it was in), age: how
        long ago its sender stored it."""
        self.received += 1
        if self.received % COUNTER_EVERY == 0:
            log.info("Message counter: %s", self.received)
        try:
            message = parse_message(frames)
        except BadInput as exc:
            self.drops.drop(self.network.source, str(exc), b" | ".join(frames))
            return
        message.age = age
        if self.seen.add(message.uuid):
            return  # the same message by another hub
        if message.origin == self.name:
            if message.uuid not in self.sent:
                self.name_clash(message)
            return
        self.hear(message)
        handler = self.handlers.get(message.msg_type)
        if handler is None:
            log.debug("Ignoring %s from %s.", message.msg_type, message.origin)
            return
        if self.network.proves_origin:
            if not self.origin_proven(message, owner):
                return
            if owner is None:  # a plain subject: it says nothing of a peer's health
                handler(message)
                return
        self.peers.saw(message)
        handler(message)

    def origin_proven(self, message: Envelope, owner: Optional[str]) -> bool:
        """Over NATS a peer is who its bucket key says (only that peer may put under its name),
        never what a body claims: a value whose origin is not its key's owner, or a state on a
        subject anyone may publish on, is dropped and counted."""
        if owner is not None and message.origin != owner:
            why = f"origin {message.origin!r} in a key of {owner!r}"
        elif owner is None and carries_state(message):
            why = "a state on a plain subject: over NATS states come from the bucket only"
        else:
            return True
        self.unproven_origins += 1
        self.drop(message, why)
        return False

    def drop(self, message: Envelope, why: str, raw: bytes = b"") -> None:
        """Bad input in a peer's message.  Counted and rate-limited as the network's, the origin
        named in the line: a flood of invented origins must not grow a table or the log."""
        self.drops.drop(self.network.source, f"{message.msg_type} from {message.origin}: {why}",
                        raw)

    def name_clash(self, message: Envelope) -> None:
        """A message in its own name that it did not send: another agent has its SYSTEM_NAME."""
        self.name_clashes += 1
        more = self.clash_warnings.allow("clash")
        if more is not None:
            log.error("Another agent also calls itself %s (a %s in my name that I did not "
                      "send): the two never mirror each other.  Give each agent its own "
                      "SYSTEM_NAME.%s", self.name, message.msg_type,
                      held_back(more, "such messages"))
