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

from testing.natscluster import free_port  # noqa: F401  (one for tests, bench and NATS)
from zmqami.ami import AmiParser, format_action
from zmqami.asterisk import EVENT_SUBSCRIPTIONS
from zmqami.loop import STALL

ROOT = Path(__file__).resolve().parents[1]
DEADLINE = 30.0  # seconds: generous, so that a busy CI machine never fails a test by timing


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


def converge(label: str, condition: Callable[[], object], timeout: float = DEADLINE) -> None:
    """wait_until, printing how long it took (pytest -s shows it; never asserted)."""
    started = time.monotonic()
    wait_until(condition, timeout, label)
    print(f"converged: {label}: {time.monotonic() - started:.2f} s")




STARTED: List["Script"] = []  # every script started, so that each test can end its own


def kill_all_scripts() -> None:
    """Kill every script still running: none may outlive its test (a later test could reuse
    its ports and receive its traffic)."""
    while STARTED:
        STARTED.pop().kill()


class Script:
    """python <script> <args>, run from the project's root, its output kept in a file."""

    def __init__(self, script: str, *args: str, log_dir: Path, name: Optional[str] = None) -> None:
        self.script, self.args, self.log_dir = script, args, log_dir
        self.name = name or Path(script).stem
        self.log_path = log_dir / f"{self.name}.log"
        self._log = open(self.log_path, "wb")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen([sys.executable, str(ROOT / script), *args], cwd=str(ROOT),
                                     stdout=self._log, stderr=subprocess.STDOUT, env=env)
        STARTED.append(self)

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

    def restart(self) -> "Script":
        """kill -9, then the same command again (its output in a new file)."""
        self.kill()
        return Script(self.script, *self.args, log_dir=self.log_dir, name=self.name + "+")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if not self._log.closed:
            self._log.close()


def run_script(script: str, *args: str, timeout: float = DEADLINE) -> subprocess.CompletedProcess:
    """Run a script to its end, as a user does, and return its exit status and output."""
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=str(ROOT),
                          capture_output=True, text=True, timeout=timeout)


def run_without(package: str, tmp_path: Path, script: str, *args: str
                ) -> subprocess.CompletedProcess:
    """run_script as on a machine where package (an optional library) is not installed."""
    blocker = tmp_path / f"without_{package}"
    (blocker / package).mkdir(parents=True, exist_ok=True)
    (blocker / package / "__init__.py").write_text("raise ImportError('absent')\n")
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=str(ROOT),
                          env=dict(os.environ, PYTHONPATH=str(blocker)),
                          capture_output=True, text=True, timeout=DEADLINE)


AMI_USER, AMI_SECRET = "zmq-ami", "stand-in-secret"  # the stand-in's manager user


# A relay's subscriptions to res_zmq_manager (ami_trace: one, to everything).  ZeroMQ sends them
# together on each connection; a test waits for all before it publishes.
SUBSCRIBED = len(EVENT_SUBSCRIPTIONS)


def subscribed(standin, count: int = SUBSCRIBED) -> bool:
    """Every subscription of a relay (count of them) has reached this stand-in."""
    return standin.control.state()["subscriptions"] >= count


def broker_config(servers: list, names: Optional[List[str]] = None, ami=(), ami_secret=AMI_SECRET,
                  server_keys: Optional[Dict[int, Dict[str, str]]] = None, **general: str) -> str:
    """The text of a broker config.ini for these stand-ins (those whose index is in ami over AMI)."""
    names = names or [f"server-{i + 1}" for i in range(len(servers))]
    lines = ["[general]"] + [f"{key} = {value}" for key, value in general.items()]
    lines += ["[servers]", "sections = " + ", ".join(names)]
    for index, (name, standin) in enumerate(zip(names, servers)):
        lines += [f"[{name}]", f"name = {name}", "addr = 127.0.0.1"]
        if index in ami:
            lines += [f"ami_user = {AMI_USER}", f"ami_secret = {ami_secret}",
                      f"ami_port = {standin.ami_port}"]
        else:
            lines += [f"cmd_port = {standin.cmd_port}", f"evt_port = {standin.evt_port}"]
        lines += [f"{key} = {value}" for key, value in (server_keys or {}).get(index, {}).items()]
    return "\n".join(lines) + "\n"


