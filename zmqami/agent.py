"""The agent: ``python agent.py [CONFIG.py]``, on each Asterisk host of the agent/server network.

One process, one loop (the original ran three processes):
- its Asterisk's events -> AsteriskEvent to ``[*]`` through the hub(s);
- the hubs' messages -> Setvar on its Asterisk (AsteriskEvent, AgentStates), an action run on its
  Asterisk and answered with AsteriskActionStatus (AsteriskAction), AgentPong (AgentPing), its own
  states (AgentStateRequest);
- every KEEP_ALIVE_INTERVAL: Ping its Asterisk, report to ``[AsteriskStats]``, AgentPing itself,
  and an AgentHeartbeat to every peer.
Nothing waits for Asterisk: while it is down, the agent still answers the hub.

Every message it sends carries ``x_heartbeat``, its KEEP_ALIVE_INTERVAL: the mark of an agent that
sends heartbeats, which its peers therefore time out.  Messages added to the original's (an
original agent ignores them, as it ignores every msg_type and field it does not know):
- ``AgentHeartbeat`` to ``[*]``, ``x_asterisk``: "up", "down" or "unknown".  A peer silent for
  PEER_TIMEOUT, or whose Asterisk is down, has its devices shown as DOWN_STATE here.
- ``AgentStateRequest`` to ``[*]`` or ``[<peer>]``: answered with
- ``AgentStates`` to ``[<requester>]`` (or ``[*]``), ``x_events``: the sender's own states, as the
  x_data of AsteriskEvent messages, read from its Asterisk's lists.
"""
import json
import logging
import os
import sys
import time
from collections import OrderedDict
from urllib.parse import urlsplit
from typing import Any, Dict, List, Optional, Set

import zmq

from . import __version__, envelope
from .ami import AmiLink
from .asterisk import HEALTH_CHECK_INTERVAL, AsteriskLink, LinkHandlers, ZmqManagerLink
from .config import (COMMON_SETTINGS, PROJECT_DIR, RUN_DIR, ConfigError, Schema, Setting,
                     check_each, in_checkout, is_action_names, is_bool, is_down_state,
                     is_log_level, is_name_token, is_nats_urls, is_optional_text, is_url,
                     is_url_or_urls, is_whole_number, number_between, reload_settings,
                     run_settings_script)
from .envelope import ALL, STATS, Envelope, is_heartbeat, is_node_name, parse_message
from .loop import BATCH_INTERVAL, EventLoop, Timer
from .rules import BadInput, StateUpdate, event_for, relayed_update, safe_action, unique_id
from .states import ListReading, StateTable, list_items
from .statefile import SAVE_INTERVAL, StateFile
from .stats import DropLog, Throttle, held_back, plural
from .status import (StatusServer, describe_states, known_names, link_status, serve_status,
                     when)
from .metrics import MetricsServer, link_snapshot, serve_metrics
from .natsnet import (NatsNetwork, carries_state, check_nats_security, nats_permissions,
                      print_bucket)
from .network import HubNetwork, curve_client_keys
from .pidfile import PidFileBusy, claim_pid_file, release_pid_file
from .systemd import Notifier

log = logging.getLogger("agent")


# Actions a client may have an agent run: read-only ones.  Others (Originate, Setvar, Command, ...)
# must be listed in ALLOWED_ACTIONS by the administrator who wants them.
READ_ONLY_ACTIONS = ("Ping", "CoreStatus", "CoreSettings", "CoreShowChannels", "DeviceStateList",
                     "PresenceStateList", "PresenceState", "ExtensionStateList", "ExtensionState",
                     "SIPpeers", "SIPshowpeer", "PJSIPShowEndpoints", "PJSIPShowEndpoint",
                     "QueueStatus", "QueueSummary", "Mailboxcount", "MailboxStatus")


def check_agent_settings(path: str, settings: Dict[str, Any]) -> None:
    """What spans several settings: CURVE's two key files, NATS's TLS and credentials files."""
    check_each(path, settings, curve_client_keys, check_nats_security)


