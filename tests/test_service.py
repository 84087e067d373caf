"""Running under systemd (Type=notify) and being watched: the notify protocol, the package."""
import os
import signal
import socket
import subprocess
import sys

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
