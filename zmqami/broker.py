"""The central broker: ``python broker.py config.ini``.

It reaches every Asterisk server through res_zmq_manager and mirrors each server's device states
(and, with ``presence = yes``, presences) on all the others as Custom: devices.
"""
import argparse
import logging
import sys
from typing import Any, Dict, List, Optional

import zmq

from . import __version__
from .ami import AmiLink
from .asterisk import HEALTH_CHECK_INTERVAL, AsteriskLink, LinkHandlers, ZmqManagerLink
from .config import (CONFIG_ERROR_EXIT, BrokerConfig, ConfigError, ServerConfig, example_text,
                     load_broker_config, placeholder_secrets, program_name, setup_logging)
from .loop import EventLoop
from .metrics import link_snapshot
from .relay import Relay
from .service import Service
from .states import StateTable
from .statefile import SAVE_INTERVAL, StateFile
from .stats import DropLog, plural
from .status import describe_states, known_names, link_status, print_status

log = logging.getLogger("broker")

STATISTICS_INTERVAL = 60.0  # seconds between statistics lines with count_messages = yes
FIRST_READ_WAIT = 10.0  # s after start to decide the presences with the servers that answered


class Broker(Service):
    def __init__(self, config: BrokerConfig, context: zmq.Context) -> None:
        super().__init__("broker", context, log)
        self.config = config
        self.drops = DropLog(log)
        self.states = StateTable(config.down_state, max_per_source=config.max_devices)
        self.relay = Relay(self.states, self.drops, log, config.device_state, config.presence,
                           mwi=config.mwi)
        self.handlers = LinkHandlers(
            on_event=lambda link, event: self.relay.take_event(link.name, link, event),
            drops=self.drops, on_up=self.resync, on_down=self.show_down,
            on_caught_up=lambda link: self.relay.read_lists(link.name, repair=True))
        self.servers: Dict[str, ServerConfig] = {}   # link name -> what it was made from
        self.links: List[AsteriskLink] = []
        self.state_file: Optional[StateFile] = None
        if config.state_file:
            self.state_file = StateFile(config.state_file, state_file_entries(config))
            self.states.restore(self.state_file.load())
        elif config.presence:  # without a state file the first presences are decided together
            self.relay.first_presences = {}

    def start(self) -> None:
        log.info("Broker %s starting with %s (device_state %s, presence %s, mwi %s)",
                 __version__, plural(len(self.config.servers), "server"),
                 _yes_no(self.config.device_state), _yes_no(self.config.presence),
                 _yes_no(self.config.mwi))
        self.apply(self.config)
        if self.relay.first_presences is not None:
            self.loop.call_later(FIRST_READ_WAIT, self.relay.decide_first)

    def ready_text(self) -> str:
        return f"relaying between {len(self.links)} servers"

    def stop(self) -> None:
        log.info("Received %s, exiting.", self.loop.stop_signal or "stop")
        self.save_states()
        if self.config.count_messages:
            self.log_statistics()
        for link in self.links:
            link.close()

    def apply(self, config: BrokerConfig) -> None:
        """Run with config: links that did not change are kept, with all they hold."""
        if len(config.servers) < 2:
            log.warning("Only %d server in %s: there is nowhere to relay to",
                        len(config.servers), config.path)
        kept = {link.name: link for link in self.links
                if self.servers.get(link.name) in config.servers}
        removed = [link for link in self.links if link.name not in kept]
        for link in removed:
            log.info("Server %s removed: disconnecting", link.name)
            link.close()
        self.links, self.servers = [], {}
        for server in config.servers:
            link = kept.get(server.name)
            if link is None:
                link = make_link(self.loop, self.context, server, config.request_timeout,
                                 self.handlers)
                link.start()
                link.ping()
            link.outbox.timeout = config.request_timeout / 1000.0
            self.links.append(link)
            self.servers[server.name] = server
        self.config = config
        self.relay.links = {link.name: link for link in self.links}
        self.relay.traced = {server.name for server in config.servers if server.ami_trace}
        self.relay.verbose = config.verbose_messages
        self.relay.device_state, self.relay.presence = config.device_state, config.presence
        self.relay.mwi = config.mwi
        self.relay.mwi_write = {server.name: server.mwi_write for server in config.servers}
        self.relay.publish_filters = {server.name: server.publish_filter
                                      for server in config.servers if server.publish_filter}
        self.relay.accept_filters = {server.name: server.accept_filter
                                     for server in config.servers if server.accept_filter}
        self.relay.hinted_only = {server.name for server in config.servers if server.hinted_only}
        self.states.down_state = config.down_state
        self.states.max_per_source = config.max_devices
        for link in removed:
            self.forget(link)
        if config.state_file and (self.state_file is None or
                                  self.state_file.path != config.state_file):
            self.state_file = StateFile(config.state_file, state_file_entries(config))
        elif not config.state_file:
            self.state_file = None
        self.schedule(
            self.loop.call_every(config.ping_interval, self.ping_all),
            self.loop.call_every(min(HEALTH_CHECK_INTERVAL, config.ping_interval),
                                 self.check_health),
            self.every(config.resync_interval, self.repair_all),
            self.every(STATISTICS_INTERVAL if config.count_messages else 0, self.log_statistics),
            self.every(SAVE_INTERVAL if config.state_file else 0, self.save_states))
        self.serve_status(config.status_socket, "broker", f"{config.path}: [general] "
                          "status_socket", self.describe_devices)

    def reload(self) -> None:
        """SIGHUP: read the config file again; a broken one is logged and the running one kept."""
        log.info("Received SIGHUP: reloading %s", self.config.path)
        try:
            config = load_broker_config(self.config.path)
            setup_logging(config.log_level, config.log_file, config.log_syslog)
        except ConfigError as exc:
            for line in exc.errors:
                log.error("Reload failed, running on as before: %s", line)
            return
        except OSError as exc:
            log.error("Reload failed, running on as before: %s: [general] log_file: %s",
                      self.config.path, exc)
            return
        before = set(self.servers)
        self.apply(config)
        self.reloads += 1
        after = set(self.servers)
        log.info("Reloaded %s: %s (%d added, %d removed)", config.path,
                 plural(len(after), "server"),
                 len(after - before), len(before - after))

    def metrics_snapshot(self) -> Dict[str, Any]:
        return {"links": [link_snapshot(link, self.drops.counts[link.name])
                          for link in self.links],
                "totals": {
                    "events_relayed": ("counter", "Events relayed to the other servers",
                                       self.relay.changes),
                    "known_states": ("gauge", "States known", len(self.states.entries)),
                    "resyncs": ("counter", "Servers resynchronised", self.relay.resyncs),
                    "reloads": ("counter", "Config reloads (SIGHUP) applied", self.reloads)}}

    def status_report(self) -> Dict[str, Any]:
        return {"servers": [link_status(link, self.drops.counts[link.name])
                            for link in self.links],
                "totals": {"events_relayed": self.relay.changes,
                           "known_states": len(self.states.entries),
                           "input_dropped": sum(self.drops.counts.values())}}

    def describe_devices(self, names: Optional[List[str]]) -> Dict[str, Any]:
        """--status devices: the names known (None), or what is known of these."""
        if names is None:
            return known_names(self.states)
        return describe_states(names, self.states, self.relay.links)

    # --- health, resynchronisation, repair ---------------------------------------------------------
    def ping_all(self) -> None:
        for link in self.links:
            link.ping()

    def check_health(self) -> None:
        for link in self.links:
            link.check_health(self.config.server_timeout)
        down = [link.name for link in self.links if link.up is False]
        self.set_health(f"{len(self.links) - len(down)} of {len(self.links)} servers up" +
                        (f"; down: {', '.join(down)}" if down else ""))

    def show_down(self, link: AsteriskLink) -> None:
        """A server is down: its devices show down_state on the others until it is back."""
        variables = self.relay.source_down(link.name)
        if variables:
            log.warning("%s of %s: now %s on the other servers",
                        plural(len(variables), "device"), link.name, self.config.down_state)

    def forget(self, link: AsteriskLink) -> None:
        """A server removed from the config: its devices show down_state on the others one last
        time, and nothing it reported is known any more (no repair writes it again)."""
        variables = self.relay.forget_source(link.name)
        log.info("Forgot the states of %s%s", link.name, f"; {len(variables)} of its devices now "
                 f"show {self.config.down_state} on the other servers" if variables else "")

    def resync(self, link: AsteriskLink) -> None:
        """A server is (back) up: write every known state on it, then read its own states."""
        first = self.relay.resync(link.name)
        self.relay.read_lists(link.name, repair=False, first=first)

    def after_stall(self, seconds: float) -> None:
        modules = [link for link in self.links if isinstance(link, ZmqManagerLink)]
        log.warning("The broker did not run for %.1f s (stopped, or its host paused)%s", seconds,
                    ": reading the states of the servers reached through res_zmq_manager again "
                    "once it has read what they sent meanwhile" if modules else "")
        for link in modules:  # (AMI drops nothing: Asterisk holds what a session has not read)
            link.read_again_when_caught_up()

    def repair_all(self) -> None:
        """Anti-entropy: read every server's states again; relay what was missed, repair mirrors."""
        for link in self.links:
            if link.up:
                self.relay.read_lists(link.name, repair=True)

    def save_states(self) -> None:
        if self.state_file is not None:
            self.state_file.save(self.states.presence_snapshot())

    def log_statistics(self) -> None:
        per_server = "; ".join(
            f"{link.name}: {link.stats.events} events in, {link.stats.writes_sent} writes sent, "
            f"{link.stats.acknowledged} acknowledged, {link.stats.refused} refused, "
            f"{link.stats.too_large} too large, "
            f"{sum(link.stats.actions_sent.values())} other actions sent, "
            f"{sum(link.stats.actions_answered.values())} answered, "
            f"{link.stats.timeouts} timeouts, {self.drops.counts[link.name]} dropped, "
            f"{len(link.outbox)} queued"
            for link in self.links)
        log.info("Statistics: %d events relayed; %s", self.relay.changes, per_server)


