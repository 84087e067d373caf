"""The agent: ``python agent.py [CONFIG.py]``, on each Asterisk host of the agent/server network.

One process, one loop (the original ran three processes):
- its Asterisk's events -> AsteriskEvent to ``[*]`` through the hub;
- the hub's messages -> Setvar on its Asterisk (AsteriskEvent), an action run on its Asterisk and
  answered with AsteriskActionStatus (AsteriskAction), AgentPong (AgentPing);
- every KEEP_ALIVE_INTERVAL: Ping its Asterisk, report to ``[AsteriskStats]``, AgentPing itself.
Nothing waits for Asterisk: while it is down, the agent still answers the hub.
"""
import argparse
import errno
import logging
import os
import sys
from typing import Any, Dict, List, Optional

import zmq

from . import __version__, envelope
from .asterisk import LinkHandlers, ZmqManagerLink
from .config import (PROJECT_DIR, ConfigError, Setting, is_bool, is_log_level,
                     is_optional_text, is_positive_number, is_url, load_script_settings)
from .envelope import ALL, STATS, Envelope, is_node_name, parse_message
from .loop import EventLoop
from .rules import BadInput, PresenceEchoFilter, relayed_update, safe_action
from .stats import DropLog

log = logging.getLogger("asterisk_agent")

AGENT_SETTINGS = {
    "LOG_LEVEL": Setting("info", is_log_level),
    "SYSTEM_NAME": Setting("Moscow", lambda v: None if is_node_name(v) else
                           "must be a name without brackets or control characters"),
    "ASTERISK_CMD_URL": Setting("tcp://127.0.0.1:1967", is_url),
    "ASTERISK_EVT_URL": Setting("tcp://127.0.0.1:1968", is_url),
    "KEEP_ALIVE_INTERVAL": Setting(30, is_positive_number),
    "ZMQ_PUB_URL": Setting("tcp://127.0.0.1:55556", is_url),
    "ZMQ_SUB_URL": Setting("tcp://127.0.0.1:55555", is_url),
    "PID_FILE": Setting(None, is_optional_text),
    "ASTERISK_TIMEOUT": Setting(5000, is_positive_number),
    "DEVICE_STATE": Setting(True, is_bool),
    "PRESENCE": Setting(False, is_bool),
}
BATCH = 1000           # hub messages handled per wake-up
COUNTER_EVERY = 100    # the original's "Message counter" line
LOCAL = "local"        # this agent's Asterisk, for the presence echo filter
EXIT_PID_FILE = 1


