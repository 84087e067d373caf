"""The stand-in's voicemail lamps answer like the two Asterisk 22 servers of the MWI captures:
C runs app_voicemail, D runs res_mwi_external (tests/captures/mwi/README.md)."""
import json
from pathlib import Path

import pytest

from harness import AMI_SECRET, AMI_USER, ami_session, restart, run_actions

CAPTURES = Path(__file__).resolve().parent / "captures" / "mwi"
CASES = {case["case"]: case for case in json.loads((CAPTURES / "index.json").read_text())["cases"]}
KEPT_EVENTS = ("MessageWaiting", "DeviceStateChange", "MWIGet", "MWIGetComplete",
               "VoicemailUserEntry", "VoicemailUserEntryComplete")
LAB = dict(ami_user="lab", ami_secret="labsecret")


def comparable(messages):
    """Responses and the voicemail events, without what a lab's asterisk.conf adds (its
    SystemName) and what a login brings (FullyBooted, SuccessfulAuth)."""
    kept = []
    for message in messages:
        pairs = [tuple(pair) for pair in message if pair[0] != "SystemName"]
        if pairs and (pairs[0][0] == "Response" or pairs[0][1] in KEPT_EVENTS):
            kept.append(pairs)
    return kept


def seed(standin, *updates, user="lab", secret="labsecret"):
    """What the lab's D held before a case: MWIUpdates on a connection of their own."""
    run_actions(standin, *({"Action": "MWIUpdate", "Mailbox": box, "NewMessages": str(new),
                            "OldMessages": str(old)} for box, new, old in updates),
                user=user, secret=secret)


# The lab's state before each case (the captures ran in order on the same two servers).
BEFORE_D = {"d02": [], "d03": [("100@default", 1, 0)], "d05": [("100@default", 1, 0)],
            "d07": [("100", 1, 0), ("100@default", 1, 0), ("555@default", 3, 1),
                    ("Weird-Box@nowhere", 1, 0)],
            "d09": [("100@default", 1, 0)], "d16": [("100@default", 1, 0)]}
BEFORE_D["d08"] = BEFORE_D["d07"]


@pytest.mark.parametrize("case", sorted(BEFORE_D))
def test_res_mwi_external_answers_like_asterisk(standins, case):
    standin, = standins(1, ami_port=0, voicemail="external", **LAB)
    seed(standin, *BEFORE_D[case])
    captured = CASES[case]
    expected = comparable(message["headers"] for message in captured["received_messages"]
                          if message["kind"] != "banner")
    received = ami_session(standin.ami_port, (CAPTURES / captured["sent_file"]).read_bytes())
    assert comparable(received) == expected


def test_app_voicemail_answers_like_asterisk(standins):
    standin, = standins(1, ami_port=0, voicemail="voicemail", **LAB)
    standin.control.set_mailbox("100@default", 0, 0, poll=False)
    standin.control.set_mailbox("101@default", 0, 0, poll=False)
    for case in ("c01", "c03"):
        captured = CASES[case]
        expected = comparable(message["headers"] for message in captured["received_messages"]
                              if message["kind"] != "banner")
        received = ami_session(standin.ami_port, (CAPTURES / captured["sent_file"]).read_bytes())
        assert comparable(received) == expected, case
    standin.control.set_mailbox("100@default", 1, 0)            # c04: the poll saw it
    standin.control.set_mailbox("100@default", 2, 0, poll=False)  # the second, not polled yet
    captured = CASES["c05"]
    received = ami_session(standin.ami_port, (CAPTURES / captured["sent_file"]).read_bytes())
    assert comparable(received) == comparable(
        message["headers"] for message in captured["received_messages"]
        if message["kind"] != "banner")


def test_the_counts_of_res_mwi_external_survive_a_restart(processes):
    d = processes("d", ami_port=0, voicemail="external")
    seed(d, ("100@default", 2, 1), user=AMI_USER, secret=AMI_SECRET)
    d = restart(processes, d, "d")  # (kill -9: its database has them)
    assert d.control.mailboxes() == {"100@default": [2, 1]}
