"""A stand-in Asterisk 20 with res_zmq_manager, for the tests, the demo and the benchmarks.

It answers like the captures of two real Asterisk 20 servers (tests/captures; docs/protocol.md):
- cmd socket (REP): one JSON object in, one JSON array out; the module's two-object error for
  anything it cannot hand to Asterisk; Ping, Setvar of DEVICE_STATE(Custom:...) and
  PRESENCE_STATE(CustomPresence:...), DeviceStateList, PresenceStateList, ExtensionStateList,
  CoreStatus, async Originate.  Getvar, Status and the other actions that crash Asterisk through
  the module make the stand-in stop answering, as the real server does.
- evt socket (PUB, as an XPUB so the stand-in can tell when somebody subscribed): LoadZmq 2 s
  after start (as the module publishes it; a test may instead trigger it with the control
  socket's ``boot`` once the program under test has subscribed), FullyBooted, and a DeviceStateChange when a device's state changes (a Setvar of the
  same state publishes nothing), a PresenceStateChange on every presence write.

A third socket, the control socket (REP, JSON), lets a test or the demo play the phones (change a
device's state as a ringing phone would), publish any bytes, make the server hang or answer slowly,
and read back what it holds.  StandinControl is its client.

Run it in a thread (start_standin) or as its own process:
    python -m zmqami.standin --cmd-port 0 --evt-port 0 --control-port 0
prints one JSON line with the ports it bound, then serves until SIGTERM or Ctrl-C.
"""
import argparse
import base64
import json
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any, Deque, Dict, Iterable, List, Optional, Tuple

import zmq

from .config import setup_logging
from .loop import READ_BATCH, EventLoop, send_frames
from .ami import AmiParser, format_action
from .standin_voicemail import Voicemail
from .rules import (CRASHING_ACTIONS, CUSTOM_DEVICE, CUSTOM_PRESENCE, DEVICE_STATES, BadInput,
                    longest_line_bytes, parse_presence_value)

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
INTERNAL_ERROR = [{"Response": "Error"}, {"Message": "Internal error."}]
_FUNCTION = re.compile(r"^([A-Za-z_]+)\((.*)\)$", re.S)
REQUEST_LOG = 10_000  # requests kept for StandinControl.requests()
AMI_USER, AMI_SECRET = "zmq-ami", "stand-in-secret"
AMI_BANNER = b"Asterisk Call Manager/9.0.0\r\n"
AMI_AUTH_TIMEOUT = 30.0  # s an unauthenticated session may stay (manager.conf authtimeout)
AMI_LOGIN_FAILURE_DELAY = 1.0  # Asterisk sleeps 1 s before answering a failed login
AMI_MAX_QUEUED = 64 * 1024 * 1024  # bytes queued for a client that does not read
LOADZMQ_DELAY = 2.0  # s: res_zmq_manager publishes LoadZmq 2 s after it loads
FULLY_BOOTED = {"Event": "FullyBooted", "Privilege": "system,all", "Uptime": "1",
                "LastReload": "1", "Status": "Fully Booted"}
# What modules provide: unknown (list actions) or refused (function writes) before they load.
MODULE_ACTIONS = ("devicestatelist", "presencestatelist", "extensionstatelist", "setvar")
# res_zmq_manager's unbounded copies into stack buffers (docs/protocol.md 2): past these,
# Asterisk dies.
MODULE_ACTION_BUFFER = 10240
MODULE_EVENT_LINE = 4096
MODULE_REPLY_LINE = 2048


def asterisk_headers(pairs: Iterable[Tuple[str, str]]) -> Dict[str, str]:
    """Header lines as Asterisk reads them (astman_get_header): names compared in any case, the
    FIRST of a name wins (``action: ModuleLoad`` before ``Action: Ping`` runs ModuleLoad)."""
    headers: Dict[str, str] = {}
    for key, value in pairs:
        headers.setdefault(key.lower(), value)
    return headers


# Made once: it is on the path of every reply and event.
_COMPACT_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def module_json(obj: Any) -> bytes:
    """JSON as the module writes it: no spaces, raw UTF-8."""
    return _COMPACT_JSON.encode(obj).encode("utf-8")


INTERNAL_ERROR_JSON = module_json(INTERNAL_ERROR)