class Agent:
    def __init__(self, settings: Dict[str, Any], context: zmq.Context) -> None:
        self.settings = settings
        self.name = settings["SYSTEM_NAME"]
        self.loop = EventLoop()
        self.drops = DropLog(log)
        self.unsent = DropLog(log, what="a message to")
        self.echoes = PresenceEchoFilter()
        self.received = 0
        self.asterisk_ok: Optional[bool] = None
        self.asterisk = ZmqManagerLink(
            self.loop, context, "Asterisk", settings["ASTERISK_CMD_URL"],
            settings["ASTERISK_EVT_URL"], settings["ASTERISK_TIMEOUT"],
            LinkHandlers(on_event=self.on_asterisk_event, drops=self.drops))
        self.hub_source = f"the hub at {settings['ZMQ_SUB_URL']}"
        self.push = context.socket(zmq.PUSH)
        self.sub = context.socket(zmq.SUB)
        for sock in (self.push, self.sub):
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
        self.sub.setsockopt(zmq.SUBSCRIBE, envelope.topic(ALL))
        self.sub.setsockopt(zmq.SUBSCRIBE, envelope.topic(self.name))

    def run(self) -> None:
        log.info("Agent %s (version %s) starting.", self.name, __version__)
        self.asterisk.start()
        self.push.connect(self.settings["ZMQ_PUB_URL"])
        self.sub.connect(self.settings["ZMQ_SUB_URL"])
        log.info("Connected to the hub: pushing to %s, subscribed to %s.",
                 self.settings["ZMQ_PUB_URL"], self.settings["ZMQ_SUB_URL"])
        self.loop.add_reader(self.sub, self.read_hub)
        self.keep_alive()
        self.loop.call_every(self.settings["KEEP_ALIVE_INTERVAL"], self.keep_alive)
        self.loop.stop_on_signals()
        try:
            self.loop.run()
        finally:
            log.info("Received %s: %d hub messages, %d dropped. Exiting.",
                     self.loop.stop_signal or "stop", self.received,
                     sum(self.drops.counts.values()))
            self.asterisk.close()
            self.loop.close()

    def send(self, target: str, msg_type: str, **fields: Any) -> None:
        frames = envelope.build(target, msg_type, self.name, **fields)
        try:
            self.push.send_multipart(frames, zmq.NOBLOCK)
        except zmq.Again:  # the hub has been unreachable long enough to fill the queue
            self.unsent.drop(f"the hub at {self.settings['ZMQ_PUB_URL']}",
                             "not reachable, queue full", frames[1])

    # --- its Asterisk -> the hub ------------------------------------------------------------------
    def on_asterisk_event(self, link: ZmqManagerLink, event: Dict[str, Any]) -> None:
        if event["Event"] == "Reload":
            self.send(ALL, "AsteriskEvent", data={"Event": "Reload",
                                                  "Status": _text(event.get("Status")),
                                                  "Module": _text(event.get("Module"))})
            return
        try:
            update = relayed_update(event, self.settings["DEVICE_STATE"], self.settings["PRESENCE"])
        except BadInput as exc:
            self.drops.drop(link.name, f"{event['Event']}: {exc}", repr(event).encode())
            return
        if update is None:
            return
        if update.is_presence:
            if self.echoes.is_echo(LOCAL, update):
                return
            data = {key: event.get(key, "") for key in
                    ("Event", "Presentity", "Status", "Subtype", "Message")}
        else:
            data = {"Event": "DeviceStateChange", "Device": event["Device"], "State": update.value}
        log.debug("My device %s state %s.", update.variable, update.value)
        self.send(ALL, "AsteriskEvent", data=data)

    # --- the hub -> its Asterisk ------------------------------------------------------------------
    def read_hub(self) -> None:
        for _ in range(BATCH):
            try:
                frames = self.sub.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self.on_hub_message(frames)

    def on_hub_message(self, frames: List[bytes]) -> None:
        self.received += 1
        if self.received % COUNTER_EVERY == 0:
            log.info("Message counter: %s", self.received)
        try:
            message = parse_message(frames)
        except BadInput as exc:
            self.drops.drop(self.hub_source, str(exc), b" | ".join(frames))
            return
        if message.origin == self.name:
            log.debug("Ignoring %s: coming from myself.", message.msg_type)
            return
        handler = {"AgentPing": self.answer_ping, "AsteriskEvent": self.apply_event,
                   "AsteriskAction": self.run_action}.get(message.msg_type)
        if handler is None:
            log.debug("Ignoring %s from %s.", message.msg_type, message.origin)
            return
        handler(message)

    def answer_ping(self, message: Envelope) -> None:
        self.send(message.origin, "AgentPong")
        log.info("AgentPing received from %s, sending AgentPong.", message.origin)

    def apply_event(self, message: Envelope) -> None:
        data = message.field("data")
        try:
            if not isinstance(data, dict):
                raise BadInput("x_data is not an object")
            update = relayed_update(data, self.settings["DEVICE_STATE"], self.settings["PRESENCE"])
        except BadInput as exc:
            self.drops.drop(f"{message.origin} via the hub", f"AsteriskEvent: {exc}",
                            repr(data).encode())
            return
        if update is None:
            return
        if update.is_presence:
            self.echoes.written(LOCAL, update)
        log.debug("Other device: %s - %s (from %s).", update.variable, update.value, message.origin)
        self.asterisk.write_state(update, message.uuid, verb="SetVar")

    def run_action(self, message: Envelope) -> None:
        origin = message.origin
        try:
            action = safe_action(message.field("data"))
        except BadInput as exc:
            log.warning("Refused AsteriskAction from %s: %s", origin, exc)
            self.send(origin, "AsteriskActionStatus", data=[
                {"Response": "Error", "Message": f"Refused by agent {self.name}: {exc}"}])
            return
        log.info("AsteriskAction %s from %s.", action["Action"], origin)
        self.asterisk.send_action(
            action, lambda reply: self.send(origin, "AsteriskActionStatus", data=reply))

    # --- keep-alive ------------------------------------------------------------------------------
    def keep_alive(self) -> None:
        self.asterisk.send_action({"Action": "Ping"}, self.on_ping_reply)
        self.send(self.name, "AgentPing")  # through the hub and back: keeps its sockets alive

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


def _text(value: Any) -> Optional[str]:
    return value if isinstance(value, str) else None


# --- the pid file ---------------------------------------------------------------------------------

class PidFileBusy(Exception):
    pass


def claim_pid_file(path: str) -> None:
    """Write our pid to path; PidFileBusy if it names a running process, replace it if stale."""
    try:
        with open(path, encoding="ascii", errors="replace") as handle:
            old_pid = int(handle.read().strip() or 0)
    except FileNotFoundError:
        old_pid = None
    except (OSError, ValueError):
        old_pid = 0
    if old_pid is not None:
        if old_pid > 0 and _process_exists(old_pid):
            raise PidFileBusy(f"{path} already exists (agent running as pid {old_pid}), exiting.")
        log.warning("%s names pid %s, which is not running: replacing it.", path, old_pid or "?")
        os.unlink(path)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(f"{os.getpid()}\n")


def release_pid_file(path: str) -> None:
    try:
        with open(path, encoding="ascii") as handle:
            if handle.read().strip() == str(os.getpid()):
                os.unlink(path)
    except (OSError, ValueError):
        pass


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError as exc:
        return exc.errno == errno.EPERM
    return True


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python agent.py",
                                     description="The zmq-ami-broker agent for one Asterisk host.")
    parser.add_argument("config", nargs="?", help="settings file (default: agent_config.py "
                                                  "beside agent.py)")
    parser.add_argument("--version", action="version", version=f"zmq-ami-broker {__version__}")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    config_path = args.config or os.path.join(PROJECT_DIR, "agent_config.py")
    try:
        settings = load_script_settings(config_path, AGENT_SETTINGS, log)
    except ConfigError as exc:
        return exc.report()
    pid_file = settings["PID_FILE"] or os.path.join(PROJECT_DIR, "zmq_agent.pid")
    try:
        claim_pid_file(pid_file)
    except PidFileBusy as exc:
        print(exc, file=sys.stderr)
        return EXIT_PID_FILE
    except OSError as exc:
        print(f"{config_path}: PID_FILE: cannot write {pid_file}: {exc.strerror}", file=sys.stderr)
        return EXIT_PID_FILE
    context = zmq.Context()
    try:
        Agent(settings, context).run()
    finally:
        context.destroy(linger=0)
        release_pid_file(pid_file)
    return 0
