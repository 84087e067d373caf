"""The relay rules on their own: which events are relayed, as what, and what is refused."""
import json

import pytest
from harness import device_event, presence_event, wait_until
from hypothesis import given, settings
from hypothesis import strategies as st

from zmqami.rules import (BadInput, PresenceEchoFilter, StateUpdate, decode_event,
                          decode_json_object, parse_presence_value, presence_value,
                          relayed_update)
from zmqami.states import Entry, Reports


def test_device_state_becomes_setvar_of_its_custom_mirror():
    update = relayed_update(device_event("SIP/100", "RINGING"))
    assert update == StateUpdate("DEVICE_STATE(Custom:SIP/100)", "RINGING")
    assert update.action("abc") == {"Action": "Setvar", "ActionID": "abc",
                                    "Variable": "DEVICE_STATE(Custom:SIP/100)", "Value": "RINGING"}
    assert update.action("abc", verb="SetVar")["Action"] == "SetVar"


@pytest.mark.parametrize("state", ["NOT_INUSE", "INUSE", "BUSY", "INVALID", "UNAVAILABLE",
                                   "RINGING", "RINGINUSE", "ONHOLD", "inuse"])
def test_every_writable_state_is_relayed_in_upper_case(state):
    assert relayed_update(device_event(state=state)).value == state.upper()


def test_custom_devices_and_unknown_are_not_relayed():
    assert relayed_update(device_event("Custom:SIP/100", "INUSE")) is None
    assert relayed_update(device_event("SIP/100", "UNKNOWN")) is None


def test_presence_is_relayed_only_when_enabled_and_only_custom_presence():
    assert relayed_update(presence_event()) is None
    assert relayed_update(presence_event(), presence=True) == StateUpdate(
        "PRESENCE_STATE(CustomPresence:100)", "away,,Lunch")
    assert relayed_update(presence_event("XMPP:alice"), presence=True) is None
    assert relayed_update(device_event(), device_state=False) is None


def test_other_events_are_not_relayed():
    assert relayed_update({"Event": "FullyBooted"}) is None
    assert relayed_update({"Event": "ExtensionStatus", "Exten": "100"}) is None


@pytest.mark.parametrize("event, reason", [
    ({"Event": "DeviceStateChange", "State": "INUSE"}, "Device missing"),
    (device_event(device=5), "Device missing or not a string"),
    (device_event(device=""), "Device missing"),
    (device_event(state=None), "State missing"),
    (device_event(state="FOO"), "not a device state"),
    (device_event(device="SIP/1\nAction: Originate"), "control character"),
    (device_event(device="SIP/1)"), "parenthesis"),
    (device_event(device="SIP/1,2"), "comma"),
    (device_event(device="x" * 201), "longer than 200 bytes"),
    (device_event(device="\u00e9" * 101), "longer than 200 bytes"),  # 2 bytes each
    (presence_event(status="sleeping"), "not a presence state"),
    (presence_event(message="a\r\nAction: Originate"), "control character"),
    (presence_event(subtype=3), "not a string"),
    (presence_event(message="m" * 4001), "longer than 4000 bytes"),
    (presence_event(message="\U0001f600" * 1001), "longer than 4000 bytes"),  # 4 bytes each
])
def test_values_that_must_not_reach_asterisk_are_refused(event, reason):
    with pytest.raises(BadInput, match=reason):
        relayed_update(event, presence=True)


def test_presence_value_syntax_and_base64_when_a_comma_would_split_it():
    assert presence_value("available", "", "") == "available"
    assert presence_value("dnd", "meeting", "In a meeting") == "dnd,meeting,In a meeting"
    # The capture 23_presence_base64 wrote exactly this value.
    assert presence_value("xa", "office", "Out, of office").endswith(",e")
    assert parse_presence_value("xa,b2ZmaWNl,T3V0IG9mIG9mZmljZQ==,e") == ("xa", "office",
                                                                           "Out of office")


@given(st.sampled_from(["not_set", "available", "away", "xa", "chat", "dnd", "unavailable"]),
       st.text(alphabet=st.characters(blacklist_categories=("Cc", "Cs"))),
       st.text(alphabet=st.characters(blacklist_categories=("Cc", "Cs"))))
def test_presence_value_round_trips_through_asterisks_parser(status, subtype, message):
    assert parse_presence_value(presence_value(status, subtype, message)) == (status, subtype,
                                                                              message)


