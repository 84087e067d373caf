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
from urllib.parse import urlsplit
from typing import Any, Dict, List, Optional, Set

import zmq

from . import __version__, envelope
from .actions import ActionGate
from .agent_settings import AGENT_SETTINGS, ASTERISK_SETTINGS, RESTART_SETTINGS
from .ami import AmiLink
from .asterisk import HEALTH_CHECK_INTERVAL, AsteriskLink, LinkHandlers, ZmqManagerLink
from .config import PROJECT_DIR, RUN_DIR, ConfigError, in_checkout, name_filter, \
    reload_settings, run_settings_script
from .envelope import ALL, STATS, Envelope, is_node_name
from .inbox import Inbox
from .loop import EventLoop
from .metrics import link_snapshot
from .natsnet import NatsNetwork, nats_permissions, print_bucket
from .network import HubNetwork
from .outgoing import StateSender
from .peers import Peers
from .peerstates import PeerStates
from .pidfile import PidFileBusy, claim_pid_file, release_pid_file
from .relay import Relay
from .rules import BadInput, StateUpdate, event_for, unique_id
from .states import ListReading, StateTable
from .statefile import SAVE_INTERVAL, StateFile
from .service import Service
from .stats import DropLog
from .status import describe_states, known_names, link_status, when

log = logging.getLogger("agent")

EXIT_PID_FILE = 1
STATE_REQUEST_DELAY = 0.5  # s after (re)connecting to a hub: its subscription must reach the hub


