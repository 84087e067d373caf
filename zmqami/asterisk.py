"""The connection to one Asterisk server, and what is still to be sent to it.

``Outbox`` is the delivery policy, independent of how Asterisk is reached:
- per variable (one device, one presentity) only the newest state waits to be sent: a slow server
  gets the newest state of each device, not a backlog, and memory is bounded by the devices;
- at most one write per variable is in flight, so per device the order of states is kept;
- a write that is not acknowledged (timeout, lost connection) is sent again, unless superseded;
- one-shot actions (a Ping, an action a client asked for) are sent once, their reply or None
  handed to a callback.

``ZmqManagerLink`` reaches Asterisk through res_zmq_manager: a SUB socket for events and a DEALER
socket for actions.  The module's cmd socket is REP, which answers requests one by one in order, so
a DEALER may keep several requests in flight (the Guide's pipelining).  A reply is matched to its
request by ActionID; one without (the module's own errors) belongs to the oldest request in flight,
and requests older than the one answered were lost on a reconnect.  When the oldest request is not
answered in time, the socket is closed and opened again (the Guide's Lazy Pirate) and what was in
flight is queued again: nothing the loop does ever waits for Asterisk.
"""
import json
import logging
import time
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Callable, Deque, Dict, List, Optional, Set, Tuple

import zmq

from .loop import READ_BATCH, EventLoop, Timer, drain, keep_alive, send_frames
from .rules import (CRASHING_ACTIONS, MODULE_MAX_LINE_BYTES, BadInput, PresenceEchoFilter,
                    StateUpdate, check_module_action, decode_event, longest_line_bytes,
                    unique_id)
from .stats import DropLog, Histogram, Throttle, held_back, printable

log = logging.getLogger(__name__)

# Requests queued at Asterisk per server.  Past this, newer states of a device replace older ones
# not yet sent; within it, a server (or this process) that is not scheduled for a few ms, as on a
# busy machine, does not hold back the rest (at 10 the window, not the CPU, capped the rate).
MAX_IN_FLIGHT = 100
EVENT_HWM = 100_000  # events buffered by ZeroMQ before a burst is dropped
# s without READ_BATCH events waiting at once, after a stall, before the server's states are
# read again (ZmqManagerLink.read_again_when_caught_up): a list read before the events that
# waited would be overwritten by their older states.
CAUGHT_UP_SETTLE = 0.5
EVENT_MAX_BYTES = 1024 * 1024        # larger events are refused (and the connection reset)
REPLY_MAX_BYTES = 64 * 1024 * 1024   # a DeviceStateList of 100,000 devices is about 8 MB
BOOT_EVENTS = ("LoadZmq", "FullyBooted")  # what a (re)started Asterisk publishes
BOOT_WINDOW = 10.0  # seconds after LoadZmq within which FullyBooted is awaited
# What each list action lists, by the event its items are and the header naming an item.
LISTED_IN = {"DeviceStateChange": ("DeviceStateList", "Device"),
             "PresenceStateChange": ("PresenceStateList", "Presentity"),
             "ExtensionStatus": ("ExtensionStateList", "Exten"),  # (its Hint line: hinted_only)
             "MessageWaiting": ("MWIGet", "Mailbox")}
HEALTH_CHECK_INTERVAL = 1.0  # seconds between checks of server_timeout (see check_health)
LIST_RETRY_FIRST, LIST_RETRY_MAX = 1.0, 30.0  # seconds before a failed list read is tried again
# The last acknowledged write of each variable, for --status devices: the newest this many per
# server (at 100,000 devices a full record would add a fifth to the broker's memory).
WRITTEN_KEPT = 10_000

# res_zmq_manager publishes every event of Asterisk: a captured call made 34 events, 6 of them
# DeviceStateChange, and as many VarSet and Newexten as its dialplan runs.  Its PUB drops what no
# subscription matches before it queues anything, so a link subscribed to the events it uses
# keeps the rest in Asterisk: off the network, off the relay, and out of the 1000 places the
# PUB keeps for a slow reader.  Each event is a JSON object of its header lines, which Asterisk
# writes (compact) in their order, the name first, with jansson 2.8 or later, and in an order
# jansson does not define with older ones (main/json.c asks for no order): then any header may
# come first.  So a link subscribes to each used event by its name, and to every other header
# those events have (the captures': Asterisk 20 and 22) as a first key: with a recent jansson
# only the names ever match; with an old one, more than the events used comes through, never
# less.  (ami_trace: everything, to show it.)
SUBSCRIBED_EVENTS = tuple(LISTED_IN) + BOOT_EVENTS + ("Reload",)
SUBSCRIBED_EVENT_HEADERS = ("Privilege", "SystemName", "Device", "State", "Presentity", "Status",
                            "Subtype", "Message", "Exten", "Context", "Hint", "StatusText",
                            "Mailbox", "Waiting", "New", "Old", "Module", "Uptime", "LastReload")
