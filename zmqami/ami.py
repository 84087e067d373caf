"""Plain AMI over TCP: Asterisk's own manager interface (port 5038), no C module needed.

The framing (docs/protocol.md, section 1; tests/captures): a banner line on connect, then
messages of ``Key: Value`` lines ending with an empty line.  TCP splits and joins messages
anywhere, so bytes are buffered until ``\\r\\n\\r\\n`` and each whole message is decoded once (a
UTF-8 character split across two reads survives).  Keys repeat (``Output``, ``Variable``): all are
kept, in order.  A message is a response or an event by its first line.

AmiLink is the second way to reach Asterisk (AsteriskLink): one TCP connection, in the same
zmq.Poller loop as everything else, never blocking it.  Replies are shaped like res_zmq_manager's
(a list of messages: a list action's ack, items and Complete event gathered into one), so the
broker and the agent handle both the same way.
"""
import errno
import logging
import socket
from typing import Any, Dict, Iterator, List, Optional, Tuple

from .asterisk import AsteriskLink, LinkHandlers, Request
from .loop import EventLoop, Timer, keep_alive
from .rules import BadInput, unique_id
from .stats import Throttle, held_back, printable

log = logging.getLogger(__name__)

Pairs = List[Tuple[str, str]]
TERMINATOR = b"\r\n\r\n"
MAX_MESSAGE_BYTES = 1024 * 1024  # no AMI message is near this; more without a terminator is junk
RECV_BYTES = 65536
BACKOFF_FIRST, BACKOFF_MAX = 1.0, 30.0  # seconds between reconnections, doubling
BOOT_WAIT = 10.0  # seconds after a login to wait for FullyBooted before going on without it
# Each stage of a connection (TCP connect, the banner, the Login's answer) has a deadline: the
# request timeout, and never less than this (Asterisk answers a wrong secret after 1 s).  A stage
# that misses it ends the connection, and the next one is made after the backoff.
STAGE_TIMEOUT_MIN = 3.0
BANNER = "Asterisk Call Manager/"  # how Asterisk's manager interface greets (9.0.0 on 20 and 22)
EVENTS = "call,system"  # DeviceStateChange, PresenceStateChange, FullyBooted, Reload, Shutdown


class AmiParser:
    """Bytes in, whole AMI messages out, as (key, value) pairs in wire order."""

    def __init__(self, banner: bool = True) -> None:
        self.buffer = b""
        self.banner: Optional[str] = None
        self._want_banner = banner

    def feed(self, data: bytes) -> Iterator[Pairs]:
        self.buffer += data
        start = 0
        if self._want_banner:
            end = self.buffer.find(b"\r\n")
            if end < 0:
                self._check_size()
                return
            self.banner = self.buffer[:end].decode("utf-8", "replace")
            start = end + 2
            self._want_banner = False
        try:
            while True:
                end = self.buffer.find(TERMINATOR, start)
                if end < 0:
                    break
                message, start = self.buffer[start:end], end + 4
                yield parse_message(message)
        finally:
            # Cut what was read once, not after each message: a read can hold hundreds.
            self.buffer = self.buffer[start:]
        self._check_size()

    def _check_size(self) -> None:
        if len(self.buffer) > MAX_MESSAGE_BYTES:
            raise BadInput(f"more than {MAX_MESSAGE_BYTES} bytes without the end of a message")


def parse_message(raw: bytes) -> Pairs:
    """One message (without its terminator): ``Key: Value`` lines, in order."""
    pairs = []
    for line in raw.decode("utf-8", "replace").split("\r\n"):
        key, colon, value = line.partition(":")
        if not colon:
            continue  # a line without a colon carries nothing
        pairs.append((key.strip(), value[1:] if value.startswith(" ") else value))
    return pairs


def as_dict(pairs: Pairs) -> Dict[str, Any]:
    """A message as a dict; a repeated key keeps all its values, in order, in a list."""
    message: Dict[str, Any] = {}
    for key, value in pairs:
        if key in message:
            previous = message[key]
            message[key] = (previous if isinstance(previous, list) else [previous]) + [value]
        else:
            message[key] = value
    return message


def format_action(action: Dict[str, Any]) -> bytes:
    """An action as AMI text.  Values were checked before (no CR or LF); lists repeat the key."""
    lines = []
    for key, value in action.items():
        for item in value if isinstance(value, list) else [value]:
            text = str(item)
            if "\r" in text or "\n" in text:
                raise BadInput(f"{key} would inject AMI headers")
            lines.append(f"{key}: {text}\r\n")
    return ("".join(lines) + "\r\n").encode("utf-8")