class Agent(Service):
    def __init__(self, settings: Dict[str, Any], context: zmq.Context) -> None:
        super().__init__("agent", context, log)
        self.settings = settings
        self.name = settings["SYSTEM_NAME"]
        self.drops = DropLog(log)
        self.states = StateTable(settings["DOWN_STATE"], settings["MAX_DEVICES_PER_PEER"],
                                 settings["MAX_PEERS"] + 1,  # the peers and itself
                                 unverified_wall=0.0)
        self.relay = Relay(self.states, self.drops, log, settings["DEVICE_STATE"],
                           settings["PRESENCE"], verb="SetVar",  # (the original's spelling)
                           mwi=settings["MWI"])
        self.relay.on_change = self.announce
        self.relay.on_gone = self.announce_gone
        self.state_file: Optional[StateFile] = None
        if settings["STATE_FILE"]:
            self.state_file = StateFile(settings["STATE_FILE"],
                                        self.states.max_per_source * self.states.max_sources)
            self.states.restore(self.state_file.load())
        self.peers = Peers(settings["PEER_TIMEOUT"] or 3 * settings["KEEP_ALIVE_INTERVAL"],
                           settings["MAX_PEERS"], on_down=self.on_peer_down,
                           on_up=self.on_peer_up,
                           refuse=lambda *args: self.inbox.drop(*args))  # (made below)
        self.state_requesters: Set[str] = set()
        self.config_path = ""
        self.actions = ActionGate(settings["ALLOWED_ACTIONS"])
        self.asterisk_ok: Optional[bool] = None
        self.asterisk = self.connect_asterisk(settings)
        self.peer_states = PeerStates(self.states, self.relay, self.peers,
                                      drop=lambda *args: self.inbox.drop(*args))  # (made below)
        self.configure_relay(settings)
        network = NatsNetwork if settings["NATS_URLS"] else HubNetwork
        self.network = network(self.loop, context, settings, self.name,
                               on_message=lambda *args: self.inbox.take(*args),
                               on_connected=self.on_hub_connection)
        self.outgoing = StateSender(self.loop, self.transmit, settings["PACK_EVENTS"],
                                    packing=network is HubNetwork)
        self.set_pack_events(settings["PACK_EVENTS"])
        self.inbox = Inbox(self.name, self.network, self.drops, self.peers, handlers={
            "AgentPing": self.answer_ping, "AsteriskEvent": self.peer_states.apply_event,
            "AsteriskEvents": self.peer_states.apply_events, "AsteriskAction": self.run_action,
            "AgentHeartbeat": self.peers.heartbeat, "AgentStateRequest": self.on_state_request,
            "AgentStates": self.peer_states.apply_states}, hear=self.outgoing.heard)

    def connect_asterisk(self, settings: Dict[str, Any]) -> AsteriskLink:
        link = make_link(self.loop, self.context, settings, LinkHandlers(
            on_event=self.on_asterisk_event, drops=self.drops, on_up=self.on_asterisk_up,
            on_down=self.on_asterisk_down, on_caught_up=lambda link: self.repair()))
        self.relay.links = {self.name: link}  # (its own states are reported under its name)
        return link

    def configure_relay(self, settings: Dict[str, Any]) -> None:
        """What a reload may change of how its Asterisk's states are taken and written."""
        self.peer_states.kinds = (settings["DEVICE_STATE"], settings["PRESENCE"], settings["MWI"])
        self.relay.mwi_write = {self.name: settings["MWI_WRITE"]}
        self.relay.hinted_only = {self.name} if settings["HINTED_ONLY"] else set()
        self.relay.publish_filters = {self.name: name_filter(settings["PUBLISH_FILTER"])} \
            if settings["PUBLISH_FILTER"] else {}
        self.relay.accept_filters = {self.name: name_filter(settings["ACCEPT_FILTER"])} \
            if settings["ACCEPT_FILTER"] else {}

    def set_pack_events(self, mode: Any) -> None:
        """PACK_EVENTS; 'auto' listens for original agents' reports too (outgoing.py)."""
        self.outgoing.mode = mode
        if isinstance(self.network, HubNetwork):
            self.network.hear_reports(mode == "auto")

    def start(self) -> None:
        log.info("Agent %s (version %s) starting.", self.name, __version__)
        self.asterisk.start()
        self.network.start()
        self.keep_alive()
        self.schedule_timers()
        self.serve_status(self.settings["STATUS_SOCKET"], "agent " + self.name,
                          f"{self.config_path}: STATUS_SOCKET", self.describe_devices)

    def ready_text(self) -> str:
        return f"agent {self.name} started"

    def stop(self) -> None:
        log.info("Received %s: %d %s messages, %d dropped. Exiting.",
                 self.loop.stop_signal or "stop", self.inbox.received, self.network.kind,
                 sum(self.drops.counts.values()))
        self.save_states()
        self.asterisk.close()
        self.network.close()

    def schedule_timers(self) -> None:
        self.schedule(
            self.loop.call_every(self.settings["KEEP_ALIVE_INTERVAL"], self.keep_alive),
            self.loop.call_every(HEALTH_CHECK_INTERVAL, self.check_health),
            self.every(self.settings["RESYNC_INTERVAL"], self.repair),
            self.every(SAVE_INTERVAL if self.state_file is not None else 0, self.save_states))

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
        self.actions = ActionGate(settings["ALLOWED_ACTIONS"])
        self.peers.timeout = settings["PEER_TIMEOUT"] or 3 * settings["KEEP_ALIVE_INTERVAL"]
        self.states.down_state = settings["DOWN_STATE"]
        self.set_pack_events(settings["PACK_EVENTS"])
        self.configure_relay(settings)
        self.schedule_timers()
        if asterisk_changed:
            log.info("The Asterisk connection changed: reconnecting")
            self.asterisk.close()
            self.state_requesters.clear()  # the old link's reads will not answer
            self.asterisk = self.connect_asterisk(settings)
            self.asterisk.start()
            self.asterisk.ping()

    def metrics_snapshot(self) -> Dict[str, Any]:
        # (its Asterisk under the agent's own name: one label value per Asterisk in a scrape)
        asterisk = dict(link_snapshot(self.asterisk, self.drops.counts["Asterisk"]),
                        name=self.name)
        return {"links": [asterisk],
                "peers": [{"name": name, "up": peer.up} for name, peer in self.peers],
                "totals": {
                    "hub_messages_received": ("counter", "Messages received from the hubs "
                                              "or NATS", self.inbox.received),
                    "known_states": ("gauge", "States known", len(self.states.entries)),
                    "resyncs": ("counter", "Times its Asterisk was resynchronised",
                                self.relay.resyncs),
                    "reloads": ("counter", "Settings reloads (SIGHUP) applied", self.reloads),
                    "name_clashes": ("counter", "Messages from another agent with its name",
                                     self.inbox.name_clashes),
                    "unproven_origins": ("counter", "NATS: states dropped because their key "
                                         "or subject does not prove their origin",
                                         self.inbox.unproven_origins),
                    "hub_input_dropped": ("counter", "Invalid input from the hubs or NATS "
                                          "dropped", self.drops.counts[self.network.source])}}

    def status_report(self) -> Dict[str, Any]:
        together = self.outgoing.status()  # (None over NATS)
        return {"servers": [link_status(self.asterisk, self.drops.counts["Asterisk"])],
                "peers": [{"name": name, "up": peer.up,
                           "last_seen": when(time.time() - (time.monotonic() - peer.last_seen))}
                          for name, peer in self.peers],
                "totals": {f"{self.network.kind}_messages": self.inbox.received,
                           "known_states": len(self.states.entries),
                           "messages_from_another_agent_with_my_name": self.inbox.name_clashes,
                           "unproven_origins": self.inbox.unproven_origins,
                           "input_dropped": sum(self.drops.counts.values()),
                           **({"states_together": together} if together else {}),
                           **self.network.status()}}

    def describe_devices(self, names: Optional[List[str]]) -> Dict[str, Any]:
        """--status devices: the names known (None), or what is known of these."""
        if names is None:
            return known_names(self.states)
        return describe_states(names, self.states, {self.name: self.asterisk})

    def send(self, target: str, msg_type: str, **fields: Any) -> None:
        """A message other than its own states: the states taken before it go first."""
        self.outgoing.flush()
        self.transmit(target, msg_type, **fields)

    def transmit(self, target: str, msg_type: str, **fields: Any) -> None:
        uuid = unique_id()
        self.inbox.sent.add(uuid)
        body = envelope.body_of(msg_type, self.name, uuid, **fields,
                                heartbeat=envelope.heartbeat(self.settings["KEEP_ALIVE_INTERVAL"]))
        # (the body goes along, decoded: over NATS it says which key a state goes under)
        self.network.send([envelope.topic(target), json.dumps(body).encode("utf-8")], body)

    # --- its Asterisk -> the peers ------------------------------------------------------------------
    def on_asterisk_event(self, link: AsteriskLink, event: Dict[str, Any]) -> None:
        if event["Event"] == "Reload":  # for the peers, as the original sent it
            self.send(ALL, "AsteriskEvent", data={"Event": "Reload",
                                                  "Status": _text(event.get("Status")),
                                                  "Module": _text(event.get("Module"))})
        self.relay.take_event(self.name, link, event)  # (Reload: its hints are read again)

    def announce(self, source: str, update: StateUpdate) -> None:
        """A change of its Asterisk's, for every peer."""
        log.debug("My device %s state %s.", update.variable, update.value)
        self.outgoing.add(self.event_of(update))

    def announce_gone(self, source: str, variable: str) -> None:
        """A phone of its Asterisk's not registered again since its restart: down for the peers."""
        self.outgoing.add(event_for(StateUpdate(variable, self.states.down_state)))

    def on_asterisk_up(self, link: AsteriskLink) -> None:
        """Its Asterisk is (back) up: give it every peer's states, and tell the peers its own."""
        first = self.relay.resync(self.name)
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
        self.relay.read_lists(self.name, repair, first, on_read=self.answer_state_requests)

    def answer_state_requests(self, readings: List[ListReading]) -> None:
        events = [self.event_of(update) for reading in readings for update in reading.current]
        requesters, self.state_requesters = self.state_requesters, set()
        if not readings:
            return  # it relays neither device states nor presences
        for requester in ([ALL] if ALL in requesters else sorted(requesters)):
            self.send(requester, "AgentStates", events=events)
        log.info("Sent %d states of Asterisk to %s", len(events),
                 "every peer" if ALL in requesters else ", ".join(sorted(requesters)))

    def repair(self) -> None:
        """Anti-entropy: send its states to every peer again, and repair its own mirrors."""
        if self.asterisk.up:
            self.read_own_states(repair=True, requester=ALL)

    # --- the peers -> its Asterisk ---------------------------------------------------------------
    def answer_ping(self, message: Envelope) -> None:
        self.send(message.origin, "AgentPong")
        log.debug("AgentPing received from %s, sending AgentPong.", message.origin)

    def event_of(self, update: StateUpdate) -> Dict[str, str]:
        """Its own state as the x_data of an AsteriskEvent.  A presence says when it changed
        (ChangedAt, wall clock): a presence has no owner, and the newest change wins."""
        event = event_for(update)
        if not update.has_owner:  # a presence or a lamp
            event["ChangedAt"] = f"{self.states.wall(update.variable, self.name):.3f}"
        return event

    def run_action(self, message: Envelope) -> None:
        origin = message.origin
        try:
            action = self.actions.check(message.field("data"), self.asterisk.crashing_actions)
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
    def on_peer_down(self, name: str, why: str) -> None:
        variables = self.relay.source_down(name)
        log.warning("Peer %s is down (%s): %d of its devices now show %s here.", name, why,
                    len(variables), self.settings["DOWN_STATE"] if variables else "their last state")

    def on_peer_up(self, name: str) -> None:
        if self.network.proves_origin:  # over NATS its states came from the bucket
            variables = self.relay.source_up(name)
            log.info("Peer %s is up again: %d of its devices show their states again.", name,
                     len(variables))
            return
        log.info("Peer %s is up again: asking for its states.", name)
        self.send(name, "AgentStateRequest")

    def check_health(self) -> None:
        self.asterisk.check_health(self.peers.timeout)
        self.peers.check()
        self.set_health(f"Asterisk {({True: 'up', False: 'DOWN', None: 'unknown'})[self.asterisk.up]}, "
                        f"{self.peers.up_count()} of {len(self.peers)} peers up")

    def after_stall(self, seconds: float) -> None:
        module = isinstance(self.asterisk, ZmqManagerLink)  # (AMI drops nothing)
        log.warning("The agent did not run for %.1f s (stopped, or its host paused): asking its "
                    "peers for their states%s", seconds, ", and reading its Asterisk's again "
                    "once it has read what it sent meanwhile" if module else "")
        if module:
            self.asterisk.read_again_when_caught_up()
        self.on_hub_connection()

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
        agent.config_path = config_path
        agent.run(settings["METRICS_ADDRESS"], settings["METRICS_PORT"],
                  f"{config_path}: METRICS_PORT")
    except ConfigError as exc:
        return exc.report()
    finally:
        context.destroy(linger=0)
        release_pid_file(pid_file)
    return 0