class StandinAsterisk:
    """The stand-in server; serve() runs its loop until stop()."""

    def __init__(self, cmd_port: int = 0, evt_port: int = 0, control_port: int = 0,
                 loadzmq_delay: Optional[float] = LOADZMQ_DELAY, state_file: Optional[str] = None,
                 ami_port: Optional[int] = None, ami_user: str = AMI_USER,
                 ami_secret: str = AMI_SECRET, ami_chunk: int = 0, host: str = HOST,
                 modules_delay: float = 0.0, voicemail: Optional[str] = None,
                 endpoints: Iterable[str] = ()) -> None:
        self.context = zmq.Context()
        self.host = host
        self.loop = EventLoop()
        self.loadzmq_delay = loadzmq_delay
        # Asterisk accepts AMI logins before it has loaded its modules: until modules_delay has
        # passed, list actions are unknown and functions cannot be written; then FullyBooted.
        self.modules_delay = modules_delay
        self.fully_booted = modules_delay <= 0
        self.state_file = state_file
        self.devices: Dict[str, str] = {}
        self.presences: Dict[str, Tuple[str, str, str]] = {}
        # Voicemail lamps: app_voicemail ("voicemail"), res_mwi_external ("external") or none.
        self.voicemail = Voicemail(voicemail, self.publish, self._response, self._save_database)
        # Asterisk 22 lists every PJSIP endpoint of its pjsip.conf UNAVAILABLE from boot
        # (res_pjsip creates them offline), registered or not.
        self.devices.update({endpoint: "UNAVAILABLE" for endpoint in endpoints})
        self.hints: Dict[str, str] = {}  # its dialplan's hints: extension -> hint
        self._load_database()
        self.requests: Deque[str] = deque(maxlen=REQUEST_LOG)
        self.request_count = 0
        self.actions_run: Counter = Counter()  # action names as Asterisk picked them, lower case
        self.crashes: List[str] = []            # why it played dead
        self.subscriptions = 0
        self.mode = "normal"      # normal, hung, slow or crashed
        self.delay = 0.0          # seconds, in slow mode
        self.stuck = False        # a request was read and never answered
        self.written_at: Dict[str, Tuple[str, float]] = {}  # Custom: device -> (state, when)
        self.cmd = self._bind(zmq.REP, cmd_port)
        # ZeroMQ's default high-water mark, as res_zmq_manager's PUB has: a subscriber more than
        # 1000 events behind loses the rest of a flood.
        self.evt = self._bind(zmq.XPUB, evt_port)
        self.evt.setsockopt(zmq.XPUB_VERBOSE, 1)
        self.control = self._bind(zmq.REP, control_port, HOST)  # tests reach it there
        self.ports = {"cmd_port": self._port(self.cmd), "evt_port": self._port(self.evt),
                      "control_port": self._port(self.control)}
        self.ami: Optional[AmiServer] = None
        if ami_port is not None:
            self.ami = AmiServer(self, ami_port, ami_user, ami_secret, ami_chunk)
            self.ports["ami_port"] = self.ami.port
        self.loop.add_reader(self.cmd, self._on_request)
        self.loop.add_reader(self.evt, self._on_subscription)
        self.loop.add_reader(self.control, self._on_control)

    def _bind(self, kind: int, port: int, host: str = "") -> zmq.Socket:
        sock = self.context.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IPV6, 1)
        host = host or self.host
        address = f"[{host}]" if ":" in host else host
        sock.bind(f"tcp://{address}:{port or '*'}")
        return sock

    @staticmethod
    def _port(sock: zmq.Socket) -> int:
        return int(sock.getsockopt_string(zmq.LAST_ENDPOINT).rsplit(":", 1)[1])

    def serve(self) -> None:
        if self.loadzmq_delay is not None:  # None: only when the control socket says boot
            self.loop.call_later(self.loadzmq_delay, self._booted)
        if not self.fully_booted:
            self.loop.call_later(self.modules_delay, self._modules_loaded)
        try:
            self.loop.run()
        finally:
            self.loop.close()
            self.context.destroy(linger=0)

    def _modules_loaded(self) -> None:
        self.fully_booted = True
        if self.ami is not None:
            self.ami.publish(FULLY_BOOTED)

    def _booted(self) -> None:
        # The module publishes LoadZmq with its own spacing; every other event is compact.
        # (Not to AMI sessions: there FullyBooted comes with each login.)
        self.evt.send(b'{"Event": "LoadZmq"}')
        self.evt.send(module_json({"Event": "FullyBooted", "Privilege": "system,all",
                                "Status": "Fully Booted", "Uptime": "1", "LastReload": "1"}))

    # --- the evt socket --------------------------------------------------------------------------
    def publish(self, event: Dict[str, Any]) -> None:
        # The module's hook sees every event, however caused.  (No line is longer than the
        # compact JSON it is in: only a long event needs its lines counted.)
        data = module_json(event)
        longest = longest_line_bytes([event]) if len(data) > MODULE_EVENT_LINE else 0
        if longest > MODULE_EVENT_LINE:
            self._play_dead(f"an event line of {longest} bytes overflows the module's "
                            f"{MODULE_EVENT_LINE}-byte buffer")
        if self.mode != "crashed":
            send_frames(self.evt, [data])
            if self.ami is not None:
                self.ami.publish(event)

    def _on_subscription(self) -> None:
        message = self.evt.recv()
        if message[:1] == b"\x01":
            self.subscriptions += 1
        elif message[:1] == b"\x00":
            self.subscriptions -= 1

    def set_device(self, device: str, state: str, publish: bool = True) -> None:
        """A device changes state, as a phone ringing or a Setvar would make it."""
        if self.devices.get(device) != state:
            self.devices[device] = state
            self._save_database()
            if publish:
                self.publish({"Event": "DeviceStateChange", "Privilege": "call,all",
                              "Device": device, "State": state})

    def set_presence(self, presentity: str, status: str, subtype: str, message: str,
                     publish: bool = True) -> None:
        self.presences[presentity] = (status, subtype, message)
        self._save_database()
        if publish:
            self.publish({"Event": "PresenceStateChange", "Privilege": "call,all",
                          "Presentity": presentity, "Status": status, "Subtype": subtype,
                          "Message": message})

    # --- Asterisk's database: Custom: devices and presences survive a restart ---------------------
    def _load_database(self) -> None:
        if self.state_file and os.path.exists(self.state_file):
            with open(self.state_file, encoding="utf-8") as handle:
                saved = json.load(handle)
            self.devices.update(saved["devices"])
            self.presences.update({k: tuple(v) for k, v in saved["presences"].items()})
            self.voicemail.stored.update({k: tuple(v) for k, v in saved.get("mwi", {}).items()})

    def _save_database(self) -> None:
        if not self.state_file:
            return
        custom = {d: s for d, s in self.devices.items() if d.startswith(CUSTOM_DEVICE)}
        temporary = self.state_file + ".tmp"
        with open(temporary, "w", encoding="utf-8") as handle:
            json.dump({"devices": custom, "presences": self.presences,
                       "mwi": self.voicemail.stored}, handle)
        os.replace(temporary, self.state_file)

    # --- the cmd socket --------------------------------------------------------------------------
    def _on_request(self) -> None:
        """Answer the requests waiting, one by one, as the module's one command thread does."""
        for _ in range(READ_BATCH):
            if not self._answer_next():
                return

    def _answer_next(self) -> bool:
        """Read and answer one request; False when there is none or no more may be read now."""
        try:
            raw = self.cmd.recv(zmq.NOBLOCK)
        except zmq.Again:
            return False
        self.request_count += 1
        self.requests.append(raw.decode("utf-8", "replace"))
        reply = self.answer(raw)
        if reply is None or self.mode in ("hung", "crashed"):
            # REP cannot read again before it answers: the server now reads nothing more.
            self.loop.remove_reader(self.cmd)
            self.stuck = True
            return False
        if self.mode == "slow":
            self.loop.remove_reader(self.cmd)
            self.loop.call_later(self.delay, lambda: self._send_reply(reply, resume=True))
            return False
        self._send_reply(reply)
        return True

    def _send_reply(self, reply: bytes, resume: bool = False) -> None:
        send_frames(self.cmd, [reply])
        if resume:
            self.loop.add_reader(self.cmd, self._on_request)

    def answer(self, raw: bytes) -> Optional[bytes]:
        """The module's reply to one request, as it sends it; None when the request crashes
        Asterisk."""
        try:
            request = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            return INTERNAL_ERROR_JSON
        if not isinstance(request, dict) or "Action" not in request:
            return INTERNAL_ERROR_JSON
        # The module writes every key as a header line, a non-string value as "(null)"; the
        # "Action" key must be spelt so for the module, but Asterisk then reads the lines.
        lines = [(str(k), v if isinstance(v, str) else "(null)") for k, v in request.items()]
        headers = asterisk_headers(lines)
        action = headers["action"].lower()
        if action in CRASHING_ACTIONS:
            return self._play_dead(f"{action} crashes a real Asterisk")
        # The lines are at most twice the JSON they came from (a pair `"":0,` of 5 bytes makes
        # `: (null)\r\n`, 10): only a long request needs them counted.
        size = sum(len(f"{k}: {v}\r\n".encode("utf-8")) for k, v in lines) \
            if 2 * len(raw) > MODULE_ACTION_BUFFER else 0
        if size > MODULE_ACTION_BUFFER:
            return self._play_dead(f"an action of {size} bytes overflows the module's "
                                   f"{MODULE_ACTION_BUFFER}-byte buffer")
        reply = self.dispatch(headers)
        if reply is None:
            return INTERNAL_ERROR_JSON  # unknown actions, Login
        encoded = module_json(reply)
        longest = longest_line_bytes(reply) if len(encoded) > MODULE_REPLY_LINE else 0
        if longest > MODULE_REPLY_LINE:
            return self._play_dead(f"a reply line of {longest} bytes overflows the module's "
                                   f"{MODULE_REPLY_LINE}-byte line buffer")
        return encoded

    def _play_dead(self, why: str) -> None:
        """What kills a real Asterisk (docs/protocol.md) makes the stand-in stop answering."""
        log.warning("Stand-in Asterisk: %s; playing dead", why)
        self.mode = "crashed"
        self.crashes.append(why)
        return None

    def dispatch(self, headers: Dict[str, str]) -> Optional[List[Dict[str, str]]]:
        """Asterisk's answer to an action (lower-case header names): its AMI messages in order,
        or None for an action it does not know."""
        action = headers.get("action", "").lower()
        self.actions_run[action] += 1
        if not action.isalpha():
            return None
        handler = self.voicemail.handler(action) or getattr(self, "_action_" + action, None)
        return None if handler is None else handler(headers)

    @staticmethod
    def _response(headers: Dict[str, str], response: str, **fields: str) -> Dict[str, str]:
        message = {"Response": response}
        if "actionid" in headers:
            message["ActionID"] = headers["actionid"]
        message.update(fields)
        return message

    def _action_ping(self, headers: Dict[str, str]) -> List[Dict[str, str]]:
        return [self._response(headers, "Success", Ping="Pong", Timestamp=f"{time.time():.6f}")]

    def _action_corestatus(self, headers: Dict[str, str]) -> List[Dict[str, str]]:
        now = time.localtime()
        return [self._response(headers, "Success", CoreStartupDate=time.strftime("%Y-%m-%d", now),
                               CoreStartupTime=time.strftime("%H:%M:%S", now),
                               CoreReloadDate=time.strftime("%Y-%m-%d", now),
                               CoreReloadTime=time.strftime("%H:%M:%S", now), CoreCurrentCalls="0")]

    def _action_originate(self, headers: Dict[str, str]) -> Optional[List[Dict[str, str]]]:
        if headers.get("async", "").lower() not in ("true", "yes", "1", "on"):
            # A synchronous Originate holds the module's only thread until the call is answered.
            log.warning("Stand-in Asterisk: synchronous Originate blocks the module; playing hung")
            self.mode = "hung"
            return None
        return [self._response(headers, "Success", Message="Originate successfully queued")]

    def _action_setvar(self, headers: Dict[str, str]) -> List[Dict[str, str]]:
        variable = headers.get("variable")
        if not variable:
            return [self._response(headers, "Error", Message="No variable specified")]
        value = headers.get("value", "")
        function = _FUNCTION.match(variable)
        if function is None:
            return [self._response(headers, "Success", Message="Variable Set")]  # a global variable
        name, argument = function.group(1).upper(), function.group(2)
        if name == "DEVICE_STATE" and self._write_device_state(argument, value):
            return [self._response(headers, "Success", Message="Variable Set")]
        if name == "PRESENCE_STATE" and self._write_presence(argument, value):
            return [self._response(headers, "Success", Message="Variable Set")]
        return [self._response(headers, "Error", Message="Variable not set")]

    def _write_device_state(self, device: str, value: str) -> bool:
        if not device.lower().startswith(CUSTOM_DEVICE.lower()) or value.upper() not in DEVICE_STATES:
            return False
        device = CUSTOM_DEVICE + device[len(CUSTOM_DEVICE):]
        self.written_at[device] = (value.upper(), time.monotonic())
        self.set_device(device, value.upper())
        return True

    def _write_presence(self, presentity: str, value: str) -> bool:
        if not presentity.lower().startswith(CUSTOM_PRESENCE.lower()):
            return False
        try:
            status, subtype, message = parse_presence_value(value)
        except BadInput:
            return False
        self.set_presence(CUSTOM_PRESENCE + presentity[len(CUSTOM_PRESENCE):],
                          status, subtype, message)
        return True

    def _list(self, headers: Dict[str, str], intro: str, items: List[Dict[str, str]],
              complete: str) -> List[Dict[str, str]]:
        """A list action's reply: the ack, one object per item, then the Complete object."""
        action_id = {"ActionID": headers["actionid"]} if "actionid" in headers else {}
        reply = [self._response(headers, "Success", EventList="start", Message=intro)]
        for item in items:
            reply.append({"Event": item.pop("Event"), **action_id, **item})
        reply.append({"Event": complete, **action_id, "EventList": "Complete",
                      "ListItems": str(len(items))})
        return reply

    def _action_devicestatelist(self, headers: Dict[str, str]) -> List[Dict[str, str]]:
        items = [{"Event": "DeviceStateChange", "Device": device, "State": state}
                 for device, state in self.devices.items()]
        return self._list(headers, "Device State Changes will follow", items,
                          "DeviceStateListComplete")

    def _action_presencestatelist(self, headers: Dict[str, str]) -> List[Dict[str, str]]:
        items = [{"Event": "PresenceStateChange", "Presentity": presentity, "Status": status,
                  "Subtype": subtype, "Message": message}
                 for presentity, (status, subtype, message) in self.presences.items()]
        return self._list(headers, "Presence State Changes will follow", items,
                          "PresenceStateListComplete")

    def _action_extensionstatelist(self, headers: Dict[str, str]) -> List[Dict[str, str]]:
        items = [{"Event": "ExtensionStatus", "Exten": exten, "Context": "default", "Hint": hint,
                  "Status": "0", "StatusText": "Idle"} for exten, hint in self.hints.items()]
        return self._list(headers, "Extension Statuses will follow", items,
                          "ExtensionStateListComplete")

    # --- the control socket ----------------------------------------------------------------------
    def _on_control(self) -> None:
        try:
            command = json.loads(self.control.recv())
            answer = getattr(self, "_control_" + command["cmd"])(command)
        except Exception as exc:  # a test's mistake: say so to the test, keep serving
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        self.control.send_json(answer)

    def _control_set_device(self, command: Dict[str, Any]) -> Dict[str, Any]:
        self.set_device(command["device"], command["state"], command.get("publish", True))
        return {}

    def _control_set_devices(self, command: Dict[str, Any]) -> Dict[str, Any]:
        for device, state in command["states"].items():
            self.set_device(device, state)
        return {}

    def _control_set_presence(self, command: Dict[str, Any]) -> Dict[str, Any]:
        self.set_presence(command["presentity"], command["status"], command.get("subtype", ""),
                          command.get("message", ""), command.get("publish", True))
        return {}

    def _control_publish(self, command: Dict[str, Any]) -> Dict[str, Any]:
        frames = [base64.b64decode(frame) for frame in command["frames"]]
        self.evt.send_multipart(frames)
        return {}

    def _control_state(self, command: Dict[str, Any]) -> Dict[str, Any]:
        return {"devices": self.devices, "presences": self.presences, "mode": self.mode,
                "requests": self.request_count, "subscriptions": self.subscriptions,
                "actions_run": self.actions_run, "crashes": self.crashes,
                "ami_sessions": 0 if self.ami is None else sum(
                    1 for session in self.ami.sessions.values() if session.user is not None),
                "ami_connections": 0 if self.ami is None else self.ami.connections,
                "mailboxes": {box: list(counts) for box, counts in
                              {**self.voicemail.spool, **self.voicemail.stored}.items()}}

    def _control_set_hints(self, command: Dict[str, Any]) -> Dict[str, Any]:
        """The dialplan's hints change; reload: as `dialplan reload` does, with its event."""
        self.hints = dict(command["hints"])
        if command.get("reload"):
            self.publish({"Event": "Reload", "Privilege": "system,all",
                          "Module": "pbx_config.so", "Status": "0"})
        return {}

    def _control_set_mailbox(self, command: Dict[str, Any]) -> Dict[str, Any]:
        self.voicemail.set_mailbox(command["mailbox"], command["new"], command["old"],
                                   command.get("urgent", 0), command.get("poll", True))
        return {}

    def _control_ami_raw(self, command: Dict[str, Any]) -> Dict[str, Any]:
        """Raw bytes to every logged-in AMI session (hostile input for tests)."""
        data = base64.b64decode(command["data"])
        for session in list(self.ami.sessions.values()):
            if session.user is not None:
                self.ami._send(session, data)
        return {}

    def _control_ami_fault(self, command: Dict[str, Any]) -> Dict[str, Any]:
        """New AMI connections misbehave so (AMI_FAULTS; None: not any more); the sessions open
        now are closed, as by a restart of the manager interface, unless keep is true."""
        fault = command.get("fault")
        if fault is not None and fault not in AMI_FAULTS:
            raise ValueError(f"no such fault {fault!r}: one of {', '.join(AMI_FAULTS)}")
        self.ami.fault = fault
        if not command.get("keep"):
            for session in list(self.ami.sessions.values()):
                self.ami._close(session)
        return {}

    def _control_requests(self, command: Dict[str, Any]) -> Dict[str, Any]:
        return {"requests": list(self.requests)}

    def _control_mode(self, command: Dict[str, Any]) -> Dict[str, Any]:
        self.mode = command["mode"]
        self.delay = command.get("delay_ms", 0) / 1000.0
        if self.stuck and self.mode not in ("hung", "crashed"):
            self.stuck = False
            # The REP socket read a request it never answered: answer it now (if its sender has
            # gone, ZeroMQ drops the answer) so that the socket reads again.
            self._send_reply(INTERNAL_ERROR_JSON, resume=True)
        return {}

    def _control_writes(self, command: Dict[str, Any]) -> Dict[str, Any]:
        prefix = CUSTOM_DEVICE + command["prefix"]
        return {"writes": {device: written for device, written in self.written_at.items()
                           if device.startswith(prefix)}}

    def _control_shutdown(self, command: Dict[str, Any]) -> Dict[str, Any]:
        """core stop now: a Shutdown event to the AMI sessions, then the server is gone."""
        if self.ami is not None:
            self.ami.shutdown()
        self.loop.call_later(0.05, self.loop.stop)
        return {}

    def _control_boot(self, command: Dict[str, Any]) -> Dict[str, Any]:
        """Publish the boot events now (LoadZmq, FullyBooted)."""
        self._booted()
        return {}

    def _control_stop(self, command: Dict[str, Any]) -> Dict[str, Any]:
        self.loop.stop()
        return {}




