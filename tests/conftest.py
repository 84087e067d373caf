import sys
from pathlib import Path
from typing import Callable, List

import pytest
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Script, broker_config, wait_until  # noqa: E402
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
        config = tmp_path / "config.ini"
        config.write_text(broker_config(servers, **general))
        script = Script("broker.py", str(config), log_dir=tmp_path)
        running.append(script)
        wait_until(lambda: all(s.control.state()["subscriptions"] >= 1 for s in servers)
                   or script.proc.poll() is not None, message="the broker to subscribe")
        assert script.proc.poll() is None, script.output()
        return script

    yield start
    for script in running:
        script.kill()
