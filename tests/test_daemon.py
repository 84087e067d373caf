"""Running as a daemon: live status, SIGHUP reload, log files, --check-config, systemd units."""
import json
import re
import shutil
import signal
import subprocess

import pytest

from harness import (ROOT, HubClient, Script, broker_config, custom_states, free_port,
                     python_settings, run_script, setvars, subscribed, wait_until)


def start_broker(tmp_path, servers, **general):
    config = tmp_path / "daemon.ini"
    config.write_text(broker_config(servers, **general))
    script = Script("broker.py", str(config), log_dir=tmp_path, name="daemon")
    script.wait_for_output("starting with")
    return config, script


def status_of(script_name, config, *query):
    result = run_script(script_name, "--status", str(config), *query)
    return result.stdout if result.returncode == 0 else ""


def test_status_shows_a_server_that_is_down(standins, tmp_path):
    a, b = standins(2)
    dead = type(a)(free_port(), free_port(), control=None)
    address = f"ipc://{tmp_path}/broker.status"
    config, script = start_broker(tmp_path, [a, b, dead], status_socket=address,
                                  ping_interval="0.2", server_timeout="1")
    try:
        a.control.set_device("SIP/1", "INUSE")
        wait_until(lambda: custom_states(b).get("Custom:SIP/1") == "INUSE")
        wait_until(lambda: "server-3  DOWN" in status_of("broker.py", config),
                   message="the status to show server-3 down")
        table = status_of("broker.py", config)
        assert "server-1  up" in table and "server-2  up" in table
        # (relayed from the event, or from the first read of server-1's states: either way known)
        assert "known states: 1" in table and table.startswith("broker ")
        raw = run_script("broker.py", "--status", "--json", str(config))  # for scripts
        status = json.loads(raw.stdout)
        assert [server["up"] for server in status["servers"]] == [True, True, False]
        assert status["program"] == "broker" and status["totals"]["known_states"] == 1
        # What each server reports for SIP/1, what its mirror should show, what was written.
        wait_until(lambda: "INUSE at " in status_of("broker.py", config, "devices", "sip/"))
        table = status_of("broker.py", config, "devices", "sip/")
        assert table.startswith("SIP/1\n") and re.search(r"server-1 +INUSE since .* +- +-", table)
        assert re.search(r"server-3 +- +INUSE +not yet \(writing\)", table)  # down: queued for it
        raw = run_script("broker.py", "--status", str(config), "devices", "--json")
        rows = {row["server"]: row for row in json.loads(raw.stdout)[0]["servers"]}
        assert rows["server-2"]["mirror"] == rows["server-2"]["written"] == "INUSE"
        assert rows["server-1"]["reports"] == "INUSE" and rows["server-1"]["mirror"] is None
        nothing = run_script("broker.py", "--status", str(config), "devices", "^PJSIP/")
        assert nothing.returncode == 1 and "No known device or presence matches" in nothing.stderr
        bad = run_script("broker.py", "--status", str(config), "devices", "(")
        assert bad.returncode == 2 and "is not a regular expression" in bad.stderr
    finally:
        script.kill()


def test_status_without_a_socket_or_a_process(tmp_path, standins):
    a, = standins(1)
    config = tmp_path / "nostatus.ini"
    config.write_text(broker_config([a]))
    result = run_script("broker.py", "--status", str(config))
    assert result.returncode == 2 and "status_socket: not set" in result.stderr
    config.write_text(broker_config([a], status_socket=f"ipc://{tmp_path}/nobody"))
    result = run_script("broker.py", "--status", str(config))
    assert result.returncode == 1 and "is it running?" in result.stderr


