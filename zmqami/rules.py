"""The relay rules, shared by broker.py and agent.py.

Which Asterisk events are relayed, how a relayed state becomes an AMI action, and the checks every
value passes before anything is sent to Asterisk.  Nothing here touches a socket, so every rule can
be tested on its own (tests/test_rules.py).

Asterisk's rules behind them (PROTOCOL.md section 1):
- only ``Custom:<name>`` devices are writable, with ``DEVICE_STATE(Custom:<name>)``; UNKNOWN is refused;
- only ``CustomPresence:<name>`` presences are writable, with ``PRESENCE_STATE(...)`` and the value
  ``status,subtype,message[,e]``; option ``e`` means subtype and message are base64;
- res_zmq_manager writes each value as a ``Key: value`` line, so a control character in a value
  would inject AMI headers: such values are refused here and never reach a socket.
"""
import base64
import binascii
import json
import re
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

DEVICE_STATES = frozenset({
    "NOT_INUSE", "INUSE", "BUSY", "INVALID", "UNAVAILABLE", "RINGING", "RINGINUSE", "ONHOLD",
})
PRESENCE_STATES = frozenset({"not_set", "unavailable", "available", "away", "xa", "chat", "dnd"})
CUSTOM_DEVICE = "Custom:"
CUSTOM_PRESENCE = "CustomPresence:"

# Asterisk's own device and extension names are far shorter; the limits keep every action far from
# res_zmq_manager's 10240-byte buffer whatever the input.
MAX_NAME_LENGTH = 200
MAX_TEXT_LENGTH = 1000

# Actions that crash Asterisk 20 when they come through res_zmq_manager (its hook sessions have no
# manager session): Getvar and Status were seen to, the others do by code inspection.
CRASHING_ACTIONS = frozenset({"getvar", "status", "challenge", "listcommands", "waitevent", "filter"})
MAX_ACTION_BYTES = 4096  # res_zmq_manager copies an action into a 10240-byte stack buffer

_HEADER_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")
# Characters that would change the meaning of VARIABLE(arg) or split the function's arguments.
_NAME_FORBIDDEN = re.compile(r"[\x00-\x1f\x7f(),]")


class BadInput(ValueError):
    """Input that neither Asterisk nor a peer would send: it is logged, counted and dropped."""


@dataclass(frozen=True)
class StateUpdate:
    """One state to write on an Asterisk server: ``Setvar <variable> = <value>``.

    The variable names what is written (one device or one presentity), so it is also the key under
    which a newer state replaces an older one that was not sent yet.
    """
    __slots__ = ("variable", "value")
    variable: str
    value: str

    def action(self, action_id: str, verb: str = "Setvar") -> Dict[str, str]:
        return {"Action": verb, "ActionID": action_id, "Variable": self.variable, "Value": self.value}

    @property
    def is_presence(self) -> bool:
        return self.variable.startswith("PRESENCE_STATE(")


def decode_json_object(raw: bytes) -> Dict[str, Any]:
    """Decode one JSON object from bytes, or raise BadInput saying why not."""
    try:
        obj = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise BadInput("not UTF-8") from None
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
    if len(value) > MAX_NAME_LENGTH:
        raise BadInput(f"{what} longer than {MAX_NAME_LENGTH} characters")
    if _NAME_FORBIDDEN.search(value):
        raise BadInput(f"{what} {value!r} contains a control character, a comma or a parenthesis")
    return value


