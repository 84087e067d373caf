"""The envelope of the agent/server network, byte-compatible with the original Python 2 agents.

Every message has two frames:
1. the target topic: ``[*]`` (everyone), ``[<SYSTEM_NAME>]`` (one node), ``[AsteriskStats]``;
   subscriptions are prefix matches, and the closing ``]`` keeps ``[Node]`` from matching ``[Node2]``;
2. the body, a JSON object: ``{"msg_type": ..., "uuid": <32 hex>, "origin": <sender>, "x_<field>": ...}``
   written with json.dumps' default separators, as the original's ``ZmqMessage.dump()`` wrote it.
"""
import json
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Dict, List

import zmq

from .loop import keep_alive
from .rules import MAX_NAME_BYTES, BadInput, decode_json_object, unique_id

HUB_MAX_BYTES = 16 * 1024 * 1024  # the largest message on a hub socket (AgentStates of 100k devices)
HEARTBEAT_IVL_MS = 10_000  # ZeroMQ heartbeats on hub connections: a dead peer is noticed in 30 s

ALL = "*"
STATS = "AsteriskStats"
_TOPIC = re.compile(rb"\[[^\[\]\x00-\x1f\x7f]{1,200}\]")
_MSG_TYPE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_NODE_NAME = re.compile(r"[^\[\]\x00-\x1f\x7f]{1,%d}" % MAX_NAME_BYTES)
_UUID = re.compile(r"[0-9A-Za-z_-]{1,64}")  # the original's uuid4().hex, used as an ActionID


def hub_socket(context: zmq.Context, kind: int) -> zmq.Socket:
    """A socket of the hub network, on either side: size limit, keep-alives, heartbeats."""
    sock = context.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IPV6, 1)  # IPv6 addresses as well as IPv4 ones
    keep_alive(sock)
    sock.setsockopt(zmq.MAXMSGSIZE, HUB_MAX_BYTES)
    sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3 * HEARTBEAT_IVL_MS)
    return sock


def topic(name: str) -> bytes:
    return f"[{name}]".encode("utf-8")


def is_node_name(name: Any) -> bool:
    """A SYSTEM_NAME that can stand inside a topic: no brackets, no control characters."""
    return isinstance(name, str) and _NODE_NAME.fullmatch(name) is not None


def heartbeat(interval: float) -> str:
    """The x_heartbeat field: the sender's KEEP_ALIVE_INTERVAL, as a string.

    Every field a new agent adds must survive the original hub, which calls len() on each value
    it logs: a number there killed it (docs/protocol.md, section 4).
    """
    return f"{interval:g}"


def is_heartbeat(value: Any) -> bool:
    """An x_heartbeat as new agents send it (a string) or as the first new agents did (a number)."""
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, float)):
        return True
    try:
        return isinstance(value, str) and float(value) > 0
    except ValueError:
        return False


def body_of(msg_type: str, origin: str, uuid: str = "", **fields: Any) -> Dict[str, Any]:
    """A message's body; each field becomes ``x_<field>``."""
    body: Dict[str, Any] = {"msg_type": msg_type, "uuid": uuid or unique_id(), "origin": origin}
    for key, value in fields.items():
        body["x_" + key] = value
    return body


def build(target: str, msg_type: str, origin: str, uuid: str = "", **fields: Any) -> List[bytes]:
    """The two frames of a message to ``[target]``."""
    return [topic(target), json.dumps(body_of(msg_type, origin, uuid, **fields)).encode("utf-8")]


@dataclass
class Envelope:
    target: bytes
    body: Dict[str, Any]
    age: float = 0.0  # s since it was sent, when it comes from a store (NATS bucket); 0: live

    @property
    def msg_type(self) -> str:
        return self.body["msg_type"]

    @property
    def origin(self) -> Any:
        return self.body.get("origin")

    @property
    def uuid(self) -> Any:
        return self.body.get("uuid")

    def field(self, name: str) -> Any:
        return self.body.get("x_" + name)


def parse_frames(frames: List[bytes]) -> Envelope:
    """What the hub checks: two frames, a topic ``[...]``, a JSON object with a string msg_type."""
    if len(frames) != 2:
        raise BadInput(f"{len(frames)} frames, not 2")
    target, raw = frames
    if not _TOPIC.fullmatch(target):
        raise BadInput("first frame is not a topic of the form [name]")
    body = decode_json_object(raw)
    if not isinstance(body.get("msg_type"), str) or not _MSG_TYPE.fullmatch(body["msg_type"]):
        raise BadInput("no msg_type, or not a name")
    return Envelope(target, body)


def parse_message(frames: List[bytes]) -> Envelope:
    """What an agent checks on top: a uuid and an origin it can answer to."""
    envelope = parse_frames(frames)
    if not isinstance(envelope.uuid, str) or not _UUID.fullmatch(envelope.uuid):
        raise BadInput(f"{envelope.msg_type} without a valid uuid")
    if not is_node_name(envelope.origin):
        raise BadInput(f"{envelope.msg_type} without a valid origin")
    return envelope


class RecentIds:
    """The newest size message uuids (an agent applies a message that comes by two hubs once,
    and knows its own messages from a namesake's)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.ids: "OrderedDict[str, None]" = OrderedDict()

    def __contains__(self, uuid: object) -> bool:
        return uuid in self.ids

    def add(self, uuid: str) -> bool:
        """Remember uuid; True if it was already known."""
        if uuid in self.ids:
            return True
        self.ids[uuid] = None
        if len(self.ids) > self.size:
            self.ids.popitem(last=False)
        return False