def test_sighup_adds_and_removes_servers_and_keeps_the_known_states(standins, tmp_path):
    a, b, c = standins(3)
    config, script = start_broker(tmp_path, [a, b])
    try:
        wait_until(lambda: subscribed(a) and subscribed(b))
        a.control.set_device("SIP/1", "INUSE")
        wait_until(lambda: custom_states(b).get("Custom:SIP/1") == "INUSE")
        config.write_text(broker_config([a, b, c]))
        script.proc.send_signal(signal.SIGHUP)
        script.wait_for_output("1 added, 0 removed")
        # The new server gets what the broker knew before the reload.
        wait_until(lambda: custom_states(c).get("Custom:SIP/1") == "INUSE",
                   message="the known states on the added server")
        a.control.set_device("SIP/2", "BUSY")
        wait_until(lambda: custom_states(c).get("Custom:SIP/2") == "BUSY")

        config.write_text(broker_config([a, c], names=["server-1", "server-3"]))
        script.proc.send_signal(signal.SIGHUP)
        script.wait_for_output("0 added, 1 removed")
        a.control.set_device("SIP/3", "RINGING")
        wait_until(lambda: custom_states(c).get("Custom:SIP/3") == "RINGING")
        assert "DEVICE_STATE(Custom:SIP/3)" not in {s["Variable"] for s in setvars(b)}
        assert len(script.lines("Connected to server-1 events")) == 1   # kept, not reconnected
    finally:
        script.kill()


def test_a_broken_reload_keeps_the_running_config(standins, tmp_path):
    a, b = standins(2)
    config, script = start_broker(tmp_path, [a, b])
    try:
        config.write_text(broker_config([a, b]).replace("cmd_port", "cmd_prot"))
        script.proc.send_signal(signal.SIGHUP)
        script.wait_for_output("Reload failed, running on as before")
        a.control.set_device("SIP/1", "INUSE")
        wait_until(lambda: custom_states(b).get("Custom:SIP/1") == "INUSE")
        assert script.proc.poll() is None
    finally:
        script.kill()


def test_the_log_file_survives_logrotate(standins, tmp_path):
    a, b = standins(2)
    log_file = tmp_path / "broker.log"
    config, script = start_broker(tmp_path, [a, b], log_file=str(log_file))
    try:
        wait_until(lambda: "starting with" in log_file.read_text())
        log_file.rename(tmp_path / "broker.log.1")        # what logrotate does
        script.proc.send_signal(signal.SIGHUP)             # anything that logs a line
        wait_until(lambda: log_file.exists() and "Received SIGHUP" in log_file.read_text(),
                   message="a new log file")
        assert "Received SIGHUP" not in (tmp_path / "broker.log.1").read_text()
    finally:
        script.kill()


def test_check_config_good_and_broken(tmp_path, standins):
    a, b = standins(2)
    good = tmp_path / "good.ini"
    good.write_text(broker_config([a, b]))
    result = run_script("broker.py", "--check-config", str(good))
    assert result.returncode == 0 and "OK (2 servers)" in result.stdout
    broken = tmp_path / "broken.ini"
    broken.write_text(broker_config([a, b]).replace("cmd_port = ", "cmd_port = x")
                      .replace("[general]", "[general]\nlog_level = loud"))
    result = run_script("broker.py", "--check-config", str(broken))
    assert result.returncode == 2
    errors = result.stderr.splitlines()
    assert len(errors) == 3 and all(line.startswith(str(broken)) for line in errors)
    for script, name in (("agent.py", "agent_config.py"), ("server.py", "server_config.py")):
        assert run_script(script, "--check-config", str(ROOT / name)).returncode == 0
        bad = python_settings(tmp_path / name, LOG_LEVEL="loud", STATUS_SOCKET=5)
        result = run_script(script, "--check-config", str(bad))
        assert result.returncode == 2 and len(result.stderr.splitlines()) == 2


@pytest.mark.parametrize("script", ["broker.py", "server.py", "agent.py"])
def test_version(script):
    result = run_script(script, "--version")
    assert result.returncode == 0 and result.stdout.startswith("zmq-ami-broker 2.")