EVENT_SUBSCRIPTIONS = tuple(
    [opening + f'"{name}"'.encode("ascii") for name in SUBSCRIBED_EVENTS
     for opening in (b'{"Event":', b'{"Event": ')]  # (LoadZmq: the module's own, with a space)
    + [f'{{"{header}":'.encode("ascii") for header in SUBSCRIBED_EVENT_HEADERS])

# res_zmq_manager's compact JSON.  A Custom: device's event is the echo of a mirror we wrote (two in
# three events on a busy relay): never relayed, so not decoded.  Inside a JSON string the quotes
# would be escaped, so the mark cannot be forged by a value.
ECHO_MARK = b'"Device":"Custom:'
# The acknowledgement of a state write, read without decoding it (ActionIDs are ours: hex).
ACK_PREFIX, ACK_SUFFIX = b'[{"Response":"Success","ActionID":"', b'","Message":"Variable Set"}]'
ACKNOWLEDGED = [{"Response": "Success", "Message": "Variable Set"}]

ReplyCallback = Callable[[Optional[List[Dict[str, Any]]]], None]
ListCallback = Callable[[List[Dict[str, Any]], float], None]


class Request:
    """One action for Asterisk: a state write (retried until acknowledged) or a one-shot action.

    A state write builds its action only when it is sent: a slow server may have a queued write
    for every device, and each should cost little memory.
    """
    __slots__ = ("action_id", "update", "verb", "action", "on_reply", "caller_action_id",
                 "sent_at", "encoded", "queued_at", "kind")

    def __init__(self, action_id: str, update: Optional[StateUpdate] = None, verb: str = "",
                 action: Optional[Dict[str, Any]] = None, on_reply: Optional[ReplyCallback] = None,
                 caller_action_id: Any = None, encoded: Optional[bytes] = None,
                 kind: str = "write") -> None:
        self.action_id = action_id
        self.queued_at = time.monotonic()  # for a relayed state: when its event came in
        self.kind = kind  # write (a state), or ping, list, client (one-shot actions)
        self.update = update
        self.verb = verb
        self.action = action
        self.on_reply = on_reply
        self.caller_action_id = caller_action_id  # the ActionID the caller gave a one-shot action
        self.sent_at = 0.0
        self.encoded = encoded  # the JSON sent, kept for a retry (and shared by the broker)

    def payload(self) -> Dict[str, Any]:
        if self.update is not None:
            return self.update.action(self.action_id, self.verb)
        return self.action

    def wire(self) -> bytes:
        if self.encoded is None:
            self.encoded = self.update.encoded_action(self.action_id, self.verb) \
                if self.update is not None else encode_action(self.action)
        return self.encoded


@dataclass
class LinkStats:
    """What went to and came from one server.  For a server that answers,
    writes_sent = acknowledged + refused + writes in flight (a retry is sent, and counted, again)."""
    events: int = 0
    writes_sent: int = 0      # Setvar of a state
    acknowledged: int = 0
    refused: int = 0
    too_large: int = 0        # writes never sent: this server could not safely take them
    actions_sent: Counter = field(default_factory=Counter)      # others, by kind: ping, list,
    actions_answered: Counter = field(default_factory=Counter)  # client (an AsteriskAction)
    timeouts: int = 0
    latency: Histogram = field(default_factory=Histogram)  # event in to write acknowledged
    last_event: float = 0.0   # wall-clock times, for the status
    last_ack: float = 0.0


