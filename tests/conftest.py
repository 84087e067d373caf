from typing import Callable, List

import pytest
import zmq
from hypothesis import HealthCheck, settings

from harness import (SUBSCRIBED, HubClient, Script, broker_config, free_port, kill_all_scripts,
                     python_settings, start_agent, subscribed, wait_until)
from testing.standins import start_standin_process
from zmqami.standin import Standin, start_standin

# The suite runs on busy, shared machines: Hypothesis keeps its number of examples but never fails
# a test for being slow (no deadline, no too_slow or data-size health checks).
settings.register_profile("suite", deadline=None, suppress_health_check=[
    HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture])
settings.load_profile("suite")


LOG_TAIL_LINES = 12  # of each log of a failed test, in its report (CI keeps nothing else)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test's report ends with the last lines of the logs it left in its tmp_path
    (scripts, nats-server): what the processes saw is what explains a failure on CI."""
    outcome = yield
    report = outcome.get_result()
    tmp_path = item.funcargs.get("tmp_path") if hasattr(item, "funcargs") else None
    if report.when != "call" or not report.failed or tmp_path is None:
        return
    for log in sorted(tmp_path.rglob("*.log")):
        try:
            lines = log.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
        except OSError:
            continue
        text = "\n".join(line[:240] for line in lines)
        report.sections.append((f"last lines of {log.relative_to(tmp_path)}", text))


@pytest.fixture(autouse=True)
def no_script_outlives_its_test():
    yield
    kill_all_scripts()


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

    def start(servers: List[Standin], ami=(), server_keys=None, **general: str) -> Script:
        config = tmp_path / f"config{len(running)}.ini"
        config.write_text(broker_config(servers, ami=ami, server_keys=server_keys, **general))
        script = Script("broker.py", str(config), log_dir=tmp_path)
        running.append(script)
        # Every live server subscribed to (res_zmq_manager) or logged in to (AMI).
        # (ami_trace: one subscription, to everything)
        zmq_servers = [(s, 1 if (server_keys or {}).get(i, {}).get("ami_trace") == "yes"
                        else SUBSCRIBED)
                       for i, s in enumerate(servers) if s.control is not None and i not in ami]
        ami_servers = [s for i, s in enumerate(servers) if s.control is not None and i in ami]
        wait_until(lambda: all(subscribed(s, count) for s, count in zmq_servers)
                   and all(s.control.state()["ami_sessions"] >= 1 for s in ami_servers)
                   or script.proc.poll() is not None, message="the broker to connect")
        assert script.proc.poll() is None, script.output()
        return script

    yield start
    for script in running:
        script.kill()


class RunningHub:
    """python server.py <settings> on free 127.0.0.1 ports."""

    def __init__(self, tmp_path, name: str = "server") -> None:
        self.pub_url = f"tcp://127.0.0.1:{free_port()}"
        self.pull_url = f"tcp://127.0.0.1:{free_port()}"
        settings = python_settings(tmp_path / f"{name}_config.py", LOG_LEVEL="debug",
                                   PUB_BIND_URL=self.pub_url, SUB_BIND_URL=self.pull_url)
        self.script = Script("server.py", str(settings), log_dir=tmp_path, name=name)
        self.script.wait_for_output("Started")

    def restart(self) -> None:
        """kill -9, and start again on the same ports."""
        self.script = self.script.restart()
        self.script.wait_for_output("Started")


@pytest.fixture
def hub(tmp_path):
    running = RunningHub(tmp_path)
    yield running
    running.script.kill()


@pytest.fixture
def agents(tmp_path, hub, context):
    """agents(standins, **settings): one python agent.py per stand-in, named X, Y, Z..., ready."""
    running: List[Script] = []
    client = HubClient(context, hub, name="harness")

    def start(servers: List[Standin], names: str = "XYZW", hubs=None, ami=(),
              **settings) -> List[Script]:
        new = []
        hub_urls = dict(ZMQ_PUB_URL=hub.pull_url, ZMQ_SUB_URL=hub.pub_url) if hubs is None else \
            dict(ZMQ_PUB_URL=[h.pull_url for h in hubs], ZMQ_SUB_URL=[h.pub_url for h in hubs])
        for index, (name, standin) in enumerate(zip(names, servers)):
            script = start_agent(tmp_path, name, standin, ami=index in ami, **hub_urls,
                                 **settings)
            running.append(script)
            new.append(script)
        for index, (name, standin) in enumerate(zip(names, servers)):
            client.ping_until_pong(name)
            wait_until(lambda: standin.control.state()["ami_sessions"] >= 1 if index in ami
                       else subscribed(standin), message=f"agent {name} to connect to its Asterisk")
        return new

    yield start
    client.close()
    for script in running:
        script.kill()


@pytest.fixture
def processes(context, tmp_path):
    """processes(name, **options): a stand-in in its own process, with a database file; can be
    killed; started again under the same name it keeps the options it had."""
    started = []
    options_of = {}

    def start(name, **options):
        options_of[name] = options = {**options_of.get(name, {}), **options}
        standin = start_standin_process(context, state_file=str(tmp_path / f"{name}.json"),
                                        **options)
        started.append(standin)
        return standin

    yield start
    for standin in started:
        if standin.process.poll() is None:
            standin.process.kill()
            standin.process.wait()