def start_agent(tmp_path: Path, name: str, standin, ami: bool = False, host: str = "127.0.0.1",
                **settings) -> Script:
    """python agent.py for a stand-in, with its own settings file and pid file; settings
    (ZMQ_PUB_URL, ZMQ_SUB_URL at least) are added to the file."""
    host = f"[{host}]" if ":" in host else host
    asterisk = dict(ASTERISK_AMI_URL=f"tcp://{host}:{standin.ami_port}", ASTERISK_AMI_USER=AMI_USER,
                    ASTERISK_AMI_SECRET=AMI_SECRET) if ami else {}
    config = python_settings(
        tmp_path / f"agent_{name}.py", SYSTEM_NAME=name, LOG_LEVEL="info",
        ASTERISK_CMD_URL=f"tcp://{host}:{standin.cmd_port}",
        ASTERISK_EVT_URL=f"tcp://{host}:{standin.evt_port}",
        PID_FILE=str(tmp_path / f"agent_{name}.pid"), **asterisk, **settings)
    return Script("agent.py", str(config), log_dir=tmp_path, name=f"agent_{name}")


def setvars(standin) -> List[Dict]:
    """The Setvar requests a stand-in received, decoded."""
    return [json.loads(r) for r in standin.control.requests() if '"Setvar"' in r or '"SetVar"' in r]


def python_settings(path: Path, **settings) -> Path:
    """Write a Python settings file (agent_config.py or server_config.py style)."""
    path.write_text("".join(f"{key} = {value!r}\n" for key, value in settings.items()))
    return path


class HubClient:
    """A client of the hub written the way the original Python 2 agents wrote their messages."""

    def __init__(self, context, hub, name: str = "client", topics=None) -> None:
        import zmq
        self.name = name
        self.push = context.socket(zmq.PUSH)
        self.push.setsockopt(zmq.LINGER, 0)
        self.push.setsockopt(zmq.SNDTIMEO, 10_000)  # a dead hub fails the test, never hangs it
        self.push.connect(hub.pull_url)
        self.sub = context.socket(zmq.SUB)
        self.sub.setsockopt(zmq.LINGER, 0)
        for topic in topics if topics is not None else [f"[{name}]"]:
            self.sub.setsockopt(zmq.SUBSCRIBE, topic.encode())
        self.sub.connect(hub.pub_url)
        self.topics = topics
        self.received: List = []
        if topics is not None:
            self.wait_subscribed()

    def wait_subscribed(self) -> None:
        """Send to our own first topic until it comes back: the subscription has reached the hub."""
        target = self.topics[0].strip("[]")
        wait_until(lambda: self.send(target, "HarnessSync") and self.find("HarnessSync"),
                   message=f"{self.name}'s subscription to {self.topics[0]}")

    def send_frames(self, *frames: bytes, refused: bool = False) -> None:
        """refused: the hub may have refused our connection (an intruder's key): then the PUSH
        socket has no peer and would block, so the message is offered without waiting, and
        dropped if there is no connection to take it."""
        import zmq
        try:
            self.push.send_multipart(list(frames), zmq.NOBLOCK if refused else 0)
        except zmq.Again:
            if not refused:
                raise

    def send(self, target: str, msg_type: str, origin: Optional[str] = None,
             refused: bool = False, **fields) -> str:
        """A message exactly as the original's ZmqMessage.dump() built it; returns its uuid."""
        import uuid
        body = {"msg_type": msg_type, "uuid": uuid.uuid4().hex, "origin": origin or self.name}
        body.update({"x_" + key: value for key, value in fields.items()})
        self.send_frames(f"[{target}]".encode(), json.dumps(body).encode(), refused=refused)
        return body["uuid"]

    def poll(self, timeout_ms: int = 10) -> None:
        while self.sub.poll(timeout_ms):
            target, body = self.sub.recv_multipart()
            self.received.append((target.decode(), json.loads(body)))
            timeout_ms = 0

    def find(self, msg_type: str, origin: Optional[str] = None) -> List[Dict]:
        self.poll()
        return [body for _, body in self.received if body.get("msg_type") == msg_type
                and (origin is None or body.get("origin") == origin)]

    def wait_for(self, msg_type: str, origin: Optional[str] = None, timeout: float = DEADLINE):
        return wait_until(lambda: self.find(msg_type, origin), timeout,
                          f"{msg_type} from {origin or 'anyone'}")[0]

    def ping_until_pong(self, agent: str, timeout: float = DEADLINE) -> Dict:
        """AgentPing to [agent] until its AgentPong comes back: both ways through the hub work."""
        def pong():
            self.send(agent, "AgentPing")
            return self.find("AgentPong", agent)
        return wait_until(pong, timeout, f"AgentPong from {agent}")[0]

    def close(self) -> None:
        self.push.close()
        self.sub.close()


def device_event(device: str = "SIP/100", state: str = "INUSE") -> Dict[str, str]:
    """A DeviceStateChange as Asterisk publishes it."""
    return {"Event": "DeviceStateChange", "Privilege": "call,all", "Device": device, "State": state}


