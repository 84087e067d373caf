#!/usr/bin/env python3
"""Benchmarks: python bench.py [--quick] [SCENARIO ...]

Every stand-in Asterisk runs in its own process (python -m zmqami.standin), and so do the broker,
the hub and the agents, started as a user starts them.  A source stand-in publishes a paced
stream of DeviceStateChange events and notes when it sent each; the destination stand-ins note
when each Setvar arrived.  Both use the system's monotonic clock, so latency is the time from the
event leaving the source Asterisk to the Setvar reaching the other.

The baseline is the original broker's algorithm (one blocking request at a time, destination after
destination, a fixed 1000 ms timeout), run the same way: python bench.py --baseline-broker CONFIG.
The rate rows stream devices the relays know, as an estate's are: each row's devices are streamed
once in another state before the measured stream (--first-sight: devices never seen, whose
first sight makes every relay's memory, and Python's garbage collections, grow meanwhile).

The floor is the least any relay can do here: the broker's loop and pacing, and nothing else (no
checks, no state, no retries): python bench.py --floor-broker CONFIG; and likewise for agents
behind a hub (--floor-hub, --floor-agent) and over NATS (--floor-nats-agent).  Their rows show
what this machine, its stand-ins, pyzmq and nats-py allow relays in Python on the day, whatever
the relays' logic.
"""
import argparse
import configparser
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import zmq

from testing.natscluster import (NatsCluster, fill_bucket_as_mallory, free_port,
                                 make_unlimited_bucket)
from testing.standins import start_standin_process
from zmqami.asterisk import ECHO_MARK
from zmqami.loop import BATCH_INTERVAL, EventLoop, drain, send_frames
from zmqami.standin import AMI_SECRET, AMI_USER, Standin

ROOT = os.path.dirname(os.path.abspath(__file__))
LOG_LEVEL = os.environ.get("BENCH_LOG_LEVEL", "warning")  # of the agents
DRAIN_SECONDS = 10.0  # after a stream: how long to wait for what is still to be delivered


@dataclass
class Row:
    scenario: str
    events: int
    delivered: float = 0.0            # share delivered to every destination, percent
    p50: Optional[float] = None       # ms
    p99: Optional[float] = None
    worst: Optional[float] = None
    cpu: Optional[float] = None       # s of CPU used by the relay processes during the run
    rss: Optional[float] = None       # MB, peak, of the largest relay process
    note: str = ""

    def cells(self) -> List[str]:
        def ms(value):
            return "-" if value is None else f"{value:.2f}"
        return [self.scenario, str(self.events), f"{self.delivered:.1f}%", ms(self.p50),
                ms(self.p99), ms(self.worst), "-" if self.cpu is None else f"{self.cpu:.2f}",
                "-" if self.rss is None else f"{self.rss:.1f}", self.note]


HEADER = ["scenario", "events", "delivered", "p50 ms", "p99 ms", "max ms", "relay CPU s",
          "relay RSS MB", "note"]


def process_cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _status_mb(pid: int, field: str) -> float:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def process_peak_rss_mb(pid: int) -> float:
    return _status_mb(pid, "VmHWM")


def process_rss_mb(pid: int) -> float:
    return _status_mb(pid, "VmRSS")