class Outbox:
    """What is still to be sent to one Asterisk server, and what is waiting for its reply."""

    def __init__(self, name: str, timeout: float, stats: LinkStats) -> None:
        self.name = name
        self.timeout = timeout
        self.stats = stats
        self.pending: "OrderedDict[str, Request]" = OrderedDict()  # ready to send, by variable
        self.waiting: Dict[str, Request] = {}   # newer state of a variable that is in flight
        self.one_shots: Deque[Request] = deque()
        self.in_flight: "OrderedDict[str, Request]" = OrderedDict()  # by ActionID, oldest first
        self.busy: set = set()                   # variables in flight
        self.unsendable: Dict[str, str] = {}     # variable -> its newest state, too large to send
        self.echoes = PresenceEchoFilter()       # presence writes sent, until their echo
        self.refusals = Throttle()  # a server that refuses every write is logged once a minute
        # variable -> (value, wall), newest last (an OrderedDict: a dict whose oldest key is
        # deleted again and again takes ever longer to find its next first key: 3.7 us a write)
        self.written: "OrderedDict[str, Tuple[str, float]]" = OrderedDict()

    def __len__(self) -> int:
        """The states waiting to be written (one per variable at most): what a server that is
        down will be sent when it is back.  One-shot actions are never kept for that long."""
        return len(self.pending) + len(self.waiting)

    def write_state(self, update: StateUpdate, action_id: str, verb: str = "Setvar",
                    encoded: Optional[bytes] = None) -> None:
        """Queue a state write; encoded, if given, is its action already in JSON."""
        self.unsendable.pop(update.variable, None)
        request = Request(action_id, update=update, verb=verb, encoded=encoded)
        if update.variable in self.busy:
            self.waiting[update.variable] = request
        else:
            self.pending[update.variable] = request

    def cannot_send(self, update: StateUpdate, why: str) -> None:
        """A state this server cannot safely take: never sent, counted, logged once a minute."""
        self.unsendable[update.variable] = update.value
        self.stats.too_large += 1
        more = self.refusals.allow(self.name + " too large")
        if more is not None:
            log.warning("Not writing %s on %s: %s%s", printable(update.variable), self.name, why,
                        held_back(more, "not written"))

    def is_unsettled(self, variable: str) -> bool:
        """True while what the server shows for variable cannot be judged: a write of it waits
        to be sent or for its reply (a list read meanwhile may predate it), or its newest state
        could not be sent at all (a repair would only be refused again)."""
        return (variable in self.busy or variable in self.pending or variable in self.waiting
                or variable in self.unsendable)

    def send_action(self, action: Dict[str, Any], on_reply: ReplyCallback,
                    first: bool = False) -> None:
        """Queue a one-shot action; first: ahead of every other (a health check waits for
        nothing).  Our own ActionID makes the reply ours to match; the caller's is put back into
        the reply."""
        # (Asterisk reads the first ActionID of any spelling: the caller's goes, whatever its case.)
        action_id = "zab-" + unique_id()
        callers = [key for key in action if key.lower() == "actionid"]
        own = {key: value for key, value in action.items() if key not in callers}
        name = str(action.get("Action", "")).lower()
        kind = "ping" if name == "ping" else "list" if name.endswith("list") else "client"
        request = Request(action_id, action=dict(own, ActionID=action_id), on_reply=on_reply,
                          caller_action_id=action[callers[0]] if callers else None, kind=kind)
        if first:
            self.one_shots.appendleft(request)
        else:
            self.one_shots.append(request)

    def fail_one_shots(self) -> None:
        """The server cannot be reached now: the one-shot actions not sent yet are answered
        None (no answer) at once; nothing waits for a server that may stay down for hours."""
        failed, self.one_shots = self.one_shots, deque()
        for request in failed:  # (a callback may queue a new action: it is not failed here)
            request.on_reply(None)

    def next_request(self) -> Optional[Request]:
        if len(self.in_flight) >= MAX_IN_FLIGHT:
            return None
        if self.one_shots:
            return self.one_shots.popleft()
        if not self.pending:
            return None
        request = self.pending.popitem(last=False)[1]
        if request.action_id in self.in_flight:
            # Replies are matched by ActionID: each request in flight needs its own.  (An agent
            # writes with the uuid of the message, and an AgentStates brings many states.)
            request.action_id, request.encoded = unique_id(), None
        return request

    def sent(self, request: Request, now: float) -> None:
        request.sent_at = now
        self.in_flight[request.action_id] = request
        if request.update is not None:
            self.busy.add(request.update.variable)
            if request.update.is_presence:
                self.echoes.sent(request.update)
            self.stats.writes_sent += 1
        else:
            self.stats.actions_sent[request.kind] += 1

    def unsent(self, request: Request) -> None:
        """Put back a request the socket would not take."""
        if request.update is None:
            self.one_shots.appendleft(request)
        else:
            self._requeue(request)

    def oldest_deadline(self) -> Optional[float]:
        for request in self.in_flight.values():
            return request.sent_at + self.timeout
        return None

    def acknowledged(self, action_id: str) -> bool:
        """A "Variable Set" reply read without decoding it: True if it completes a state write
        in flight (the common case, the oldest one: the path of every relayed state)."""
        request = self.in_flight.get(action_id)
        if request is None or request.update is None:
            return False
        if next(iter(self.in_flight)) != action_id:  # older ones were lost
            self.reply(action_id, ACKNOWLEDGED)
            return True
        del self.in_flight[action_id]
        self._release(request.update.variable)
        self._succeeded(request)
        return True

    def reply(self, action_id: Optional[str], reply: Optional[List[Dict[str, Any]]]) -> None:
        """A reply arrived: complete its request and requeue those it shows were lost."""
        if action_id is None or action_id not in self.in_flight:
            if action_id is not None or not self.in_flight:
                log.debug("Reply from %s matches no request in flight: %s", self.name,
                          printable(action_id))
                return
            action_id = next(iter(self.in_flight))
        while True:
            oldest_id, request = self.in_flight.popitem(last=False)
            if oldest_id == action_id:
                break
            self._lost(request)
        if request.update is None and reply is not None:
            self.stats.actions_answered[request.kind] += 1
        self._complete(request, reply)

    def requeue_in_flight(self) -> None:
        """The connection was reset: everything in flight is lost."""
        while self.in_flight:
            self._lost(self.in_flight.popitem(last=False)[1])

    def _complete(self, request: Request, reply: Optional[List[Dict[str, Any]]]) -> None:
        if request.on_reply is not None:
            request.on_reply(_restore_action_id(reply, request))
            return
        self._release(request.update.variable)
        response = reply[0].get("Response") if reply and isinstance(reply[0], dict) else None
        if response == "Success":
            self._succeeded(request)
            return
        # Asterisk refused the value: sending it again would be refused again.
        self.stats.refused += 1
        if request.update.is_presence:
            self.echoes.refused(request.update)
        more = self.refusals.allow(self.name + request.verb)
        if more is None:
            return
        if request.update.is_mailbox:  # (app_voicemail there, or no res_mwi_external_ami)
            log.warning("%s refused %s %s: %s: it needs res_mwi_external and "
                        "res_mwi_external_ami loaded; a server running app_voicemail is a source "
                        "of voicemail lamps: give it mwi_write = none (or refresh, on storage "
                        "it shares)%s", self.name, request.verb, request.update.variable,
                        printable(_reply_message(reply)), held_back(more, "refused"))
            return
        log.warning("%s refused %s %s=%s: %s%s", self.name, request.verb,
                    request.update.variable, request.update.value,
                    printable(_reply_message(reply)), held_back(more, "refused"))

    def _succeeded(self, request: Request) -> None:
        now = self.stats.last_ack = time.time()
        self.stats.acknowledged += 1
        written, variable = self.written, request.update.variable
        if variable in written:
            written.move_to_end(variable)
        written[variable] = (request.update.value, now)
        if len(written) > WRITTEN_KEPT:
            written.popitem(last=False)
        self.stats.latency.observe(time.monotonic() - request.queued_at)

    def refuse(self, request: Request, why: str) -> None:
        """A request that cannot be sent at all: answered with an error, never retried."""
        self._complete(request, [{"Response": "Error", "Message": why}])

    def _lost(self, request: Request) -> None:
        if request.on_reply is not None:
            request.on_reply(None)
            return
        self._release(request.update.variable)
        self._requeue(request)

    def _requeue(self, request: Request) -> None:
        variable = request.update.variable
        if variable in self.pending:
            return  # superseded by a newer state that is already queued
        self.pending[variable] = request
        self.pending.move_to_end(variable, last=False)

    def _release(self, variable: str) -> None:
        self.busy.discard(variable)
        newer = self.waiting.pop(variable, None)
        if newer is not None:
            self.pending[variable] = newer


