"""The central broker: ``python broker.py config.ini``.

It reaches every Asterisk server through res_zmq_manager and mirrors each server's device states
(and, with ``presence = yes``, presences) on all the others as Custom: devices.
"""
import argparse
import json
import logging
import sys
import uuid
from typing import Any, Dict, List, Optional

import zmq

from . import __version__
from .asterisk import LinkHandlers, ZmqManagerLink
from .config import CONFIG_ERROR_EXIT, BrokerConfig, ConfigError, load_broker_config, setup_logging
from .loop import EventLoop
from .rules import BadInput, PresenceEchoFilter, StateUpdate, relayed_update
from .stats import DropLog

log = logging.getLogger("broker")

STATISTICS_INTERVAL = 60.0  # seconds between statistics lines with count_messages = yes


class Broker:
    def __init__(self, config: BrokerConfig, context: zmq.Context) -> None:
        self.config = config
        self.loop = EventLoop()
        self.drops = DropLog(log)
        self.echoes = PresenceEchoFilter()
        self.events_relayed = 0
        handlers = LinkHandlers(on_event=self.on_event, drops=self.drops)
        self.links = [ZmqManagerLink(self.loop, context, server.name, server.cmd_url,
                                     server.evt_url, config.request_timeout, handlers)
                      for server in config.servers]
        self.traced = {link.name for link, server in zip(self.links, config.servers)
                       if server.ami_trace}

    def run(self) -> None:
        """Relay until SIGTERM or Ctrl-C."""
        log.info("Broker %s starting with %d servers (device_state %s, presence %s)", __version__,
                 len(self.links), _yes_no(self.config.device_state), _yes_no(self.config.presence))
        if len(self.links) < 2:
            log.warning("Only %d server in %s: there is nowhere to relay to",
                        len(self.links), self.config.path)
        for link in self.links:
            link.start()
        if self.config.count_messages:
            self.loop.call_every(STATISTICS_INTERVAL, self.log_statistics)
        self.loop.stop_on_signals()
        try:
            self.loop.run()
        finally:
            log.info("Received %s, exiting.", self.loop.stop_signal or "stop")
            if self.config.count_messages:
                self.log_statistics()
            for link in self.links:
                link.close()
            self.loop.close()

    def on_event(self, source: ZmqManagerLink, event: Dict[str, Any]) -> None:
        if source.name in self.traced:
            log.info("Got message from %s:\n%s.", source.name, json.dumps(event, indent=4))
        try:
            update = relayed_update(event, self.config.device_state, self.config.presence)
        except BadInput as exc:
            self.drops.drop(source.name, f"{event.get('Event')}: {exc}",
                            json.dumps(event).encode("utf-8"))
            return
        if update is None:
            log.debug("Ignoring event %s from %s", event["Event"], source.name)
            return
        if update.is_presence and self.echoes.is_echo(source.name, update):
            log.debug("Ignoring %s=%s from %s: the echo of our own write", update.variable,
                      update.value, source.name)
            return
        self.relay(source, update)

    def relay(self, source: ZmqManagerLink, update: StateUpdate) -> None:
        """Write the update on every server but its source."""
        self.events_relayed += 1
        action_id = uuid.uuid4().hex
        if self.config.verbose_messages:
            log.info("Distribute: %s", json.dumps(update.action(action_id), indent=1))
        log.debug("Relaying %s=%s from %s", update.variable, update.value, source.name)
        for link in self.links:
            if link is source:
                continue
            if update.is_presence:
                self.echoes.written(link.name, update)
            link.write_state(update, action_id)

    def log_statistics(self) -> None:
        per_server = "; ".join(
            f"{link.name}: {link.stats.events} events in, {link.stats.sent} actions sent, "
            f"{link.stats.acknowledged} acknowledged, {link.stats.refused} refused, "
            f"{link.stats.timeouts} timeouts, {self.drops.counts[link.name]} dropped, "
            f"{len(link.outbox)} queued"
            for link in self.links)
        log.info("Statistics: %d events relayed; %s", self.events_relayed, per_server)


def _yes_no(flag: bool) -> str:
    return "yes" if flag else "no"


def parse_args(argv: List[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python broker.py", usage="python broker.py config.ini\n       python broker.py --demo",
        description="Mirror device states and presences between Asterisk servers.")
    parser.add_argument("config", nargs="?", help="the broker's ini file (see example_config.ini)")
    parser.add_argument("--demo", action="store_true",
                        help="run against three stand-in Asterisk servers on 127.0.0.1 and show "
                             "what propagates where")
    parser.add_argument("--version", action="version", version=f"zmq-ami-broker {__version__}")
    args = parser.parse_args(argv)
    if not args.demo and not args.config:
        parser.print_usage(sys.stderr)
        sys.exit(CONFIG_ERROR_EXIT)
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.demo:
        from .demo import run_demo
        return run_demo()
    try:
        config = load_broker_config(args.config)
    except ConfigError as exc:
        return exc.report()
    setup_logging(config.log_level)
    context = zmq.Context()
    try:
        Broker(config, context).run()
    finally:
        context.destroy(linger=0)
    return 0