class Cluster:
    """Stand-in Asterisk servers and the relay between them, each in its own process."""

    def __init__(self, context: zmq.Context, workdir: str) -> None:
        self.context = context
        self.workdir = tempfile.mkdtemp(dir=workdir)  # its own: pid files, configs, NATS stores
        self.standins: List[Standin] = []
        self.relays: List[subprocess.Popen] = []
        self.nats: Optional[NatsCluster] = None
        self.labels: Dict[int, str] = {}  # pid -> what the process is, for per-process CPU

    def standin(self, mode: str = "normal") -> Standin:
        # Already booted: no LoadZmq in the middle of a run (a restart, with its resync).
        standin = start_standin_process(self.context, mode=mode, ami_port=0, loadzmq_delay=None)
        self.standins.append(standin)
        return standin

    def run(self, script: str, *args: str) -> subprocess.Popen:
        log = open(os.path.join(self.workdir, f"{script}-{len(self.relays)}.log"), "wb")
        profile = os.environ.get("BENCH_PROFILE")  # a folder: profile each relay with cProfile
        prefix = ["-m", "cProfile", "-o", os.path.join(profile, f"{script}-{len(self.relays)}"
                                                       ".prof")] if profile else []
        process = subprocess.Popen([sys.executable, *prefix, os.path.join(ROOT, script), *args],
                                   stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        self.relays.append(process)
        self.labels[process.pid] = "agent" if script == "agent.py" else script[:-3]
        return process

    def broker(self, servers: List[Standin], relay: str = "broker", ami: bool = False,
               **general: str) -> None:
        """relay: "broker" (broker.py), "baseline" or "floor" (this file's)."""
        # Every run streams new devices: the bound on a flood (max_devices) must not cut them.
        lines = ["[general]", "log_level = warning", "max_devices = 10000000"] + \
            [f"{k} = {v}" for k, v in general.items()]
        names = [f"server-{i}" for i in range(len(servers))]
        lines += ["[servers]", "sections = " + ", ".join(names)]
        for name, server in zip(names, servers):
            lines += [f"[{name}]", "addr = 127.0.0.1"]
            if ami:
                lines += [f"ami_user = {AMI_USER}", f"ami_secret = {AMI_SECRET}",
                          f"ami_port = {server.ami_port}"]
            else:
                lines += [f"cmd_port = {server.cmd_port}", f"evt_port = {server.evt_port}"]
        path = os.path.join(self.workdir, f"broker{len(self.relays)}.ini")
        with open(path, "w") as handle:
            handle.write("\n".join(lines) + "\n")
        if relay == "broker":
            self.run("broker.py", path)
        else:
            self.run("bench.py", f"--{relay}-broker", path)

    def agents(self, servers: List[Standin], nats_nodes: int = 0, ami: bool = False,
               nats_urls: Optional[List[str]] = None, first_index: int = 0,
               max_devices: int = 10_000_000, log_level: str = LOG_LEVEL,
               floor: bool = False) -> None:
        """An agent per server, through a hub, or through a NATS cluster of nats_nodes (or the
        NATS servers at nats_urls); floor: bench.py's floor agents (and hub) instead."""
        if nats_urls:
            network = f"NATS_URLS = {nats_urls!r}\n"
        elif nats_nodes:
            self.nats = NatsCluster(os.path.join(self.workdir, f"nats{len(self.relays)}"),
                                    nats_nodes)
            network = f"NATS_URLS = {self.nats.urls!r}\nNATS_REPLICAS = {nats_nodes}\n"
        else:
            pub, pull = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
            hub_config = os.path.join(self.workdir, "server_config.py")
            with open(hub_config, "w") as handle:
                handle.write(f"LOG_LEVEL = 'warning'\nPUB_BIND_URL = {pub!r}\n"
                             f"SUB_BIND_URL = {pull!r}\n")
            if floor:
                self.run("bench.py", "--floor-hub", pull, pub)
            else:
                self.run("server.py", hub_config)
            # every agent here is of this version: what 'auto' does after five minutes
            network = f"ZMQ_PUB_URL = {pull!r}\nZMQ_SUB_URL = {pub!r}\nPACK_EVENTS = True\n"
        for i, server in enumerate(servers, first_index):
            cmd_url, evt_url = (f"tcp://127.0.0.1:{port}" for port in (server.cmd_port,
                                                                        server.evt_port))
            if floor:  # (bench.py's own, with what the agents would be given)
                self.run("bench.py", *(["--floor-nats-agent", f"node{i}", cmd_url,
                                        evt_url, ",".join(self.nats.urls)] if nats_nodes
                                       else ["--floor-agent", f"node{i}", cmd_url,
                                             evt_url, pull, pub]))
                continue
            config = os.path.join(self.workdir, f"agent{len(self.relays)}.py")
            with open(config, "w") as handle:
                handle.write(
                    f"LOG_LEVEL = {log_level!r}\nSYSTEM_NAME = 'node{i}'\n"
                    f"ASTERISK_CMD_URL = 'tcp://127.0.0.1:{server.cmd_port}'\n"
                    f"ASTERISK_EVT_URL = 'tcp://127.0.0.1:{server.evt_port}'\n" + network +
                    (f"ASTERISK_AMI_URL = 'tcp://127.0.0.1:{server.ami_port}'\n"
                     f"ASTERISK_AMI_USER = {AMI_USER!r}\nASTERISK_AMI_SECRET = {AMI_SECRET!r}\n"
                     if ami else "") +
                    # every run streams new devices: the bound on a flood must not cut them
                    f"MAX_DEVICES_PER_PEER = {max_devices}\n" +
                    f"PID_FILE = {os.path.join(self.workdir, f'agent{i}.pid')!r}\n")
            self.run("agent.py", config)

    def wait_ready(self, source: Standin, destinations: List[Standin], timeout: float = 30) -> None:
        """Send probe events until one reaches every destination: the whole path is up."""
        deadline = time.monotonic() + timeout
        for attempt in range(10**6):
            source.control.set_device("probe", "INUSE" if attempt % 2 else "BUSY")
            probe_deadline = time.monotonic() + 0.5
            while time.monotonic() < probe_deadline:
                if all(d.control.devices().get("Custom:probe") == ("INUSE" if attempt % 2 else "BUSY")
                       for d in destinations):
                    return
                time.sleep(0.02)
            if time.monotonic() > deadline:
                raise RuntimeError("the relay did not become ready")

    def processes(self) -> List[subprocess.Popen]:
        """The relay's processes: scripts, and the NATS servers when there are."""
        servers = [server.process for server in self.nats.servers] if self.nats else []
        return [p for p in self.relays + servers if p.poll() is None]

    def cpu_seconds(self) -> float:
        return sum(process_cpu_seconds(p.pid) for p in self.processes())

    def cpu_by_process(self) -> Dict[str, float]:
        """CPU seconds of each process so far, by a label: agent-1, hub, nats-2..."""
        cpu: Dict[str, float] = {}
        for process in self.processes():
            label = self.labels.get(process.pid, "nats")
            label = label if label in ("broker", "server") else \
                f"{label}-{sum(k.startswith(label) for k in cpu) + 1}"
            cpu[label.replace("server", "hub")] = process_cpu_seconds(process.pid)
        return cpu

    def peak_rss_mb(self) -> float:
        return max(process_peak_rss_mb(p.pid) for p in self.processes())

    def close(self) -> None:
        for process in self.relays:
            process.terminate()
        for process in self.relays:
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
        if self.nats is not None:
            self.nats.close()
        for standin in self.standins:
            if standin.process.poll() is None:
                standin.process.kill()
                standin.process.wait()
            standin.control.close()


def stream(cluster: Cluster, source: Standin, live: List[Standin], name: str, rate: float,
           count: int, devices: Optional[int] = None, drain: float = DRAIN_SECONDS,
           others: int = 0, known: bool = False) -> Row:
    """A paced stream from source; latency of each event's Setvar on every live destination.
    others: a call's other events published before each state (testing.standins.CALL_EVENTS).
    known: the same devices are streamed once before, at the same rate, in another state, and
    the second stream is measured: devices the relays know, as an estate's phones are (the
    first sight of a device makes memory grow, and with it Python's full collections)."""
    prefix = f"b{int(time.time() * 1000) % 10**8}-"
    if known:
        source.control.call("stream", prefix=prefix, count=count, devices=count, rate=rate,
                            others=others, states=["NOT_INUSE"])
        collect(cluster, source, live, "", prefix, count, count, drain, {}, "NOT_INUSE")
    measured = {"states": ["INUSE"]} if known else {}  # (else the stand-in's, in turn)
    cpu_before = cluster.cpu_by_process()
    source.control.call("stream", prefix=prefix, count=count, devices=devices or count, rate=rate,
                        others=others, **measured)
    return collect(cluster, source, live, name, prefix, count, devices or count, drain,
                   cpu_before, "INUSE" if known else None)


def collect(cluster: Cluster, source: Standin, live: List[Standin], name: str, prefix: str,
            count: int, devices: int, drain: float, cpu_before: Dict[str, float],
            state: Optional[str] = None) -> Row:
    """Once source's stream is sent: wait up to drain s for its writes (of state, if given),
    and measure them."""
    while not source.control.call("stream_status")["done"]:
        time.sleep(0.05)
    sent = source.control.call("stream_status", times=True)["sent"]
    deadline = time.monotonic() + drain
    writes = [{} for _ in live]
    while time.monotonic() < deadline:
        writes = [{device: written for device, written in
                   d.control.call("writes", prefix=prefix)["writes"].items()
                   if state is None or written[0] == state} for d in live]
        if all(len(w) >= devices for w in writes):
            break
        time.sleep(0.1)
    cpu_each = {label: used - cpu_before.get(label, 0.0)
                for label, used in cluster.cpu_by_process().items()}
    latencies = []
    delivered = 0
    for w in writes:
        for i in range(count if devices == count else 0):
            written = w.get(f"Custom:{prefix}{i}")
            if written is not None:
                latencies.append((written[1] - sent[i]) * 1000)
        delivered += len(w)
    row = Row(name, count, 100.0 * delivered / (devices * len(live)), cpu=sum(cpu_each.values()),
              rss=cluster.peak_rss_mb())
    if len(cpu_each) > 1:
        row.note = "CPU s: " + ", ".join(f"{label} {used:.2f}" for label, used in cpu_each.items())
    if latencies:
        latencies.sort()
        row.p50 = statistics.median(latencies)
        row.p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
        row.worst = latencies[-1]
    return row


# --- scenarios ------------------------------------------------------------------------------------

def scenario_isolation(context: zmq.Context, workdir: str, baseline: bool, seconds: float) -> Row:
    """100 events/s from one server; one destination hung, one dead (nothing listening), one live."""
    cluster = Cluster(context, workdir)
    try:
        source, hung, live = cluster.standin(), cluster.standin("hung"), cluster.standin()
        dead = Standin(free_port(), free_port(), control=None)
        cluster.broker([source, hung, dead, live], relay="baseline" if baseline else "broker")
        cluster.wait_ready(source, [live], timeout=60)
        name = "isolation: 100/s, 1 hung + 1 dead, latency to the live one"
        row = stream(cluster, source, [live], ("baseline " if baseline else "") + name, 100,
                     int(100 * seconds))
        return row
    finally:
        cluster.close()


def scenario_rates(context: zmq.Context, workdir: str, topology: str, rates: List[int],
                   seconds: float, others: int = 0, known: bool = True) -> List[Row]:
    """Paced streams of distinct devices from one server to two others; others: each state
    among so many other events of a call, as Asterisk publishes them through res_zmq_manager;
    known: to devices the relays know (stream)."""
    cluster = Cluster(context, workdir)
    try:
        source, first, second = cluster.standin(), cluster.standin(), cluster.standin()
        if topology in ("agents", "nats", "floor-agents", "floor-nats"):
            cluster.agents([source, first, second], nats_nodes=3 if "nats" in topology else 0,
                           floor=topology.startswith("floor"))
        else:
            cluster.broker([source, first, second], ami=topology == "ami",
                           relay=topology if topology in ("baseline", "floor") else "broker")
        cluster.wait_ready(source, [first, second], timeout=60)
        label = {"broker": "broker", "agents": "agent -> hub -> 2 agents",
                 "nats": "agent -> 3-node NATS (R3 bucket) -> 2 agents",
                 "baseline": "baseline broker", "ami": "broker over AMI",
                 "floor": "floor relay", "floor-agents": "floor agents -> floor hub",
                 "floor-nats": "floor agents -> 3-node NATS (R3)"}[topology]
        rows = []
        for rate in rates:
            among = f" among {rate * (others + 1)} events/s" if others else ""
            rows.append(stream(cluster, source, [first, second],
                               f"{label}: {rate}/s{among} into 2", rate, int(rate * seconds),
                               others=others, known=known))
        return rows
    finally:
        cluster.close()


def scenario_nats_failover(context: zmq.Context, workdir: str, seconds: float) -> Row:
    """1000 events/s through a 3-node NATS cluster; half way, kill -9 the node that the source's
    agent is connected to.  Convergence: from the kill to the last write on the destinations."""
    cluster = Cluster(context, workdir)
    try:
        source, first, second = cluster.standin(), cluster.standin(), cluster.standin()
        cluster.agents([source, first, second], nats_nodes=3)
        cluster.wait_ready(source, [first, second], timeout=60)
        node = cluster.nats.server_of("zmq-ami agent node0")
        rate, count = 1000, int(1000 * seconds)
        prefix = f"f{int(time.time() * 1000) % 10**8}-"
        cpu_before = cluster.cpu_by_process()
        source.control.call("stream", prefix=prefix, count=count, devices=count, rate=rate)
        while source.control.call("stream_status")["count"] < count // 2:
            time.sleep(0.01)
        leaders = node.leaders("KV_zmqami")
        roles = [role for role in ("meta", "stream") if leaders.get(role) == node.name]
        killed_at = time.monotonic()
        node.kill()
        row = collect(cluster, source, [first, second], "NATS: kill -9 of the source agent's node "
                      f"half way ({rate}/s)", prefix, count, count, DRAIN_SECONDS, cpu_before)
        last_sent = source.control.call("stream_status", times=True)["sent"][-1]
        last = max(written[1] for d in (first, second)
                   for written in d.control.call("writes", prefix=prefix)["writes"].values())
        row.note = (f"killed {node.name} ({' and '.join(roles) or 'no'} leader) "
                    f"{killed_at - first_sent(source):.2f} s in; all delivered "
                    f"{max(0.0, last - last_sent) * 1000:.0f} ms after the last was sent; " +
                    row.note)
        return row
    finally:
        cluster.close()


def scenario_recovery(context: zmq.Context, workdir: str, trials: int,
                      hang: float = 8.0) -> List[Row]:
    """An AMI server hung for hang seconds (it answers nothing, the Login of each new connection
    included), then healthy; a state changed meanwhile on another server.  Per trial, the time
    from healthy to that state mirrored on it (default settings: what users get)."""
    rows = []
    for topology in ("broker", "agents"):
        cluster = Cluster(context, workdir)
        try:
            source, target = cluster.standin(), cluster.standin()
            if topology == "broker":
                cluster.broker([source, target], ami=True)
            else:
                cluster.agents([source, target], ami=True)
            cluster.wait_ready(source, [target], timeout=60)
            times = []
            for trial in range(trials):
                state = ("BUSY", "INUSE")[trial % 2]
                target.control.set_mode("hung")
                source.control.set_device("recovery", state)
                time.sleep(hang)  # the scenario: a server hung for this long
                target.control.set_mode("normal")
                healthy = time.monotonic()
                while target.control.devices().get("Custom:recovery") != state:
                    if time.monotonic() - healthy > 120:
                        break
                    time.sleep(0.01)
                else:
                    times.append(time.monotonic() - healthy)
            label = {"broker": "broker", "agents": "agent"}[topology]
            rows.append(Row(f"recovery ({label} over AMI): hung {hang:g} s, then healthy",
                            trials, 100.0 * len(times) / trials,
                            p50=statistics.median(times) * 1000 if times else None,
                            worst=max(times) * 1000 if times else None,
                            note="s from healthy to mirrored: " +
                                 ", ".join(f"{t:.1f}" for t in times)))
        finally:
            cluster.close()
    return rows


def scenario_nats_hostile(context: zmq.Context, workdir: str, small: int, large: int) -> Row:
    """A compromised agent fills the bucket within its own keys: small states, then values of
    about 1 MB, in a bucket made without limits (as before issue 23).  Peak RSS of an agent
    running meanwhile and of one starting afterwards."""
    import asyncio
    cluster = Cluster(context, workdir)
    try:
        cluster.nats = NatsCluster(os.path.join(cluster.workdir, "nats"), 1)
        url = cluster.nats.urls[0]

        def agent_ready() -> float:
            """Start an agent, wait until it has read the bucket; its pid."""
            cluster.agents([cluster.standin()], nats_urls=[url], first_index=len(cluster.relays),
                           max_devices=10_000, log_level="info")  # the default bound
            log = os.path.join(cluster.workdir, f"agent.py-{len(cluster.relays) - 1}.log")
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and b"from the NATS bucket" not in \
                    open(log, "rb").read():
                time.sleep(0.2)
            return cluster.relays[-1].pid

        asyncio.run(make_unlimited_bucket([url]))
        running_pid = agent_ready()
        megabytes = asyncio.run(fill_bucket_as_mallory([url], small, large))
        time.sleep(5)  # (what it was sent is taken in by now)
        running = process_peak_rss_mb(running_pid)
        starting_pid = agent_ready()
        time.sleep(5)
        starting = process_peak_rss_mb(starting_pid)
        return Row(f"NATS: a hostile {megabytes:.0f} MB bucket ({small} states, {large} values of "
                   "1 MB)", small + large, 100.0, rss=max(running, starting),
                   note=f"peak RSS of the running agent {running:.1f} MB, of an agent "
                        f"starting then {starting:.1f} MB")
    finally:
        cluster.close()


def first_sent(source: Standin) -> float:
    return source.control.call("stream_status", times=True)["sent"][0]


def scenario_burst(context: zmq.Context, workdir: str, baseline: bool, count: int) -> Row:
    """count events over 1,000 devices as fast as the source can publish them."""
    cluster = Cluster(context, workdir)
    try:
        source, first, second = cluster.standin(), cluster.standin(), cluster.standin()
        cluster.broker([source, first, second], relay="baseline" if baseline else "broker")
        cluster.wait_ready(source, [first, second], timeout=60)
        requests_before = [d.control.state()["requests"] for d in (first, second)]
        prefix = "burst-"
        devices = 1000
        cpu_before = cluster.cpu_seconds()
        source.control.call("stream", prefix=prefix, count=count, devices=devices, rate=10**9,
                            states=["INUSE", "NOT_INUSE", "RINGING", "BUSY", "ONHOLD"])
        while not source.control.call("stream_status")["done"]:
            time.sleep(0.05)
        last_sent = source.control.call("stream_status", times=True)["sent"][-1]
        final = source.control.devices()
        expected = {f"Custom:{d}": state for d, state in final.items() if d.startswith(prefix)}
        deadline = time.monotonic() + DRAIN_SECONDS * 3
        finished = []
        for destination in (first, second):
            while time.monotonic() < deadline:
                writes = destination.control.call("writes", prefix=prefix)["writes"]
                if all(writes.get(d, (None,))[0] == state for d, state in expected.items()):
                    finished.append(max(writes[d][1] for d in expected) - last_sent)
                    break
                time.sleep(0.1)
        setvars = sum(d.control.state()["requests"] - before
                      for d, before in zip((first, second), requests_before))
        row = Row(f"{'baseline ' if baseline else ''}burst: {count} events over {devices} devices",
                  count, 100.0 * len(finished) / 2, cpu=cluster.cpu_seconds() - cpu_before,
                  rss=cluster.peak_rss_mb())
        if len(finished) == 2:
            row.worst = max(finished) * 1000
            row.note = f"final everywhere {max(finished):.2f} s after the last event; "
        else:
            row.note = f"not final within {DRAIN_SECONDS * 3:.0f} s; "
        row.note += f"{setvars} Setvar sent for {2 * count} changes"
        return row
    finally:
        cluster.close()


def scenario_hinted(context: zmq.Context, workdir: str, servers: int, share: int,
                    devices: int) -> List[Row]:
    """servers stand-ins, each but the source hinting 1/share of the devices; the same stream
    of device changes with hinted_only and without: the Setvars it takes."""
    rows = []
    for hinted in (False, True):
        cluster = Cluster(context, workdir)
        try:
            standins = [cluster.standin() for _ in range(servers)]
            source, destinations = standins[0], standins[1:]
            prefix = f"hint{int(hinted)}-"
            for index, destination in enumerate(destinations):
                hints = {str(n): f"{prefix}{n}&Custom:{prefix}{n}" for n in range(devices)
                         if n % share == index % share}
                destination.control.set_hints(dict(hints, probe="probe&Custom:probe"))
            cluster.broker(standins, hinted_only="yes" if hinted else "no")
            cluster.wait_ready(source, destinations, timeout=60)
            before = [d.control.state()["requests"] for d in destinations]
            cpu_before = cluster.cpu_seconds()
            source.control.call("stream", prefix=prefix, count=devices, devices=devices,
                                rate=1000)
            expected = [devices if not hinted else len(range(index % share, devices, share))
                        for index in range(len(destinations))]
            deadline = time.monotonic() + devices / 1000 + DRAIN_SECONDS
            while time.monotonic() < deadline:
                got = [len(d.control.call("writes", prefix=prefix)["writes"])
                       for d in destinations]
                if got == expected:
                    break
                time.sleep(0.1)
            setvars = sum(d.control.state()["requests"] - was
                          for d, was in zip(destinations, before))
            row = Row(f"{'hinted_only' if hinted else 'every device'}: {servers} servers, each "
                      f"hinting 1/{share} of {devices} devices, 1000/s", devices,
                      100.0 * sum(min(g, e) for g, e in zip(got, expected)) / sum(expected),
                      cpu=cluster.cpu_seconds() - cpu_before, rss=cluster.peak_rss_mb())
            row.note = f"{setvars} actions to the {len(destinations)} destinations"
            rows.append(row)
        finally:
            cluster.close()
    return rows


def scenario_memory_and_idle(context: zmq.Context, workdir: str, devices: int) -> List[Row]:
    """Broker RSS once it knows devices devices; then its CPU while nothing happens."""
    cluster = Cluster(context, workdir)
    try:
        source, destination = cluster.standin(), cluster.standin()
        cluster.broker([source, destination])
        cluster.wait_ready(source, [destination], timeout=60)
        # At a rate the broker keeps up with: what it holds, not the backlog of a burst.
        row = stream(cluster, source, [destination], f"memory: {devices} known devices",
                     10_000, devices, drain=60)
        row.p50 = row.p99 = row.worst = None
        broker = cluster.relays[0].pid
        row.rss = process_rss_mb(broker)
        row.note = "RSS now, after they were relayed"
        idle_seconds = 5.0
        cpu_before = process_cpu_seconds(broker)
        time.sleep(idle_seconds)
        idle = Row("idle: broker with 2 servers, nothing happening", 0, 100.0,
                   cpu=process_cpu_seconds(broker) - cpu_before,
                   note=f"CPU over {idle_seconds:.0f} s "
                        f"({100 * (process_cpu_seconds(broker) - cpu_before) / idle_seconds:.2f}%"
                        f" of a core)")
        return [row, idle]
    finally:
        cluster.close()


def rates(topology: str, per_second: List[int], others: int = 0) -> Callable[..., List[Row]]:
    """A scenario of paced streams at each rate (scenario_rates)."""
    return lambda ctx, wd, options: scenario_rates(
        ctx, wd, topology, per_second, 2 if options.quick else 4, others=others,
        known=not options.first_sight)


SCENARIOS: Dict[str, Callable[..., List[Row]]] = {
    "broker": rates("broker", [1000, 3000, 6000]),
    "ami": rates("ami", [1000, 3000, 6000]),
    "agents": rates("agents", [1000, 3000, 6000]),
    "nats": rates("nats", [1000, 3000]),
    "nats-failover": lambda ctx, wd, options: [
        scenario_nats_failover(ctx, wd, 2 if options.quick else 4)],
    "baseline": rates("baseline", [1000, 3000, 6000]),
    "floor": rates("floor", [1000, 3000, 6000]),
    "floor-agents": rates("floor-agents", [1000, 3000, 6000]),
    "floor-nats": rates("floor-nats", [1000, 3000]),
    # A call publishes 34 events through res_zmq_manager, 6 of them states: 5 others per state.
    "calls": lambda ctx, wd, options: [
        row for topology in ("broker", "baseline")
        for row in rates(topology, [1000], others=5)(ctx, wd, options)],
    "burst": lambda ctx, wd, options: [
        scenario_burst(ctx, wd, baseline, 20_000 if options.quick else 100_000)
        for baseline in (False, True)],
    "isolation": lambda ctx, wd, options: [
        scenario_isolation(ctx, wd, baseline=baseline, seconds=2 if options.quick else 5)
        for baseline in (False, True)],
    "nats-hostile": lambda ctx, wd, options: [
        scenario_nats_hostile(ctx, wd, 20_000 if options.quick else 100_000,
                              30 if options.quick else 150)],
    "recovery": lambda ctx, wd, options: scenario_recovery(ctx, wd, 2 if options.quick else 5),
    "hinted": lambda ctx, wd, options: scenario_hinted(ctx, wd, 20, 10,
                                                       1000 if options.quick else 4000),
    "memory": lambda ctx, wd, options: scenario_memory_and_idle(
        ctx, wd, 20_000 if options.quick else 100_000),
}


def print_table(rows: List[Row]) -> None:
    table = [HEADER] + [row.cells() for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(HEADER))]
    for n, line in enumerate(table):
        print("| " + " | ".join(cell.ljust(width) for cell, width in zip(line, widths)) + " |")
        if n == 0:
            print("|" + "|".join("-" * (width + 2) for width in widths) + "|")