AGENT_SETTINGS = Schema({
    "LOG_LEVEL": Setting("info", is_log_level),
    "SYSTEM_NAME": Setting("Moscow", lambda v: None if is_node_name(v) else
                           "must be a name without brackets or control characters"),
    "ASTERISK_CMD_URL": Setting("tcp://127.0.0.1:1967", is_url),
    "ASTERISK_EVT_URL": Setting("tcp://127.0.0.1:1968", is_url),
    "KEEP_ALIVE_INTERVAL": Setting(30, number_between(0.1, 86400, "seconds")),
    "ZMQ_PUB_URL": Setting("tcp://127.0.0.1:55556", is_url_or_urls),
    "ZMQ_SUB_URL": Setting("tcp://127.0.0.1:55555", is_url_or_urls),
    "PID_FILE": Setting(None, is_optional_text),
    "ASTERISK_TIMEOUT": Setting(5000, number_between(10, 600_000, "milliseconds")),
    "DEVICE_STATE": Setting(True, is_bool),
    "PRESENCE": Setting(False, is_bool),
    "PEER_TIMEOUT": Setting(None, number_between(0.1, 864000, "seconds", none=True)),
    "DOWN_STATE": Setting("UNAVAILABLE", is_down_state),
    "RESYNC_INTERVAL": Setting(300, number_between(0.1, 86400, "seconds", zero=True)),
    "ALLOWED_ACTIONS": Setting(list(READ_ONLY_ACTIONS), is_action_names),
    "MAX_PEERS": Setting(1000, number_between(1, 100_000, "peers")),
    "STATE_FILE": Setting(None, is_optional_text),
    "MAX_DEVICES_PER_PEER": Setting(10_000, number_between(1, 10_000_000, "devices")),
    "ASTERISK_AMI_URL": Setting("tcp://127.0.0.1:5038", is_url),
    "ASTERISK_AMI_USER": Setting(None, is_optional_text),
    "ASTERISK_AMI_SECRET": Setting(None, is_optional_text),
    "CURVE_SERVER_KEY_FILE": Setting(None, is_optional_text),
    "CURVE_SECRET_KEY_FILE": Setting(None, is_optional_text),
    "NATS_URLS": Setting(None, is_nats_urls),
    "NATS_USER": Setting(None, is_optional_text),
    "NATS_PASSWORD": Setting(None, is_optional_text),
    "NATS_CREDS_FILE": Setting(None, is_optional_text),
    "NATS_TLS_CA": Setting(None, is_optional_text),
    "NATS_TLS_CERT": Setting(None, is_optional_text),
    "NATS_TLS_KEY": Setting(None, is_optional_text),
    "NATS_BUCKET": Setting("zmqami", is_name_token("bucket name")),
    "NATS_REPLICAS": Setting(1, is_whole_number(1, 5, "replicas")),
    "NATS_SUBJECT_PREFIX": Setting("zmqami", is_name_token("subject prefix", dots=True)),
    "NATS_JS_DOMAIN": Setting(None, is_name_token("JetStream domain", none=True)),
    "NATS_MAX_BYTES": Setting(256 * 1024 * 1024, is_whole_number(1024 * 1024, 2 ** 50, "bytes")),
    **COMMON_SETTINGS,
}, together=check_agent_settings)
# What a SIGHUP cannot change: who the agent is and how it reaches the hubs.
RESTART_SETTINGS = ("SYSTEM_NAME", "ZMQ_PUB_URL", "ZMQ_SUB_URL", "PID_FILE", "STATE_FILE",
                    "CURVE_SERVER_KEY_FILE", "CURVE_SECRET_KEY_FILE", "STATUS_SOCKET",
                    *(name for name in AGENT_SETTINGS if name.startswith("NATS_")))
ASTERISK_SETTINGS = ("ASTERISK_CMD_URL", "ASTERISK_EVT_URL", "ASTERISK_AMI_URL",
                     "ASTERISK_AMI_USER", "ASTERISK_AMI_SECRET", "ASTERISK_TIMEOUT")
COUNTER_EVERY = 100        # the original's "Message counter" line
EXIT_PID_FILE = 1
SEEN_UUIDS = 10_000        # messages remembered to apply each once when they come by two hubs
STATE_REQUEST_DELAY = 0.5  # s after (re)connecting to a hub: its subscription must reach the hub


class Peer:
    """Another agent that sends heartbeats (an original agent never does and is never timed out)."""

    def __init__(self, last_seen: float) -> None:
        self.last_seen = last_seen
        self.up = True


