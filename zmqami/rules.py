"""The relay rules, shared by broker.py and agent.py.

Which Asterisk events are relayed, how a relayed state becomes an AMI action, and the checks every
value passes before anything is sent to Asterisk.  Nothing here touches a socket, so every rule can
be tested on its own (tests/test_rules.py).

Asterisk's rules behind them (docs/protocol.md):
- only ``Custom:<name>`` devices are writable, with ``DEVICE_STATE(Custom:<name>)``; UNKNOWN is refused;
- only ``CustomPresence:<name>`` presences are writable, with ``PRESENCE_STATE(...)`` and the value
  ``status,subtype,message[,e]``; option ``e`` means subtype and message are base64;
- res_zmq_manager writes each value as a ``Key: value`` line, so a control character in a value
  would inject AMI headers: such values are refused here and never reach a socket.
"""
import base64
import binascii
import itertools
import json
import os
import re
import sys
import time
from collections import deque
from json.encoder import encode_basestring_ascii as _json_string
from typing import Any, Deque, Dict, Iterable, List, NamedTuple, Optional, Set, Tuple

DEVICE_STATES = frozenset({
    "NOT_INUSE", "INUSE", "BUSY", "INVALID", "UNAVAILABLE", "RINGING", "RINGINUSE", "ONHOLD",
})
PRESENCE_STATES = frozenset({"not_set", "unavailable", "available", "away", "xa", "chat", "dnd"})
CUSTOM_DEVICE = "Custom:"
CUSTOM_PRESENCE = "CustomPresence:"
# A voicemail lamp: MAILBOX(100@default) = "new,old" (docs/protocol.md 5).  Written with MWIUpdate
# (res_mwi_external) or VoicemailRefresh (app_voicemail on shared storage), never with Setvar.
MAILBOX_PREFIX = "MAILBOX("
MAILBOX_WRITES = {"external": "MWIUpdate", "refresh": "VoicemailRefresh", "none": None}
MAX_MESSAGES = 999_999  # more is not a count of voicemail messages

# Sane limits for whatever is relayed, counted in UTF-8 bytes (what buffers hold), whichever way
# Asterisk is reached.  Asterisk's own device and extension names are far shorter.
MAX_NAME_BYTES = 200
MAX_TEXT_BYTES = 4000    # a presence subtype or message, any header value of a client's action
MAX_ACTION_BYTES = 8192  # a client's action, as AMI text

# res_zmq_manager copies into fixed stack buffers without a bound (docs/protocol.md 2): the
# action it is given (10240 bytes), each line of an event it publishes (4096) and each line of a
# reply it parses (2048).  What is sent to it stays within half of those: each line of an action
# within half the smallest (a presence message written comes back in events and in list replies,
# and is never longer than the line that wrote it), the whole action within half of its buffer.
MODULE_MAX_LINE_BYTES = 1024
MODULE_MAX_ACTION_BYTES = 5120

# Actions that crash Asterisk 20 when they come through res_zmq_manager (its hook sessions have no
# manager session): Getvar and Status were seen to, the others do by code inspection.
CRASHING_ACTIONS = frozenset({"getvar", "status", "challenge", "listcommands", "waitevent", "filter"})

_HEADER_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")
# Characters that would change the meaning of VARIABLE(arg) or split the function's arguments.
_NAME_FORBIDDEN = re.compile(r"[\x00-\x1f\x7f(),]")


_ID_PREFIX = os.urandom(8).hex()  # this process's, so that ids differ between processes too
_ID_COUNT = itertools.count()


def unique_id() -> str:
    """32 hex digits, as unique as the original's uuid4().hex (an ActionID, a message's uuid):
    a random half, then a count.  A tenth of uuid4's cost, on the path of every message."""
    return f"{_ID_PREFIX}{next(_ID_COUNT):016x}"


class BadInput(ValueError):
    """Input that neither Asterisk nor a peer would send: it is logged, counted and dropped."""


