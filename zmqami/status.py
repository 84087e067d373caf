"""Live status: a running process answers on a local control socket with a JSON status, and
``--status CONFIG`` prints it as a table, like Asterisk's own ``corosync show members``.

The socket is off unless the config names it (``status_socket`` / ``STATUS_SOCKET``): an
``ipc://`` path or a ``tcp://127.0.0.1:PORT`` address.  Nothing can be changed through it.  A
request is one frame, or several:
- ``names``: the names of every device and presence known (``--status CONFIG devices REGEX``
  matches them here, in the asking process: a regular expression from outside never runs in the
  relay, where a slow one would hold up every event);
- ``devices`` and up to MAX_NAMES names: what each server reports for each, what its mirror
  should show and what was last written there;
- anything else: the status.
"""
import json
import logging
import re
import sys
import time
from typing import Any, Callable, Dict, Iterable, List, Optional

import zmq

from . import __version__
from .loop import EventLoop
from .rules import state_name, state_variable

log = logging.getLogger(__name__)

STATUS_TIMEOUT_MS = 3000
MAX_NAMES = 500  # names asked about in one request
DEVICES = "devices"  # --status CONFIG devices [REGEX]
Devices = Callable[[Optional[List[str]]], Dict[str, Any]]  # (None: the names) -> answer


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


def describe_states(names: Iterable[str], states: Any, links: Dict[str, Any]) -> Dict[str, Any]:
    """For --status devices: for each name known to states (a StateTable), what each source
    reports and, on each server it writes (links: name -> AsteriskLink), what the mirror should
    show, what was last written there and whether a write is under way."""
    described = []
    for name in names:
        variable = state_variable(name)
        reports = states.entries.get(variable)
        if reports is None:
            continue
        rows = []
        for server in list(links) + [source for source in reports if source not in links]:
            entry = reports.get(server)
            row: Dict[str, Any] = {"server": server, "reports": None, "down": False,
                                   "since": None}
            if entry is not None:
                row.update(reports=entry.value, down=entry.down, since=when(entry.wall))
            link = links.get(server)
            if link is not None:
                written = link.outbox.written.get(variable)
                row.update(mirror=states.mirror_value(variable, server),
                           written=written and written[0], written_at=when(written and written[1]),
                           writing=link.outbox.is_unsettled(variable))
            rows.append(row)
        described.append({"name": name, "servers": rows})
    return {"devices": described}


def known_names(states: Any) -> Dict[str, Any]:
    return {"names": sorted(state_name(variable) for variable in states.entries)}


class StatusServer:
    """Answers each request on the status socket (see the module's comment) in JSON."""

    def __init__(self, loop: EventLoop, context: zmq.Context, address: str, program: str,
                 provide: Callable[[], Dict[str, Any]], devices: Optional[Devices] = None) -> None:
        self.started = time.time()
        self.program = program
        self.provide = provide
        self.devices = devices
        self.sock = context.socket(zmq.REP)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.IPV6, 1)
        self.sock.setsockopt(zmq.MAXMSGSIZE, 1024)
        self.sock.bind(address)
        self.address = address
        self.loop = loop
        loop.add_reader(self.sock, self.answer)

    def answer(self) -> None:
        """Whatever came (one frame or several, any bytes), there is an answer."""
        try:
            frames = self.sock.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return
        status: Dict[str, Any] = {"program": self.program, "version": __version__}
        if self.devices is not None and frames[0] == b"names":
            status.update(self.devices(None))
        elif self.devices is not None and frames[0] == DEVICES.encode():
            names = [frame.decode("utf-8", "replace") for frame in frames[1:MAX_NAMES + 1]]
            status.update(self.devices(names))
        else:
            status.update(started=when(self.started), uptime=round(time.time() - self.started))
            status.update(self.provide())
        try:
            self.sock.send(json.dumps(status).encode("utf-8"), zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # the asker is gone: REP drops the answer, or says why
            log.debug("Status answer not sent: %s", exc.strerror)

    def close(self) -> None:
        self.loop.remove_reader(self.sock)
        self.sock.close()


def serve_status(loop: EventLoop, context: zmq.Context, address: Optional[str], program: str,
                 provide: Callable[[], Dict[str, Any]], where: str,
                 devices: Optional[Devices] = None) -> Optional[StatusServer]:
    """A StatusServer on address, if one is set; a bind that fails is logged (where names the
    file and key) and the program runs on without it."""
    if not address:
        return None
    try:
        return StatusServer(loop, context, address, program, provide, devices)
    except zmq.ZMQError as exc:
        log.error("%s: cannot bind %s: %s; running without a status socket", where, address,
                  exc.strerror)
        return None


def fetch_status(address: str, request: Iterable[bytes] = (b"status",)) -> Dict[str, Any]:
    """Ask a running process for its status (or what request asks); TimeoutError if it does not
    answer."""
    context = zmq.Context.instance()
    sock = context.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IPV6, 1)
    sock.setsockopt(zmq.RCVTIMEO, STATUS_TIMEOUT_MS)
    try:
        sock.connect(address)
        sock.send_multipart(list(request))
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