@pytest.mark.parametrize("raw, reason", [
    (b"not json", "not JSON"), (b"\xff\xfe{}", "not UTF-8"), (b"[1,2]", "not an object"),
    (b'"Ping"', "not an object"), (b"", "not JSON"), (b"{}", "no Event"),
    (b'{"Event": 5}', "no Event"), (b"[" * 100000, "not JSON"),
])
def test_event_decoding_refuses_what_is_not_an_event(raw, reason):
    with pytest.raises(BadInput, match=reason):
        decode_event(raw)


def test_event_decoding_reads_the_captured_events():
    event = decode_event(b'{"Event":"PresenceStateChange","Privilege":"call,all","Presentity":'
                         b'"CustomPresence:102","Status":"away","Subtype":"","Message":'
                         b'"Caf\xc3\xa9: back at 2"}')
    assert relayed_update(event, presence=True).value == "away,,Café: back at 2"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: st.lists(children) | st.dictionaries(st.text(), children), max_leaves=20)
event_like = st.fixed_dictionaries(
    {"Event": st.sampled_from(["DeviceStateChange", "PresenceStateChange"])},
    optional={"Device": json_values | st.text(), "State": json_values | st.text(),
              "Presentity": json_values | st.text(), "Status": json_values | st.text(),
              "Subtype": json_values | st.text(), "Message": json_values | st.text()})


@settings(max_examples=300)
@given(st.binary() | json_values.map(lambda v: json.dumps(v).encode()),
       st.sampled_from([b"", b" ", b"\n", b" {}", b"x"]), st.sampled_from([b"", b" ", b"\t"]))
def test_the_fast_json_decoding_judges_as_json_loads_does(raw, after, before):
    """decode_json_object reads the common case with raw_decode: whitespace around a value, or
    more after it, must be taken or refused exactly as json.loads takes or refuses them."""
    raw = before + raw + after
    try:
        expected = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        expected = BadInput
    try:
        got = decode_json_object(raw)
    except BadInput:
        got = BadInput
    assert got == (expected if isinstance(expected, dict) or expected is BadInput else BadInput)


@given(st.text(), st.text(), st.text(), st.sampled_from(["Setvar", "SetVar"]))
def test_a_write_is_encoded_as_json_dumps_encodes_its_action(variable, value, action_id, verb):
    update = StateUpdate(variable, value)
    assert update.encoded_action(action_id, verb) == \
        json.dumps(update.action(action_id, verb)).encode("ascii")


@settings(max_examples=300)
@given(st.one_of(st.binary(), json_values.map(lambda v: json.dumps(v).encode()),
                 event_like.map(lambda v: json.dumps(v).encode())))
def test_any_bytes_give_an_update_none_or_bad_input_and_never_a_control_character(raw):
    try:
        update = relayed_update(decode_event(raw), device_state=True, presence=True)
    except BadInput:
        return
    if update is not None:
        for text in (update.variable, update.value):
            assert not any(ord(c) < 32 or ord(c) == 127 for c in text)


def test_echo_filter_recognises_every_write_awaiting_its_echo():
    echoes = PresenceEchoFilter()
    lunch, meeting, available = (StateUpdate("PRESENCE_STATE(CustomPresence:1)", value)
                                 for value in ("away,,lunch", "dnd,,meeting", "available"))
    echoes.sent(lunch)
    assert echoes.is_echo(lunch)               # the echo of our write
    assert not echoes.is_echo(lunch)           # a second event is a genuine write
    echoes.sent(lunch)
    assert not echoes.is_echo(meeting)         # a different value is a genuine change
    # Three writes sent before any echo came back: each echo is recognised, in order.
    for update in (lunch, meeting, available):
        echoes.sent(update)
    assert echoes.is_echo(lunch) and echoes.is_echo(meeting) and echoes.is_echo(available)
    assert not echoes.is_echo(lunch)
    # Written twice (a resync): echoed twice.
    echoes.sent(lunch)
    echoes.sent(lunch)
    assert echoes.is_echo(lunch) and echoes.is_echo(lunch) and not echoes.is_echo(lunch)
    # An echo that came means the writes before it will not be echoed any more.
    echoes.sent(lunch)
    echoes.sent(meeting)
    assert echoes.is_echo(meeting) and not echoes.is_echo(lunch)
    # A write Asterisk refused is echoed by nothing.
    echoes.sent(lunch)
    echoes.refused(lunch)
    assert not echoes.is_echo(lunch)


def test_an_echo_that_never_came_expires():
    echoes = PresenceEchoFilter(window=0.0)
    lunch = StateUpdate("PRESENCE_STATE(CustomPresence:1)", "away,,lunch")
    echoes.sent(lunch)
    wait_until(lambda: not echoes.is_echo(lunch), message="the write to expire")


@given(st.one_of(
    st.builds(device_event, st.text(min_size=1), st.sampled_from(["INUSE", "BUSY", "RINGING"])),
    st.builds(presence_event, st.text(min_size=1).map("CustomPresence:".__add__),
              st.sampled_from(["away", "dnd", "available"]), st.text(), st.text())))
def test_event_for_gives_back_the_event_of_an_update(event):
    from zmqami.rules import event_for
    try:
        update = relayed_update(event, presence=True)
    except BadInput:
        return
    if update is not None:
        assert relayed_update(event_for(update), presence=True) == update


# Asterisk 20's main/devicestate.c, ast_devstate_aggregate_add(): each state's rank, and RINGING
# with INUSE, ONHOLD or BUSY gives RINGINUSE.
@pytest.mark.parametrize("states, combined", [
    ([], "INVALID"),
    (["UNAVAILABLE"], "UNAVAILABLE"),
    (["INUSE", "UNAVAILABLE"], "INUSE"),
    (["UNAVAILABLE", "INUSE"], "INUSE"),
    (["NOT_INUSE", "UNAVAILABLE"], "NOT_INUSE"),
    (["INVALID", "UNAVAILABLE"], "UNAVAILABLE"),
    (["UNKNOWN", "INVALID"], "UNKNOWN"),
    (["UNKNOWN", "UNAVAILABLE"], "UNAVAILABLE"),
    (["NOT_INUSE", "ONHOLD"], "ONHOLD"),
    (["ONHOLD", "RINGING"], "RINGINUSE"),
    (["RINGING", "INUSE"], "RINGINUSE"),
    (["INUSE", "RINGING"], "RINGINUSE"),
    (["RINGING", "BUSY"], "RINGINUSE"),
    (["RINGING", "NOT_INUSE"], "RINGING"),
    (["RINGING", "UNAVAILABLE"], "RINGING"),
    (["INUSE", "BUSY"], "BUSY"),
    (["BUSY", "INUSE"], "BUSY"),
    (["INUSE", "ONHOLD"], "INUSE"),
    (["RINGINUSE", "NOT_INUSE"], "RINGINUSE"),
    (["NOT_INUSE", "NOT_INUSE", "INUSE"], "INUSE"),
])
def test_device_states_combine_as_asterisk_combines_them(states, combined):
    from zmqami.rules import aggregate_device_states
    assert aggregate_device_states(states) == combined


def test_a_list_read_after_a_newer_presence_of_a_peer_does_not_fail():
    """A peer's presence stamped later than now (its clock ahead): a differing value read from
    the server's own list is not taken, and the reading goes on."""
    import time
    from zmqami.states import StateTable
    table = StateTable("UNAVAILABLE", unverified_wall=0.0)
    variable = "PRESENCE_STATE(CustomPresence:1)"
    table.record("Peer", StateUpdate(variable, "away,,lunch"), wall=time.time() + 600)
    listed = [StateUpdate(variable, "available")]
    reading = table.read_presence_list("Me", listed, time.monotonic(), after_restart=False,
                                       writing=lambda v: False, on_refused=lambda u, why: None)
    assert reading.changed == [] and reading.current == []
    assert table.expected(variable) == "away,,lunch"


@settings(max_examples=200)
@given(st.lists(st.tuples(st.sampled_from(["set", "del"]), st.sampled_from("ABC")), max_size=12))
def test_reports_of_one_variable_behave_as_a_dict(operations):
    """StateTable's Reports holds one source in two slots and more in a dict: the same answers
    as a dict, in the same order, whatever the sequence of reports and removals."""
    reports, expected = Reports(), {}
    for number, (operation, source) in enumerate(operations):
        if operation == "set":
            reports[source] = expected[source] = Entry(str(number), 0.0, 0.0)
        elif source in expected:
            del reports[source], expected[source]
        else:
            with pytest.raises(KeyError):
                del reports[source]
        assert len(reports) == len(expected) and bool(reports) == bool(expected)
        assert list(reports) == list(expected) and list(reports.items()) == list(expected.items())
        assert list(reversed(reports.values())) == list(reversed(expected.values()))
        for name in "ABC":
            assert (name in reports) == (name in expected)
            assert reports.get(name) is expected.get(name)