class StateUpdate(NamedTuple):
    """One state to write on an Asterisk server: ``Setvar <variable> = <value>``.

    The variable names what is written (one device or one presentity), so it is also the key under
    which a newer state replaces an older one that was not sent yet.  (A NamedTuple: made for
    every relayed state, at two thirds of a frozen dataclass's cost.)
    """
    variable: str
    value: str

    def action(self, action_id: str, verb: str = "Setvar") -> Dict[str, str]:
        if self.is_mailbox:
            return mailbox_action(self, action_id, verb)
        return {"Action": verb, "ActionID": action_id, "Variable": self.variable, "Value": self.value}

    def encoded_action(self, action_id: str, verb: str = "Setvar") -> bytes:
        """action() in JSON, the bytes json.dumps gives, made at a fifth of its cost (on the path
        of every relayed state) with the string encoder json.dumps itself uses."""
        if self.is_mailbox:
            return json.dumps(self.action(action_id, verb)).encode("ascii")
        return (f'{{"Action": {_json_string(verb)}, "ActionID": {_json_string(action_id)}, '
                f'"Variable": {_json_string(self.variable)}, "Value": {_json_string(self.value)}}}'
                ).encode("ascii")

    @property
    def is_presence(self) -> bool:
        return self.variable.startswith("PRESENCE_STATE(")

    @property
    def is_mailbox(self) -> bool:
        return self.variable.startswith(MAILBOX_PREFIX)

    @property
    def has_owner(self) -> bool:
        """A device's state is its servers'; a presence or a mailbox is one value everywhere,
        whoever changed it last."""
        return self.variable.startswith("DEVICE_STATE(")


_JSON = json.JSONDecoder()


def decode_json_object(raw: bytes) -> Dict[str, Any]:
    """Decode one JSON object from bytes, or raise BadInput saying why not."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadInput("not UTF-8") from None
    # raw_decode, a third of json.loads's cost, reads the common case: one value, nothing around
    # it.  Anything else (whitespace around it, more after it, not JSON) is json.loads's to judge.
    try:
        obj, end = _JSON.raw_decode(text)
    except (ValueError, RecursionError):
        end = -1
    if end != len(text):
        try:
            obj = json.loads(text)
        except (ValueError, RecursionError):
            raise BadInput("not JSON") from None
    if not isinstance(obj, dict):
        raise BadInput(f"JSON {type(obj).__name__}, not an object")
    return obj


def decode_event(raw: bytes) -> Dict[str, Any]:
    """An AMI event as res_zmq_manager publishes it: a JSON object with a string ``Event``."""
    event = decode_json_object(raw)
    if not isinstance(event.get("Event"), str):
        raise BadInput("no Event name")
    return event


def check_name(what: str, value: Any) -> str:
    """A device or presentity name that is safe inside ``FUNCTION(<name>)``."""
    if not isinstance(value, str) or not value:
        raise BadInput(f"{what} missing or not a string")
    if 4 * len(value) > MAX_NAME_BYTES and len(value.encode("utf-8")) > MAX_NAME_BYTES:
        raise BadInput(f"{what} longer than {MAX_NAME_BYTES} bytes")
    if _NAME_FORBIDDEN.search(value):
        raise BadInput(f"{what} {value!r} contains a control character, a comma or a parenthesis")
    return value


def check_text(what: str, value: Any) -> str:
    """A free-text value (presence subtype or message): a string without control characters."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise BadInput(f"{what} not a string")
    if len(value.encode("utf-8")) > MAX_TEXT_BYTES:
        raise BadInput(f"{what} longer than {MAX_TEXT_BYTES} bytes")
    if _CONTROL_CHARS.search(value):
        raise BadInput(f"{what} {value!r} contains a control character")
    return value


def safe_action(action: Any, crashing: frozenset = CRASHING_ACTIONS) -> Dict[str, str]:
    """A copy of an AMI action a peer asked for that is safe to hand to Asterisk.

    Raises BadInput for anything that would crash Asterisk (crashing: the actions that do so the
    way it is reached), inject AMI headers or overflow a buffer.  Asterisk runs the first
    ``Action`` header of any case (docs/protocol.md 1), so two keys that are one header to
    Asterisk are refused, and the one action checked is written first, as ``Action`` (the only spelling
    res_zmq_manager takes).  Originate is always made asynchronous: a synchronous one holds the
    module's only command thread (or the AMI session) until the call is answered.
    """
    if not isinstance(action, dict):
        raise BadInput("the action is not a JSON object")
    keys: Dict[str, str] = {}  # header name as Asterisk compares it -> as given
    for key in action:
        if not isinstance(key, str) or not _HEADER_NAME.fullmatch(key):
            raise BadInput(f"header name {str(key)[:40]!r} is not valid")
        if key.lower() in keys:
            raise BadInput(f"headers {keys[key.lower()]!r} and {key!r} are one header to Asterisk")
        keys[key.lower()] = key
    name = action.get(keys.get("action", "Action"))
    if not isinstance(name, str) or not _HEADER_NAME.fullmatch(name):
        raise BadInput("the action has no valid Action name")
    if name.lower() in crashing:
        raise BadInput(f"{name} crashes Asterisk when sent through res_zmq_manager")
    checked = {"Action": name}
    for key, value in action.items():
        if key.lower() != "action":
            checked[key] = check_text(key, value) if value is not None else ""
    if name.lower() == "originate":
        checked = {k: v for k, v in checked.items() if k.lower() != "async"}
        checked["Async"] = "true"
    if action_bytes(checked) > MAX_ACTION_BYTES:
        raise BadInput(f"the action is longer than {MAX_ACTION_BYTES} bytes")
    return checked


