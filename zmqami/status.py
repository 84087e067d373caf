"""Live status: a running process answers on a local control socket with a JSON status, and
``--status CONFIG`` prints it as a table, like Asterisk's own ``corosync show members``.

The socket is off unless the config names it (``status_socket`` / ``STATUS_SOCKET``): an
``ipc://`` path or a ``tcp://127.0.0.1:PORT`` address.  Any request gets the status; nothing can
be changed through it.
"""
import json
import logging
import sys
import time
from typing import Any, Callable, Dict, List, Optional

import zmq

from . import __version__
from .loop import EventLoop

log = logging.getLogger(__name__)

STATUS_TIMEOUT_MS = 3000


def when(timestamp: Optional[float]) -> Optional[str]:
    """A wall-clock time for the status, or None."""
    return None if not timestamp else time.strftime("%Y-%m-%d %H:%M:%S",
                                                    time.localtime(timestamp))


def link_status(link: Any, dropped: int) -> Dict[str, Any]:
    """The status of one Asterisk connection (an AsteriskLink)."""
    return {"name": link.name, "up": link.up, "since": when(link.since),
            "last_event": when(link.stats.last_event), "last_ack": when(link.stats.last_ack),
            "queued": len(link.outbox), "events": link.stats.events,
            "sent": link.stats.writes_sent, "acknowledged": link.stats.acknowledged,
            "refused": link.stats.refused, "too_large": link.stats.too_large,
            "actions_sent": dict(link.stats.actions_sent),
            "actions_answered": dict(link.stats.actions_answered),
            "timeouts": link.stats.timeouts, "dropped": dropped}


class StatusServer:
    """Answers every request on the status socket with provide()'s JSON."""

    def __init__(self, loop: EventLoop, context: zmq.Context, address: str, program: str,
                 provide: Callable[[], Dict[str, Any]]) -> None:
        self.started = time.time()
        self.program = program
        self.provide = provide
        self.sock = context.socket(zmq.REP)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.IPV6, 1)
        self.sock.setsockopt(zmq.MAXMSGSIZE, 1024)
        self.sock.bind(address)
        self.address = address
        self.loop = loop
        loop.add_reader(self.sock, self.answer)

    def answer(self) -> None:
        """Whatever came (one frame or several, any bytes), the answer is the status."""
        try:
            self.sock.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return
        status = {"program": self.program, "version": __version__,
                  "started": when(self.started), "uptime": round(time.time() - self.started)}
        status.update(self.provide())
        try:
            self.sock.send(json.dumps(status).encode("utf-8"), zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # the asker is gone: REP drops the answer, or says why
            log.debug("Status answer not sent: %s", exc.strerror)

    def close(self) -> None:
        self.loop.remove_reader(self.sock)
        self.sock.close()


def serve_status(loop: EventLoop, context: zmq.Context, address: Optional[str], program: str,
                 provide: Callable[[], Dict[str, Any]], where: str) -> Optional[StatusServer]:
    """A StatusServer on address, if one is set; a bind that fails is logged (where names the
    file and key) and the program runs on without it."""
    if not address:
        return None
    try:
        return StatusServer(loop, context, address, program, provide)
    except zmq.ZMQError as exc:
        log.error("%s: cannot bind %s: %s; running without a status socket", where, address,
                  exc.strerror)
        return None


def fetch_status(address: str) -> Dict[str, Any]:
    """Ask a running process for its status; TimeoutError if it does not answer."""
    context = zmq.Context.instance()
    sock = context.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IPV6, 1)
    sock.setsockopt(zmq.RCVTIMEO, STATUS_TIMEOUT_MS)
    try:
        sock.connect(address)
        sock.send(b"status")
        return json.loads(sock.recv())
    except zmq.Again:
        raise TimeoutError(f"no answer on {address} within {STATUS_TIMEOUT_MS // 1000} s: "
                           "is it running?") from None
    finally:
        sock.close()


def _state(up: Optional[bool]) -> str:
    return {True: "up", False: "DOWN", None: "unknown"}[up]


def render(status: Dict[str, Any]) -> str:
    """The status as a few readable lines and a table."""
    lines = [f"{status['program']} {status['version']}, running since {status['started']} "
             f"({status['uptime']} s)"]
    rows: List[List[str]] = []
    for server in status.get("servers", []):
        rows.append([server["name"], _state(server["up"]), server["since"] or "-",
                     server["last_event"] or "-", server["last_ack"] or "-",
                     str(server["queued"]), str(server["events"]), str(server["sent"]),
                     str(server["refused"]), str(server["timeouts"]), str(server["dropped"])])
    if rows:
        header = ["server", "state", "since", "last event", "last ack", "queued", "events",
                  "writes", "refused", "timeouts", "dropped"]
        lines += _table(header, rows)
    peers = status.get("peers", [])
    if peers:
        lines += _table(["peer", "state", "last seen"],
                        [[p["name"], _state(p["up"]), p["last_seen"] or "-"] for p in peers])
    for key, value in status.get("totals", {}).items():
        lines.append(f"{key.replace('_', ' ')}: {value}")
    return "\n".join(lines)


def _table(header: List[str], rows: List[List[str]]) -> List[str]:
    widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]
    return [""] + ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
                   for row in [header] + rows]


def print_status(config_path: str, key: str, address: Optional[str],
                 as_json: bool = False) -> int:
    """--status: ask the running process on its status socket, print a table (as_json: the
    status itself, for scripts)."""
    if not address:
        print(f"{config_path}: {key}: not set, so there is no status to ask for", file=sys.stderr)
        return 2
    try:
        status = fetch_status(address)
        print(json.dumps(status, indent=2) if as_json else render(status))
    except TimeoutError as exc:
        print(f"{config_path}: {exc}", file=sys.stderr)
        return 1
    return 0
