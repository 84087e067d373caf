"""The hub of the agent/server network: ``python server.py [CONFIG.py]``.

Agents PUSH to its PULL socket; it re-publishes every message, unchanged, on its PUB socket, to
which the agents subscribe.  It keeps no state.  It checks each message's shape (two frames, a topic
``[...]``, a JSON object with a string msg_type) so that one bad sender cannot stop it; message
types it does not know are relayed all the same, for newer agents.
"""
import logging
import os
from typing import Any, Dict, List, Optional

import zmq
from zmq.utils.monitor import recv_monitor_message

from . import __version__
from . import security
from .config import (COMMON_SETTINGS, ConfigError, Schema, Setting, collecting, is_bind_url,
                     is_log_level, is_optional_text, is_url, reload_settings, run_settings_script)
from .envelope import hub_socket, parse_frames
from .loop import drain, send_frames
from .rules import BadInput
from .stats import DropLog, printable
from .service import Service

log = logging.getLogger("hub")

def curve_server_keys(path: str, settings: Dict[str, Any]) -> Optional[security.KeyPair]:
    """The hub's key pair when CURVE is on (None: off); ConfigError naming the setting when
    CURVE_CLIENTS_DIR is not a folder, or is set without a key pair (CURVE would be off)."""
    key_file, clients_dir = settings["CURVE_SECRET_KEY_FILE"], settings["CURVE_CLIENTS_DIR"]
    if key_file is None:
        if clients_dir is not None:
            raise ConfigError([f"{path}: CURVE_SECRET_KEY_FILE: needed too: without it CURVE "
                               "is off, and CURVE_CLIENTS_DIR admits nobody in particular"])
        return None
    errors: List[str] = []
    if not clients_dir or not os.path.isdir(clients_dir):
        errors.append(f"{path}: CURVE_CLIENTS_DIR: must name the folder of the allowed clients' "
                      f"public keys (found {clients_dir!r})")
    keys = collecting(errors, security.load_key_pair, path, "CURVE_SECRET_KEY_FILE", key_file)
    if errors:
        raise ConfigError(errors)
    return keys


HUB_SETTINGS = Schema({
    "LOG_LEVEL": Setting("info", is_log_level),
    "PUB_BIND_URL": Setting("tcp://127.0.0.1:55555", is_bind_url),
    "PUB_CONNECT_URL": Setting("tcp://127.0.0.1:55555", is_url),  # kept from the original; unused
    "SUB_BIND_URL": Setting("tcp://127.0.0.1:55556", is_bind_url),
    "CURVE_SECRET_KEY_FILE": Setting(None, is_optional_text),
    "CURVE_CLIENTS_DIR": Setting(None, is_optional_text),
    **COMMON_SETTINGS,
}, together=curve_server_keys)
# What a SIGHUP cannot change: the sockets are bound.
RESTART_SETTINGS = ("PUB_BIND_URL", "SUB_BIND_URL", "CURVE_SECRET_KEY_FILE", "CURVE_CLIENTS_DIR",
                    "STATUS_SOCKET")


