"""Running under systemd (Type=notify) and being watched: the notify protocol, the package."""
import os
import re
import shutil
import socket
import subprocess
import sys
import zipfile
from pathlib import Path
from urllib.request import urlopen

import pytest

from harness import (ROOT, Script, broker_config, custom_states, free_port, python_settings,
                     run_without, start_agent, wait_until)
from zmqami import __version__


class FakeSystemd:
    """What systemd does for a Type=notify unit: a datagram socket in $NOTIFY_SOCKET."""

    def __init__(self, path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.setblocking(False)
        self.messages = []

    def received(self):
        while True:
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except BlockingIOError:
                return self.messages

    def has(self, line: str) -> bool:
        return any(line in message.splitlines() for message in self.received())

    def count(self, line: str) -> int:
        return sum(line in message.splitlines() for message in self.received())


@pytest.mark.parametrize("program", ["broker", "hub", "agent"])
def test_ready_watchdog_status_and_stopping_reach_systemd(program, standins, hub, tmp_path,
                                                          monkeypatch):
    systemd = FakeSystemd(tmp_path / "notify")
    monkeypatch.setenv("NOTIFY_SOCKET", systemd.path)
    monkeypatch.setenv("WATCHDOG_USEC", "200000")  # WatchdogSec=0.2: a ping every 0.1 s
    a, b = standins(2)
    if program == "broker":
        config = tmp_path / "notify.ini"
        config.write_text(broker_config([a, b]))
        script = Script("broker.py", str(config), log_dir=tmp_path, name="notified")
    elif program == "hub":
        path = python_settings(tmp_path / "notify_hub.py",
                               PUB_BIND_URL=f"tcp://127.0.0.1:{free_port()}",
                               SUB_BIND_URL=f"tcp://127.0.0.1:{free_port()}")
        script = Script("server.py", str(path), log_dir=tmp_path, name="notified")
    else:
        script = start_agent(tmp_path, "N", a, ZMQ_PUB_URL=hub.pull_url,
                             ZMQ_SUB_URL=hub.pub_url)
    wait_until(lambda: systemd.has("READY=1"), message="READY=1")
    wait_until(lambda: systemd.count("WATCHDOG=1") >= 3, message="the watchdog fed")
    assert any(line.startswith("STATUS=") for message in systemd.received()
               for line in message.splitlines())
    assert script.stop() == 0
    assert systemd.has("STOPPING=1")


def test_the_wheel_installs_and_its_commands_run(tmp_path):
    """pip wheel, then a fresh virtualenv with it: zmq-ami-broker --demo and --check-config."""
    source = tmp_path / "source"  # a copy: building writes into the tree it builds
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source)
    shutil.copytree(ROOT / "zmqami", source / "zmqami",
                    ignore=shutil.ignore_patterns("__pycache__"))
    dist, venv = tmp_path / "dist", tmp_path / "venv"
    run = lambda *command: subprocess.run(command, capture_output=True, text=True,  # noqa: E731
                                          timeout=120, cwd=str(tmp_path))
    built = run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                "--disable-pip-version-check", "-q", "-w", str(dist), str(source))
    assert built.returncode == 0, built.stderr
    wheel, = dist.glob("zmq_ami_broker-*.whl")
    with zipfile.ZipFile(wheel) as archive:  # the product only: no test code
        assert not [name for name in archive.namelist()
                    if re.search(r"natscluster|testing/|tests/|PYTEST", name)]
        assert not [name for name in archive.namelist() if name.endswith(".py")
                    and b"PYTEST_XDIST" in archive.read(name)]
    # Without a pip of its own (seconds saved): this environment's pip installs into it.
    assert run(sys.executable, "-m", "venv", "--without-pip", str(venv)).returncode == 0
    python = venv / "bin" / "python"
    installed = run(sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
                    "-q", "--disable-pip-version-check", str(wheel))
    assert installed.returncode == 0, installed.stderr
    # pyzmq, the one dependency, from this environment (the test fetches nothing).
    import zmq
    site = run(str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    (Path(site.stdout.strip()) / "pyzmq-from-tests.pth").write_text(
        os.path.dirname(os.path.dirname(zmq.__file__)) + "\n")
    metadata = run(sys.executable, "-m", "pip", "--python", str(python), "show", "zmq-ami-broker")
    assert "Requires: pyzmq" in metadata.stdout
    bin_dir = venv / "bin"
    demo = run(str(bin_dir / "zmq-ami-broker"), "--demo")
    assert demo.returncode == 0 and "Every change reached every other server" in demo.stdout, \
        demo.stdout + demo.stderr
    check = run(str(bin_dir / "zmq-ami-broker"), "--check-config", str(ROOT / "example_config.ini"))
    assert check.returncode == 0 and "OK (2 servers)" in check.stdout, check.stderr
    for command in ("zmq-ami-hub", "zmq-ami-agent"):
        help_text = run(str(bin_dir / command), "--help").stdout
        assert f"usage: {command}" in help_text and "/etc/zmq-ami/" in help_text
    # The wheel carries no config file: each command prints its commented example, which passes.
    for command, name in (("zmq-ami-broker", "example_config.ini"),
                          ("zmq-ami-hub", "server_config.py"),
                          ("zmq-ami-agent", "agent_config.py")):
        example = run(str(bin_dir / command), "--example-config")
        assert example.returncode == 0 and example.stdout == (ROOT / name).read_text()
        written = tmp_path / name
        written.write_text(example.stdout)
        assert run(str(bin_dir / command), "--check-config", str(written)).returncode == 0


def scrape(port: int) -> dict:
    """GET /metrics, parsed with the client library's own parser: {(name, labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families
    with urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def test_metrics_are_served_and_add_up(standins, broker):
    # Booted already: a LoadZmq during the changes would have them read from its list instead,
    # and counted as a resync, not as events relayed.
    a, b = standins(2, loadzmq_delay=None)
    port = free_port()
    broker([a, b], metrics_port=str(port))
    for i in range(10):
        a.control.set_device(f"SIP/{i}", "INUSE")
    wait_until(lambda: len(custom_states(b)) == 10)

    server = lambda name: (("server", name),)  # noqa: E731

    def settled():  # every write sent acknowledged (a resync may have written some again)
        metrics = scrape(port)
        sent = metrics.get(("zmqami_writes_sent_total", server("server-2")), 0)
        acknowledged = metrics.get(("zmqami_writes_acknowledged_total", server("server-2")))
        return metrics if sent >= 10 and acknowledged == sent else None
    metrics = wait_until(settled, message="the writes acknowledged in the metrics")
    assert metrics[("zmqami_server_up", server("server-1"))] == 1
    assert metrics[("zmqami_server_up", server("server-2"))] == 1
    assert metrics[("zmqami_events_received_total", server("server-1"))] >= 10
    assert metrics[("zmqami_writes_refused_total", server("server-2"))] == 0
    # Pings and list reads are counted on their own, sent and answered alike.
    for kind in ("list", "ping"):
        labels = (("kind", kind), ("server", "server-2"))
        assert metrics[("zmqami_actions_sent_total", labels)] >= \
            metrics[("zmqami_actions_answered_total", labels)] >= 1
    acknowledged = metrics[("zmqami_writes_acknowledged_total", server("server-2"))]
    assert metrics[("zmqami_relay_latency_seconds_count", server("server-2"))] == acknowledged
    assert metrics[("zmqami_relay_latency_seconds_bucket",
                    (("le", "+Inf"), ("server", "server-2")))] == acknowledged
    assert metrics[("zmqami_events_relayed_total", ())] == 10
    assert metrics[("zmqami_known_states", ())] == 10
    assert metrics[("zmqami_queue_length", server("server-2"))] == 0
    assert ("zmqami_build_info", (("program", "broker"), ("version", __version__))) in metrics


def test_metrics_without_the_library_is_one_clear_line(standins, tmp_path):
    a, b = standins(2)
    config = tmp_path / "metrics.ini"
    config.write_text(broker_config([a, b], metrics_port="9999"))
    for args in (["--check-config", str(config)], [str(config)]):
        result = run_without("prometheus_client", tmp_path, "broker.py", *args)
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
        assert "[general] metrics_port: metrics need the prometheus-client library: pip " \
               "install prometheus-client" in result.stderr


def test_hub_and_agent_serve_metrics_too(standins, tmp_path):
    x, = standins(1)
    hub_port, agent_port = free_port(), free_port()
    pull, pub = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    Script("server.py", str(python_settings(tmp_path / "metrics_hub.py", PUB_BIND_URL=pub,
                                            SUB_BIND_URL=pull, METRICS_PORT=hub_port)),
           log_dir=tmp_path, name="metrics_hub")
    start_agent(tmp_path, "M", x, ZMQ_PUB_URL=pull, ZMQ_SUB_URL=pub, METRICS_PORT=agent_port,
                KEEP_ALIVE_INTERVAL=0.2)

    def scraped(port, name, labels=()):
        try:
            return scrape(port).get((name, labels))
        except OSError:  # not listening yet
            return None
    # An agent's Asterisk is labelled with the agent's name: one value per Asterisk in a scrape.
    wait_until(lambda: scraped(agent_port, "zmqami_server_up", (("server", "M"),)) == 1)
    wait_until(lambda: (scraped(hub_port, "zmqami_messages_relayed_total") or 0) > 0)
    wait_until(lambda: (scraped(agent_port, "zmqami_hub_messages_received_total") or 0) > 0)
    assert scraped(agent_port, "process_start_time_seconds") > 0  # the standard collector
    if shutil.which("promtool"):  # as an administrator checks an exporter (Debian: prometheus)
        for port in (hub_port, agent_port):
            check_with_promtool(port)


def check_with_promtool(port: int) -> None:
    with urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read()
    result = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True)
    assert result.returncode == 0, (result.stdout + result.stderr).decode()


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed "
                    "(Debian: apt install prometheus)")
def test_the_shipped_alert_rules_and_the_brokers_metrics_pass_promtool(standins, broker):
    result = subprocess.run(["promtool", "check", "rules",
                             str(ROOT / "contrib/prometheus/zmq-ami-rules.yml")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    a, b = standins(2)
    port = free_port()
    broker([a, b], metrics_port=str(port))
    def served() -> bytes:
        try:
            with urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
                return response.read()
        except OSError:  # not listening yet (a busy machine: the test asked too early)
            return b""
    wait_until(lambda: b"zmqami_server_up" in served())
    check_with_promtool(port)