# --- the relays bench.py runs itself: the original's algorithm (baseline), and the floors --------

def servers_in(config_path: str) -> List[Dict[str, str]]:
    """The cmd and evt addresses of each server of a broker's config file."""
    parser = configparser.ConfigParser()
    parser.read(config_path)
    sections = [s.strip() for s in parser.get("servers", "sections").split(",")]
    return [{kind: f"tcp://{parser.get(section, 'addr')}:{parser.get(section, kind + '_port')}"
             for kind in ("cmd", "evt")} for section in sections]


def setvar(event: Dict[str, str], action_id: str) -> str:
    return json.dumps({"Action": "Setvar", "ActionID": action_id,
                       "Variable": f"DEVICE_STATE(Custom:{event['Device']})",
                       "Value": event["State"]})


def baseline_broker(config_path: str) -> None:
    """The original's relay: each event to each other server in turn, waiting for each reply."""
    import uuid
    context = zmq.Context()
    servers = []
    poller = zmq.Poller()
    for urls in servers_in(config_path):
        server = {"cmd_url": urls["cmd"]}
        server["evt"] = context.socket(zmq.SUB)
        server["evt"].setsockopt(zmq.SUBSCRIBE, b"{")
        server["evt"].connect(urls["evt"])
        server["cmd"] = context.socket(zmq.REQ)
        server["cmd"].connect(server["cmd_url"])
        poller.register(server["evt"], zmq.POLLIN)
        servers.append(server)
    while True:
        for sock, _ in poller.poll(1000):
            source = next(s for s in servers if s["evt"] is sock)
            event = json.loads(sock.recv())
            if event.get("Event") != "DeviceStateChange" or event["Device"].startswith("Custom:"):
                continue
            action = setvar(event, uuid.uuid4().hex)
            for server in servers:
                if server is source:
                    continue
                server["cmd"].send_string(action)
                if server["cmd"].poll(1000):
                    server["cmd"].recv()
                else:  # lost: close the stuck REQ socket and open a new one
                    server["cmd"].close(linger=0)
                    server["cmd"] = context.socket(zmq.REQ)
                    server["cmd"].connect(server["cmd_url"])