def presence_event(presentity: str = "CustomPresence:100", status: str = "away",
                   subtype: str = "", message: str = "Lunch") -> Dict[str, str]:
    """A PresenceStateChange as Asterisk publishes it."""
    return {"Event": "PresenceStateChange", "Privilege": "call,all", "Presentity": presentity,
            "Status": status, "Subtype": subtype, "Message": message}


def mirrored(standin, device: str, state: str) -> Callable[[], bool]:
    """A condition: the stand-in's mirror of device (Custom:<device>) shows state."""
    return lambda: custom_states(standin).get("Custom:" + device) == state


def all_mirrored(standin, devices: List[str], state: str) -> Callable[[], bool]:
    """A condition: the stand-in's mirrors of all these devices show state."""
    def condition() -> bool:
        mirrors = custom_states(standin)
        return all(mirrors.get("Custom:" + device) == state for device in devices)
    return condition


def ami_session(port: int, data: bytes) -> List:
    """Send data on a new AMI connection; the messages received until the server closes it
    (data ends with a Logoff)."""
    parser, received, closed = AmiParser(), [], []
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        conn.sendall(data)

        def done():
            conn.settimeout(0.05)
            try:
                chunk = conn.recv(65536)
                closed.extend([True] if not chunk else [])
                received.extend(parser.feed(chunk))
            except socket.timeout:
                pass
            return closed
        wait_until(done, message="the AMI server to answer and close")
    return received


def run_actions(standin, *actions: Dict[str, str], user: str = AMI_USER,
                secret: str = AMI_SECRET) -> List:
    """Log in to a stand-in's AMI, run these actions, log off: what it answered."""
    login = {"Action": "Login", "Username": user, "Secret": secret, "Events": "off"}
    return ami_session(standin.ami_port, b"".join(
        format_action(action) for action in (login, *actions, {"Action": "Logoff"})))


def custom_states(standin) -> Dict[str, str]:
    """The Custom: devices of a stand-in: the mirrors written on it."""
    return {d: s for d, s in standin.control.devices().items() if d.startswith("Custom:")}


def restart(processes, standin, name, **options):
    """kill -9 a stand-in process, then start it again on the same ports with its database."""
    standin.kill()
    ports = dict(cmd_port=standin.cmd_port, evt_port=standin.evt_port, **options)
    if standin.ami_port is not None:
        ports["ami_port"] = standin.ami_port
    return processes(name, **ports)


def play(source, count: int, devices: int, prefix: str = "SIP/") -> Dict[str, str]:
    """count state changes over devices on source; returns the final mirror states."""
    expected = {}
    for i in range(count):
        state = ("RINGING", "INUSE", "NOT_INUSE", "BUSY")[i % 4]
        source.control.set_device(f"{prefix}{i % devices}", state)
        expected[f"Custom:{prefix}{i % devices}"] = state
    return expected


def flood_while_stopped(script: "Script", standin, devices: int = 500) -> Dict[str, str]:
    """Stop script (SIGSTOP) while standin publishes more events than ZeroMQ's high-water marks
    and the kernel's buffers hold (about 5 MB; about 3 MB got through here), then one final
    state per device, and keep it stopped for STALL and two seconds in all (a VM paused that
    long); then let it run on.
    Returns the mirrors the final states should give.  res_zmq_manager's PUB drops what a
    subscriber so far behind has not read: the final states never reach the script."""
    stopped_at = time.monotonic()
    os.kill(script.proc.pid, signal.SIGSTOP)
    try:
        for count, states in ((50_000, ["INUSE", "NOT_INUSE"]), (devices, ["BUSY"])):
            standin.control.call("stream", prefix="F/", count=count, devices=devices,
                                 rate=10**9, states=states)
            wait_until(lambda: standin.control.call("stream_status")["done"],
                       message="the stand-in to publish its flood")
        # The fault's length, not a synchronisation: the pause must outlast STALL and the
        # loop's longest wait (1 s, its health checks).
        wait_until(lambda: time.monotonic() > stopped_at + STALL + 2, message="the pause")
    finally:
        os.kill(script.proc.pid, signal.SIGCONT)
    return {f"Custom:F/{i}": "BUSY" for i in range(devices)}


def flood_until_packed(source, destination, monitor, name: str) -> None:
    """Change 50 of source's devices at once, until its agent (name) sent some together."""
    devices = [f"SIP/{i}" for i in range(50)]
    for attempt in range(20):
        state = ("INUSE", "BUSY")[attempt % 2]
        source.control.set_devices({device: state for device in devices})
        wait_until(all_mirrored(destination, devices, state), message=f"50 devices {state}")
        if monitor.find("AsteriskEvents", name):
            return
    raise AssertionError(f"{name} never sent states together")
