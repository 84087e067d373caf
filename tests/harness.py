"""Test harness: run the scripts as a user does, and wait for conditions with a deadline."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
DEADLINE = 10.0  # seconds: generous, so that a slow CI machine never fails a test by timing


def wait_until(condition: Callable[[], object], timeout: float = DEADLINE,
               message: str = "condition") -> object:
    """Call condition until it returns something true, or fail after timeout seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {message}")
        time.sleep(0.01)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Script:
    """python <script> <args>, run from the project's root, its output kept in a file."""

    def __init__(self, script: str, *args: str, log_dir: Path, name: Optional[str] = None) -> None:
        self.name = name or Path(script).stem
        self.log_path = log_dir / f"{self.name}.log"
        self._log = open(self.log_path, "wb")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen([sys.executable, str(ROOT / script), *args], cwd=str(ROOT),
                                     stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def output(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def lines(self, text: str) -> List[str]:
        return [line for line in self.output().splitlines() if text in line]

    def wait_for_output(self, text: str, timeout: float = DEADLINE) -> str:
        def found() -> Optional[str]:
            if self.proc.poll() is not None and text not in self.output():
                raise AssertionError(f"{self.name} exited ({self.proc.returncode}) without "
                                     f"printing {text!r}:\n{self.output()}")
            lines = self.lines(text)
            return lines[0] if lines else None
        return wait_until(found, timeout, f"{text!r} from {self.name}")

    def stop(self, signum: int = signal.SIGTERM, timeout: float = DEADLINE) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signum)
        try:
            return self.proc.wait(timeout)
        finally:
            self.kill()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


def run_script(script: str, *args: str, timeout: float = DEADLINE) -> subprocess.CompletedProcess:
    """Run a script to its end, as a user does, and return its exit status and output."""
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=str(ROOT),
                          capture_output=True, text=True, timeout=timeout)


def broker_config(servers: list, names: Optional[List[str]] = None, **general: str) -> str:
    """The text of a broker config.ini for these stand-ins."""
    names = names or [f"server-{i + 1}" for i in range(len(servers))]
    lines = ["[general]"] + [f"{key} = {value}" for key, value in general.items()]
    lines += ["[servers]", "sections = " + ", ".join(names)]
    for name, standin in zip(names, servers):
        lines += [f"[{name}]", f"name = {name}", "addr = 127.0.0.1",
                  f"cmd_port = {standin.cmd_port}", f"evt_port = {standin.evt_port}"]
    return "\n".join(lines) + "\n"


def setvars(standin) -> List[Dict]:
    """The Setvar requests a stand-in received, decoded."""
    return [json.loads(r) for r in standin.control.requests() if '"Setvar"' in r or '"SetVar"' in r]