def floor_broker(config_path: str) -> None:
    """The broker's loop, batching under load as the broker does, with nothing else: each
    DeviceStateChange of a device not Custom: is sent on as a Setvar to every other server,
    replies and echoes are read and dropped.  No relay with this loop can cost less."""
    loop = EventLoop(BATCH_INTERVAL)
    context = zmq.Context()
    links = []
    for urls in servers_in(config_path):
        evt, cmd = context.socket(zmq.SUB), context.socket(zmq.DEALER)
        evt.setsockopt(zmq.SUBSCRIBE, b"{")
        evt.connect(urls["evt"])
        cmd.connect(urls["cmd"])
        links.append((evt, cmd))
    action_ids = itertools.count()

    def relay_from(source: zmq.Socket):
        def relay(frames: List[bytes]) -> None:
            if ECHO_MARK in frames[0]:
                return
            event = json.loads(frames[0])
            if event.get("Event") == "DeviceStateChange":
                action = setvar(event, str(next(action_ids))).encode()
                for evt, cmd in links:
                    if evt is not source:
                        send_frames(cmd, (b"", action))
        return lambda: drain(source, relay)

    for evt, cmd in links:
        loop.add_reader(evt, relay_from(evt))
        loop.add_reader(cmd, lambda cmd=cmd: drain(cmd, lambda frames: None))
    loop.run()


