"""Names over NATS: the subjects of the hub's topics, and the bucket's keys.  In both a name keeps
its letters, digits, ``-``, ``_`` and ``/``; every other byte (UTF-8) is written ``=XX``."""
from typing import Any, Optional

from .envelope import ALL, STATS

SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_/")
HEARTBEAT_KEY = "heartbeat"
STATE_EVENTS = {"DeviceStateChange": ("device", "Device"),
                "PresenceStateChange": ("presence", "Presentity"),
                "MessageWaiting": ("mailbox", "Mailbox")}


def token(name: str) -> str:
    """name as one token of a NATS subject or key: letters, digits, - _ / kept, other bytes =XX."""
    return "".join(chr(byte) if byte in SAFE else f"={byte:02X}" for byte in name.encode("utf-8"))


def untoken(text: str) -> str:
    """The name that token() wrote as text."""
    raw, index = bytearray(), 0
    while index < len(text):
        if text[index] == "=":
            raw.append(int(text[index + 1:index + 3], 16))
            index += 3
        else:
            raw.append(ord(text[index]))
            index += 1
    return raw.decode("utf-8")


def subject_for(prefix: str, target: str) -> str:
    """The subject of a hub topic's target: *, AsteriskStats, or a node's name."""
    if target == ALL:
        return f"{prefix}.all"
    if target == STATS:
        return f"{prefix}.stats"
    return f"{prefix}.node.{token(target)}"


def state_key(origin: str, data: Any) -> Optional[str]:
    """The bucket key of an AsteriskEvent's x_data when it is a state; None for anything else."""
    if not isinstance(data, dict) or data.get("Event") not in STATE_EVENTS:
        return None
    kind, field = STATE_EVENTS[data["Event"]]
    name = data.get(field)
    return f"{token(origin)}.{kind}.{token(name)}" if isinstance(name, str) and name else None


def key_owner(key: str) -> str:
    """Whose key it is: the name in its first token (only that agent may put there)."""
    return untoken(key.split(".", 1)[0])
