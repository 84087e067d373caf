"""Prometheus metrics on /metrics (optional: ``pip install prometheus-client``).

The official client library serves HTTP in a thread of its own.  That thread never touches the
program's live objects: the event loop takes a snapshot of plain values every REFRESH seconds
(cheap, and never on the path of an event), and each scrape reads the last snapshot.
"""
import logging
import time
from typing import Any, Callable, Dict, Iterator, List, Optional

from . import __version__
from .config import ConfigError, metrics_library_missing
from .loop import EventLoop
from .stats import LATENCY_BUCKETS

log = logging.getLogger(__name__)

REFRESH = 1.0  # seconds between snapshots
Snapshot = Dict[str, Any]

# Per-server counters: (metric name, help, key in the snapshot of a link)
LINK_COUNTERS = [
    ("events_received", "Events received from the server", "events"),
    ("writes_sent", "State writes (Setvar) sent to the server, retries included", "writes_sent"),
    ("writes_acknowledged", "State writes the server acknowledged", "acknowledged"),
    ("writes_refused", "State writes the server refused", "refused"),
    ("writes_too_large", "State writes never sent: too large for the server", "too_large"),
    ("request_timeouts", "Times the server did not answer within the request timeout",
     "timeouts"),
    ("input_dropped", "Events or replies from the server dropped as invalid", "dropped"),
]


def link_snapshot(link: Any, dropped: int) -> Dict[str, Any]:
    """The values of one Asterisk connection (an AsteriskLink), for the metrics."""
    stats = link.stats
    return {"name": link.name, "up": link.up is True, "events": stats.events,
            "writes_sent": stats.writes_sent, "acknowledged": stats.acknowledged,
            "refused": stats.refused, "too_large": stats.too_large, "timeouts": stats.timeouts,
            "dropped": dropped, "queued": len(link.outbox),
            "actions_sent": dict(stats.actions_sent),
            "actions_answered": dict(stats.actions_answered),
            # wall clock: Prometheus subtracts it from time() (exporters name no durations)
            "last_answer": time.time() - (time.monotonic() - link.last_answer),
            "latency": (list(stats.latency.counts), stats.latency.sum)}


class MetricsServer:
    """/metrics over HTTP; take() is called by the loop to refresh what it serves."""

    def __init__(self, program: str, take: Callable[[], Snapshot]) -> None:
        self.program = program
        self.take = take
        self.snapshot: Snapshot = {}
        self.server: Any = None

    def start(self, loop: EventLoop, address: str, port: int, where: str) -> None:
        from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server
        registry = CollectorRegistry(auto_describe=True)
        registry.register(self)
        ProcessCollector(registry=registry)  # process_start_time_seconds, CPU, memory, files
        self.refresh()
        try:
            started = start_http_server(port, addr=address, registry=registry)
        except OSError as exc:
            log.error("%s: cannot serve metrics on %s:%d: %s; running without them", where,
                      address, port, exc.strerror or exc)
            return
        self.server = started[0] if isinstance(started, tuple) else None
        loop.call_every(REFRESH, self.refresh)
        log.info("Metrics on http://%s:%d/metrics", address if ":" not in address
                 else f"[{address}]", port)

    def refresh(self) -> None:
        self.snapshot = self.take()  # one reference swap: the HTTP thread sees old or new

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()

    def collect(self) -> Iterator[Any]:
        """prometheus_client's collector protocol (runs in the HTTP thread)."""
        from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                            InfoMetricFamily)
        snapshot = self.snapshot
        links: List[Dict[str, Any]] = snapshot.get("links", [])
        info = InfoMetricFamily("zmqami_build", "Program and version")
        info.add_metric([], {"program": self.program, "version": __version__})
        yield info
        if links:  # (the hub has no Asterisk: no per-server family, not even an empty one)
            yield from self.server_families(links)
        peers = snapshot.get("peers")
        if peers:
            peer_up = GaugeMetricFamily("zmqami_peer_up", "1 if the peer agent is up",
                                        labels=["peer"])
            for peer in peers:
                peer_up.add_metric([peer["name"]], 1 if peer["up"] else 0)
            yield peer_up
        for name, (kind, text, value) in snapshot.get("totals", {}).items():
            family = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            yield family(f"zmqami_{name}", text, value=value)

    @staticmethod
    def server_families(links: List[Dict[str, Any]]) -> Iterator[Any]:
        """The families with a server label: one sample per Asterisk server."""
        from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                            HistogramMetricFamily)
        up = GaugeMetricFamily("zmqami_server_up", "1 if the Asterisk server answers",
                               labels=["server"])
        queue = GaugeMetricFamily("zmqami_queue_length", "States waiting to be written on the "
                                  "server (one per device or presence at most)",
                                  labels=["server"])
        answer = GaugeMetricFamily("zmqami_last_answer_timestamp_seconds",
                                   "When the server last answered, Unix seconds",
                                   labels=["server"])
        sent = CounterMetricFamily("zmqami_actions_sent", "Other actions sent, by kind (ping, "
                                   "list, client)", labels=["server", "kind"])
        answered = CounterMetricFamily("zmqami_actions_answered", "Other actions answered, by "
                                       "kind", labels=["server", "kind"])
        counters = {name: CounterMetricFamily(f"zmqami_{name}", text, labels=["server"])
                    for name, text, _ in LINK_COUNTERS}
        latency = HistogramMetricFamily("zmqami_relay_latency_seconds", "From a state's event "
                                        "to its write acknowledged, per destination",
                                        labels=["server"])
        for link in links:
            name = link["name"]
            up.add_metric([name], 1 if link["up"] else 0)
            queue.add_metric([name], link["queued"])
            answer.add_metric([name], link["last_answer"])
            for metric, _, key in LINK_COUNTERS:
                counters[metric].add_metric([name], link[key])
            for kind, count in link["actions_sent"].items():
                sent.add_metric([name, kind], count)
            for kind, count in link["actions_answered"].items():
                answered.add_metric([name, kind], count)
            counts, total = link["latency"]
            buckets, cumulative = [], 0
            for bound, count in zip(list(LATENCY_BUCKETS) + [float("inf")], counts):
                cumulative += count
                buckets.append((_bound(bound), cumulative))
            latency.add_metric([name], buckets, total)
        yield from [up, queue, answer, sent, answered, *counters.values(), latency]


def _bound(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


def serve_metrics(loop: EventLoop, program: str, take: Callable[[], Snapshot],
                  address: str, port: Optional[int], where: str) -> Optional[MetricsServer]:
    """A MetricsServer on address:port when port is set; ConfigError (one line naming where)
    when the client library is missing."""
    if not port:
        return None
    missing = metrics_library_missing()  # (the config check said so already; a last guard)
    if missing:
        raise ConfigError([f"{where}: {missing}"])
    server = MetricsServer(program, take)
    server.start(loop, address, port, where)
    return server