def floor_hub(pull_url: str, pub_url: str) -> None:
    """The least a hub does: each message its agents push, published to all of them."""
    loop = EventLoop(BATCH_INTERVAL)
    context = zmq.Context()
    pull, pub = context.socket(zmq.PULL), context.socket(zmq.PUB)
    pull.bind(pull_url)
    pub.bind(pub_url)
    loop.add_reader(pull, lambda: drain(pull, lambda frames: send_frames(pub, frames)))
    loop.run()


def floor_agent(name: str, cmd_url: str, evt_url: str, push_url: str, sub_url: str) -> None:
    """The least an agent behind a hub does, with the broker's loop: the states a wake-up took
    from its Asterisk go to the hub in one message, and each state a peer sent is written as a
    Setvar; replies and echoes are read and dropped."""
    loop = EventLoop(BATCH_INTERVAL)
    context = zmq.Context()
    evt, cmd, push, sub = (context.socket(kind) for kind in (zmq.SUB, zmq.DEALER, zmq.PUSH,
                                                             zmq.SUB))
    evt.setsockopt(zmq.SUBSCRIBE, b"{")
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    for sock, url in ((evt, evt_url), (cmd, cmd_url), (push, push_url), (sub, sub_url)):
        sock.connect(url)
    own, pack, action_ids = name.encode() + b"\n", [], itertools.count()

    def send_pack() -> None:
        send_frames(push, [own + b"\n".join(pack)])
        pack.clear()

    def take_event(frames: List[bytes]) -> None:
        if ECHO_MARK not in frames[0] and json.loads(frames[0]).get("Event") == "DeviceStateChange":
            if not pack:
                loop.soon(send_pack)
            pack.append(frames[0])

    def take_pack(frames: List[bytes]) -> None:
        if not frames[0].startswith(own):
            for line in frames[0].split(b"\n")[1:]:
                send_frames(cmd, (b"", setvar(json.loads(line), str(next(action_ids))).encode()))

    loop.add_reader(evt, lambda: drain(evt, take_event))
    loop.add_reader(sub, lambda: drain(sub, take_pack))
    loop.add_reader(cmd, lambda: drain(cmd, lambda frames: None))
    loop.run()


