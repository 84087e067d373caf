"""What the three programs share around their work: the event loop, SIGTERM/SIGINT and SIGHUP,
systemd's notify protocol and watchdog, the status socket, the metrics server and timers.

A program (Broker, Hub, Agent) is a Service: it says what to do at start (start), what to report
(status_report, metrics_snapshot), how to reload, and what to do on the way out (stop).  run()
is the same for all three:

    start -> serve status and metrics -> READY=1 -> the loop, until a signal -> STOPPING=1 -> stop
"""
import logging
from typing import Any, Callable, Dict, List, Optional

import zmq

from .loop import BATCH_INTERVAL, EventLoop, Timer
from .metrics import MetricsServer, serve_metrics
from .status import Devices, StatusServer, serve_status
from .systemd import Notifier


class Service:
    def __init__(self, program: str, context: zmq.Context, log: logging.Logger) -> None:
        self.program = program  # broker, hub or agent: its metrics' and status's name
        self.context = context
        self.log = log
        self.loop = EventLoop(BATCH_INTERVAL)
        self.systemd = Notifier()
        self.status: Optional[StatusServer] = None
        self.metrics: Optional[MetricsServer] = None
        self.timers: List[Timer] = []
        self.reloads = 0
        self.health = ""  # the last STATUS= line sent to systemd

    # --- what each program says ------------------------------------------------------------------
    def start(self) -> None:
        """Connect and schedule: the loop is not running yet."""

    def stop(self) -> None:
        """The loop has ended: log what was done, save, close the connections."""

    def after_stall(self, seconds: float) -> None:
        """The process did not run for seconds (stopped, its host paused): what the others sent
        meanwhile may have been dropped."""

    def reload(self) -> None:
        """SIGHUP."""

    def ready_text(self) -> str:
        """systemd's STATUS= line at READY=1."""
        return "running"

    def status_report(self) -> Dict[str, Any]:
        return {}

    def metrics_snapshot(self) -> Dict[str, Any]:
        return {}

    # --- the same for every program --------------------------------------------------------------
    def run(self, metrics_address: str, metrics_port: Optional[int], metrics_where: str) -> None:
        """Until SIGTERM or Ctrl-C; SIGHUP reloads.  The metrics server, when metrics_port is
        set, listens there (metrics_where: the file and key, for an error)."""
        self.loop.stop_on_signals()
        self.loop.reload_on_sighup(self.reload)
        self.loop.on_stall(self.after_stall)
        self.start()
        self.metrics = serve_metrics(self.loop, self.program, self.metrics_snapshot,
                                     metrics_address, metrics_port, metrics_where)
        self.systemd.ready(self.ready_text())
        self.systemd.keep_watchdog_fed(self.loop)
        try:
            self.loop.run()
        finally:
            self.systemd.stopping()
            self.systemd.close()
            if self.metrics is not None:
                self.metrics.close()
            self.stop()
            if self.status is not None:
                self.status.close()
            self.loop.close()

    def serve_status(self, address: Optional[str], name: str, where: str,
                     devices: Optional[Devices] = None) -> None:
        """The status socket at address (None: none); a new address replaces the old one."""
        if self.status is not None and self.status.address != address:
            self.status.close()
            self.status = None
        if self.status is None:
            self.status = serve_status(self.loop, self.context, address, name,
                                       self.status_report, where, devices)

    def schedule(self, *timers: Optional[Timer]) -> None:
        """These timers (None: left out) replace the ones scheduled before."""
        for timer in self.timers:
            timer.cancel()
        self.timers = [timer for timer in timers if timer is not None]

    def every(self, interval: float, callback: Callable[[], None]) -> Optional[Timer]:
        """A timer every interval seconds; None when interval is 0 (off)."""
        return self.loop.call_every(interval, callback) if interval else None

    def set_health(self, health: str) -> None:
        """systemd's STATUS= line, sent when it changes (not at every check)."""
        if health != self.health:
            self.health = health
            self.systemd.status(health)