def check_text(what: str, value: Any) -> str:
    """A free-text value (presence subtype or message): a string without control characters."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise BadInput(f"{what} not a string")
    if len(value) > MAX_TEXT_LENGTH:
        raise BadInput(f"{what} longer than {MAX_TEXT_LENGTH} characters")
    if _CONTROL_CHARS.search(value):
        raise BadInput(f"{what} {value!r} contains a control character")
    return value


def safe_action(action: Any, crashing: frozenset = CRASHING_ACTIONS) -> Dict[str, str]:
    """A copy of an AMI action a peer asked for that is safe to hand to Asterisk.

    Raises BadInput for anything that would crash Asterisk (crashing: the actions that do so the
    way it is reached), inject AMI headers or overflow res_zmq_manager's buffer.  Originate is
    always made asynchronous: a synchronous one holds the module's only command thread (or the
    AMI session) until the call is answered.
    """
    if not isinstance(action, dict):
        raise BadInput("the action is not a JSON object")
    name = action.get("Action")
    if not isinstance(name, str) or not _HEADER_NAME.fullmatch(name):
        raise BadInput("the action has no valid Action name")
    if name.lower() in crashing:
        raise BadInput(f"{name} crashes Asterisk when sent through res_zmq_manager")
    checked = {}
    for key, value in action.items():
        if not isinstance(key, str) or not _HEADER_NAME.fullmatch(key):
            raise BadInput(f"header name {str(key)[:40]!r} is not valid")
        checked[key] = check_text(key, value) if value is not None else ""
    if name.lower() == "originate":
        checked = {k: v for k, v in checked.items() if k.lower() != "async"}
        checked["Async"] = "true"
    if sum(len(k) + len(v) + 4 for k, v in checked.items()) > MAX_ACTION_BYTES:
        raise BadInput(f"the action is longer than {MAX_ACTION_BYTES} bytes")
    return checked


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
    return StateUpdate(f"DEVICE_STATE({CUSTOM_DEVICE}{device})", state)


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


def event_for(update: StateUpdate) -> Dict[str, str]:
    """The event that relayed_update turns into this update: how agents send a state."""
    name, argument = update.variable[:-1].split("(", 1)
    if name == "DEVICE_STATE":
        return {"Event": "DeviceStateChange", "Device": argument[len(CUSTOM_DEVICE):],
                "State": update.value}
    status, subtype, message = parse_presence_value(update.value)
    return {"Event": "PresenceStateChange", "Presentity": argument, "Status": status,
            "Subtype": subtype, "Message": message}


def relayed_update(event: Dict[str, Any], device_state: bool = True,
                   presence: bool = False) -> Optional[StateUpdate]:
    """The state update an event asks for on the other servers, None for events not relayed.

    Raises BadInput when a relayed event carries a value that must not reach Asterisk.
    """
    name = event.get("Event")
    if name == "DeviceStateChange" and device_state:
        return device_state_update(event)
    if name == "PresenceStateChange" and presence:
        return presence_update(event)
    return None


class PresenceEchoFilter:
    """Recognises the PresenceStateChange a server publishes when we write its presence.

    Asterisk publishes a PresenceStateChange on every write, even of an unchanged value, and the
    presentity keeps its name, so the echo cannot be told apart by name (unlike Custom: devices).
    The original broker ignored every change of a presentity for 3 s after relaying it, which also
    swallowed genuine changes made on another server in that time.  Here, what was last written to
    each server is remembered, and only an event from that server carrying that very value is
    taken as the echo (one echo per write: a value written twice is echoed twice).  An event
    that differs is a genuine change and is relayed.
    """

    def __init__(self) -> None:
        # (server, variable) -> (value, how many writes of it have not been echoed yet)
        self._written: Dict[Tuple[str, str], Tuple[str, int]] = {}

    def written(self, server: str, update: StateUpdate) -> None:
        key = (server, update.variable)
        value, count = self._written.get(key, (None, 0))
        self._written[key] = (update.value, count + 1 if value == update.value else 1)

    def forget_except(self, servers: set) -> None:
        """Forget what was written to servers that are gone (a reload removed them)."""
        for key in [key for key in self._written if key[0] not in servers]:
            del self._written[key]

    def is_echo(self, server: str, update: StateUpdate) -> bool:
        key = (server, update.variable)
        value, count = self._written.pop(key, (None, 0))
        if value != update.value:
            return False
        if count > 1:
            self._written[key] = (value, count - 1)
        return True