class Hub(Service):
    def __init__(self, settings: dict, context: zmq.Context) -> None:
        super().__init__("hub", context, log)
        self.settings = settings
        self.drops = DropLog(log)
        self.refusals = DropLog(log, what="a connection to")
        self.relayed = 0
        self.authenticator: Optional[security.Authenticator] = None
        self.config_path = ""
        self.pull = hub_socket(context, zmq.PULL)
        self.pub = hub_socket(context, zmq.PUB)
        self.source = f"agents on {settings['SUB_BIND_URL']}"

    def secure(self, config_path: str) -> None:
        """CURVE on both sockets when CURVE_SECRET_KEY_FILE is set; a warning when it should be."""
        keys = curve_server_keys(config_path, self.settings)
        if keys is None:
            for key in ("SUB_BIND_URL", "PUB_BIND_URL"):
                if security.binds_beyond_loopback(self.settings[key]):
                    log.warning("%s binds %s without CURVE: anyone who reaches it can read every "
                                "phone's state and have agents run actions (docs/security.md)",
                                key, self.settings[key])
            return
        clients_dir = self.settings["CURVE_CLIENTS_DIR"]
        self.authenticator = security.start_authenticator(self.context, clients_dir)
        for sock in (self.pull, self.pub):
            security.make_server(sock, keys)
            monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL |
                                              zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
            self.loop.add_reader(monitor, lambda monitor=monitor: self.on_refused(monitor))
        log.info("CURVE on: only the keys in %s may connect.", clients_dir)

    def on_refused(self, monitor: zmq.Socket) -> None:
        # libzmq tells the endpoint, not the peer: a client without CURVE never reaches the
        # authenticator, which logs the address of clients with an unknown key.
        event = recv_monitor_message(monitor)
        self.refusals.drop(event["endpoint"].decode(), "a client without CURVE (or with another "
                           "security mechanism) was refused")

    def bind(self, config_path: str) -> None:
        self.secure(config_path)
        for sock, key in ((self.pull, "SUB_BIND_URL"), (self.pub, "PUB_BIND_URL")):
            try:
                sock.bind(self.settings[key])
            except zmq.ZMQError as exc:
                raise ConfigError([f"{config_path}: {key}: cannot bind {self.settings[key]}: "
                                   f"{exc.strerror}"]) from None

    def start(self) -> None:
        if self.authenticator is None:
            self.loop.add_reader(self.pull, lambda: drain(self.pull, self.relay))
        else:
            self.loop.add_reader(self.pull, lambda: drain(self.pull, self.relay_own, copy=False))
        self.serve_status(self.settings["STATUS_SOCKET"], "hub",
                          f"{self.config_path}: STATUS_SOCKET")
        log.info("Started (version %s): agents push to %s, subscribe to %s.", __version__,
                 self.settings["SUB_BIND_URL"], self.settings["PUB_BIND_URL"])

    def ready_text(self) -> str:
        return f"relaying: agents push to {self.settings['SUB_BIND_URL']}"

    def stop(self) -> None:
        log.info("Received %s: %d messages relayed, %d dropped. ESB - exit.",
                 self.loop.stop_signal or "stop", self.relayed, sum(self.drops.counts.values()))
        if self.authenticator is not None:
            self.authenticator.stop()

    def metrics_snapshot(self) -> dict:
        return {"totals": {
            "messages_relayed": ("counter", "Messages relayed to the agents", self.relayed),
            "input_dropped": ("counter", "Invalid messages dropped",
                              sum(self.drops.counts.values())),
            "connections_refused": ("counter", "Connections refused (CURVE)",
                                    sum(self.refusals.counts.values())),
            "reloads": ("counter", "Settings reloads (SIGHUP) applied", self.reloads)}}

    def status_report(self) -> dict:
        return {"totals": {"messages_relayed": self.relayed,
                           "input_dropped": sum(self.drops.counts.values()),
                           "connections_refused": sum(self.refusals.counts.values())}}

    def reload(self) -> None:
        log.info("Received SIGHUP: reloading %s", self.config_path)
        settings = reload_settings(self.config_path, HUB_SETTINGS, self.settings,
                                   RESTART_SETTINGS, log)
        if settings is not None:
            self.settings = settings
            self.reloads += 1

    def relay_own(self, frames: List[zmq.Frame]) -> None:
        """With CURVE: relay a message only if its origin is the name of the key that sent it."""
        sender = frames[0].get("User-Id")
        self.relay([frame.bytes for frame in frames], sender)

    def relay(self, frames: List[bytes], sender: Optional[str] = None) -> None:
        try:
            envelope = parse_frames(frames)
            if sender is not None and envelope.origin != sender:
                raise BadInput(f"{envelope.msg_type} with origin {envelope.origin!r} from the "
                               f"key of {sender!r}: a client may only speak as itself")
        except BadInput as exc:
            self.drops.drop(self.source, str(exc), b" | ".join(frames))
            return
        # The original's line, now at debug: one line per message is no log for months.
        if log.isEnabledFor(logging.DEBUG):  # escaping costs: only for a line that is written
            log.debug("Message %s from %s to %s, uuid %s.", envelope.msg_type,
                      printable(envelope.origin), envelope.target.decode("utf-8", "replace"),
                      printable(envelope.uuid))
        log.debug("%s", envelope.body)
        send_frames(self.pub, frames)  # (a PUB never blocks: a slow subscriber's share is dropped)
        self.relayed += 1


def main(argv: Optional[List[str]] = None) -> int:
    return run_settings_script("server.py", "The hub between zmq-ami-broker agents.",
                               "server_config.py", HUB_SETTINGS, argv, run_hub)


def run_hub(config_path: str, settings: dict) -> int:
    context = zmq.Context()
    try:
        hub = Hub(settings, context)
        hub.config_path = config_path
        hub.bind(config_path)
        hub.run(settings["METRICS_ADDRESS"], settings["METRICS_PORT"],
                f"{config_path}: METRICS_PORT")
    except ConfigError as exc:
        return exc.report()
    finally:
        context.destroy(linger=0)
    return 0