def render_devices(answer: Dict[str, Any]) -> str:
    """--status devices: a table per device or presence."""
    lines: List[str] = []
    for device in answer["devices"]:
        rows = []
        for row in device["servers"]:
            reports = "-" if row["reports"] is None else \
                f"{row['reports']}{' (server down)' if row['down'] else ''} since {row['since']}"
            mirror = "-" if row.get("mirror") is None else row["mirror"]
            written = f"{row['written']} at {row['written_at']}" if row.get("written") else \
                "not yet" if row.get("writing") else "-"
            if row.get("writing"):
                written += " (writing)"
            rows.append([row["server"], reports, mirror, written])
        lines += [device["name"]] + _table(["  server", "reports", "its mirror should show",
                                            "last written there"],
                                           [["  " + row[0]] + row[1:] for row in rows])[1:] + [""]
    return "\n".join(lines).rstrip()


def ask_devices(address: str, pattern: str) -> Dict[str, Any]:
    """What the process at address knows of the names pattern matches (re.search, any case):
    the names first, matched here, then their details, MAX_NAMES at a time."""
    regex = re.compile(pattern, re.IGNORECASE)
    answer = fetch_status(address, [b"names"])
    if "names" not in answer:
        raise LookupError(f"the {answer.get('program', 'process')} there keeps no device states")
    names = [name for name in answer["names"] if regex.search(name)]
    devices: List[Dict[str, Any]] = []
    for start in range(0, len(names), MAX_NAMES):
        chunk = names[start:start + MAX_NAMES]
        devices += fetch_status(address, [DEVICES.encode()] +
                                [name.encode("utf-8") for name in chunk])["devices"]
    return dict(answer, names=names, devices=devices)


def print_status(config_path: str, key: str, address: Optional[str],
                 as_json: bool = False, query: Optional[List[str]] = None) -> int:
    """--status: ask the running process on its status socket, print a table (as_json: the
    status itself, for scripts).  query: ["devices"] or ["devices", REGEX]."""
    if query and (query[0] != DEVICES or len(query) > 2):
        print(f"--status: {' '.join(query)!r}: the only question is 'devices [REGEX]'",
              file=sys.stderr)
        return 2
    if not address:
        print(f"{config_path}: {key}: not set, so there is no status to ask for", file=sys.stderr)
        return 2
    try:
        if query:
            answer = ask_devices(address, query[1] if len(query) > 1 else "")
            if not answer["devices"] and not as_json:
                print(f"No known device or presence matches {query[-1]!r}", file=sys.stderr)
                return 1
            print(json.dumps(answer["devices"], indent=2) if as_json else render_devices(answer))
            return 0
        status = fetch_status(address)
        print(json.dumps(status, indent=2) if as_json else render(status))
    except re.error as exc:
        print(f"--status devices: {query[1]!r} is not a regular expression: {exc}",
              file=sys.stderr)
        return 2
    except (TimeoutError, LookupError) as exc:
        print(f"{config_path}: {exc}", file=sys.stderr)
        return 1
    return 0


def split_status_query(config: Optional[str], query: List[str],
                       default: Optional[str] = None) -> tuple:
    """(config, query) from the command line's positionals: ``agent.py --status devices``
    (its settings file by default) reads 'devices' as the config."""
    if config == DEVICES and default is not None:
        return default, [DEVICES] + query
    return config, query
