"""Plain AMI over TCP: the parser and the stand-in against the captures, then the scripts over AMI."""
import json
import random
import socket
from pathlib import Path

import pytest

from harness import (AMI_USER, HubClient, custom_states, restart, setvars, wait_until)
from zmqami.ami import AmiParser, as_dict, format_action, parse_message

CAPTURES = Path(__file__).resolve().parent / "captures" / "ami"
CASES = [case for case in json.loads((CAPTURES / "index.json").read_text())["cases"]
         if (CAPTURES / case["recv_file"]).exists()]


def captured_messages(case):
    return [message["headers"] for message in case["received_messages"]
            if message["kind"] != "banner"]


def split(data: bytes, rng: random.Random, size: int = 0):
    """data in pieces: of one size, or random sizes."""
    pieces, start = [], 0
    while start < len(data):
        length = size or rng.randrange(1, 40)
        pieces.append(data[start:start + length])
        start += length
    return pieces


@pytest.mark.parametrize("case", CASES, ids=[f"{c['case']}_{c['name']}" for c in CASES])
@pytest.mark.parametrize("chunking", ["whole", "bytes", "random"])
def test_parser_reads_every_capture_however_tcp_cuts_it(case, chunking):
    data = (CAPTURES / case["recv_file"]).read_bytes()
    rng = random.Random(case["recv_file"])
    pieces = {"whole": [data], "bytes": split(data, rng, 1), "random": split(data, rng)}[chunking]
    parser = AmiParser()
    messages = [[list(pair) for pair in message] for piece in pieces for message in parser.feed(piece)]
    assert messages == captured_messages(case)
    assert parser.banner == "Asterisk Call Manager/9.0.0"


def test_a_utf8_character_split_across_reads_survives():
    raw = "Event: PresenceStateChange\r\nMessage: Café: back\r\n\r\n".encode("utf-8")
    cut = raw.index("é".encode()) + 1
    parser = AmiParser(banner=False)
    assert list(parser.feed(raw[:cut])) == []
    assert as_dict(list(parser.feed(raw[cut:]))[0])["Message"] == "Café: back"


def test_repeated_keys_are_kept_in_order():
    message = parse_message(b"Response: Success\r\nOutput: line 1\r\nOutput: line 2  ")
    assert as_dict(message)["Output"] == ["line 1", "line 2  "]


def test_actions_are_written_as_asterisk_reads_them():
    sent = (CAPTURES / "04d_setvar_devstate_inuse.sent.bin").read_bytes()
    for raw in sent.split(b"\r\n\r\n")[:-1]:
        assert format_action(dict(parse_message(raw))) == raw + b"\r\n\r\n"
    with pytest.raises(ValueError):
        format_action({"Action": "Setvar", "Value": "x\r\nAction: Originate"})


# --- the stand-in against the captures ------------------------------------------------------------

REPLAYED = ["02a_login_success", "02b_login_failure", "04a_ping_actionid", "04b_unknown_action",
            "04c_ping_no_actionid", "04d0_setvar_devstate_prep_not_inuse",
            "04d_setvar_devstate_inuse", "04e_setvar_devstate_unknown",
            "04f_setvar_devstate_invalid_value", "04g_setvar_devstate_noncustom",
            "04h_setvar_presence", "04j_missing_action_header", "08a_logoff",
            "08a2_logoff_unauthenticated"]
RELAYED_EVENTS = ("DeviceStateChange", "PresenceStateChange", "FullyBooted")
VARIABLE = ("Timestamp", "Uptime", "LastReload")


def comparable(messages):
    """Responses and the events the relay uses, values that change from run to run masked."""
    kept = []
    for message in messages:
        pairs = [(k, "*" if k in VARIABLE else v) for k, v in message]
        if pairs and (pairs[0][0] == "Response" or pairs[0][1] in RELAYED_EVENTS):
            kept.append(pairs)
    return kept


@pytest.mark.parametrize("name", REPLAYED)
def test_the_stand_in_answers_like_asterisk(standins, name):
    case = next(c for c in CASES if c["recv_file"] == f"{name}.recv.bin")
    standin, = standins(1, ami_port=0, ami_user="lab", ami_secret="labsecret")
    # The state the lab's Asterisk had before the case ran.
    before = "INUSE" if name.startswith("04d0") else "NOT_INUSE"
    standin.control.set_device("Custom:SIP/100", before)
    expected = comparable(captured_messages(case))
    with socket.create_connection(("127.0.0.1", standin.ami_port)) as conn:
        conn.sendall((CAPTURES / case["sent_file"]).read_bytes())
        parser, received, closed = AmiParser(), [], []

        def enough():
            conn.settimeout(0.05)
            try:
                data = conn.recv(65536)
                closed.extend([True] if not data else [])
                received.extend([list(map(tuple, m)) for m in parser.feed(data)])
            except socket.timeout:
                pass
            return closed or len(comparable(received)) >= len(expected)
        wait_until(enough, message=f"the stand-in's answer to {name}")
        if case["closed_by_server"]:
            wait_until(lambda: enough() and closed, message="the server to close")
    assert parser.banner == "Asterisk Call Manager/9.0.0"
    assert comparable(received) == [[tuple(pair) for pair in m] for m in expected]


# --- the broker and the agents over AMI ------------------------------------------------------------