def test_hub_and_agent_status_and_reload(standins, agents, hub, context, tmp_path):
    x, = standins(1)
    address = f"ipc://{tmp_path}/agent.status"
    script, = agents([x], STATUS_SOCKET=address, KEEP_ALIVE_INTERVAL=0.3)
    config = tmp_path / "agent_X.py"
    wait_until(lambda: "Asterisk  up" in status_of("agent.py", config))
    x.control.set_device("PJSIP/7", "BUSY")  # its own device: reported by X, mirrored nowhere
    wait_until(lambda: re.search(r"X +BUSY since .* +- +-",
                                 status_of("agent.py", config, "devices", "pjsip/7$")))
    # ALLOWED_ACTIONS changed by a reload, without a restart.
    client = HubClient(context, hub, name="Console")
    client.ping_until_pong("X")
    client.send("X", "AsteriskAction", data={"Action": "Originate", "Channel": "SIP/1",
                                             "Application": "Wait"})
    assert "not allowed" in client.wait_for("AsteriskActionStatus", "X")["x_data"][0]["Message"]
    config.write_text(config.read_text() + "ALLOWED_ACTIONS = ['Ping', 'Originate']\n")
    script.proc.send_signal(signal.SIGHUP)
    script.wait_for_output("Reloaded")
    client.received.clear()
    client.send("X", "AsteriskAction", data={"Action": "Originate", "Channel": "SIP/1",
                                             "Application": "Wait"})
    status = client.wait_for("AsteriskActionStatus", "X")
    assert status["x_data"][0]["Message"] == "Originate successfully queued"
    hub_config = tmp_path / "server_config.py"
    hub_config.write_text(hub_config.read_text() +
                          f"STATUS_SOCKET = 'ipc://{tmp_path}/hub.status'\n")
    hub.script.proc.send_signal(signal.SIGHUP)
    hub.script.wait_for_output("STATUS_SOCKET changed: it takes effect at the next restart")


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")
def test_systemd_units_verify(tmp_path):
    # The units name the installed commands (/opt/zmq-ami-broker/bin/...): verify them with
    # stand-in commands at those places.
    (tmp_path / "bin").mkdir()
    for command in ("zmq-ami-broker", "zmq-ami-hub", "zmq-ami-agent"):
        (tmp_path / "bin" / command).write_text("#!/bin/sh\n")
        (tmp_path / "bin" / command).chmod(0o755)
    for unit in (ROOT / "contrib" / "systemd").glob("*.service"):
        (tmp_path / unit.name).write_text(unit.read_text().replace("/opt/zmq-ami-broker",
                                                                   str(tmp_path)))
    result = subprocess.run(["systemd-analyze", "verify", *map(str, tmp_path.glob("*.service"))],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    for unit in tmp_path.glob("*.service"):
        # Hardened (8.5, EXPOSED, before issue 26), with notify, watchdog and reload kept; the
        # log folder made for it; the run folder shared by the units and never removed by one.
        security = subprocess.run(["systemd-analyze", "security", "--offline=true", str(unit)],
                                  capture_output=True, text=True, timeout=60)
        score = re.search(r"Overall exposure level for \S+: ([0-9.]+)", security.stdout)
        assert score and float(score.group(1)) <= 3.0, security.stdout[-2000:]
        text = unit.read_text()
        for line in ("Type=notify", "WatchdogSec=", "ExecReload=", "LogsDirectory=zmq-ami",
                     "RuntimeDirectory=zmq-ami", "RuntimeDirectoryPreserve=yes",
                     "MemoryDenyWriteExecute=yes", "LimitNOFILE="):
            assert line in text, (unit.name, line)


def test_each_line_of_the_log_names_its_program(standins, broker, agents, hub):
    a, b = standins(2)
    script = broker([a, b])
    agent, = agents([a])
    for program, output in (("broker", script), ("agent", agent), ("hub", hub.script)):
        output.wait_for_output(f" - {program} - INFO - ")
        lines = [line for line in output.output().splitlines() if " - INFO - " in line
                 or " - WARNING - " in line]
        assert lines and all(f" - {program} - " in line for line in lines), lines[:3]
