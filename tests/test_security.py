"""CURVE on the hub network, key files, and the hub's warnings."""
import os
import shutil

import pytest
import zmq
import zmq.auth

from harness import (HubClient, Script, custom_states, free_port, python_settings, run_script,
                     wait_until)
from zmqami.security import binds_beyond_loopback


class Keys:
    """A hub's key pair and some clients' key pairs, as zmq.auth.create_certificates writes them."""

    def __init__(self, folder):
        self.folder = folder
        folder.mkdir(mode=0o700, exist_ok=True)
        self.clients = folder / "clients"
        self.clients.mkdir()
        self.hub_public, self.hub_secret = zmq.auth.create_certificates(str(folder), "hub")

    def client(self, name, allowed=True):
        public, secret = zmq.auth.create_certificates(str(self.folder), name)
        os.chmod(secret, 0o600)
        if allowed:
            shutil.copy(public, self.clients)
        return public, secret


class CurveHub:
    def __init__(self, tmp_path, keys):
        self.pub_url = f"tcp://127.0.0.1:{free_port()}"
        self.pull_url = f"tcp://127.0.0.1:{free_port()}"
        os.chmod(keys.hub_secret, 0o600)
        settings = python_settings(tmp_path / "curve_server.py", PUB_BIND_URL=self.pub_url,
                                   SUB_BIND_URL=self.pull_url,
                                   CURVE_SECRET_KEY_FILE=str(keys.hub_secret),
                                   CURVE_CLIENTS_DIR=str(keys.clients))
        self.script = Script("server.py", str(settings), log_dir=tmp_path, name="curve_hub")
        self.script.wait_for_output("Started")


def curve_client(context, hub, keys, key_pair, name, topics=None):
    """A HubClient whose sockets use CURVE with this key pair (before they connect)."""
    original_socket = context.socket

    def socket(kind):
        sock = original_socket(kind)
        sock.curve_serverkey = zmq.auth.load_certificate(str(keys.hub_public))[0]
        sock.curve_publickey, sock.curve_secretkey = zmq.auth.load_certificate(str(key_pair[1]))
        return sock
    context.socket = socket
    try:
        return HubClient(context, hub, name=name, topics=topics)
    finally:
        context.socket = original_socket


@pytest.fixture
def curve(tmp_path, standins, context):
    keys = Keys(tmp_path / "keys")
    hub = CurveHub(tmp_path, keys)
    scripts = []

    def start_agent(name, standin, key_pair):
        config = python_settings(
            tmp_path / f"curve_agent_{name}.py", SYSTEM_NAME=name,
            ASTERISK_CMD_URL=f"tcp://127.0.0.1:{standin.cmd_port}",
            ASTERISK_EVT_URL=f"tcp://127.0.0.1:{standin.evt_port}",
            ZMQ_PUB_URL=hub.pull_url, ZMQ_SUB_URL=hub.pub_url,
            CURVE_SERVER_KEY_FILE=str(keys.hub_public), CURVE_SECRET_KEY_FILE=str(key_pair[1]),
            PID_FILE=str(tmp_path / f"curve_{name}.pid"), KEEP_ALIVE_INTERVAL=0.5)
        script = Script("agent.py", str(config), log_dir=tmp_path, name=f"curve_agent_{name}")
        scripts.append(script)
        return script

    yield keys, hub, start_agent
    for script in scripts + [hub.script]:
        script.kill()


def test_curve_agents_relay_and_strangers_can_neither_inject_nor_listen(curve, standins,
                                                                         context):
    keys, hub, start_agent = curve
    x, y = standins(2)
    start_agent("X", x, keys.client("X"))
    start_agent("Y", y, keys.client("Y"))
    console = curve_client(context, hub, keys, keys.client("Console"), "Console",
                           topics=["[Console]", "[*]"])
    console.ping_until_pong("X")
    console.ping_until_pong("Y")
    x.control.set_device("SIP/100", "RINGING")
    wait_until(lambda: custom_states(y).get("Custom:SIP/100") == "RINGING")

    plain = HubClient(context, hub, name="Plain")
    plain.sub.setsockopt(zmq.SUBSCRIBE, b"")
    unlisted = curve_client(context, hub, keys, keys.client("mallory", allowed=False), "Mallory")
    unlisted.sub.setsockopt(zmq.SUBSCRIBE, b"")
    # Once the hub has said no, a refused CURVE client has no connection to send on (on a busy
    # machine, that came before the send of this test, which then waited for a peer for ever).
    hub.script.wait_for_output("Refused a connection from 127.0.0.1: a key not in CURVE_CLIENTS_DIR")
    hub.script.wait_for_output("a client without CURVE")
    for intruder in (plain, unlisted):
        intruder.send("*", "AsteriskEvent", refused=True,
                      data={"Event": "DeviceStateChange", "Device": f"SIP/{intruder.name}",
                            "State": "BUSY"})
    x.control.set_device("SIP/101", "INUSE")
    wait_until(lambda: custom_states(y).get("Custom:SIP/101") == "INUSE")
    console.poll()
    assert "Custom:SIP/Plain" not in custom_states(y)
    assert "Custom:SIP/Mallory" not in custom_states(y)
    plain.poll(200)
    unlisted.poll(200)
    assert plain.received == [] and unlisted.received == []
    # Each refused peer is logged once, however often it retries.
    assert len(hub.script.lines("Refused a connection from 127.0.0.1")) <= 2