class AmiLink(AsteriskLink):
    """One Asterisk server reached through its manager interface over TCP."""
    NO_ANSWER = "No AMI response from %s within %d ms"
    crashing_actions = frozenset()  # through plain AMI, Getvar and Status are safe

    def __init__(self, loop: EventLoop, name: str, host: str, port: int, user: str, secret: str,
                 request_timeout_ms: int, handlers: LinkHandlers) -> None:
        super().__init__(loop, name, request_timeout_ms, handlers)
        self.host, self.port = host, port
        self.user, self.secret = user, secret
        self.address = f"{host}:{port}"
        self.sock: Optional[socket.socket] = None
        self.state = "closed"         # closed, connecting, banner, login, booting, ready
        self.parser = AmiParser()
        self.outgoing = b""           # what the kernel would not take yet
        self.lists: Dict[str, List[Dict[str, Any]]] = {}  # list actions being gathered
        self.backoff = BACKOFF_FIRST
        self.failing: Optional[str] = None  # why the last connection failed
        self.failures = Throttle()  # each reason logged once a minute
        self._reconnect_timer: Optional[Timer] = None
        self._stage_timer: Optional[Timer] = None  # the deadline of the stage under way
        self._boot_timer: Optional[Timer] = None
        self._login_id = ""

    # --- connection ------------------------------------------------------------------------------
    def start(self) -> None:
        log.info("Connecting to %s over AMI at %s as %s", self.name, self.address, self.user)
        self._connect()

    def close(self) -> None:
        super().close()
        if self._reconnect_timer:
            self._reconnect_timer.cancel()
        self._drop_socket()

    def _cancel_boot_wait(self) -> None:
        if self._boot_timer is not None:
            self._boot_timer.cancel()
            self._boot_timer = None

    def _stage(self, state: str, awaited: str) -> None:
        """Enter a stage of the connection that must end within the stage timeout."""
        self.state = state
        if self._stage_timer is not None:
            self._stage_timer.cancel()
        timeout = max(STAGE_TIMEOUT_MIN, self.outbox.timeout)
        self._stage_timer = self.loop.call_later(
            timeout, lambda: self._failed(f"no {awaited} within {timeout:g} s"))

    def _stage_done(self) -> None:
        if self._stage_timer is not None:
            self._stage_timer.cancel()
            self._stage_timer = None

    def _connect(self) -> None:
        self._reconnect_timer = None
        self.parser = AmiParser()
        self.outgoing = b""
        self.lists.clear()
        try:
            self.sock = socket.socket(_family(self.host), socket.SOCK_STREAM)
            self.sock.setblocking(False)
            keep_alive(self.sock)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            result = self.sock.connect_ex((self.host, self.port))
        except OSError as exc:
            self._failed(f"cannot connect: {exc.strerror}")
            return
        if result not in (0, errno.EINPROGRESS):
            self._failed(f"cannot connect: {errno.errorcode.get(result, result)}")
            return
        self._stage("connecting", "TCP connection")
        self.loop.add_writer(self.sock, self._on_connected)

    def _on_connected(self) -> None:
        self.loop.remove_writer(self.sock)
        error = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if error:
            self._failed(f"cannot connect: {errno.errorcode.get(error, error)}")
            return
        self._stage("banner", "banner")
        self.loop.add_reader(self.sock, self._on_readable)

    def _on_banner(self, banner: str) -> None:
        """The server's first line: the Login (and its secret) goes to Asterisk only."""
        if not banner.startswith(BANNER):
            self._failed(f"not Asterisk's manager interface: its first line is "
                         f"'{printable(banner)}'")
            return
        self._stage("login", "answer to the Login (with its ActionID)")
        # The secret goes on the wire, never into a log line.
        self._login_id = f"login-{unique_id()}"
        self._write(format_action({"Action": "Login", "Username": self.user,
                                   "Secret": self.secret, "Events": EVENTS,
                                   "ActionID": self._login_id}))

    def _on_login(self, response: Dict[str, Any]) -> None:
        if response.get("Response") != "Success":
            # Asterisk closes the connection after a failed login; so do we, and retry later.
            self._failed(f"authentication failed for {self.user} at {self.address}")
            return
        self._stage_done()
        self.backoff = BACKOFF_FIRST
        if self.failing is not None:
            log.info("Connected to %s over AMI again (it was: %s)", self.name, self.failing)
        else:
            log.info("Logged in to %s at %s as %s", self.name, self.address, self.user)
        self.failing = None
        # Asterisk accepts logins before it has loaded its modules: nothing is sent before its
        # FullyBooted (which comes at once, after the login's response, when it is booted).
        self.state = "booting"
        self._boot_timer = self.loop.call_later(BOOT_WAIT, self._no_fully_booted)

    def _no_fully_booted(self) -> None:
        log.warning("No FullyBooted from %s within %g s of the login (does its manager.conf "
                    "user lack read = system?): going on without it", self.name, BOOT_WAIT)
        self._fully_booted()

    def _fully_booted(self) -> None:
        self._cancel_boot_wait()
        self.state = "ready"
        # A new session may follow a restart that was quicker than server_timeout: whatever
        # happened, resynchronise (on_up), as for a server that was down.
        was_up = self.up is True
        self._answered()
        if was_up:
            self.handlers.on_up(self)
        self._send_pending()

    def _failed(self, why: str) -> None:
        """The connection is gone or unusable: requeue, and connect again after a backoff."""
        more = self.failures.allow(why)
        if more is not None:
            log.warning("%s: %s; connecting again in %g s (doubling up to %g s)%s", self.name,
                        why, self.backoff, BACKOFF_MAX, held_back(more, "times"))
        else:
            log.debug("%s: %s again", self.name, why)
        self.failing = why
        self._drop_socket()
        self.outbox.requeue_in_flight()
        self.outbox.fail_one_shots()
        if self._reconnect_timer is not None:
            self._reconnect_timer.cancel()
        self._reconnect_timer = self.loop.call_later(self.backoff, self._connect)
        self.backoff = min(self.backoff * 2, BACKOFF_MAX)

    def _drop_socket(self) -> None:
        self._cancel_boot_wait()
        self._stage_done()
        if self.sock is not None:
            self.loop.remove_reader(self.sock)
            self.loop.remove_writer(self.sock)
            self.sock.close()
            self.sock = None
        self.state = "closed"

    def _reset(self) -> None:
        """No answer in time: this connection is stuck, make a new one now."""
        self._drop_socket()
        if self._reconnect_timer:
            self._reconnect_timer.cancel()
        self._connect()

    # --- sending ---------------------------------------------------------------------------------
    def _send_pending(self) -> None:
        if self.state == "ready":
            super()._send_pending()
        if self.state != "ready":  # (a write may just have ended the connection)
            # States wait for the connection, one per variable; a one-shot action (a Ping, a
            # list, a peer's action) is answered "no answer" at once instead of waiting for it.
            self.outbox.fail_one_shots()

    def _transmit(self, request: Request) -> bool:
        self._write(format_action(request.payload()))
        return self.sock is not None  # (a write that failed ended the connection)

    def _write(self, data: bytes) -> None:
        self.outgoing += data
        self._flush()

    def _flush(self) -> None:
        try:
            sent = self.sock.send(self.outgoing)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self._failed(f"connection lost: {exc.strerror}")
            return
        self.outgoing = self.outgoing[sent:]
        if self.outgoing:
            self.loop.add_writer(self.sock, self._flush)
        else:
            self.loop.remove_writer(self.sock)

    # --- receiving -------------------------------------------------------------------------------
    def _on_readable(self) -> None:
        try:
            data = self.sock.recv(RECV_BYTES)
        except BlockingIOError:
            return
        except OSError as exc:
            self._failed(f"connection lost: {exc.strerror}")
            return
        if not data:
            self._failed("connection closed by Asterisk")
            return
        try:
            for pairs in self.parser.feed(data):
                self._on_message(pairs)
                if self.sock is None:
                    return  # the message ended the connection
        except BadInput as exc:
            self.handlers.drops.drop(self.name, str(exc), self.parser.buffer[:200])
            self._failed(f"unreadable AMI stream ({exc})")
            return
        if self.state == "banner" and self.parser.banner is not None:
            self._on_banner(self.parser.banner)
        self._send_pending()

    def _on_message(self, pairs: Pairs) -> None:
        if not pairs:
            return
        if self.state == "banner":  # before our Login, Asterisk sends nothing but its banner
            self.handlers.drops.drop(self.name, "a message before the Login")
            return
        message = as_dict(pairs)
        kind = pairs[0][0]
        if kind == "Response":
            self._on_response(message)
        elif kind == "Event":
            self._on_event(message)
        else:
            self.handlers.drops.drop(self.name, f"neither a response nor an event ({kind!r})")

    def _on_response(self, response: Dict[str, Any]) -> None:
        action_id = response.get("ActionID")
        if self.state == "login":
            if action_id == self._login_id:  # any other answer is not the Login's
                self._on_login(response)
            return
        if not isinstance(action_id, str):
            # Asterisk answers each action with its ActionID (we give every one ours): an answer
            # without one is nobody's, never taken for the oldest request's.
            self.handlers.drops.drop(self.name, "a response without an ActionID")
            return
        self._answered()
        if response.get("EventList") == "start":
            self.lists[action_id] = [response]  # its items and Complete event follow
            return
        self.outbox.reply(action_id, [response])

    def _on_event(self, event: Dict[str, Any]) -> None:
        if self.state == "login":  # Asterisk sends no event before a session has logged in
            self.handlers.drops.drop(self.name, "an event before the Login's answer")
            return
        action_id = event.get("ActionID")
        gathered = self.lists.get(action_id) if isinstance(action_id, str) else None
        if gathered is not None:
            gathered.append(event)
            if event.get("EventList") == "Complete":
                del self.lists[action_id]
                self.outbox.reply(action_id, gathered)
            return
        self.stats.events += 1
        if event.get("Event") == "FullyBooted" and self.state == "booting":
            self._fully_booted()
        if event.get("Event") == "Shutdown":
            self._failed("Asterisk is shutting down")
            return
        if not isinstance(event.get("Event"), str):
            self.handlers.drops.drop(self.name, "event without a single Event name")
            return
        self._deliver_event(event)


def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET
