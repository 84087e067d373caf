"""Stand-in Asterisk servers as the tests and the benchmarks run them: each in a process of its
own (start_standin_process), able to publish a paced stream of events (the benchmarks' load).

The stand-in itself is zmqami.standin (the demo uses it too); this is what only tests need.
"""
import json
import os
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional

import zmq

from zmqami import standin
from zmqami.standin import LOADZMQ_DELAY, Standin, StandinAsterisk, StandinControl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The events of a call other than its states, as a captured one (Asterisk 20, a SIP phone called:
# 34 events, 6 of them DeviceStateChange) had them: what a stream with ``others`` mixes in.
_CHANNEL = {"Privilege": "call,all", "Channel": "SIP/100-00000000", "ChannelState": "5",
            "ChannelStateDesc": "Ringing", "CallerIDNum": "999", "CallerIDName": "Lab",
            "ConnectedLineNum": "999", "ConnectedLineName": "Lab", "Language": "en",
            "AccountCode": "", "Context": "test", "Exten": "", "Priority": "1",
            "Uniqueid": "1795726106.0", "Linkedid": "1795726106.0"}
CALL_EVENTS = [{"Event": "Newchannel", **_CHANNEL},
               {"Event": "VarSet", **_CHANNEL, "Privilege": "dialplan,all",
                "Variable": "SIPCALLID", "Value": "2d5a9c1e46b3f0a7"},
               {"Event": "Newexten", **_CHANNEL, "Privilege": "dialplan,all", "Extension": "100",
                "Application": "Dial", "AppData": "SIP/100,30"},
               {"Event": "Newstate", **_CHANNEL},
               {"Event": "Hangup", **_CHANNEL, "Cause": "16", "Cause-txt": "Normal Clearing"}]


class StreamingStandin(StandinAsterisk):
    """A stand-in whose control socket also takes ``stream``: count DeviceStateChange events
    at a steady rate, each one's time noted (``stream_status``)."""

    def __init__(self, *args: Any, **options: Any) -> None:
        super().__init__(*args, **options)
        self.stream: Optional[Dict[str, Any]] = None

    def _control_stream(self, command: Dict[str, Any]) -> Dict[str, Any]:
        """Publish count DeviceStateChange events at rate per second, over devices devices;
        with others, that many of a call's other events before each (CALL_EVENTS)."""
        self.stream = dict(command, start=time.monotonic(), sent=[], timer=None)
        self.stream["timer"] = self.loop.call_every(0.001, self._stream_tick)
        self._stream_tick()
        return {}

    def _stream_tick(self) -> None:
        stream = self.stream
        sent, count = stream["sent"], stream["count"]
        due = min(count, int((time.monotonic() - stream["start"]) * stream["rate"]) + 1)
        states = stream.get("states", ["INUSE", "NOT_INUSE"])
        while len(sent) < due:
            i = len(sent)
            device = f"{stream['prefix']}{i % stream['devices']}"
            state = states[(i // stream["devices"]) % len(states)]
            self.devices[device] = state
            for n in range(stream.get("others", 0)):
                self.publish(CALL_EVENTS[(i + n) % len(CALL_EVENTS)])
            self.publish({"Event": "DeviceStateChange", "Privilege": "call,all",
                          "Device": device, "State": state})
            sent.append(time.monotonic())
        if len(sent) == count:
            stream["timer"].cancel()

    def _control_stream_status(self, command: Dict[str, Any]) -> Dict[str, Any]:
        stream = self.stream
        done = stream is not None and len(stream["sent"]) == stream["count"]
        return {"done": done, "sent": stream["sent"] if done and command.get("times") else [],
                "count": len(stream["sent"]) if stream else 0}


def start_standin_process(context: zmq.Context, cmd_port: int = 0, evt_port: int = 0,
                          control_port: int = 0, state_file: Optional[str] = None,
                          mode: str = "normal", delay_ms: int = 0,
                          ami_port: Optional[int] = None, ami_chunk: int = 0,
                          loadzmq_delay: Optional[float] = LOADZMQ_DELAY,
                          modules_delay: float = 0.0, voicemail: Optional[str] = None) -> Standin:
    """Start a stand-in Asterisk in its own process (python -m testing.standins)."""
    command = [sys.executable, "-m", "testing.standins", "--cmd-port", str(cmd_port),
               "--evt-port", str(evt_port), "--control-port", str(control_port),
               "--mode", mode, "--delay-ms", str(delay_ms), "--ami-chunk", str(ami_chunk),
               "--modules-delay", str(modules_delay)]
    if loadzmq_delay is not None:
        command += ["--loadzmq-delay", str(loadzmq_delay)]
    else:
        command += ["--boot-on-command"]
    if state_file:
        command += ["--state-file", state_file]
    if ami_port is not None:
        command += ["--ami-port", str(ami_port)]
    if voicemail is not None:
        command += ["--voicemail", voicemail]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, cwd=ROOT)
    line = process.stdout.readline()
    if not line:
        process.wait(5)
        raise RuntimeError(f"the stand-in Asterisk did not start (status {process.returncode})")
    ports = json.loads(line)
    return Standin(ports["cmd_port"], ports["evt_port"],
                   StandinControl(context, ports["control_port"]), process=process,
                   ami_port=ports.get("ami_port"))


def main(argv: Optional[List[str]] = None) -> int:
    return standin.main(argv, StreamingStandin)


if __name__ == "__main__":
    sys.exit(main())
