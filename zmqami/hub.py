"""The hub of the agent/server network: ``python server.py [CONFIG.py]``.

Agents PUSH to its PULL socket; it re-publishes every message, unchanged, on its PUB socket, to
which the agents subscribe.  It keeps no state.  It checks each message's shape (two frames, a topic
``[...]``, a JSON object with a string msg_type) so that one bad sender cannot stop it; message
types it does not know are relayed all the same, for newer agents.
"""
import argparse
import logging
import os
import sys
from typing import List, Optional

import zmq
from zmq.utils.monitor import recv_monitor_message

from . import __version__
from . import security
from .config import (PROJECT_DIR, ConfigError, Setting, is_log_level, is_optional_text, is_url,
                     load_script_settings)
from .envelope import hub_socket, parse_frames
from .loop import EventLoop
from .rules import BadInput
from .stats import DropLog, printable

log = logging.getLogger("esb_server")

HUB_SETTINGS = {
    "LOG_LEVEL": Setting("info", is_log_level),
    "PUB_BIND_URL": Setting("tcp://127.0.0.1:55555", is_url),
    "PUB_CONNECT_URL": Setting("tcp://127.0.0.1:55555", is_url),  # kept from the original; unused
    "SUB_BIND_URL": Setting("tcp://127.0.0.1:55556", is_url),
    "CURVE_SECRET_KEY_FILE": Setting(None, is_optional_text),
    "CURVE_CLIENTS_DIR": Setting(None, is_optional_text),
}
BATCH = 1000  # messages relayed per wake-up


class Hub:
    def __init__(self, settings: dict, context: zmq.Context) -> None:
        self.settings = settings
        self.context = context
        self.loop = EventLoop()
        self.drops = DropLog(log)
        self.refusals = DropLog(log, what="a connection to")
        self.relayed = 0
        self.authenticator: Optional[security.Authenticator] = None
        self.pull = hub_socket(context, zmq.PULL)
        self.pub = hub_socket(context, zmq.PUB)
        self.source = f"agents on {settings['SUB_BIND_URL']}"

    def secure(self, config_path: str) -> None:
        """CURVE on both sockets when CURVE_SECRET_KEY_FILE is set; a warning when it should be."""
        key_file, clients_dir = self.settings["CURVE_SECRET_KEY_FILE"], self.settings["CURVE_CLIENTS_DIR"]
        if key_file is None:
            for key in ("SUB_BIND_URL", "PUB_BIND_URL"):
                if security.binds_beyond_loopback(self.settings[key]):
                    log.warning("%s binds %s without CURVE: anyone who reaches it can read every "
                                "phone's state and have agents run actions (README: Security)",
                                key, self.settings[key])
            return
        keys = security.load_key_pair(config_path, "CURVE_SECRET_KEY_FILE", key_file)
        if not clients_dir or not os.path.isdir(clients_dir):
            raise ConfigError([f"{config_path}: CURVE_CLIENTS_DIR: must name the folder of the "
                               f"allowed clients' public keys (found {clients_dir!r})"])
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
        self.refusals.drop(event["endpoint"].decode(), "a client without CURVE (or another "
                           "mechanism) was refused")

    def bind(self, config_path: str) -> None:
        self.secure(config_path)
        for sock, key in ((self.pull, "SUB_BIND_URL"), (self.pub, "PUB_BIND_URL")):
            try:
                sock.bind(self.settings[key])
            except zmq.ZMQError as exc:
                raise ConfigError([f"{config_path}: {key}: cannot bind {self.settings[key]}: "
                                   f"{exc.strerror}"]) from None

    def run(self) -> None:
        self.loop.stop_on_signals()
        self.loop.add_reader(self.pull, self.relay_messages)
        log.info("Started (version %s): agents push to %s, subscribe to %s.", __version__,
                 self.settings["SUB_BIND_URL"], self.settings["PUB_BIND_URL"])
        try:
            self.loop.run()
        finally:
            log.info("Received %s: %d messages relayed, %d dropped. ESB - exit.",
                     self.loop.stop_signal or "stop", self.relayed, sum(self.drops.counts.values()))
            if self.authenticator is not None:
                self.authenticator.stop()
            self.loop.close()

    def relay_messages(self) -> None:
        for _ in range(BATCH):
            try:
                frames = self.pull.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self.relay(frames)

    def relay(self, frames: List[bytes]) -> None:
        try:
            envelope = parse_frames(frames)
        except BadInput as exc:
            self.drops.drop(self.source, str(exc), b" | ".join(frames))
            return
        if log.isEnabledFor(logging.INFO):  # escaping costs: only for a line that is written
            log.info("Message %s from %s to %s, uuid %s.", envelope.msg_type,
                     printable(envelope.origin), envelope.target.decode("utf-8", "replace"),
                     printable(envelope.uuid))
        log.debug("%s", envelope.body)
        self.pub.send_multipart(frames)
        self.relayed += 1


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python server.py",
                                     description="The hub between zmq-ami-broker agents.")
    parser.add_argument("config", nargs="?", help="settings file (default: server_config.py "
                                                  "beside server.py)")
    parser.add_argument("--version", action="version", version=f"zmq-ami-broker {__version__}")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    config_path = args.config or os.path.join(PROJECT_DIR, "server_config.py")
    context = zmq.Context()
    try:
        hub = Hub(load_script_settings(config_path, HUB_SETTINGS, log), context)
        hub.bind(config_path)
    except ConfigError as exc:
        context.destroy(linger=0)
        return exc.report()
    try:
        hub.run()
    finally:
        context.destroy(linger=0)
    return 0