class Agent:
    def __init__(self, settings: Dict[str, Any], context: zmq.Context) -> None:
        self.settings = settings
        self.name = settings["SYSTEM_NAME"]
        self.peer_timeout = settings["PEER_TIMEOUT"] or 3 * settings["KEEP_ALIVE_INTERVAL"]
        self.loop = EventLoop(BATCH_INTERVAL)
        self.drops = DropLog(log)
        self.states = StateTable(settings["DOWN_STATE"], settings["MAX_DEVICES_PER_PEER"],
                                 settings["MAX_PEERS"] + 1,  # the peers and itself
                                 unverified_wall=0.0)
        self.presences_read = False  # its Asterisk's presences read once in this run
        self.state_file: Optional[StateFile] = None
        if settings["STATE_FILE"]:
            self.state_file = StateFile(settings["STATE_FILE"],
                                        self.states.max_per_source * self.states.max_sources)
            self.states.restore(self.state_file.load())
        self.peers: Dict[str, Peer] = {}
        self.seen: "OrderedDict[str, None]" = OrderedDict()
        self.message_handlers = {  # by msg_type
            "AgentPing": self.answer_ping, "AsteriskEvent": self.apply_event,
            "AsteriskAction": self.run_action, "AgentHeartbeat": self.on_heartbeat,
            "AgentStateRequest": self.on_state_request, "AgentStates": self.apply_states}
        self.sent_uuids: "OrderedDict[str, None]" = OrderedDict()  # to tell a namesake's messages
        self.name_clashes = 0
        self.systemd = Notifier()
        self.metrics: Optional[MetricsServer] = None
        self.resyncs = 0
        self.reloads = 0
        self.health = ""  # the last STATUS= line sent to systemd
        self.clash_warnings = Throttle()
        self.state_requesters: Set[str] = set()
        self.received = 0
        self.unproven_origins = 0  # NATS: values whose origin their key does not prove
        self.context = context
        self.config_path = ""
        self.timers: List[Timer] = []
        self.status: Optional[StatusServer] = None
        self.allowed = {name.lower() for name in settings["ALLOWED_ACTIONS"]}
        self.asterisk_ok: Optional[bool] = None
        self.asterisk = make_link(self.loop, context, settings, LinkHandlers(
            on_event=self.on_asterisk_event, drops=self.drops, on_up=self.on_asterisk_up,
            on_down=self.on_asterisk_down))
        network = NatsNetwork if settings["NATS_URLS"] else HubNetwork
        self.network = network(self.loop, context, settings, self.name,
                               on_message=self.on_hub_message, on_connected=self.on_hub_connection)
        self.hub_source = self.network.source

    def run(self, config_path: str) -> None:
        self.config_path = config_path
        self.loop.stop_on_signals()
        self.loop.reload_on_sighup(self.reload)
        log.info("Agent %s (version %s) starting.", self.name, __version__)
        self.asterisk.start()
        self.network.start()
        self.keep_alive()
        self.schedule()
        self.status = serve_status(self.loop, self.context, self.settings["STATUS_SOCKET"],
                                   "agent " + self.name, self.status_report,
                                   f"{config_path}: STATUS_SOCKET", self.describe_devices)
        self.metrics = serve_metrics(self.loop, "agent", self.metrics_snapshot,
                                     self.settings["METRICS_ADDRESS"],
                                     self.settings["METRICS_PORT"], f"{config_path}: METRICS_PORT")
        self.systemd.ready(f"agent {self.name} started")
        self.systemd.keep_watchdog_fed(self.loop)
        try:
            self.loop.run()
        finally:
            self.systemd.stopping()
            self.systemd.close()
            if self.metrics is not None:
                self.metrics.close()
            log.info("Received %s: %d %s messages, %d dropped. Exiting.",
                     self.loop.stop_signal or "stop", self.received, self.network.kind,
                     sum(self.drops.counts.values()))
            self.save_states()
            self.asterisk.close()
            self.network.close()
            if self.status is not None:
                self.status.close()
            self.loop.close()

    def schedule(self) -> None:
        for timer in self.timers:
            timer.cancel()
        self.timers = [self.loop.call_every(self.settings["KEEP_ALIVE_INTERVAL"], self.keep_alive),
                       self.loop.call_every(HEALTH_CHECK_INTERVAL, self.check_health)]
        if self.settings["RESYNC_INTERVAL"]:
            self.timers.append(self.loop.call_every(self.settings["RESYNC_INTERVAL"], self.repair))
        if self.state_file is not None:
            self.timers.append(self.loop.call_every(SAVE_INTERVAL, self.save_states))

    def save_states(self) -> None:
        if self.state_file is not None:
            self.state_file.save(self.states.presence_snapshot())

    def reload(self) -> None:
        """SIGHUP: read the settings again; known states and connections that did not change stay."""
        log.info("Received SIGHUP: reloading %s", self.config_path)
        settings = reload_settings(self.config_path, AGENT_SETTINGS, self.settings,
                                   RESTART_SETTINGS, log)
        if settings is None:
            return
        asterisk_changed = any(settings[k] != self.settings[k] for k in ASTERISK_SETTINGS)
        self.reloads += 1
        self.settings = settings
        self.allowed = {name.lower() for name in settings["ALLOWED_ACTIONS"]}
        self.peer_timeout = settings["PEER_TIMEOUT"] or 3 * settings["KEEP_ALIVE_INTERVAL"]
        self.states.down_state = settings["DOWN_STATE"]
        self.schedule()
        if asterisk_changed:
            log.info("The Asterisk connection changed: reconnecting")
            self.asterisk.close()
            self.state_requesters.clear()  # the old link's reads will not answer
            self.asterisk = make_link(self.loop, self.context, settings, self.asterisk.handlers)
            self.asterisk.start()
            self.asterisk.ping()

    def metrics_snapshot(self) -> Dict[str, Any]:
        # (its Asterisk under the agent's own name: one label value per Asterisk in a scrape)
        asterisk = dict(link_snapshot(self.asterisk, self.drops.counts["Asterisk"]),
                        name=self.name)
        return {"links": [asterisk],
                "peers": [{"name": name, "up": peer.up} for name, peer in self.peers.items()],
                "totals": {
                    "hub_messages_received": ("counter", "Messages received from the hubs "
                                              "or NATS",
                                              self.received),
                    "known_states": ("gauge", "States known", len(self.states.entries)),
                    "resyncs": ("counter", "Times its Asterisk was resynchronised", self.resyncs),
                    "reloads": ("counter", "Settings reloads (SIGHUP) applied", self.reloads),
                    "name_clashes": ("counter", "Messages from another agent with its name",
                                     self.name_clashes),
                    "unproven_origins": ("counter", "NATS: states dropped because their key "
                                         "or subject does not prove their origin",
                                         self.unproven_origins),
                    "hub_input_dropped": ("counter", "Invalid input from the hubs or NATS "
                                          "dropped",
                                          self.drops.counts[self.hub_source])}}

    def status_report(self) -> Dict[str, Any]:
        return {"servers": [link_status(self.asterisk, self.drops.counts["Asterisk"])],
                "peers": [{"name": name, "up": peer.up,
                           "last_seen": when(time.time() - (time.monotonic() - peer.last_seen))}
                          for name, peer in sorted(self.peers.items())],
                "totals": {f"{self.network.kind}_messages": self.received,
                           "known_states": len(self.states.entries),
                           "messages_from_another_agent_with_my_name": self.name_clashes,
                           "unproven_origins": self.unproven_origins,
                           "input_dropped": sum(self.drops.counts.values()),
                           **self.network.status()}}

    def describe_devices(self, names: Optional[List[str]]) -> Dict[str, Any]:
        """--status devices: the names known (None), or what is known of these."""
        if names is None:
            return known_names(self.states)
        return describe_states(names, self.states, {self.name: self.asterisk})

    def send(self, target: str, msg_type: str, **fields: Any) -> None:
        uuid = unique_id()
        self.sent_uuids[uuid] = None
        if len(self.sent_uuids) > SEEN_UUIDS:
            self.sent_uuids.popitem(last=False)
        frames = envelope.build(target, msg_type, self.name, uuid,
                                heartbeat=envelope.heartbeat(self.settings["KEEP_ALIVE_INTERVAL"]),
                                **fields)
        self.network.send(frames)

    # --- its Asterisk -> the hub ------------------------------------------------------------------
    def on_asterisk_event(self, link: AsteriskLink, event: Dict[str, Any]) -> None:
        if event["Event"] == "Reload":
            self.send(ALL, "AsteriskEvent", data={"Event": "Reload",
                                                  "Status": _text(event.get("Status")),
                                                  "Module": _text(event.get("Module"))})
            return
        try:
            update = relayed_update(event, self.settings["DEVICE_STATE"], self.settings["PRESENCE"])
            self.states.check_room(self.name, update)
        except BadInput as exc:
            self.drops.drop(link.name, f"{event['Event']}: {exc}", repr(event).encode())
            return
        if update is None or (update.is_presence and link.is_echo(update)):
            return
        if self.states.record(self.name, update):
            log.debug("My device %s state %s.", update.variable, update.value)
            self.send(ALL, "AsteriskEvent", data=self.event_of(update))

    def on_asterisk_up(self, link: AsteriskLink) -> None:
        """Its Asterisk is (back) up: give it every peer's states, and tell the peers its own.

        Until its presences have been read once in this run, none is written to it: one may
        have changed while the agent was stopped (STATE_FILE)."""
        first = not self.presences_read
        self.resyncs += 1
        written = 0
        for update in self.states.mirrors_for(self.name):
            if not (first and update.is_presence):
                self.write(update)
                written += 1
        log.info("Resynchronising Asterisk: %d known states of the peers written, reading its "
                 "states for the peers", written)
        self.heartbeat()
        self.read_own_states(repair=False, requester=ALL, first=first)

    def on_asterisk_down(self, link: AsteriskLink) -> None:
        self.heartbeat()  # the peers show its devices as DOWN_STATE until it is back

    def read_own_states(self, repair: bool, requester: str, first: bool = False) -> None:
        """Read its Asterisk's lists and send its own states to requester (a peer or everyone)."""
        under_way = bool(self.state_requesters)
        self.state_requesters.add(requester)
        if under_way:
            return  # its answer goes to this requester too
        readings: List[ListReading] = []
        wanted = int(self.settings["DEVICE_STATE"]) + int(self.settings["PRESENCE"])

        def on_list(reading: ListReading) -> None:
            readings.append(reading)
            if len(readings) == wanted:
                self.answer_state_requests(readings)

        # (A failed read is tried again by the link until it succeeds.)
        if self.settings["DEVICE_STATE"]:
            self.asterisk.read_list("DeviceStateList", lambda reply, asked_at: on_list(
                self.on_own_list(reply, "DeviceStateChange", asked_at, repair)))
        if self.settings["PRESENCE"]:
            self.asterisk.read_list("PresenceStateList", lambda reply, asked_at: on_list(
                self.on_own_list(reply, "PresenceStateChange", asked_at, repair or first)))
        if not wanted:
            self.state_requesters.clear()

    def on_own_list(self, reply: List[Dict[str, Any]], event: str, asked_at: float,
                    repair: bool) -> ListReading:
        items = list_items(reply, event)
        on_bad = lambda item, exc: self.drops.drop("Asterisk", f"list item: {exc}",  # noqa: E731
                                                   repr(item).encode())
        writing = self.asterisk.outbox.is_unsettled
        if event == "DeviceStateChange":
            reading = self.states.read_device_list(self.name, items, asked_at, writing, on_bad,
                                                   after_restart=not repair)
        else:
            reading = self.states.read_presence_list(self.name, items, asked_at,
                                                     not repair, writing, on_bad)
            self.presences_read = True
        for update in reading.repairs:
            self.write(update)
        if reading.repairs:
            log.info("Repaired %d mirrors on Asterisk", len(reading.repairs))
        for variable in reading.gone:  # its phones not registered again since its restart
            self.send(ALL, "AsteriskEvent", data=event_for(StateUpdate(variable,
                                                                       self.states.down_state)))
        if reading.gone:
            log.warning("%s of Asterisk that its list no longer shows after its restart: now "
                        "%s on the peers, until they report again",
                        plural(len(reading.gone), "device"), self.states.down_state)
        return reading

    def answer_state_requests(self, readings: List[ListReading]) -> None:
        events = [self.event_of(update) for reading in readings for update in reading.current]
        requesters, self.state_requesters = self.state_requesters, set()
        for requester in ([ALL] if ALL in requesters else sorted(requesters)):
            self.send(requester, "AgentStates", events=events)
        log.info("Sent %d states of Asterisk to %s", len(events),
                 "every peer" if ALL in requesters else ", ".join(sorted(requesters)))

    def repair(self) -> None:
        """Anti-entropy: send its states to every peer again, and repair its own mirrors."""
        if self.asterisk.up:
            self.read_own_states(repair=True, requester=ALL)

    # --- the hubs -> its Asterisk -----------------------------------------------------------------
    def on_hub_message(self, frames: List[bytes], age: float = 0.0,
                       owner: Optional[str] = None) -> None:
        """A message from the network; from a NATS bucket (owner: whose key it was in), age: how
        long ago its sender stored it."""
        self.received += 1
        if self.received % COUNTER_EVERY == 0:
            log.info("Message counter: %s", self.received)
        try:
            message = parse_message(frames)
        except BadInput as exc:
            self.drops.drop(self.hub_source, str(exc), b" | ".join(frames))
            return
        message.age = age
        if self.already_seen(message.uuid):
            return  # the same message by another hub
        if message.origin == self.name:
            if message.uuid not in self.sent_uuids:
                self.name_clash(message)
            return
        handler = self.message_handlers.get(message.msg_type)
        if handler is None:
            log.debug("Ignoring %s from %s.", message.msg_type, message.origin)
            return
        if self.network.proves_origin:
            if not self.origin_proven(message, owner):
                return
            if owner is None:  # a plain subject: it says nothing of a peer's health
                handler(message)
                return
        self.saw_peer(message)
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
        self.drop_from_peer(message, why)
        return False

    def drop_from_peer(self, message: Envelope, why: str, raw: bytes = b"") -> None:
        """Bad input in a peer's message.  Counted and rate-limited as the hub's, the origin
        named in the line: a flood of invented origins must not grow a table or the log."""
        self.drops.drop(self.hub_source, f"{message.msg_type} from {message.origin}: {why}", raw)

    def name_clash(self, message: Envelope) -> None:
        """A message in its own name that it did not send: another agent has its SYSTEM_NAME."""
        self.name_clashes += 1
        more = self.clash_warnings.allow("clash")
        if more is not None:
            log.error("Another agent also calls itself %s (a %s in my name that I did not "
                      "send): the two never mirror each other.  Give each agent its own "
                      "SYSTEM_NAME.%s", self.name, message.msg_type,
                      held_back(more, "such messages"))

    def already_seen(self, uuid: str) -> bool:
        if uuid in self.seen:
            return True
        self.seen[uuid] = None
        if len(self.seen) > SEEN_UUIDS:
            self.seen.popitem(last=False)
        return False

    def answer_ping(self, message: Envelope) -> None:
        self.send(message.origin, "AgentPong")
        log.debug("AgentPing received from %s, sending AgentPong.", message.origin)

    def event_of(self, update: StateUpdate) -> Dict[str, str]:
        """Its own state as the x_data of an AsteriskEvent.  A presence says when it changed
        (ChangedAt, wall clock): a presence has no owner, and the newest change wins."""
        event = event_for(update)
        if update.is_presence:
            event["ChangedAt"] = f"{self.states.wall(update.variable, self.name):.3f}"
        return event

    def apply_event(self, message: Envelope) -> None:
        self.apply_peer_event(message, message.field("data"))

    def apply_states(self, message: Envelope) -> None:
        events = message.field("events")
        if not isinstance(events, list):
            self.drop_from_peer(message, "x_events is not a list")
            return
        for event in events:
            self.apply_peer_event(message, event, snapshot=True)
        log.info("Received %d states from %s", len(events), message.origin)

    def apply_peer_event(self, message: Envelope, data: Any, snapshot: bool = False) -> None:
        """A peer's state (an AsteriskEvent's x_data, or one of its AgentStates): mirror it here.

        A presence is taken only if it changed no earlier than the one known (its ChangedAt;
        without one, an event is a change seen now, a snapshot's value the oldest of all)."""
        try:
            if not isinstance(data, dict):
                raise BadInput("not an object")
            update = relayed_update(data, self.settings["DEVICE_STATE"], self.settings["PRESENCE"])
            self.states.check_room(message.origin, update)
        except BadInput as exc:
            self.drop_from_peer(message, str(exc), repr(data).encode())
            return
        peer = self.peers.get(message.origin)
        stale = message.age > 0 and peer is not None and not peer.up  # a stopped peer's (NATS)
        if update is None or not self.states.record(message.origin, update,
                                                    changed_at(data, snapshot), down=stale):
            return
        log.debug("Other device: %s - %s (from %s).", update.variable, update.value, message.origin)
        self.write_mirror(update.variable, message.uuid)

    def write_mirror(self, variable: str, action_id: str = "") -> None:
        """Write on its Asterisk what the peers report for variable, combined."""
        value = self.states.mirror_value(variable, self.name)
        if value is not None:
            self.write(StateUpdate(variable, value), action_id)

    def write(self, update: StateUpdate, action_id: str = "") -> None:
        """Write a state on its Asterisk (SetVar, ActionID the message's uuid, as the original)."""
        self.asterisk.write_state(update, action_id or unique_id(), verb="SetVar")

    def run_action(self, message: Envelope) -> None:
        origin = message.origin
        try:
            action = safe_action(message.field("data"), self.asterisk.crashing_actions)
            if action["Action"].lower() not in self.allowed:
                raise BadInput(f"{action['Action']} is not allowed on this node (ALLOWED_ACTIONS)")
        except BadInput as exc:
            log.warning("Refused AsteriskAction from %s: %s", origin, exc)
            self.send(origin, "AsteriskActionStatus", data=[
                {"Response": "Error", "Message": f"Refused by agent {self.name}: {exc}"}])
            return
        log.info("AsteriskAction %s from %s.", action["Action"], origin)
        self.asterisk.send_action(
            action, lambda reply: self.send(origin, "AsteriskActionStatus", data=reply))

    def on_state_request(self, message: Envelope) -> None:
        if self.asterisk.up:
            self.read_own_states(repair=False, requester=message.origin)

    # --- peers and hubs ----------------------------------------------------------------------------
    def saw_peer(self, message: Envelope) -> None:
        """Any message from an agent that sends heartbeats shows it alive, when it was sent: a
        stored one (NATS bucket) older than PEER_TIMEOUT shows a peer that is down."""
        sent = time.monotonic() - message.age
        peer = self.peers.get(message.origin)
        if peer is not None:
            peer.last_seen = max(peer.last_seen, sent)
        elif is_heartbeat(message.field("heartbeat")):
            if len(self.peers) >= self.settings["MAX_PEERS"]:
                self.drop_from_peer(message, f"more than {self.settings['MAX_PEERS']} peers "
                                    "(MAX_PEERS): not tracked")
                return
            self.peers[message.origin] = Peer(sent)
            if message.age > self.peer_timeout:
                self.peer_down(message.origin, f"its last message is {message.age:.0f} s old")
            else:
                log.info("Peer %s is up.", message.origin)

    def on_heartbeat(self, message: Envelope) -> None:
        peer = self.peers.get(message.origin)
        if peer is None or message.age > self.peer_timeout:
            return  # no x_heartbeat (not an agent that can be timed out), or an old one
        asterisk_down = message.field("asterisk") == "down"
        if asterisk_down and peer.up:
            self.peer_down(message.origin, "its Asterisk is down")
        elif not asterisk_down and not peer.up:
            peer.up = True
            if self.network.proves_origin:  # over NATS its states came from the bucket
                variables = self.states.set_up(message.origin)
                for variable in variables:
                    self.write_mirror(variable)
                log.info("Peer %s is up again: %d of its devices show their states again.",
                         message.origin, len(variables))
                return
            log.info("Peer %s is up again: asking for its states.", message.origin)
            self.send(message.origin, "AgentStateRequest")

    def check_health(self) -> None:
        self.asterisk.check_health(self.peer_timeout)
        now = time.monotonic()
        for name, peer in self.peers.items():
            if peer.up and now - peer.last_seen > self.peer_timeout:
                self.peer_down(name, f"silent for {self.peer_timeout:g} s")
        health = (f"Asterisk {({True: 'up', False: 'DOWN', None: 'unknown'})[self.asterisk.up]}, "
                  f"{sum(peer.up for peer in self.peers.values())} of {len(self.peers)} peers up")
        if health != self.health:
            self.health = health
            self.systemd.status(health)

    def peer_down(self, name: str, why: str) -> None:
        self.peers[name].up = False
        variables = self.states.set_down(name)
        for variable in variables:
            self.write_mirror(variable)
        log.warning("Peer %s is down (%s): %d of its devices now show %s here.", name, why,
                    len(variables), self.settings["DOWN_STATE"] if variables else "their last state")

    def on_hub_connection(self) -> None:
        """A hub connection was made (again): the peers' states may have been missed meanwhile."""
        self.loop.call_later(STATE_REQUEST_DELAY, lambda: self.send(ALL, "AgentStateRequest"))

    # --- keep-alive ------------------------------------------------------------------------------
    def keep_alive(self) -> None:
        self.asterisk.ping(self.on_ping_reply)
        self.send(self.name, "AgentPing")  # through the hub and back: keeps its sockets alive
        self.heartbeat()

    def heartbeat(self) -> None:
        status = {True: "up", False: "down", None: "unknown"}[self.asterisk.up]
        self.send(ALL, "AgentHeartbeat", asterisk=status)

    def on_ping_reply(self, reply: Optional[List[Dict[str, Any]]]) -> None:
        response = reply[0].get("Response") if reply else None
        if response:
            self.send(STATS, "AsteriskActionStatus", data={
                "Action": "Ping", "Response": response, "Timestamp": reply[0].get("Timestamp")})
            if self.asterisk_ok is False:
                log.info("Asterisk answers Ping again.")
            self.asterisk_ok = True
            return
        if self.asterisk_ok is not False:
            log.error("asterisk_ping unknown reply: %s (logged again when it answers)", reply)
        self.asterisk_ok = False


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


