"""The agent's side of the agent network: how its messages reach the other agents.

``HubNetwork`` is the ZeroMQ hub (or redundant hubs): PUSH to each hub's PULL, SUB to each hub's
PUB with the topics ``[*]`` and ``[<SYSTEM_NAME>]``, CURVE when configured.  The agent sees only
this small interface (secure, start, send, status, close, and two callbacks: each message, and each
(re)connection after which the peers' states may have been missed), as it sees AsteriskLink for its
Asterisk.  natsnet.NatsNetwork, the NATS transport, stands behind the same seam.
"""
import logging
from typing import Any, Callable, Dict, List, Optional, Tuple

import zmq
from zmq.utils.monitor import recv_monitor_message

from . import envelope, security
from .config import ConfigError, collecting
from .envelope import ALL, hub_socket
from .loop import EventLoop, drain, send_frames
from .stats import DropLog

log = logging.getLogger("agent")

# (frames[, age, owner]): from a NATS bucket, how long ago it was stored and whose key it was in
OnMessage = Callable[..., None]


def as_list(value: Any) -> List[str]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def curve_client_keys(config_path: str, settings: Dict[str, Any]
                      ) -> Optional[Tuple[bytes, security.KeyPair]]:
    """(the hub's public key, the agent's key pair) when CURVE is on, None when off;
    ConfigError naming the setting when one of the two is missing or its file is unusable."""
    server_key_file = settings["CURVE_SERVER_KEY_FILE"]
    key_file = settings["CURVE_SECRET_KEY_FILE"]
    if server_key_file is None and key_file is None:
        return None
    if server_key_file is None or key_file is None:
        missing = "CURVE_SECRET_KEY_FILE" if key_file is None else "CURVE_SERVER_KEY_FILE"
        raise ConfigError([f"{config_path}: {missing}: needed too when CURVE is on (both "
                           f"CURVE_SERVER_KEY_FILE and CURVE_SECRET_KEY_FILE)"])
    errors: List[str] = []
    server_key = collecting(errors, security.load_public_key, config_path,
                            "CURVE_SERVER_KEY_FILE", server_key_file)
    keys = collecting(errors, security.load_key_pair, config_path, "CURVE_SECRET_KEY_FILE",
                      key_file)
    if errors:
        raise ConfigError(errors)
    return server_key, keys


class HubNetwork:
    def __init__(self, loop: EventLoop, context: zmq.Context, settings: Dict[str, Any],
                 name: str, on_message: OnMessage, on_connected: Callable[[], None]) -> None:
        self.loop = loop
        self.settings = settings
        self.on_message = on_message
        self.proves_origin = False  # the hub (with CURVE) checks origins itself
        self.kind = "hub"  # in logs and the status
        self.on_connected = on_connected
        self.push_urls = as_list(settings["ZMQ_PUB_URL"])
        self.sub_urls = as_list(settings["ZMQ_SUB_URL"])
        self.source = "the hub at " + ", ".join(self.sub_urls)  # for drop counts and logs
        self.unsent = DropLog(log, what="a message to")
        self.pushes = [hub_socket(context, zmq.PUSH) for _ in self.push_urls]
        self.sub = hub_socket(context, zmq.SUB)
        self.sub.setsockopt(zmq.SUBSCRIBE, envelope.topic(ALL))
        self.sub.setsockopt(zmq.SUBSCRIBE, envelope.topic(name))
        self.hearing_reports = False
        self.monitor = self.sub.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED |
                                                   zmq.EVENT_DISCONNECTED)

    def hear_reports(self, on: bool) -> None:
        """Take the Ping reports every agent sends to [AsteriskStats] too (an original agent's
        tell it is there: outgoing.py), or no longer: as many messages as the heartbeats."""
        if on != self.hearing_reports:
            self.sub.setsockopt(zmq.SUBSCRIBE if on else zmq.UNSUBSCRIBE,
                                envelope.topic(envelope.STATS))
            self.hearing_reports = on

    def secure(self, config_path: str) -> None:
        """CURVE on the hub connections when CURVE_SERVER_KEY_FILE is set."""
        curve = curve_client_keys(config_path, self.settings)
        if curve is not None:
            for sock in self.pushes + [self.sub]:
                security.make_client(sock, *curve)

    def start(self) -> None:
        for push, url in zip(self.pushes, self.push_urls):
            push.connect(url)
        for url in self.sub_urls:
            self.sub.connect(url)
        log.info("Connected to the hub: pushing to %s, subscribed to %s.",
                 ", ".join(self.push_urls), ", ".join(self.sub_urls))
        self.loop.add_reader(self.sub, lambda: drain(self.sub, self.on_message))
        self.loop.add_reader(self.monitor, self._on_monitor_event)

    def send(self, frames: List[bytes], body: Optional[Dict[str, Any]] = None) -> None:
        """To every hub; a hub unreachable long enough to fill its queue is counted, logged."""
        for push, url in zip(self.pushes, self.push_urls):
            try:
                send_frames(push, frames)
            except zmq.Again:
                self.unsent.drop(f"the hub at {url}", "not reachable, queue full", frames[1])

    def _on_monitor_event(self) -> None:
        event = recv_monitor_message(self.monitor)
        address = event.get("endpoint", b"").decode("utf-8", "replace")
        if event["event"] == zmq.EVENT_DISCONNECTED:
            log.warning("Lost the hub at %s; reconnecting.", address)
            return
        log.info("Connected to the hub at %s: asking the peers for their states.", address)
        self.on_connected()

    def status(self) -> Dict[str, Any]:
        """What --status shows of the network beyond the agent's own totals."""
        return {}

    def close(self) -> None:
        self.sub.disable_monitor()
