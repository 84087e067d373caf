"""The central broker: ``python broker.py config.ini``.

It reaches every Asterisk server through res_zmq_manager and mirrors each server's device states
(and, with ``presence = yes``, presences) on all the others as Custom: devices.
"""
import argparse
import json
import logging
import sys
from typing import Any, Dict, List, Optional, Set

import zmq

from . import __version__
from .ami import AmiLink
from .asterisk import HEALTH_CHECK_INTERVAL, AsteriskLink, LinkHandlers, ZmqManagerLink
from .config import (CONFIG_ERROR_EXIT, BrokerConfig, ConfigError, ServerConfig, example_text,
                     load_broker_config, placeholder_secrets, program_name, setup_logging)
from .loop import BATCH_INTERVAL, EventLoop, Timer
from .rules import BadInput, StateUpdate, presence_update, relayed_update, unique_id
from .states import ListReading, StateTable, decide_first_presences, list_items
from .statefile import SAVE_INTERVAL, StateFile
from .stats import DropLog, plural, printable
from .metrics import MetricsServer, link_snapshot, serve_metrics
from .systemd import Notifier
from .status import (StatusServer, describe_states, known_names, link_status, print_status,
                     serve_status)

log = logging.getLogger("broker")

STATISTICS_INTERVAL = 60.0  # seconds between statistics lines with count_messages = yes
FIRST_READ_WAIT = 10.0  # s after start to decide the presences with the servers that answered


