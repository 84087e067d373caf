"""An agent's peers: the other agents, up or down by their heartbeats.

A peer that sends heartbeats (x_heartbeat in its messages: a new agent) is timed out after
PEER_TIMEOUT seconds of silence, and is down while it says its Asterisk is.  An original agent
sends none and is never timed out.  A message stored in a NATS bucket says how old it is: a
peer whose last message is older than the timeout is down from the start.
"""
import logging
import time
from typing import Callable, Dict, Iterator, Tuple

from .envelope import Envelope, is_heartbeat

log = logging.getLogger("agent")


class Peer:
    """Another agent that sends heartbeats."""

    def __init__(self, last_seen: float) -> None:
        self.last_seen = last_seen  # (monotonic clock) when its newest message was sent
        self.up = True


class Peers:
    def __init__(self, timeout: float, max_peers: int, on_down: Callable[[str, str], None],
                 on_up: Callable[[str], None], refuse: Callable[[Envelope, str], None]) -> None:
        self.timeout = timeout
        self.max_peers = max_peers
        self.on_down = on_down  # (name, why): it is down now
        self.on_up = on_up      # (name): it is up again
        self.refuse = refuse    # (message, why): one peer too many
        self.peers: Dict[str, Peer] = {}

    def __iter__(self) -> Iterator[Tuple[str, Peer]]:
        return iter(sorted(self.peers.items()))

    def __len__(self) -> int:
        return len(self.peers)

    def up_count(self) -> int:
        return sum(peer.up for peer in self.peers.values())

    def is_down(self, name: str) -> bool:
        peer = self.peers.get(name)
        return peer is not None and not peer.up

    def saw(self, message: Envelope) -> None:
        """Any message from an agent that sends heartbeats shows it alive, when it was sent: a
        stored one (NATS bucket) older than the timeout shows a peer that is down."""
        sent = time.monotonic() - message.age
        peer = self.peers.get(message.origin)
        if peer is not None:
            peer.last_seen = max(peer.last_seen, sent)
        elif is_heartbeat(message.field("heartbeat")):
            if len(self.peers) >= self.max_peers:
                self.refuse(message, f"more than {self.max_peers} peers (MAX_PEERS): not tracked")
                return
            self.peers[message.origin] = Peer(sent)
            if message.age > self.timeout:
                self.down(message.origin, f"its last message is {message.age:.0f} s old")
            else:
                log.info("Peer %s is up.", message.origin)

    def heartbeat(self, message: Envelope) -> None:
        """An AgentHeartbeat: its Asterisk up or down."""
        peer = self.peers.get(message.origin)
        if peer is None or message.age > self.timeout:
            return  # no x_heartbeat (not an agent that can be timed out), or an old one
        asterisk_down = message.field("asterisk") == "down"
        if asterisk_down and peer.up:
            self.down(message.origin, "its Asterisk is down")
        elif not asterisk_down and not peer.up:
            peer.up = True
            self.on_up(message.origin)

    def check(self) -> None:
        """Peers silent for longer than the timeout are down."""
        now = time.monotonic()
        for name, peer in self.peers.items():
            if peer.up and now - peer.last_seen > self.timeout:
                self.down(name, f"silent for {self.timeout:g} s")

    def down(self, name: str, why: str) -> None:
        self.peers[name].up = False
        self.on_down(name, why)
