"""The state file's rules, without sockets: what a file may hold, and what its times may say."""
import json
import logging
import time

import pytest

from zmqami.statefile import MAX_ENTRY_BYTES, StateFile
from zmqami.rules import presence_value

NOW = time.time()


def load(tmp_path, presences, max_entries=100):
    path = tmp_path / "states.json"
    path.write_text(json.dumps({"version": 1, "presences": presences}))
    return StateFile(str(path), max_entries).load()


@pytest.mark.parametrize("variable, entry", [
    ("PRESENCE_STATE(CustomPresence:1\r\nAction: Originate)", ["away", "s1", NOW]),
    ("PRESENCE_STATE(CustomPresence:1)junk", ["away", "s1", NOW]),
    ("PRESENCE_STATE(SIP/1)", ["away", "s1", NOW]),                  # not writable
    ("PRESENCE_STATE(CustomPresence:1)", ["gone", "s1", NOW]),       # not a presence state
    ("PRESENCE_STATE(CustomPresence:1)", ["away,,a\nb", "s1", NOW]),  # control character
    ("PRESENCE_STATE(CustomPresence:1)", ["away,,x,e", "s1", NOW]),  # bad base64
    ("PRESENCE_STATE(CustomPresence:1)", ["away", "s1\n", NOW]),
    ("PRESENCE_STATE(CustomPresence:1)", ["away", "", NOW]),
    ("PRESENCE_STATE(CustomPresence:1)", ["away", "s1", 10 ** 400]),
    ("PRESENCE_STATE(CustomPresence:1)", ["away", "s1", -1]),
    ("PRESENCE_STATE(CustomPresence:1)", ["away", "s1", True]),
    ("PRESENCE_STATE(CustomPresence:1)", ["away", "s1"]),
])
def test_an_entry_asterisk_could_not_have_sent_is_skipped(tmp_path, caplog, variable, entry):
    caplog.set_level(logging.INFO)
    good = {"PRESENCE_STATE(CustomPresence:2)": ["dnd", "s1", NOW]}
    assert set(load(tmp_path, dict(good, **{variable: entry}))) == set(good)
    assert "1 skipped, such as" in caplog.text


def test_a_time_ahead_of_the_clock_counts_as_now_and_is_logged_once(tmp_path, caplog):
    saved = load(tmp_path, {f"PRESENCE_STATE(CustomPresence:{i})": ["away", "s1", NOW + 86400]
                            for i in range(5)})
    assert all(wall <= time.time() for _, _, wall in saved.values())
    assert caplog.text.count("ahead of this machine's clock") == 1


def test_the_largest_valid_entry_fits_the_bound_and_more_entries_than_allowed_do_not(tmp_path):
    text = "é" * 2000  # 4000 bytes of UTF-8, each character escaped to 6 bytes in JSON
    value = presence_value("away", text, text)
    name = "PRESENCE_STATE(CustomPresence:" + "é" * 84 + ")"
    entry = json.dumps({name: [value, "é" * 2000, NOW]})
    assert len(entry) <= MAX_ENTRY_BYTES
    assert load(tmp_path, {name: [value, "é" * 2000, NOW]}, max_entries=1)
    many = {f"PRESENCE_STATE(CustomPresence:{i})": ["away", "s1", NOW] for i in range(3)}
    assert load(tmp_path, many, max_entries=2) == {}