def floor_nats_agent(name: str, cmd_url: str, evt_url: str, nats_urls: str) -> None:
    """The least an agent over NATS does, in one asyncio loop: its Asterisk's states put in the
    bucket together at most every natsbucket.PUT_INTERVAL (unacknowledged), each change the bucket
    republishes written as a Setvar (the peers'); replies and echoes read and dropped."""
    import asyncio

    import nats
    import zmq.asyncio
    from nats.js.api import RePublish
    from zmqami.natsbucket import PUT_INTERVAL

    async def run() -> None:
        context = zmq.asyncio.Context()
        evt, cmd = context.socket(zmq.SUB), context.socket(zmq.DEALER)
        evt.setsockopt(zmq.SUBSCRIBE, b"{")
        evt.connect(evt_url)
        cmd.connect(cmd_url)
        client = await nats.connect(nats_urls.split(","))
        for _ in range(60):  # (until the cluster has elected its JetStream leader)
            try:
                await client.jetstream().create_key_value(
                    bucket="floor", history=1, replicas=3,
                    republish=RePublish(src="$KV.floor.>", dest="floor.kv.>"))
                break
            except nats.errors.Error:
                await asyncio.sleep(0.5)
        action_ids = itertools.count()

        async def write_change(msg) -> None:
            owner, device = msg.headers["Nats-Subject"].split(".", 3)[2:]
            if owner != name:
                send_frames(cmd, (b"", setvar({"Device": device, "State": msg.data.decode()},
                                             str(next(action_ids))).encode()))

        async def drop_replies() -> None:
            while True:
                await cmd.recv_multipart()

        async def put_states() -> None:
            while True:
                await asyncio.sleep(PUT_INTERVAL)
                for device, state in puts.items():
                    await client.publish(f"$KV.floor.{name}.{device}", state.encode())
                puts.clear()

        async def take_events() -> None:
            while True:
                raw = await evt.recv()
                event = json.loads(raw) if ECHO_MARK not in raw else {}
                if event.get("Event") == "DeviceStateChange":
                    puts[event["Device"]] = event["State"]

        puts: Dict[str, str] = {}
        await client.subscribe("floor.kv.>", cb=write_change)
        await asyncio.gather(take_events(), drop_replies(), put_states())

    asyncio.run(run())