def make_link(loop: EventLoop, context: zmq.Context, settings: Dict[str, Any],
              handlers: LinkHandlers) -> AsteriskLink:
    """Its Asterisk: over plain AMI when ASTERISK_AMI_USER is set, else res_zmq_manager."""
    if settings["ASTERISK_AMI_USER"]:
        parts = urlsplit(settings["ASTERISK_AMI_URL"])
        return AmiLink(loop, "Asterisk", parts.hostname or "127.0.0.1", parts.port or 5038,
                       settings["ASTERISK_AMI_USER"], settings["ASTERISK_AMI_SECRET"] or "",
                       settings["ASTERISK_TIMEOUT"], handlers)
    return ZmqManagerLink(loop, context, "Asterisk", settings["ASTERISK_CMD_URL"],
                          settings["ASTERISK_EVT_URL"], settings["ASTERISK_TIMEOUT"], handlers)


def _text(value: Any) -> Optional[str]:
    return value if isinstance(value, str) else None


COMMANDS = [("--nats-permissions", dict(
    metavar="NAME", help="print, as JSON, the NATS permissions the user of agent NAME needs "
                         "(for the bucket and subject prefix of this settings file)")),
            ("--nats-ls", dict(action="store_const", const=True, help="print every key of the "
                               "NATS bucket and its value (no nats CLI needed)"))]