class AmiSession:
    """One TCP client of the stand-in's manager interface."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.parser = AmiParser(banner=False)
        self.user: Optional[str] = None
        self.classes: Optional[set] = None  # event classes wanted; None: all
        self.closing = False
        self.chunks: Deque[bytes] = deque()  # in chunk mode: what is still to be sent, in order
        self.outgoing = b""                  # what the kernel would not take yet
        self.fault: Optional[str] = None     # how this connection misbehaves (AMI_FAULTS)


# What a server on the manager port can do wrong, for tests (the control socket's ami_fault):
# another service's banner then silence, accept and never send a byte, or answer the Login
# without its ActionID.  (A server that stops answering is the stand-in's mode "hung".)
AMI_FAULTS = {"banner": b"SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3\r\n", "silent": b"",
              "no_actionid": AMI_BANNER}


class AmiServer:
    """The stand-in's manager interface over TCP, as Asterisk 20's (docs/protocol.md 1).

    It shares the stand-in's devices, presences and actions with the res_zmq_manager side.
    chunk > 0 sends everything in pieces of that many bytes, a millisecond apart, so that a
    client sees messages (and UTF-8 characters) split across reads.  fault (AMI_FAULTS), if set,
    is how each new connection misbehaves.
    """

    def __init__(self, core: "StandinAsterisk", port: int, user: str, secret: str,
                 chunk: int) -> None:
        self.core = core
        self.user, self.secret, self.chunk = user, secret, chunk
        self.sessions: Dict[socket.socket, AmiSession] = {}
        self.fault: Optional[str] = None
        self.connections = 0  # accepted, ever
        # events published while an action is answered, sent after its response
        self.held: Optional[List[Tuple[AmiSession, bytes]]] = None
        self.listener = socket.socket(socket.AF_INET6 if ":" in core.host else socket.AF_INET)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((core.host, port))
        self.listener.listen(16)
        self.listener.setblocking(False)
        self.port = self.listener.getsockname()[1]
        core.loop.add_reader(self.listener, self._accept)

    def _accept(self) -> None:
        try:
            sock, _ = self.listener.accept()
        except BlockingIOError:
            return
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        session = AmiSession(sock)
        session.fault = self.fault
        self.sessions[sock] = session
        self.connections += 1
        self.core.loop.add_reader(sock, lambda: self._read(session))
        self.core.loop.call_later(AMI_AUTH_TIMEOUT,
                                  lambda: session.user is None and self._close(session))
        self._send(session, AMI_BANNER if session.fault is None else AMI_FAULTS[session.fault])

    def _read(self, session: AmiSession) -> None:
        try:
            data = session.sock.recv(65536)
        except OSError:
            data = b""
        if not data:
            self._close(session)
            return
        if session.fault in ("banner", "silent") or self.core.mode in ("hung", "crashed"):
            return  # not a manager interface, or one that runs nothing: what it is sent is lost
        try:
            for pairs in session.parser.feed(data):
                self._on_action(session, pairs)
        except BadInput:
            self._close(session)

    def _on_action(self, session: AmiSession, pairs: List[Tuple[str, str]]) -> None:
        if session.closing:
            return
        headers = asterisk_headers(pairs)
        self.core.request_count += 1
        self.core.requests.append(json.dumps(dict(pairs)))
        # Asterisk sends an action's response before the events the action caused (04d).
        self.held = []
        try:
            reply = self._answer(session, headers)
        finally:
            held, self.held = self.held, None
        # Its own events follow the response, however late that comes (a busy server: in their own
        # write, a few ms later); other sessions get theirs at once.
        own = b"".join(event for other, event in held if other is session)
        for other, event in held:
            if other is not session:
                self._send(other, event)
        if reply is None or self.core.mode in ("hung", "crashed"):
            self._send(session, own)
            return
        data = b"".join(format_message(message) for message in reply)
        if self.core.mode == "slow":
            self.core.loop.call_later(self.core.delay, lambda: self._send(session, data))
            self.core.loop.call_later(self.core.delay + 0.005, lambda: self._send(session, own))
        else:
            self._send(session, data + own)

    def _answer(self, session: AmiSession, headers: Dict[str, str]) -> Optional[List[Dict]]:
        respond = self.core._response
        action = headers.get("action", "").lower()
        if not action:
            return [respond(headers, "Error", Message="Missing action in request")]
        if action == "logoff":
            session.closing = True
            self.core.loop.call_later(0.001, lambda: self._close(session))
            return [respond(headers, "Goodbye", Message="Thanks for all the fish.")]
        if action == "login":
            return self._login(session, headers)
        if session.user is None:
            return [respond(headers, "Error", Message="Permission denied")]
        if action == "getvar":  # safe through AMI, unlike through res_zmq_manager
            return [respond(headers, "Success", Variable=headers.get("variable", ""), Value="")]
        if self.core.fully_booted or action not in MODULE_ACTIONS:
            reply = self.core.dispatch(headers)
        elif action == "setvar":
            return [respond(headers, "Error", Message="Variable not set")]
        else:
            reply = None
        if reply is None:
            name = headers["action"]
            return [respond(headers, "Error", Message=f"Invalid/unknown command: {name}. "
                            "Use Action: ListCommands to show available commands.")]
        return reply

    def _login(self, session: AmiSession, headers: Dict[str, str]) -> Optional[List[Dict]]:
        respond = self.core._response
        if session.user is not None:
            return [respond(headers, "Success", Message="Already authenticated")]
        if headers.get("username") != self.user or headers.get("secret") != self.secret:
            session.closing = True
            failure = format_message(respond(headers, "Error", Message="Authentication failed"))

            def fail() -> None:
                self._send(session, failure)
                self._close(session)
            self.core.loop.call_later(AMI_LOGIN_FAILURE_DELAY, fail)
            return None
        session.user = headers["username"]
        wanted = headers.get("events", "on").lower()
        session.classes = (set() if wanted == "off" else None if wanted == "on"
                           else {c.strip() for c in wanted.split(",")})
        if session.fault == "no_actionid":
            headers = {key: value for key, value in headers.items() if key != "actionid"}
        reply = [respond(headers, "Success", Message="Authentication accepted")]
        if self.core.fully_booted and (session.classes is None or "system" in session.classes):
            reply.append(dict(FULLY_BOOTED))
        return reply

    def publish(self, event: Dict[str, Any]) -> None:
        """An event to every logged-in session that wants its class."""
        event_class = str(event.get("Privilege", "")).split(",")[0]
        if not event_class or not self.sessions:
            return  # LoadZmq: res_zmq_manager's own, not an AMI event; or nobody to send it to
        data = format_message(event)
        for session in list(self.sessions.values()):
            if session.user is not None and not session.closing and (
                    session.classes is None or event_class in session.classes):
                if self.held is not None:
                    self.held.append((session, data))
                else:
                    self._send(session, data)

    def shutdown(self) -> None:
        self.publish({"Event": "Shutdown", "Privilege": "system,all", "Shutdown": "Cleanly",
                      "Restart": "False"})
        for session in list(self.sessions.values()):
            session.closing = True
            self.core.loop.call_later(0.02, lambda session=session: self._close(session))

    def _send(self, session: AmiSession, data: bytes) -> None:
        if not self.chunk:
            self._write(session, data)
            return
        idle = not session.chunks
        session.chunks.extend(data[i:i + self.chunk] for i in range(0, len(data), self.chunk))
        if idle:
            self._send_chunk(session)

    def _send_chunk(self, session: AmiSession) -> None:
        """One piece, then the next a millisecond later: each its own TCP segment."""
        if session.chunks:
            self._write(session, session.chunks.popleft())
            if session.chunks:
                self.core.loop.call_later(0.001, lambda: self._send_chunk(session))

    def _write(self, session: AmiSession, data: bytes) -> None:
        if session.sock.fileno() < 0:
            return
        session.outgoing += data
        if len(session.outgoing) > AMI_MAX_QUEUED:
            self._close(session)  # a client that does not read: Asterisk drops it too
            return
        self._flush(session)

    def _flush(self, session: AmiSession) -> None:
        try:
            sent = session.sock.send(session.outgoing)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._close(session)
            return
        session.outgoing = session.outgoing[sent:]
        if session.outgoing:
            self.core.loop.add_writer(session.sock, lambda: self._flush(session))
        else:
            self.core.loop.remove_writer(session.sock)

    def _close(self, session: AmiSession) -> None:
        if self.sessions.pop(session.sock, None) is not None:
            self.core.loop.remove_reader(session.sock)
            self.core.loop.remove_writer(session.sock)
            session.sock.close()


def format_message(message: Dict[str, Any]) -> bytes:
    """An AMI message as Asterisk writes it: CRLF lines, an empty line at the end."""
    return format_action(message)


class StandinControl:
    """Client of a stand-in's control socket, for tests, the demo and benchmarks."""

    def __init__(self, context: zmq.Context, port: int, timeout_ms: int = 5000) -> None:
        self.context = context
        self.url = f"tcp://{HOST}:{port}"
        self.timeout_ms = timeout_ms
        self.sock = self._connect()

    def _connect(self) -> zmq.Socket:
        sock = self.context.socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVTIMEO, self.timeout_ms)
        sock.connect(self.url)
        return sock

    def call(self, cmd: str, **fields: Any) -> Dict[str, Any]:
        self.sock.send_json(dict(fields, cmd=cmd))
        try:
            answer = self.sock.recv_json()
        except zmq.Again:
            self.sock.close()
            self.sock = self._connect()
            raise TimeoutError(f"stand-in Asterisk at {self.url} did not answer {cmd}") from None
        if "error" in answer:
            raise RuntimeError(answer["error"])
        return answer

    def set_device(self, device: str, state: str, publish: bool = True) -> None:
        """Change a device; publish=False changes it without an event (a lost event)."""
        self.call("set_device", device=device, state=state, publish=publish)

    def set_devices(self, states: Dict[str, str]) -> None:
        """Many devices change at once (their events published back to back)."""
        self.call("set_devices", states=states)

    def set_presence(self, presentity: str, status: str, subtype: str = "",
                     message: str = "", publish: bool = True) -> None:
        self.call("set_presence", presentity=presentity, status=status, subtype=subtype,
                  message=message, publish=publish)

    def ami_raw(self, data: bytes) -> None:
        self.call("ami_raw", data=base64.b64encode(data).decode("ascii"))

    def publish_raw(self, *frames: bytes) -> None:
        self.call("publish", frames=[base64.b64encode(frame).decode("ascii") for frame in frames])

    def state(self) -> Dict[str, Any]:
        return self.call("state")

    def devices(self) -> Dict[str, str]:
        return self.state()["devices"]

    def presences(self) -> Dict[str, List[str]]:
        return self.state()["presences"]

    def requests(self) -> List[str]:
        return self.call("requests")["requests"]

    def ami_fault(self, fault: Optional[str], keep: bool = False) -> None:
        """How new AMI connections misbehave (AMI_FAULTS, or None); open sessions are closed
        unless keep."""
        self.call("ami_fault", fault=fault, keep=keep)

    def set_mailbox(self, mailbox: str, new: int, old: int = 0, urgent: int = 0,
                    poll: bool = True) -> None:
        """app_voicemail's spool now holds these (poll: its poll sees them at once)."""
        self.call("set_mailbox", mailbox=mailbox, new=new, old=old, urgent=urgent, poll=poll)

    def set_hints(self, hints: Dict[str, str], reload: bool = False) -> None:
        """Its dialplan's hints (extension -> hint), reloaded with a Reload event or quietly."""
        self.call("set_hints", hints=hints, reload=reload)

    def mailboxes(self) -> Dict[str, List[int]]:
        """Each mailbox's counts: the spool's (app_voicemail) or those stored (res_mwi_external)."""
        return self.state()["mailboxes"]

    def boot(self) -> None:
        """Publish LoadZmq and FullyBooted now, as a (re)started server does."""
        self.call("boot")

    def set_mode(self, mode: str, delay_ms: int = 0) -> None:
        self.call("mode", mode=mode, delay_ms=delay_ms)

    def stop(self) -> None:
        self.call("stop")

    def close(self) -> None:
        self.sock.close()