def main() -> int:
    parser = argparse.ArgumentParser(prog="python bench.py", description=__doc__.split("\n")[0])
    parser.add_argument("scenarios", nargs="*", choices=[[]] + list(SCENARIOS),
                        help="scenarios to run (default: all)")
    parser.add_argument("--quick", action="store_true", help="shorter runs")
    parser.add_argument("--first-sight", action="store_true",
                        help="the rate rows stream devices the relays never saw (before "
                             "2026-12-03, every row did): each makes their memory grow")
    parser.add_argument("--baseline-broker", metavar="CONFIG", help=argparse.SUPPRESS)
    parser.add_argument("--floor-broker", metavar="CONFIG", help=argparse.SUPPRESS)
    parser.add_argument("--floor-hub", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--floor-agent", nargs=5, help=argparse.SUPPRESS)
    parser.add_argument("--floor-nats-agent", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    for floor, relay in ((args.floor_hub, floor_hub), (args.floor_agent, floor_agent),
                         (args.floor_nats_agent, floor_nats_agent)):
        if floor:
            relay(*floor)
            return 0
    if args.baseline_broker:
        baseline_broker(args.baseline_broker)
        return 0
    if args.floor_broker:
        floor_broker(args.floor_broker)
        return 0
    context = zmq.Context()
    rows: List[Row] = []
    with tempfile.TemporaryDirectory(prefix="zmq-ami-bench-") as workdir:
        for name in args.scenarios or list(SCENARIOS):
            rows += SCENARIOS[name](context, workdir, args)
    print_table(rows)
    context.destroy(linger=0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
