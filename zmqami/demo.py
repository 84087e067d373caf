"""``python broker.py --demo``: the broker at work on three stand-in Asterisk servers.

Starts three stand-in servers on free 127.0.0.1 ports, runs ``python broker.py`` on them as a user
would, plays a few phones, a presence and a voicemail, and shows each state arriving on the
other servers, as the Custom: device (presence, voicemail lamp) Asterisk would show there.  The
first server runs app_voicemail, the two others res_mwi_external.  Ends by itself after a few
seconds, or on Ctrl-C.
"""
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Set, Tuple

import zmq

from .config import PROJECT_DIR, program_name
from .standin import AMI_SECRET, AMI_USER, HOST, Standin, start_standin

SERVERS = ("asterisk-1", "asterisk-2", "asterisk-3")
STEP_DEADLINE = 3.0  # seconds to wait for a change to show on every other server

# (server index, what changes, device or presentity, new state)
SCRIPT = [
    (0, "device", "PJSIP/100", "RINGING"),
    (0, "device", "PJSIP/100", "INUSE"),
    (1, "device", "PJSIP/alice", "BUSY"),
    (2, "presence", "CustomPresence:300", ("away", "lunch", "Back at 2, promise")),
    (0, "mailbox", "100@default", (1, 0)),
    (0, "device", "PJSIP/100", "NOT_INUSE"),
]
VOICEMAIL = ("voicemail", "external", "external")  # app_voicemail on the first, lamps elsewhere


def _config_text(standins: List[Standin]) -> str:
    lines = ["[general]", "device_state = yes", "presence = yes", "mwi = yes",
             "log_level = warning", "[servers]", "sections = " + ", ".join(SERVERS)]
    for name, standin, role in zip(SERVERS, standins, VOICEMAIL):  # over plain AMI
        lines += [f"[{name}]", f"name = {name}", f"addr = {HOST}", f"ami_user = {AMI_USER}",
                  f"ami_secret = {AMI_SECRET}", f"ami_port = {standin.ami_port}"]
        if role == "voicemail":  # (its lamps are read, never written)
            lines.append("mwi_write = none")
    return "\n".join(lines) + "\n"


class Observer:
    """Watches every stand-in's events, as an administrator watching the Asterisk consoles."""

    def __init__(self, context: zmq.Context, standins: List[Standin]) -> None:
        self.poller = zmq.Poller()
        self.servers: Dict[zmq.Socket, str] = {}
        for name, standin in zip(SERVERS, standins):
            sock = context.socket(zmq.SUB)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SUBSCRIBE, b"")
            sock.connect(f"tcp://{HOST}:{standin.evt_port}")
            self.poller.register(sock, zmq.POLLIN)
            self.servers[sock] = name

    def wait_for(self, expected: Set[Tuple[str, str, str]], started: float) -> Set:
        """Print each expected (server, mirror, value) as it shows; return those that never did."""
        deadline = time.monotonic() + STEP_DEADLINE
        while expected and time.monotonic() < deadline:
            for sock, _ in self.poller.poll(100):
                seen = _mirror_of(json.loads(sock.recv()))
                item = (self.servers[sock],) + seen if seen else None
                if item in expected:
                    expected.discard(item)
                    elapsed = (time.monotonic() - started) * 1000
                    print(f"      -> {item[0]} now shows {item[1]} = {item[2]}"
                          f"   ({elapsed:.1f} ms later)")
        return expected

    def close(self) -> None:
        for sock in self.servers:
            sock.close()


def _mirror_of(event: Dict[str, str]) -> Optional[Tuple[str, str]]:
    if event.get("Event") == "DeviceStateChange" and event.get("Device", "").startswith("Custom:"):
        return event["Device"], event["State"]
    if event.get("Event") == "PresenceStateChange":
        return event["Presentity"], _presence_text(event["Status"], event["Subtype"], event["Message"])
    if event.get("Event") == "MessageWaiting":
        return f"the lamp of {event['Mailbox']}", _lamp_text(int(event["New"]), int(event["Old"]))
    return None