class Broker:
    def __init__(self, config: BrokerConfig, context: zmq.Context) -> None:
        self.config = config
        self.context = context
        self.loop = EventLoop(BATCH_INTERVAL)
        self.drops = DropLog(log)
        self.states = StateTable(config.down_state, max_per_source=config.max_devices)
        self.events_relayed = 0
        self.handlers = LinkHandlers(on_event=self.on_event, drops=self.drops,
                                     on_up=self.resync, on_down=self.show_down)
        self.servers: Dict[str, ServerConfig] = {}   # link name -> what it was made from
        self.links: List[AsteriskLink] = []
        self.traced: Set[str] = set()                 # servers with ami_trace = yes
        self.timers: List[Timer] = []
        self.status: Optional[StatusServer] = None
        self.presences_read: Set[str] = set()  # servers whose presences were read this run
        self.systemd = Notifier()
        self.metrics: Optional[MetricsServer] = None
        self.resyncs = 0
        self.reloads = 0
        self.health = ""                    # the last STATUS= line sent to systemd
        self.state_file: Optional[StateFile] = None
        if config.state_file:
            self.state_file = StateFile(config.state_file, state_file_entries(config))
            self.states.restore(self.state_file.load())
        # Without a state file, the presences of every server's first read are decided together.
        self.first_presences: Optional[Dict[str, Dict[str, str]]] = \
            {} if config.presence and self.state_file is None else None
        self.unresolved: Set[str] = set()  # presences the servers disagreed on at start

    def run(self) -> None:
        """Relay until SIGTERM or Ctrl-C; SIGHUP reloads the config file."""
        self.loop.stop_on_signals()
        self.loop.reload_on_sighup(self.reload)
        log.info("Broker %s starting with %s (device_state %s, presence %s)", __version__,
                 plural(len(self.config.servers), "server"), _yes_no(self.config.device_state),
                 _yes_no(self.config.presence))
        self.apply(self.config)
        if self.first_presences is not None:
            self.loop.call_later(FIRST_READ_WAIT, self.decide_first_presences)
        self.metrics = serve_metrics(self.loop, "broker", self.metrics_snapshot,
                                     self.config.metrics_address, self.config.metrics_port,
                                     f"{self.config.path}: [general] metrics_port")
        self.systemd.ready(f"relaying between {len(self.links)} servers")
        self.systemd.keep_watchdog_fed(self.loop)
        try:
            self.loop.run()
        finally:
            log.info("Received %s, exiting.", self.loop.stop_signal or "stop")
            self.systemd.stopping()
            self.systemd.close()
            if self.metrics is not None:
                self.metrics.close()
            self.save_states()
            if self.config.count_messages:
                self.log_statistics()
            for link in self.links:
                link.close()
            if self.status:
                self.status.close()
            self.loop.close()

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
        self.traced = {server.name for server in config.servers if server.ami_trace}
        self.config = config
        self.states.down_state = config.down_state
        self.states.max_per_source = config.max_devices
        for link in removed:
            self.forget(link)
        self._schedule(config)
        self._serve_status(config)

    def _schedule(self, config: BrokerConfig) -> None:
        for timer in self.timers:
            timer.cancel()
        self.timers = [self.loop.call_every(config.ping_interval, self.ping_all),
                       self.loop.call_every(min(HEALTH_CHECK_INTERVAL, config.ping_interval),
                                            self.check_health)]
        if config.resync_interval:
            self.timers.append(self.loop.call_every(config.resync_interval, self.repair_all))
        if config.count_messages:
            self.timers.append(self.loop.call_every(STATISTICS_INTERVAL, self.log_statistics))
        if config.state_file:
            if self.state_file is None or self.state_file.path != config.state_file:
                self.state_file = StateFile(config.state_file, state_file_entries(config))
            self.timers.append(self.loop.call_every(SAVE_INTERVAL, self.save_states))
        else:
            self.state_file = None

    def _serve_status(self, config: BrokerConfig) -> None:
        if self.status is not None and self.status.address != config.status_socket:
            self.status.close()
            self.status = None
        if self.status is None:
            self.status = serve_status(self.loop, self.context, config.status_socket, "broker",
                                       self.status_report,
                                       f"{config.path}: [general] status_socket",
                                       self.describe_devices)

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
                                       self.events_relayed),
                    "known_states": ("gauge", "States known", len(self.states.entries)),
                    "resyncs": ("counter", "Servers resynchronised", self.resyncs),
                    "reloads": ("counter", "Config reloads (SIGHUP) applied", self.reloads)}}

    def status_report(self) -> Dict[str, Any]:
        return {"servers": [link_status(link, self.drops.counts[link.name])
                            for link in self.links],
                "totals": {"events_relayed": self.events_relayed,
                           "known_states": len(self.states.entries),
                           "input_dropped": sum(self.drops.counts.values())}}

    def describe_devices(self, names: Optional[List[str]]) -> Dict[str, Any]:
        """--status devices: the names known (None), or what is known of these."""
        if names is None:
            return known_names(self.states)
        return describe_states(names, self.states, {link.name: link for link in self.links})

    # --- events ----------------------------------------------------------------------------------
    def on_event(self, source: AsteriskLink, event: Dict[str, Any]) -> None:
        if source.name in self.traced:
            log.info("Got message from %s:\n%s.", source.name, json.dumps(event, indent=4))
        try:
            update = relayed_update(event, self.config.device_state, self.config.presence)
            self.states.check_room(source.name, update)
        except BadInput as exc:
            self.drops.drop(source.name, f"{event.get('Event')}: {exc}",
                            json.dumps(event).encode("utf-8"))
            return
        if update is None:
            if log.isEnabledFor(logging.DEBUG):  # (printable costs, even for a line not written)
                log.debug("Ignoring event %s from %s", printable(event["Event"]), source.name)
            return
        if update.is_presence and source.is_echo(update):
            log.debug("Ignoring %s=%s from %s: the echo of our own write", update.variable,
                      update.value, source.name)
            return
        if self.states.record(source.name, update):
            self.unresolved.discard(update.variable)
            self.events_relayed += 1
            self.relay(update)

    def relay(self, update: StateUpdate) -> None:
        """Write update's variable on every server whose mirror of it should change: what the
        other servers report, combined (StateTable.mirror_value)."""
        owner = self.states.owner(update.variable)
        if owner is None:  # reported by several servers: each mirror shows the others' share
            for link in self.links:
                value = self.states.mirror_value(update.variable, link.name)
                if value is not None:
                    self.write(link, StateUpdate(update.variable, value))
            return
        # One server reports it (the common case): one value, and one action for all the others.
        value = self.states.mirror_value(update.variable, "")
        if value != update.value:
            update = StateUpdate(update.variable, value)
        action_id = unique_id()
        if self.config.verbose_messages:
            log.info("Distribute: %s", json.dumps(update.action(action_id), indent=1))
        log.debug("Relaying %s=%s from %s", update.variable, update.value, owner)
        encoded = update.encoded_action(action_id)  # the same bytes for every server
        for link in self.links:
            if link.name != owner:
                link.write_state(update, action_id, encoded=encoded)

    def write(self, link: AsteriskLink, update: StateUpdate) -> None:
        link.write_state(update, unique_id())

    # --- health, resynchronisation, repair ---------------------------------------------------------
    def ping_all(self) -> None:
        for link in self.links:
            link.ping()

    def check_health(self) -> None:
        for link in self.links:
            link.check_health(self.config.server_timeout)
        down = [link.name for link in self.links if link.up is False]
        health = f"{len(self.links) - len(down)} of {len(self.links)} servers up" + (
            f"; down: {', '.join(down)}" if down else "")
        if health != self.health:
            self.health = health
            self.systemd.status(health)

    def show_down(self, link: AsteriskLink) -> None:
        """A server is down: its devices show down_state on the others until it is back."""
        variables = self.states.set_down(link.name)
        for variable in variables:
            self.relay(StateUpdate(variable, self.config.down_state))
        if variables:
            log.warning("%s of %s: now %s on the other servers",
                        plural(len(variables), "device"), link.name, self.config.down_state)

    def forget(self, link: AsteriskLink) -> None:
        """A server removed from the config: its devices show down_state on the others one last
        time, and nothing it reported is known any more (no repair writes it again)."""
        variables = self.states.remove_source(link.name)
        for variable in variables:
            self.relay(StateUpdate(variable, self.config.down_state or ""))
        self.states.forget(variables, link.name)
        log.info("Forgot the states of %s%s", link.name, f"; {len(variables)} of its devices now "
                 f"show {self.config.down_state} on the other servers" if variables else "")

    def resync(self, link: AsteriskLink) -> None:
        """A server is (back) up: write every known state on it, then read its own states.

        Until its presences have been read once in this run, none is written to it: one may
        have changed while the broker was stopped (StateFile, decide_first_presences).
        """
        first = link.name not in self.presences_read
        self.resyncs += 1
        written = 0
        for update in self.states.mirrors_for(link.name):
            if not (first and update.is_presence) and update.variable not in self.unresolved:
                self.write(link, update)
                written += 1
        log.info("Resynchronising %s: %d known states written, reading its states", link.name,
                 written)
        self.read_states(link, repair=False, first=first)

    def repair_all(self) -> None:
        """Anti-entropy: read every server's states again; relay what was missed, repair mirrors."""
        for link in self.links:
            if link.up:
                self.read_states(link, repair=True)

    def read_states(self, link: AsteriskLink, repair: bool, first: bool = False) -> None:
        """Read a server's lists: after its (re)start (repair False) or for anti-entropy."""
        if self.config.device_state:
            link.read_list("DeviceStateList", lambda reply, asked_at: self.on_device_list(
                link, reply, asked_at, repair))
        if self.config.presence:
            link.read_list("PresenceStateList", lambda reply, asked_at: self.on_presences_read(
                link, reply, asked_at, repair or first))

    def on_presences_read(self, link: AsteriskLink, reply: List[Dict[str, Any]], asked_at: float,
                          repair: bool) -> None:
        """While the first presences are decided together (no state file), every list read is
        one of them, whenever it was asked for: an anti-entropy read answered before a server's
        first one (a short resync_interval, a busy machine) must not take its value for a change
        over the others'.  Afterwards, at the first contact, a difference from the saved
        presence is news (repair)."""
        if self.first_presences is not None:
            self.gather_presences(link, reply)
        else:
            self.on_presence_list(link, reply, asked_at, repair)

    def gather_presences(self, link: AsteriskLink, reply: List[Dict[str, Any]]) -> None:
        """A server's first presence list, without a state file: kept until every server's is in."""
        values = {}
        for item in list_items(reply, "PresenceStateChange"):
            try:
                update = presence_update(item)
            except BadInput as exc:
                self._bad_item(link)(item, exc)
                continue
            if update is not None:
                values[update.variable] = update.value
        self.first_presences[link.name] = values
        self.presences_read.add(link.name)
        if set(self.first_presences) >= {link.name for link in self.links}:
            self.decide_first_presences()

    def decide_first_presences(self) -> None:
        if self.first_presences is None:
            return
        first, self.first_presences = self.first_presences, None
        decided, unresolved = decide_first_presences(first)
        for variable, (server, value) in decided.items():
            update = StateUpdate(variable, value)
            if self.states.expected(variable) is None and self.states.record(server, update):
                self.relay(update)
        self.unresolved.update(unresolved)
        if unresolved:
            log.warning("%d presences differ between the servers and, without a state_file, it "
                        "cannot be told which changed last: each server keeps its own until the "
                        "next change (%s)", len(unresolved), ", ".join(unresolved[:3]))

    def on_device_list(self, link: AsteriskLink, reply: List[Dict[str, Any]], asked_at: float,
                       repair: bool) -> None:
        reading = self.states.read_device_list(
            link.name, list_items(reply, "DeviceStateChange"), asked_at,
            link.outbox.is_unsettled, self._bad_item(link), after_restart=not repair)
        self.apply_reading(link, reading, "devices")

    def on_presence_list(self, link: AsteriskLink, reply: List[Dict[str, Any]], asked_at: float,
                         repair: bool) -> None:
        self.presences_read.add(link.name)
        reading = self.states.read_presence_list(
            link.name, list_items(reply, "PresenceStateChange"), asked_at,
            after_restart=not repair, writing=link.outbox.is_unsettled, on_bad=self._bad_item(link))
        self.apply_reading(link, reading, "presences")

    def apply_reading(self, link: AsteriskLink, reading: ListReading, what: str) -> None:
        for update in reading.changed:
            if update.variable not in self.unresolved:
                self.relay(update)
        for update in reading.repairs:
            self.write(link, update)
        for variable in reading.gone:
            self.relay(StateUpdate(variable, self.config.down_state))
        if reading.changed or reading.repairs:
            log.info("Read the %s of %s: %d states relayed, %d mirrors repaired", what,
                     link.name, len(reading.changed), len(reading.repairs))
        if reading.gone:
            log.warning("%s of %s that its list no longer shows after its restart: now %s "
                        "on the other servers, until they report again",
                        plural(len(reading.gone), "device"), link.name, self.config.down_state)

    def _bad_item(self, link: AsteriskLink):
        return lambda item, exc: self.drops.drop(link.name, f"list item: {exc}", repr(item).encode())

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
        log.info("Statistics: %d events relayed; %s", self.events_relayed, per_server)


def make_link(loop: EventLoop, context: zmq.Context, server: ServerConfig, timeout_ms: int,
              handlers: LinkHandlers) -> AsteriskLink:
    """The connection to one server: plain AMI when it has an ami_user, else res_zmq_manager."""
    if server.ami_user:
        return AmiLink(loop, server.name, server.addr, server.ami_port, server.ami_user,
                       server.ami_secret, timeout_ms, handlers)
    return ZmqManagerLink(loop, context, server.name, server.cmd_url, server.evt_url, timeout_ms,
                          handlers)


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
        Broker(config, context).run()
    finally:
        context.destroy(linger=0)
    return 0


if __name__ == "__main__":  # python -m zmqami.broker, as the demo runs it
    sys.exit(main())