def test_a_key_added_to_the_folder_is_accepted_without_a_restart(curve, standins, context):
    keys, hub, start_agent = curve
    x, = standins(1)
    start_agent("X", x, keys.client("X"))
    late = keys.client("Late", allowed=False)
    shutil.copy(late[0], keys.clients)
    client = curve_client(context, hub, keys, late, "Late")
    client.ping_until_pong("X")


def test_secret_key_readable_by_others_is_warned_about(curve, standins, tmp_path):
    keys, hub, start_agent = curve
    x, = standins(1)
    public, secret = keys.client("careless")
    os.chmod(secret, 0o644)
    script = start_agent("C", x, (public, secret))
    script.wait_for_output(f"{secret} is readable by others than its owner (mode 644)")


@pytest.mark.parametrize("settings, expected", [
    ({"CURVE_SERVER_KEY_FILE": "hub.key"}, "CURVE_SECRET_KEY_FILE: needed too when CURVE is on"),
    ({"CURVE_SERVER_KEY_FILE": "/nonexistent.key", "CURVE_SECRET_KEY_FILE": "/nonexistent"},
     "CURVE_SERVER_KEY_FILE: cannot read a public key from /nonexistent.key"),
])
def test_agent_curve_settings_errors(tmp_path, settings, expected):
    path = python_settings(tmp_path / "agent.py", PID_FILE=str(tmp_path / "a.pid"), **settings)
    result = run_script("agent.py", str(path))
    assert result.returncode == 2 and expected in result.stderr, result.stderr


def test_hub_curve_needs_its_clients_folder(tmp_path):
    keys = Keys(tmp_path)
    path = python_settings(tmp_path / "server.py", CURVE_SECRET_KEY_FILE=str(keys.hub_secret),
                           PUB_BIND_URL=f"tcp://127.0.0.1:{free_port()}",
                           SUB_BIND_URL=f"tcp://127.0.0.1:{free_port()}")
    result = run_script("server.py", str(path))
    assert result.returncode == 2 and "CURVE_CLIENTS_DIR: must name the folder" in result.stderr


@pytest.mark.parametrize("url, beyond", [
    ("tcp://127.0.0.1:55555", False), ("tcp://localhost:1", False), ("tcp://[::1]:1", False),
    ("tcp://*:55555", True), ("tcp://0.0.0.0:55555", True), ("tcp://192.0.2.1:55555", True),
    ("tcp://eth0:55555", True), ("ipc:///tmp/hub", False),
])
def test_which_bind_addresses_reach_beyond_this_host(url, beyond):
    assert binds_beyond_loopback(url) == beyond


def test_a_client_may_only_speak_as_the_name_of_its_key(curve, standins, context):
    keys, hub, start_agent = curve
    x, y = standins(2)
    start_agent("X", x, keys.client("X"))
    start_agent("Y", y, keys.client("Y"))
    console = curve_client(context, hub, keys, keys.client("Console"), "Console")
    console.ping_until_pong("X")
    console.ping_until_pong("Y")
    # The Console's key, X's name: as X, it could inject states that every agent would mirror.
    console.send("*", "AsteriskEvent", origin="X", data={"Event": "DeviceStateChange",
                                                        "Device": "SIP/forged", "State": "BUSY"})
    hub.script.wait_for_output("with origin 'X' from the key of 'Console': a client may only "
                               "speak as itself")
    x.control.set_device("SIP/real", "INUSE")  # X itself still relays
    wait_until(lambda: custom_states(y).get("Custom:SIP/real") == "INUSE")
    assert "Custom:SIP/forged" not in custom_states(y)