def make_link(loop: EventLoop, context: zmq.Context, server: ServerConfig, timeout_ms: int,
              handlers: LinkHandlers) -> AsteriskLink:
    """The connection to one server: plain AMI when it has an ami_user, else res_zmq_manager."""
    if server.ami_user:
        return AmiLink(loop, server.name, server.addr, server.ami_port, server.ami_user,
                       server.ami_secret, timeout_ms, handlers)
    return ZmqManagerLink(loop, context, server.name, server.cmd_url, server.evt_url, timeout_ms,
                          handlers, every_event=server.ami_trace)


def state_file_entries(config: BrokerConfig) -> int:
    """The most presences the broker may know: max_devices from each server."""
    return config.max_devices * max(1, len(config.servers))


def _yes_no(flag: bool) -> str:
    return "yes" if flag else "no"


def parse_args(argv: List[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=program_name("broker.py"),
        usage=f"{program_name('broker.py')} config.ini\n       {program_name('broker.py')} --demo",
        description="Mirror device states and presences between Asterisk servers.")
    parser.add_argument("config", nargs="?", help="the broker's ini file (see example_config.ini)")
    parser.add_argument("--demo", action="store_true",
                        help="run against three stand-in Asterisk servers on 127.0.0.1 and show "
                             "what propagates where")
    parser.add_argument("--check-config", action="store_true",
                        help="check the config file, print every error, exit 0 or 2")
    parser.add_argument("--status", action="store_true",
                        help="print the status of the broker running with this config file")
    parser.add_argument("--json", action="store_true", help="with --status: as JSON")
    parser.add_argument("query", nargs="*", metavar="devices [REGEX]",
                        help="with --status: what each server reports for each device and "
                             "presence whose name REGEX matches, and what was written where")
    parser.add_argument("--example-config", action="store_true",
                        help="print a commented example config.ini to start from")
    parser.add_argument("--version", action="version", version=f"zmq-ami-broker {__version__}")
    args = parser.parse_args(argv)
    if args.demo and (args.config or args.check_config or args.status):
        parser.error("--demo runs the broker on stand-in servers of its own: it takes no "
                     "config file, --check-config or --status")
    if args.query and not args.status:
        parser.error(f"{' '.join(args.query)}: only --status takes more than the config file")
    if not args.demo and not args.config and not args.example_config:
        parser.print_usage(sys.stderr)
        sys.exit(CONFIG_ERROR_EXIT)
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.example_config:
        print(example_text("example_config.ini"), end="")
        return 0
    if args.demo:
        from .demo import run_demo
        return run_demo()
    try:
        config = load_broker_config(args.config)
    except ConfigError as exc:
        return exc.report()
    if args.check_config:
        for warning in placeholder_secrets(config):
            print(warning)
        print(f"{args.config}: OK ({plural(len(config.servers), 'server')})")
        return 0
    if args.status:
        return print_status(config.path, "[general] status_socket", config.status_socket,
                            args.json, args.query)
    try:
        setup_logging(config.log_level, config.log_file, config.log_syslog, "broker")
    except OSError as exc:
        return ConfigError([f"{config.path}: [general] log_file: {exc}"]).report()
    context = zmq.Context()
    try:
        Broker(config, context).run(config.metrics_address, config.metrics_port,
                                    f"{config.path}: [general] metrics_port")
    finally:
        context.destroy(linger=0)
    return 0


if __name__ == "__main__":  # python -m zmqami.broker, as the demo runs it
    sys.exit(main())