def action_bytes(action: Dict[str, str]) -> int:
    """The size of an action as the AMI text Asterisk reads (``Key: value`` lines), in bytes."""
    return sum(len(f"{key}: {value}\r\n".encode("utf-8")) for key, value in action.items()) + 2


def longest_line_bytes(messages: Iterable[Dict[str, Any]]) -> int:
    """The longest ``Key: value`` line of these AMI messages, in UTF-8 bytes (what the module's
    line buffers hold)."""
    return max((len(f"{key}: {value}".encode("utf-8")) for message in messages
                for key, value in message.items()), default=0)


def check_module_action(action: Dict[str, Any]) -> None:
    """Raise BadInput if res_zmq_manager could overflow a buffer with this action."""
    for key, value in action.items():
        if len(f"{key}: {value}".encode("utf-8")) > MODULE_MAX_LINE_BYTES:
            raise BadInput(f"its {key} line is longer than the {MODULE_MAX_LINE_BYTES} bytes "
                           "res_zmq_manager can safely take")
    if action_bytes(action) > MODULE_MAX_ACTION_BYTES:
        raise BadInput(f"it is longer than the {MODULE_MAX_ACTION_BYTES} bytes res_zmq_manager "
                       "can safely take")


def device_state_update(event: Dict[str, Any]) -> Optional[StateUpdate]:
    """The Setvar that mirrors a DeviceStateChange on the other servers, or None if not relayed.

    Custom: devices are not relayed: they are the mirrors this program writes, and relaying them
    would echo every state back.  UNKNOWN is not relayed: Asterisk refuses to set it.
    """
    device = check_name("Device", event.get("Device"))
    state = event.get("State")
    if not isinstance(state, str):
        raise BadInput("State missing or not a string")
    if device.startswith(CUSTOM_DEVICE):
        return None
    state = state.upper()
    if state == "UNKNOWN":
        return None
    if state not in DEVICE_STATES:
        raise BadInput(f"State {state[:40]!r} is not a device state")
    # Interned: every known device keeps the one string of its state, not a copy (54 bytes each).
    return StateUpdate(f"DEVICE_STATE({CUSTOM_DEVICE}{device})", sys.intern(state))


# How Asterisk combines the states of several devices into one (main/devicestate.c, Asterisk 12
# and later: ast_devstate_aggregate_add): the state of highest rank wins, except that ringing
# together with in use, on hold or busy gives RINGINUSE.  No state at all gives INVALID.
AGGREGATE_RANK = {"INVALID": 0, "UNKNOWN": 1, "UNAVAILABLE": 2, "NOT_INUSE": 3, "ONHOLD": 4,
                  "RINGING": 5, "INUSE": 6, "BUSY": 7, "RINGINUSE": 8}


def aggregate_device_states(states) -> str:
    """What Asterisk shows for several devices in these states (one hint over all of them)."""
    combined, ringing, in_use = "INVALID", False, False
    for state in states:
        ringing = ringing or state == "RINGING"
        in_use = in_use or state in ("INUSE", "ONHOLD", "BUSY")
        if ringing and in_use:
            combined = "RINGINUSE"
        elif AGGREGATE_RANK[state] > AGGREGATE_RANK[combined]:
            combined = state
    return combined


def presence_fields(event: Dict[str, Any]) -> Optional[Tuple[str, str, str, str]]:
    """(presentity, status, subtype, message) of a PresenceStateChange, checked; None if not ours.

    Only CustomPresence: presentities can be written, so only they are relayed.
    """
    presentity = check_name("Presentity", event.get("Presentity"))
    status = event.get("Status")
    if not isinstance(status, str):
        raise BadInput("Status missing or not a string")
    status = status.lower()
    if status not in PRESENCE_STATES:
        raise BadInput(f"Status {status[:40]!r} is not a presence state")
    subtype = check_text("Subtype", event.get("Subtype"))
    message = check_text("Message", event.get("Message"))
    if not presentity.startswith(CUSTOM_PRESENCE):
        return None
    return presentity, status, subtype, message


