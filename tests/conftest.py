import sys
from pathlib import Path
from typing import Callable, List

import pytest
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (HubClient, Script, broker_config, free_port, python_settings,  # noqa: E402
                     wait_until)
from zmqami.standin import Standin, start_standin  # noqa: E402


@pytest.fixture
def context():
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


@pytest.fixture
def standins(context) -> Callable[[int], List[Standin]]:
    """standins(n): n stand-in Asterisk servers on free 127.0.0.1 ports, stopped afterwards."""
    started: List[Standin] = []

    def start(count: int, **options) -> List[Standin]:
        new = [start_standin(context, **options) for _ in range(count)]
        started.extend(new)
        return new

    yield start
    for standin in started:
        standin.stop()


@pytest.fixture
def broker(tmp_path):
    """broker(servers, **general): python broker.py <config> on these stand-ins, subscribed."""
    running: List[Script] = []

    def start(servers: List[Standin], **general: str) -> Script:
        config = tmp_path / f"config{len(running)}.ini"
        config.write_text(broker_config(servers, **general))
        script = Script("broker.py", str(config), log_dir=tmp_path)
        running.append(script)
        running_servers = [s for s in servers if s.control is not None]  # not the dead ones
        wait_until(lambda: all(s.control.state()["subscriptions"] >= 1 for s in running_servers)
                   or script.proc.poll() is not None, message="the broker to subscribe")
        assert script.proc.poll() is None, script.output()
        return script

    yield start
    for script in running:
        script.kill()


class RunningHub:
    def __init__(self, script: Script, pub_port: int, pull_port: int) -> None:
        self.script = script
        self.pub_url = f"tcp://127.0.0.1:{pub_port}"
        self.pull_url = f"tcp://127.0.0.1:{pull_port}"


@pytest.fixture
def hub(tmp_path):
    """python server.py <settings> on free 127.0.0.1 ports, started."""
    pub_port, pull_port = free_port(), free_port()
    settings = python_settings(tmp_path / "server_config.py", LOG_LEVEL="info",
                               PUB_BIND_URL=f"tcp://127.0.0.1:{pub_port}",
                               SUB_BIND_URL=f"tcp://127.0.0.1:{pull_port}")
    script = Script("server.py", str(settings), log_dir=tmp_path)
    script.wait_for_output("Started")
    yield RunningHub(script, pub_port, pull_port)
    script.kill()


@pytest.fixture
def agents(tmp_path, hub, context):
    """agents(standins, **settings): one python agent.py per stand-in, named X, Y, Z..., ready."""
    running: List[Script] = []
    client = HubClient(context, hub, name="harness")

    def start(servers: List[Standin], names: str = "XYZW", **settings) -> List[Script]:
        new = []
        for name, standin in zip(names, servers):
            config = python_settings(
                tmp_path / f"agent_{name}.py", SYSTEM_NAME=name, LOG_LEVEL="info",
                ASTERISK_CMD_URL=f"tcp://127.0.0.1:{standin.cmd_port}",
                ASTERISK_EVT_URL=f"tcp://127.0.0.1:{standin.evt_port}",
                ZMQ_PUB_URL=hub.pull_url, ZMQ_SUB_URL=hub.pub_url,
                PID_FILE=str(tmp_path / f"agent_{name}.pid"), **settings)
            script = Script("agent.py", str(config), log_dir=tmp_path, name=f"agent_{name}")
            running.append(script)
            new.append(script)
        for name, standin in zip(names, servers):
            client.ping_until_pong(name)
            wait_until(lambda: standin.control.state()["subscriptions"] >= 1,
                       message=f"agent {name} to subscribe to its Asterisk")
        return new

    yield start
    client.close()
    for script in running:
        script.kill()