def _reply_message(reply: Optional[List[Dict[str, Any]]]) -> str:
    for item in reply or ():
        if isinstance(item, dict) and isinstance(item.get("Message"), str):
            return item["Message"]
    return "no reply" if reply is None else "unexpected reply"


def _restore_action_id(reply: Optional[List[Dict[str, Any]]], request: Request) -> Any:
    for item in reply or ():
        if isinstance(item, dict) and item.get("ActionID") == request.action_id:
            if request.caller_action_id is None:
                del item["ActionID"]
            else:
                item["ActionID"] = request.caller_action_id
    return reply


def decode_reply(raw: bytes) -> List[Dict[str, Any]]:
    """res_zmq_manager's reply: a JSON array of AMI messages (objects)."""
    try:
        reply = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise BadInput("reply is not JSON") from None
    if not isinstance(reply, list) or not all(isinstance(item, dict) for item in reply):
        raise BadInput("reply is not a JSON array of objects")
    return reply


def _ignore(link: Any) -> None:
    pass


@dataclass
class LinkHandlers:
    """What a link tells its owner: each event, input it dropped, the server going up and down.

    on_up is also called when the server (re)starts (its LoadZmq or FullyBooted event): either
    way the server may hold stale states and has missed what happened meanwhile.  on_caught_up:
    the events that waited while the process was stalled have been read
    (read_again_when_caught_up): the server's states are to be read again, for those it dropped.
    """
    on_event: Callable[["AsteriskLink", Dict[str, Any]], None]
    drops: DropLog
    on_up: Callable[["AsteriskLink"], None] = _ignore
    on_down: Callable[["AsteriskLink"], None] = _ignore
    on_caught_up: Callable[["AsteriskLink"], None] = _ignore