def main(argv: Optional[List[str]] = None) -> int:
    return run_settings_script("agent.py",
                               "The zmq-ami-broker agent for one Asterisk host.",
                               "agent_config.py", AGENT_SETTINGS, argv, run_agent,
                               COMMANDS, run_command)


def run_command(args: Any, config_path: str, settings: Dict[str, Any]) -> Optional[int]:
    if args.nats_permissions is not None:
        if not is_node_name(args.nats_permissions):
            print(f"--nats-permissions: {args.nats_permissions!r} is not an agent's name",
                  file=sys.stderr)
            return 2
        print(json.dumps(nats_permissions(settings, args.nats_permissions), indent=2))
        return 0
    if args.nats_ls:
        if not settings["NATS_URLS"]:
            print(f"{config_path}: NATS_URLS: not set: this agent uses a hub, not NATS",
                  file=sys.stderr)
            return 2
        return print_bucket(config_path, settings)
    return None


def run_agent(config_path: str, settings: Dict[str, Any]) -> int:
    pid_file = settings["PID_FILE"] or (os.path.join(PROJECT_DIR, "zmq_agent.pid") if in_checkout()
                                        else os.path.join(RUN_DIR, "agent.pid"))
    try:
        claim_pid_file(pid_file)
    except PidFileBusy as exc:
        print(exc, file=sys.stderr)
        return EXIT_PID_FILE
    except OSError as exc:
        print(f"{config_path}: PID_FILE: cannot write {pid_file}: {exc.strerror}",
              file=sys.stderr)
        return EXIT_PID_FILE
    context = zmq.Context()
    try:
        agent = Agent(settings, context)
        agent.network.secure(config_path)
        agent.run(config_path)
    except ConfigError as exc:
        return exc.report()
    finally:
        context.destroy(linger=0)
        release_pid_file(pid_file)
    return 0