def _lamp_text(new: int, old: int) -> str:
    return f"{'on' if new else 'off'} ({new} new, {old} old)"


def _presence_text(status: str, subtype: str, message: str) -> str:
    return f"{status} ({subtype}: {message})"


def _wait_until_connected(standins: List[Standin], broker: subprocess.Popen) -> None:
    """Until the broker has logged in to every stand-in and the observer subscribed to each."""
    deadline = time.monotonic() + 10
    while any(s.control.state()["subscriptions"] < 1 or s.control.state()["ami_sessions"] < 1
              for s in standins):
        if broker.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the broker did not connect to the stand-in servers")
        time.sleep(0.02)


def _play(observer: Observer, standins: List[Standin]) -> bool:
    everything_arrived = True
    for index, kind, name, state in SCRIPT:
        source = SERVERS[index]
        others = [server for server in SERVERS if server != source]
        started = time.monotonic()
        if kind == "device":
            print(f"\n  {source}: phone {name} is now {state}")
            standins[index].control.set_device(name, state)
            expected = {(server, "Custom:" + name, state) for server in others}
        elif kind == "presence":
            print(f"\n  {source}: {name} sets presence {_presence_text(*state)}")
            standins[index].control.set_presence(name, *state)
            expected = {(server, name, _presence_text(*state)) for server in others}
        else:
            print(f"\n  {source}: a voicemail for {name}: {state[0]} new, {state[1]} old")
            standins[index].control.set_mailbox(name, *state)
            expected = {(server, f"the lamp of {name}", _lamp_text(*state)) for server in others
                        if VOICEMAIL[SERVERS.index(server)] == "external"}
        for server, mirror, value in sorted(observer.wait_for(expected, started)):
            everything_arrived = False
            print(f"      !! {server} did not show {mirror} = {value}")
    return everything_arrived


def _print_mirrors(standins: List[Standin]) -> None:
    print("\nWhat each server holds now (Custom: devices are the mirrors the broker wrote):")
    states = [standin.control.devices() for standin in standins]
    devices = sorted({device for state in states for device in state})
    print((f"    {'device':<22}" + "".join(f"{name:<14}" for name in SERVERS)).rstrip())
    for device in devices:
        print((f"    {device:<22}" + "".join(f"{state.get(device, '-'):<14}"
                                            for state in states)).rstrip())


def run_demo() -> int:
    context = zmq.Context()
    standins = [start_standin(context, ami_port=0, voicemail=role) for role in VOICEMAIL]
    workdir = tempfile.mkdtemp(prefix="zmq-ami-broker-demo-")
    config_path = os.path.join(workdir, "demo_config.ini")
    with open(config_path, "w", encoding="utf-8") as handle:
        handle.write(_config_text(standins))

    print("zmq-ami-broker demo: three stand-in Asterisk servers on 127.0.0.1, "
          "and the broker between them, as")
    print(f"    {program_name('broker.py')} config.ini")
    # (the file itself is temporary, removed at exit: its text, to start from)
    print("with this config.ini (example_config.ini explains each key):\n")
    print("".join(f"    {line}\n" for line in _config_text(standins).splitlines() if line))
    broker = subprocess.Popen([sys.executable, "-m", "zmqami.broker", config_path],
                              cwd=PROJECT_DIR)  # (from a checkout; installed, from anywhere)
    # Ctrl-C reaches the broker too (same process group) and stops it; here it is KeyboardInterrupt.
    observer = Observer(context, standins)
    ok = False
    try:
        _wait_until_connected(standins, broker)
        ok = _play(observer, standins)
        _print_mirrors(standins)
        print("\nEvery change reached every other server." if ok else
              "\nSome changes did not arrive: see the broker's messages above.")
    except KeyboardInterrupt:
        print("\nInterrupted.")
        ok = True
    finally:
        broker.terminate()
        broker.wait(10)
        observer.close()
        for standin in standins:
            standin.stop()
        context.destroy(linger=0)
        os.unlink(config_path)
        os.rmdir(workdir)
    return 0 if ok else 1