class AsteriskLink:
    """What every way of reaching Asterisk shares: delivery (Outbox), timeouts, health.

    A subclass reaches Asterisk one way (res_zmq_manager's sockets, plain AMI over TCP): it
    implements start, close, _transmit (send one request, or say it cannot now) and _reset (the
    connection is stuck: make a new one), and calls _answered and _deliver_event.
    """
    NO_ANSWER = "No answer from %s within %d ms"
    # Actions that must never be sent this way (they crash Asterisk through res_zmq_manager).
    crashing_actions: frozenset = CRASHING_ACTIONS

    def __init__(self, loop: EventLoop, name: str, request_timeout_ms: int,
                 handlers: LinkHandlers) -> None:
        self.loop = loop
        self.name = name
        self.handlers = handlers
        self.stats = LinkStats()
        self.outbox = Outbox(name, request_timeout_ms / 1000.0, self.stats)
        self.answering: Optional[bool] = None  # None until the first reply or timeout
        self.up: Optional[bool] = None         # None until the first reply or server timeout
        self.last_answer = time.monotonic()
        self.down_since = 0.0
        self.since = time.time()  # wall-clock time of the last change of up, for the status
        self._timeout_timer: Optional[Timer] = None
        self._list_retries: Dict[str, Timer] = {}  # list action -> its next try
        self._pinging = False  # a Ping is queued or in flight
        self.list_warnings = Throttle()  # list reads not made (list_refusal), once a minute
        self.closed = False

    def start(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.closed = True
        if self._timeout_timer:
            self._timeout_timer.cancel()
        for timer in self._list_retries.values():
            timer.cancel()

    def _transmit(self, request: Request) -> bool:
        """Send request; False if it cannot be sent now; BadInput if it can never be."""
        raise NotImplementedError

    def _reset(self) -> None:
        raise NotImplementedError

    # --- health ----------------------------------------------------------------------------------
    def ping(self, on_reply: Optional[ReplyCallback] = None) -> None:
        """A Ping: its answer (any answer) shows the server is up; on_reply gets it.  One at a
        time, ahead of everything queued: a server that is slow or down never gathers a queue of
        health checks (while one is under way, another is not sent)."""
        if self._pinging:
            return
        self._pinging = True

        def answered(reply: Optional[List[Dict[str, Any]]]) -> None:
            self._pinging = False
            if on_reply is not None:
                on_reply(reply)
        self.outbox.send_action({"Action": "Ping"}, answered, first=True)
        self._send_pending()

    def check_health(self, server_timeout: float) -> None:
        """Mark the server down when it answered nothing for server_timeout seconds."""
        now = time.monotonic()
        if self.up is not False and now - self.last_answer > server_timeout:
            self.up = False
            self.down_since = now
            self.since = time.time()
            log.warning("%s is down: no answer for %d s", self.name, now - self.last_answer)
            self.handlers.on_down(self)

    def _answered(self) -> None:
        now = time.monotonic()
        self.last_answer = now
        if self.answering is False:
            log.info("%s answers again", self.name)
        self.answering = True
        if self.up is not True:
            if self.up is None:
                log.info("%s is up", self.name)
            else:
                log.info("%s is up again after %d s down", self.name, now - self.down_since)
            self.up = True
            self.since = time.time()
            self.handlers.on_up(self)

    # --- sending ---------------------------------------------------------------------------------
    def write_state(self, update: StateUpdate, action_id: str, verb: str = "Setvar",
                    encoded: Optional[bytes] = None) -> bool:
        """Queue a state write; False (logged, counted) if this server cannot safely take it."""
        why = self.refusal(update)
        if why is not None:
            self.outbox.cannot_send(update, why)
            return False
        self.outbox.write_state(update, action_id, verb, encoded)
        self.loop.soon(self._send_pending)
        return True

    def refusal(self, update: StateUpdate) -> Optional[str]:
        """Why this server cannot safely take update, or None."""
        return None

    def is_echo(self, update: StateUpdate) -> bool:
        """True for a presence event that is the echo of a write we sent this server."""
        return self.outbox.echoes.is_echo(update)

    def send_action(self, action: Dict[str, Any], on_reply: ReplyCallback) -> None:
        self.outbox.send_action(action, on_reply)
        self._send_pending()

    def read_list(self, action: str, on_list: ListCallback, retry_in: float = LIST_RETRY_FIRST,
                  fields: Optional[Dict[str, str]] = None) -> None:
        """Send a list action (DeviceStateList, ...) and hand its items (ack, items, Complete)
        and the time it was asked for to on_list.  A read that fails (no answer, or an error such
        as a booting Asterisk's "Invalid/unknown command") is tried again after retry_in
        seconds, doubling up to LIST_RETRY_MAX, until it succeeds or the link is closed; a new
        read of the same list replaces a retry that is waiting."""
        pending = self._list_retries.pop(action, None)
        if pending is not None:
            pending.cancel()
        harmful = self.list_refusal(action)
        if harmful is not None:
            more = self.list_warnings.allow(action)
            if more is not None:
                log.warning("Not reading the %s of %s: %s; going on with what its events bring, "
                            "and trying again later%s", action, self.name, harmful,
                            held_back(more, "reads not made"))
            self._read_list_later(action, on_list, retry_in, fields)
            return
        asked_at = time.monotonic()

        def on_reply(reply: Optional[List[Dict[str, Any]]]) -> None:
            if reply and reply[0].get("Response") == "Success":
                on_list(reply, asked_at)
                return
            if self.closed:
                return
            why = "no answer" if reply is None else printable(reply[0].get("Message", reply))
            log.log(logging.WARNING if retry_in == LIST_RETRY_FIRST else logging.DEBUG,
                    "Could not read the %s of %s: %s; trying again in %g s (doubling up to "
                    "%g s)", action, self.name, why, retry_in, LIST_RETRY_MAX)
            self._read_list_later(action, on_list, retry_in, fields)
        self.send_action({"Action": action, **(fields or {})}, on_reply)

    def _read_list_later(self, action: str, on_list: ListCallback, retry_in: float,
                         fields: Optional[Dict[str, str]]) -> None:
        self._list_retries[action] = self.loop.call_later(retry_in, lambda: self.read_list(
            action, on_list, min(2 * retry_in, LIST_RETRY_MAX), fields))

    def list_refusal(self, action: str) -> Optional[str]:
        """Why reading this list now could harm the server, or None."""
        return None

    def _send_pending(self) -> None:
        now = time.monotonic()
        while True:
            request = self.outbox.next_request()
            if request is None:
                break
            try:
                if not self._transmit(request):
                    self.outbox.unsent(request)
                    break
            except BadInput as exc:  # values are checked before; this is the last guard
                self.outbox.refuse(request, f"not sent: {exc}")
                continue
            self.outbox.sent(request, now)
        self._arm_timeout()

    def _arm_timeout(self) -> None:
        if self._timeout_timer is None or self._timeout_timer.cancelled:
            deadline = self.outbox.oldest_deadline()
            if deadline is not None:
                self._timeout_timer = self.loop.call_later(
                    max(0.0, deadline - time.monotonic()), self._check_timeout)

    def _check_timeout(self) -> None:
        self._timeout_timer = None
        deadline = self.outbox.oldest_deadline()
        if deadline is not None and deadline <= time.monotonic():
            self._on_timeout()
        self._arm_timeout()

    def _on_timeout(self) -> None:
        self.stats.timeouts += 1
        if self.answering is not False:  # (a warning, as a server down is)
            log.warning(self.NO_ANSWER + ": reconnecting, and sending again until it answers",
                        self.name, self.outbox.timeout * 1000)
        else:
            log.debug("Still no answer from %s: reconnecting", self.name)
        self.answering = False
        self.outbox.requeue_in_flight()
        self._reset()
        self._send_pending()

    def _deliver_event(self, event: Dict[str, Any]) -> None:
        self.stats.last_event = time.time()
        self.handlers.on_event(self, event)


class ZmqManagerLink(AsteriskLink):
    """One Asterisk server reached through res_zmq_manager (SUB for events, DEALER for actions)."""
    NO_ANSWER = "Did not receive REP from %s within %d ms"  # the original's words

    def __init__(self, loop: EventLoop, context: zmq.Context, name: str, cmd_url: str,
                 evt_url: str, request_timeout_ms: int, handlers: LinkHandlers,
                 every_event: bool = False) -> None:
        super().__init__(loop, name, request_timeout_ms, handlers)
        self.context = context
        self.cmd_url = cmd_url
        self.evt_url = evt_url
        self.every_event = every_event  # subscribed to everything (ami_trace), not the events used
        self._boot_timer: Optional[Timer] = None  # LoadZmq seen, FullyBooted awaited
        self._catch_up_timer: Optional[Timer] = None  # after a stall: read again when it fires
        # list action -> the items its events showed with a line too long for the module's
        # reply-line buffer: that list is not asked for while it would hold one (list_refusal)
        self.long_lines: Dict[str, Set[str]] = {action: set() for action, _ in LISTED_IN.values()}
        self.evt_socket: Optional[zmq.Socket] = None
        self.cmd_socket: Optional[zmq.Socket] = None

    # --- life cycle ------------------------------------------------------------------------------
    def start(self) -> None:
        log.warning("%s is reached through res_zmq_manager, which crashes Asterisk 15+ during "
                    "normal relaying: use plain AMI, or the fix in docs/asterisk.md (section "
                    "\"res_zmq_manager on Asterisk 15+\")", self.name)
        self.evt_socket = self.context.socket(zmq.SUB)
        _common_options(self.evt_socket)
        self.evt_socket.setsockopt(zmq.RCVHWM, EVENT_HWM)
        self.evt_socket.setsockopt(zmq.MAXMSGSIZE, EVENT_MAX_BYTES)
        for subscription in (b"",) if self.every_event else EVENT_SUBSCRIPTIONS:
            self.evt_socket.setsockopt(zmq.SUBSCRIBE, subscription)
        self.evt_socket.connect(self.evt_url)
        self.loop.add_reader(self.evt_socket, self._read_events)
        log.info("Connected to %s events on %s", self.name, self.evt_url)
        self._open_cmd_socket()
        log.info("Connected to %s commands on %s", self.name, self.cmd_url)

    def close(self) -> None:
        super().close()
        for timer in (self._boot_timer, self._catch_up_timer):
            if timer is not None:
                timer.cancel()
        for sock in (self.evt_socket, self.cmd_socket):
            if sock is not None:
                self.loop.remove_reader(sock)
                sock.close(linger=0)
        self.evt_socket = self.cmd_socket = None

    def _open_cmd_socket(self) -> None:
        self.cmd_socket = self.context.socket(zmq.DEALER)
        _common_options(self.cmd_socket)
        self.cmd_socket.setsockopt(zmq.MAXMSGSIZE, REPLY_MAX_BYTES)
        self.cmd_socket.connect(self.cmd_url)
        self.loop.add_reader(self.cmd_socket, self._read_replies)

    def _reset(self) -> None:
        self.loop.remove_reader(self.cmd_socket)
        self.cmd_socket.close(linger=0)
        self._open_cmd_socket()

    def _booted(self, event: str) -> None:
        """A (re)starting Asterisk publishes LoadZmq when the module loads, and FullyBooted
        when it has loaded everything: it is resynchronised then (at the latest BOOT_WINDOW
        after LoadZmq), once.  FullyBooted alone (LoadZmq came before we subscribed) counts too."""
        if event == "LoadZmq":
            log.info("%s published LoadZmq: it (re)started; resynchronising once it is fully "
                     "booted", self.name)
            if self._boot_timer is not None:
                self._boot_timer.cancel()
            self._boot_timer = self.loop.call_later(BOOT_WINDOW, self._boot_complete)
            return
        if self._boot_timer is None or self._boot_timer.cancelled:
            log.info("%s published FullyBooted: it (re)started", self.name)
        self._boot_complete()

    def _boot_complete(self) -> None:
        if self._boot_timer is not None:
            self._boot_timer.cancel()
        self._boot_timer = None
        if self.up is True:
            self.handlers.on_up(self)
        else:
            self._answered()  # its boot event is as good an answer as any

    def refusal(self, update: StateUpdate) -> Optional[str]:
        # Short enough in characters that no line can reach the limit in bytes (4 per character):
        # device states always are, so the hot path costs one comparison.
        if 4 * (len(update.variable) + len(update.value)) < MODULE_MAX_LINE_BYTES - 32:
            return None
        try:
            check_module_action(update.action("0" * 32))
        except BadInput as exc:
            return str(exc)
        return None

    def list_refusal(self, action: str) -> Optional[str]:
        # The module copies each line of a reply into a 2048-byte stack buffer without a bound: a
        # list holding a longer line kills Asterisk.  Lines are held to half of it, as writes are.
        items = self.long_lines.get(action)
        if not items:
            return None
        return (f"its events showed {len(items)} item(s) with a line longer than the "
                f"{MODULE_MAX_LINE_BYTES} bytes res_zmq_manager can safely list (such as "
                f"{printable(next(iter(items)))})")

    @property
    def long_lines_known(self) -> bool:
        return any(self.long_lines.values())

    def _watch_line_lengths(self, event: Dict[str, Any], size: int) -> None:
        """Remember which items of a list the module could not safely list, from their events
        (size: the event's length in JSON, no shorter than any of its lines)."""
        listed = LISTED_IN.get(event["Event"])
        name = event.get(listed[1]) if listed is not None else None
        if not isinstance(name, str):
            return
        items = self.long_lines[listed[0]]
        if size > MODULE_MAX_LINE_BYTES and longest_line_bytes([event]) > MODULE_MAX_LINE_BYTES:
            items.add(name)
        else:
            items.discard(name)

    def _transmit(self, request: Request) -> bool:
        if request.update is None:
            check_module_action(request.action)  # BadInput: answered with an error, never sent
        try:
            send_frames(self.cmd_socket, (b"", request.wire()))
        except zmq.Again:
            return False
        return True

    # --- receiving -------------------------------------------------------------------------------
    def _read_replies(self) -> None:
        if drain(self.cmd_socket, self._on_reply):
            self._answered()
        self._send_pending()

    def _on_reply(self, frames: List[bytes]) -> None:
        raw = frames[-1]
        if len(frames) == 2 and not frames[0] and raw.startswith(ACK_PREFIX) and \
                raw.endswith(ACK_SUFFIX) and self.outbox.acknowledged(
                    raw[len(ACK_PREFIX):-len(ACK_SUFFIX)].decode("ascii", "replace")):
            return
        try:
            if len(frames) != 2 or frames[0]:
                raise BadInput(f"reply of {len(frames)} frames")
            reply = decode_reply(raw)
        except BadInput as exc:
            self.handlers.drops.drop(self.name, str(exc), raw)
            self.outbox.reply(None, None)
            return
        action_id = reply[0].get("ActionID") if reply else None
        log.debug("Reply from %s: %s", self.name, raw)
        self.outbox.reply(action_id if isinstance(action_id, str) else None, reply)

    def read_again_when_caught_up(self) -> None:
        """The process was stalled: res_zmq_manager's PUB keeps 1000 events for a reader and
        drops the rest, unannounced.  Once the events that waited are read (they are older than
        any list read now), its states are read again: CAUGHT_UP_SETTLE after the last time
        READ_BATCH events were waiting at once."""
        if self._catch_up_timer is not None:
            self._catch_up_timer.cancel()
        self._catch_up_timer = self.loop.call_later(CAUGHT_UP_SETTLE, self._caught_up)

    def _caught_up(self) -> None:
        self._catch_up_timer = None
        if self.up is True:  # (else its coming up reads its states)
            self.handlers.on_caught_up(self)

    def _read_events(self) -> None:
        if drain(self.evt_socket, self._on_event) == READ_BATCH and \
                self._catch_up_timer is not None:
            self.read_again_when_caught_up()  # (more waiting: later)

    def _on_event(self, frames: List[bytes]) -> None:
        self.stats.events += 1
        if len(frames) == 1 and ECHO_MARK in frames[0]:
            return
        try:
            if len(frames) != 1:
                raise BadInput(f"event of {len(frames)} frames")
            event = decode_event(frames[0])
        except BadInput as exc:
            self.handlers.drops.drop(self.name, str(exc), b"".join(frames))
            return
        if len(frames[0]) > MODULE_MAX_LINE_BYTES or self.long_lines_known:
            self._watch_line_lengths(event, len(frames[0]))
        if event["Event"] in BOOT_EVENTS:
            self._booted(event["Event"])
        self._deliver_event(event)


def encode_action(action: Dict[str, Any]) -> bytes:
    return json.dumps(action).encode("ascii")


def _common_options(sock: zmq.Socket) -> None:
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IPV6, 1)  # IPv6 addresses as well as IPv4 ones
    keep_alive(sock)
