"""Running under systemd (Type=notify) and being watched: the notify protocol, the package."""
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from harness import ROOT, Script, broker_config, free_port, python_settings, start_agent, wait_until


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
    assert run(sys.executable, "-m", "venv", str(venv)).returncode == 0
    python = venv / "bin" / "python"
    installed = run(str(python), "-m", "pip", "install", "--no-deps", "-q",
                    "--disable-pip-version-check", str(wheel))
    assert installed.returncode == 0, installed.stderr
    # pyzmq, the one dependency, from this environment (the test fetches nothing).
    import zmq
    site = run(str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    (Path(site.stdout.strip()) / "pyzmq-from-tests.pth").write_text(
        os.path.dirname(os.path.dirname(zmq.__file__)) + "\n")
    metadata = run(str(python), "-m", "pip", "show", "zmq-ami-broker")
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