def test_broker_relays_between_ami_and_res_zmq_manager(standins, broker):
    a, = standins(1, ami_port=0)
    b, c = standins(2)
    script = broker([a, b, c], ami=(0,), presence="yes")
    a.control.set_device("SIP/100", "RINGING")
    for other in (b, c):
        wait_until(lambda: custom_states(other).get("Custom:SIP/100") == "RINGING")
    b.control.set_device("PJSIP/bob", "BUSY")
    wait_until(lambda: custom_states(a).get("Custom:PJSIP/bob") == "BUSY")
    b.control.set_presence("CustomPresence:7", "away", "", "Café, back at 2")
    wait_until(lambda: a.control.presences().get("CustomPresence:7") ==
               ["away", "", "Café, back at 2"])
    c.control.set_device("SIP/marker", "INUSE")    # after A's presence echo
    wait_until(lambda: custom_states(a).get("Custom:SIP/marker") == "INUSE")
    assert [s for s in setvars(b) if "PRESENCE" in s["Variable"]] == []   # the echo stopped
    assert script.lines("Logged in to server-1 at 127.0.0.1:")
    assert "stand-in-secret" not in script.output()


def test_hostile_ami_input_is_dropped_and_the_broker_goes_on(standins, broker):
    a, = standins(1, ami_port=0)
    b, = standins(1)
    script = broker([a, b], ami=(0,), count_messages="yes")
    a.control.ami_raw(b"Event: DeviceStateChange\r\nDevice: SIP/1\r\nState: FOO\r\n\r\n"
                      b"Event: DeviceStateChange\r\nState: INUSE\r\n\r\n"
                      b"Event: DeviceStateChange\r\nDevice: SIP/1\r\nDevice: SIP/2\r\n"
                      b"State: INUSE\r\n\r\n"
                      b"Bogus: line\r\n\r\n\xff\xfe: x\r\n\r\n")
    a.control.set_device("SIP/after", "BUSY")
    wait_until(lambda: custom_states(b).get("Custom:SIP/after") == "BUSY")
    assert set(custom_states(b)) == {"Custom:SIP/after"}
    assert script.lines("Dropped input from server-1")
    # A flood without a message end: the connection is dropped and made again.
    a.control.ami_raw(b"X" * (1024 * 1024 + 10))
    script.wait_for_output("unreadable AMI stream")
    a.control.set_device("SIP/after2", "BUSY")
    wait_until(lambda: custom_states(b).get("Custom:SIP/after2") == "BUSY",
               message="relay after the reconnection")


def test_chunked_tcp_and_restart_of_an_ami_server(standins, broker, processes, context):
    a = processes("a", ami_port=0, ami_chunk=3)
    b, = standins(1)
    # Tiny chunks a millisecond apart make answers slow: generous timeouts.
    script = broker([a, b], ami=(0,), presence="yes", ping_interval="0.5",
                    server_timeout="3", request_timeout="2000")
    b.control.set_device("SIP/200", "RINGING")
    a.control.set_presence("CustomPresence:1", "away", "", "Zürich, café ☕")
    wait_until(lambda: custom_states(a).get("Custom:SIP/200") == "RINGING")
    wait_until(lambda: b.control.presences().get("CustomPresence:1") ==
               ["away", "", "Zürich, café ☕"], message="a presence read in 3-byte pieces")
    a.control.set_device("SIP/100", "INUSE")
    wait_until(lambda: custom_states(b).get("Custom:SIP/100") == "INUSE")
    a.kill()
    wait_until(lambda: custom_states(b).get("Custom:SIP/100") == "UNAVAILABLE",
               message="down_state while the AMI server is dead")
    b.control.set_device("SIP/200", "NOT_INUSE")
    a = restart(processes, a, "a")     # its database still says RINGING
    wait_until(lambda: custom_states(a).get("Custom:SIP/200") == "NOT_INUSE",
               message="the restarted AMI server resynchronised")
    # The loss, logged once: "connection closed by Asterisk", or "connection lost: Connection
    # reset by peer" when kill -9 found a request of the broker's still unread (the kernel then
    # resets the connection; seen once in a full run).
    script.wait_for_output("server-1: connection ")
    assert len(script.lines("server-1: connection ")) == 1, script.output()


def test_shutdown_event_and_failed_login(standins, broker, tmp_path):
    from harness import Script, broker_config
    a, = standins(1, ami_port=0)
    b, = standins(1)
    config = tmp_path / "wrong.ini"
    config.write_text(broker_config([a, b], ami=(0,), ami_secret="wrong-secret"))
    script = Script("broker.py", str(config), log_dir=tmp_path, name="wrong")
    try:
        script.wait_for_output(f"authentication failed for {AMI_USER} at 127.0.0.1:{a.ami_port}")
        assert "wrong-secret" not in script.output()
    finally:
        script.kill()
    good = broker([a, b], ami=(0,))
    a.control.call("shutdown")
    good.wait_for_output("server-1: Asterisk is shutting down")


def test_agents_over_ami(standins, agents, hub, context):
    x, = standins(1, ami_port=0)
    y, = standins(1)
    agents([x, y], ami=(0,), ALLOWED_ACTIONS=["Ping", "Getvar"])
    x.control.set_device("SIP/100", "INUSE")
    wait_until(lambda: custom_states(y).get("Custom:SIP/100") == "INUSE")
    y.control.set_device("SIP/200", "BUSY")
    wait_until(lambda: custom_states(x).get("Custom:SIP/200") == "BUSY")
    client = HubClient(context, hub, name="Console")
    client.ping_until_pong("X")
    client.send("X", "AsteriskAction", data={"Action": "Getvar", "Variable": "FOO"})
    status = client.wait_for("AsteriskActionStatus", "X")   # safe over AMI: it is run
    assert status["x_data"][0]["Response"] == "Success"