def presence_value(status: str, subtype: str, message: str) -> str:
    """PRESENCE_STATE's value syntax; base64 with option ``e`` when a comma would split a field."""
    if not subtype and not message:
        return status
    if "," in subtype or "," in message:
        encode = lambda text: base64.b64encode(text.encode("utf-8")).decode("ascii")  # noqa: E731
        return f"{status},{encode(subtype)},{encode(message)},e"
    return f"{status},{subtype},{message}"


def parse_presence_value(value: str) -> Tuple[str, str, str]:
    """The reverse of presence_value, as Asterisk reads it: (status, subtype, message).

    Raises BadInput for a status Asterisk would refuse.  Used by the stand-in Asterisk.
    """
    parts = value.split(",", 3)
    parts += [""] * (4 - len(parts))
    status, subtype, message, options = parts
    if status.lower() not in PRESENCE_STATES:
        raise BadInput(f"presence status {status!r} is not valid")
    if "e" in options:
        try:
            subtype = base64.b64decode(subtype, validate=True).decode("utf-8")
            message = base64.b64decode(message, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            raise BadInput("option e with invalid base64") from None
    return status.lower(), subtype, message


def presence_update(event: Dict[str, Any]) -> Optional[StateUpdate]:
    """The Setvar that mirrors a PresenceStateChange on the other servers, or None."""
    fields = presence_fields(event)
    if fields is None:
        return None
    presentity, status, subtype, message = fields
    return StateUpdate(f"PRESENCE_STATE({presentity})", presence_value(status, subtype, message))


def state_name(variable: str) -> str:
    """What an administrator calls a variable's state: the device (PJSIP/100), the presentity
    (CustomPresence:100) or the mailbox (100@default) whose mirror it is."""
    argument = variable[variable.index("(") + 1:-1]
    return argument[len(CUSTOM_DEVICE):] if variable.startswith("DEVICE_STATE(") else argument


def state_variable(name: str) -> str:
    """The reverse of state_name."""
    if name.startswith(CUSTOM_PRESENCE):
        return f"PRESENCE_STATE({name})"
    if "@" in name and "/" not in name:
        return f"{MAILBOX_PREFIX}{name})"
    return f"DEVICE_STATE({CUSTOM_DEVICE}{name})"


def message_count(what: str, value: Any) -> int:
    """A count of voicemail messages as an event gives it: digits only (Asterisk publishes the
    -1 an MWIUpdate may have set, and would store 4294967295 if it were written back)."""
    if not isinstance(value, str) or not value.isascii() or not value.isdigit() or \
            int(value) > MAX_MESSAGES:
        raise BadInput(f"{what} {str(value)[:40]!r} is not a count of messages")
    return int(value)


def mailbox_update(event: Dict[str, Any]) -> StateUpdate:
    """The lamp a MessageWaiting shows: MAILBOX(<mailbox>) = "new,old"."""
    mailbox = check_name("Mailbox", event.get("Mailbox"))
    new, old = message_count("New", event.get("New")), message_count("Old", event.get("Old"))
    return StateUpdate(f"{MAILBOX_PREFIX}{mailbox})", f"{new},{old}")


def hinted_names(hint: Any) -> Set[str]:
    """The names (state_name) whose mirrors a dialplan hint shows: its Custom: devices and its
    CustomPresence: presentity.  'PJSIP/100&Custom:PJSIP/100,CustomPresence:100' gives
    {'PJSIP/100', 'CustomPresence:100'}."""
    if not isinstance(hint, str):
        return set()
    devices, _, presence = hint.partition(",")
    names = {device[len(CUSTOM_DEVICE):] for device in devices.split("&")
             if device.startswith(CUSTOM_DEVICE)}
    if presence.startswith(CUSTOM_PRESENCE):
        names.add(presence)
    return names


def listed_lamp(item: Dict[str, Any]) -> Dict[str, Any]:
    """An item of MWIGet (what res_mwi_external holds) or of VoicemailUsersList (app_voicemail's
    mailboxes) as the MessageWaiting it stands for."""
    if item.get("Event") == "MWIGet":
        return {"Mailbox": item.get("Mailbox"), "New": item.get("NewMessages"),
                "Old": item.get("OldMessages")}
    return {"Mailbox": f"{item.get('VoiceMailbox')}@{item.get('VMContext')}",
            "New": item.get("NewMessageCount"), "Old": item.get("OldMessageCount")}


def mailbox_action(update: StateUpdate, action_id: str, verb: str) -> Dict[str, str]:
    """How a mailbox's counts are written: MWIUpdate sets them (res_mwi_external);
    VoicemailRefresh has app_voicemail count them again from the storage it shares."""
    mailbox = update.variable[len(MAILBOX_PREFIX):-1]
    if verb == "VoicemailRefresh":
        box, _, context = mailbox.partition("@")
        return {"Action": verb, "ActionID": action_id, "Context": context or "default",
                "Mailbox": box}
    new, old = update.value.split(",")
    return {"Action": "MWIUpdate", "ActionID": action_id, "Mailbox": mailbox,
            "NewMessages": new, "OldMessages": old}


def event_for(update: StateUpdate) -> Dict[str, str]:
    """The event that relayed_update turns into this update: how agents send a state."""
    name, argument = update.variable[:-1].split("(", 1)
    if update.is_mailbox:
        new, old = update.value.split(",")
        return {"Event": "MessageWaiting", "Mailbox": argument,
                "Waiting": "1" if new != "0" else "0", "New": new, "Old": old}
    if name == "DEVICE_STATE":
        return {"Event": "DeviceStateChange", "Device": argument[len(CUSTOM_DEVICE):],
                "State": update.value}
    status, subtype, message = parse_presence_value(update.value)
    return {"Event": "PresenceStateChange", "Presentity": argument, "Status": status,
            "Subtype": subtype, "Message": message}


def relayed_update(event: Dict[str, Any], device_state: bool = True,
                   presence: bool = False, mwi: bool = False) -> Optional[StateUpdate]:
    """The state update an event asks for on the other servers, None for events not relayed.

    Raises BadInput when a relayed event carries a value that must not reach Asterisk.
    """
    name = event.get("Event")
    if name == "DeviceStateChange" and device_state:
        if mwi and str(event.get("Device")).startswith("MWI:"):
            return None  # res_mwi_devstate's lamp: each server has it from the lamps relayed
        return device_state_update(event)
    if name == "PresenceStateChange" and presence:
        return presence_update(event)
    if name == "MessageWaiting" and mwi:
        return mailbox_update(event)
    return None


class PresenceEchoFilter:
    """Recognises the PresenceStateChange one server publishes when we write its presence.

    Asterisk publishes a PresenceStateChange on every write, even of an unchanged value, and the
    presentity keeps its name, so the echo cannot be told apart by name (unlike Custom: devices).
    The original broker ignored every change of a presentity for 3 s after relaying it, which also
    swallowed genuine changes made on another server in that time.  Here every write sent to the
    server and not yet echoed is remembered, in the order sent: a later write may be sent before an
    earlier one's echo comes back, and each echo must be recognised, not only the newest.  An
    event carrying one of those values is that write's echo (the writes before it will not be
    echoed any more: Asterisk handles one connection's writes in order); any other is a genuine
    change.  A remembered write expires after ECHO_WINDOW seconds, so an echo that never came
    cannot hide a genuine change for long (and anti-entropy repairs one it did hide).
    """

    def __init__(self, window: float = 30.0, most: int = 32) -> None:
        self.window = window
        self.most = most  # writes remembered per presentity: bounded whatever happens
        self._sent: Dict[str, Deque[Tuple[str, float]]] = {}  # variable -> (value, when sent)

    def sent(self, update: StateUpdate) -> None:
        awaited = self._sent.setdefault(update.variable, deque(maxlen=self.most))
        awaited.append((update.value, time.monotonic()))

    def refused(self, update: StateUpdate) -> None:
        """Asterisk refused that write: it publishes nothing for it."""
        awaited = self._sent.get(update.variable)
        if awaited:
            for entry in awaited:
                if entry[0] == update.value:
                    awaited.remove(entry)
                    break
            if not awaited:
                del self._sent[update.variable]

    def is_echo(self, update: StateUpdate) -> bool:
        awaited = self._sent.get(update.variable)
        if not awaited:
            return False
        expired = time.monotonic() - self.window
        while awaited and awaited[0][1] < expired:
            awaited.popleft()
        for index, (value, _) in enumerate(awaited):
            if value == update.value:
                for _ in range(index + 1):
                    awaited.popleft()
                break
        else:
            index = -1
        if not awaited:
            del self._sent[update.variable]
        return index >= 0


def list_items(reply: List[Dict[str, Any]], event: str) -> List[Dict[str, Any]]:
    """The items of a list action's reply (ack, items, Complete)."""
    return [item for item in reply[1:] if item.get("Event") == event]


def mirror_variable(item: dict) -> Optional[str]:
    """The variable a DeviceStateList item of a Custom: device mirrors, e.g. Custom:SIP/100."""
    device = item.get("Device")
    if not isinstance(device, str) or not device.startswith(CUSTOM_DEVICE):
        return None
    try:
        check_name("Device", device)
    except BadInput:
        return None
    return f"DEVICE_STATE({device})"