@dataclass
class Standin:
    """A running stand-in, in a thread or a process: its ports and its control client."""
    cmd_port: int
    evt_port: int
    control: StandinControl
    thread: Optional[threading.Thread] = None
    process: Optional[subprocess.Popen] = None
    ami_port: Optional[int] = None

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            self.control.close()
            return
        try:
            self.control.stop()
        except TimeoutError:
            pass
        self.control.close()
        if self.thread is not None:
            self.thread.join(5)
        if self.process is not None:
            self.process.wait(5)

    def kill(self) -> None:
        """kill -9, for a stand-in in its own process: a crash, no goodbye."""
        self.process.kill()
        self.process.wait()
        self.control.close()


def start_standin(context: zmq.Context, **options: Any) -> Standin:
    """Start a stand-in Asterisk in a thread of this process (ports chosen free unless given)."""
    server = StandinAsterisk(**options)
    thread = threading.Thread(target=server.serve, name="standin-asterisk", daemon=True)
    thread.start()
    return Standin(server.ports["cmd_port"], server.ports["evt_port"],
                   StandinControl(context, server.ports["control_port"]), thread,
                   ami_port=server.ports.get("ami_port"))


def main(argv: Optional[List[str]] = None, server_class: Optional[type] = None) -> int:
    """python -m zmqami.standin: a stand-in in its own process; it prints its ports, as JSON,
    on its first line (server_class: StandinAsterisk, or one that can do more, for tests)."""
    parser = argparse.ArgumentParser(
        prog="python -m zmqami.standin",
        description="A stand-in Asterisk with res_zmq_manager, on 127.0.0.1 (for tests and demos).")
    parser.add_argument("--cmd-port", type=int, default=0, help="REP port for actions (0: free)")
    parser.add_argument("--evt-port", type=int, default=0, help="PUB port for events (0: free)")
    parser.add_argument("--control-port", type=int, default=0, help="control port (0: free)")
    parser.add_argument("--mode", choices=("normal", "hung", "slow"), default="normal")
    parser.add_argument("--delay-ms", type=int, default=0, help="reply delay in slow mode")
    parser.add_argument("--state-file", help="keep Custom: states here across restarts, as "
                                             "Asterisk's database does")
    parser.add_argument("--ami-port", type=int, help="also serve AMI over TCP on this port (0: free)")
    parser.add_argument("--ami-user", default=AMI_USER)
    parser.add_argument("--ami-secret", default=AMI_SECRET)
    parser.add_argument("--ami-chunk", type=int, default=0,
                        help="send AMI output in pieces of this many bytes")
    parser.add_argument("--loadzmq-delay", type=float, default=LOADZMQ_DELAY,
                        help="seconds from start to LoadZmq and FullyBooted (the module's 2 s)")
    parser.add_argument("--modules-delay", type=float, default=0.0,
                        help="seconds from start until list actions and function writes work "
                             "over AMI, then FullyBooted (logins are accepted before)")
    parser.add_argument("--voicemail", choices=("voicemail", "external"),
                        help="voicemail lamps: app_voicemail, or res_mwi_external (MWIUpdate)")
    parser.add_argument("--endpoints", type=int, default=0,
                        help="PJSIP/1 ... PJSIP/N, UNAVAILABLE from boot, as Asterisk 22 "
                             "lists them")
    parser.add_argument("--boot-on-command", action="store_true",
                        help="publish the boot events only when the control socket says boot")
    args = parser.parse_args(argv)
    setup_logging(logging.INFO, program="standin")
    server = (server_class or StandinAsterisk)(
        args.cmd_port, args.evt_port, args.control_port, state_file=args.state_file,
        ami_port=args.ami_port, ami_user=args.ami_user, ami_secret=args.ami_secret,
        ami_chunk=args.ami_chunk, modules_delay=args.modules_delay, voicemail=args.voicemail,
        endpoints=[f"PJSIP/{number}" for number in range(1, args.endpoints + 1)],
        loadzmq_delay=None if args.boot_on_command else args.loadzmq_delay)
    server.mode, server.delay = args.mode, args.delay_ms / 1000.0
    server.loop.stop_on_signals()
    print(json.dumps(server.ports), flush=True)
    server.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
