"""Voicemail lamps across servers, end to end: stand-ins that answer as the Asterisk 22 captures
(A runs app_voicemail, B res_mwi_external, C app_voicemail on storage shared with A)."""
import json

import pytest

from harness import restart, run_actions, start_agent, wait_until

BOX = "100@default"


def lamps(servers):
    """The broker's per-server keys: A read only, B written with MWIUpdate, C refreshed."""
    modes = ("none", "external", "refresh")[:len(servers)]
    return {index: {"mwi_write": mode} for index, mode in enumerate(modes)}


def runs(standin, action: str) -> int:
    return standin.control.state()["actions_run"].get(action.lower(), 0)


@pytest.mark.parametrize("ami", [(0, 1, 2), ()], ids=["AMI", "module"])
def test_a_lamp_reaches_a_receiver_as_mwiupdate_and_shared_storage_as_a_refresh(
        standins, broker, ami):
    a, = standins(1, ami_port=0, voicemail="voicemail", loadzmq_delay=None)
    b, = standins(1, ami_port=0, voicemail="external", loadzmq_delay=None)
    c, = standins(1, ami_port=0, voicemail="voicemail", loadzmq_delay=None)
    # (already booted: a LoadZmq in the middle of a slow run would resync them, and B would be
    # written its lamp once more)
    script = broker([a, b, c], ami=ami, server_keys=lamps([a, b, c]), mwi="yes")
    # (C's first read answered: one after the next line would show the broker the box C shares
    # with A before A's news, and there would be nothing to tell C)
    wait_until(lambda: runs(c, "VoicemailUsersList") >= 1, message="C's mailboxes read")
    c.control.set_mailbox(BOX, 2, 1, poll=False)  # (the storage A and C share)
    a.control.set_mailbox(BOX, 2, 1)              # a message left: A's poll publishes it
    wait_until(lambda: b.control.mailboxes().get(BOX) == [2, 1], message="the lamp on B")
    wait_until(lambda: runs(c, "VoicemailRefresh") >= 1, message="C told to count again")
    # B's MessageWaiting after the MWIUpdate (its echo) and C's after its refresh go nowhere:
    # A is never written, and B is written once.
    a.control.set_mailbox("marker@default", 1, 0)
    wait_until(lambda: b.control.mailboxes().get("marker@default") == [1, 0])
    assert runs(a, "MWIUpdate") == 0 and runs(a, "VoicemailRefresh") == 0
    # A lamp set on B by someone else: B runs res_mwi_external, so its MessageWaiting is never
    # taken for news (C would be told to count 200's messages again).
    run_actions(b, {"Action": "MWIUpdate", "Mailbox": "200@default", "NewMessages": "7"})
    a.control.set_mailbox("marker@default", 2, 0)
    wait_until(lambda: b.control.mailboxes().get("marker@default") == [2, 0])
    assert not [r for r in map(json.loads, c.control.requests())
                if r.get("Mailbox") in ("200", "200@default") or "200@default" in str(r)]
    assert len([r for r in b.control.requests() if BOX in r and "MWIUpdate" in r]) == 1
    a.control.set_mailbox(BOX, 0, 3)  # listened to: the lamp goes out everywhere
    wait_until(lambda: b.control.mailboxes().get(BOX) == [0, 3], message="the lamp out on B")
    assert "Traceback" not in script.output()


def test_the_counts_are_right_after_each_restart(standins, broker, processes):
    a = processes("a", ami_port=0, voicemail="voicemail")
    b = processes("b", ami_port=0, voicemail="external")
    keys = lamps([a, b])
    script = broker([a, b], ami=(0, 1), server_keys=keys, mwi="yes", resync_interval="0")
    a.control.set_mailbox(BOX, 1, 0)
    wait_until(lambda: b.control.mailboxes().get(BOX) == [1, 0], message="the lamp on B")
    b.kill()                           # the receiver restarts; a message comes meanwhile
    a.control.set_mailbox(BOX, 2, 0)
    b = restart(processes, b, "b")     # (its database still says 1, 0)
    wait_until(lambda: b.control.mailboxes().get(BOX) == [2, 0], message="B after its restart")
    a.kill()                           # the voicemail server restarts: B keeps the lamp
    a = restart(processes, a, "a")     # (its spool is its database: still 2, 0)
    a.control.set_mailbox(BOX, 2, 0, poll=False)
    wait_until(lambda: runs(a, "VoicemailUsersList") >= 1, message="A read after its restart")
    assert b.control.mailboxes().get(BOX) == [2, 0]
    assert script.stop() == 0          # the broker restarts; a message comes meanwhile
    a.control.set_mailbox(BOX, 3, 0, poll=False)
    broker([a, b], ami=(0, 1), server_keys=keys, mwi="yes", resync_interval="0")
    wait_until(lambda: b.control.mailboxes().get(BOX) == [3, 0], message="B after the broker's")


def test_bad_counts_are_dropped_and_a_refusing_receiver_is_logged_once(standins, broker):
    a, = standins(1, ami_port=0, voicemail="voicemail")
    b, = standins(1, ami_port=0, voicemail="external")
    c, = standins(1, ami_port=0, voicemail="voicemail")  # app_voicemail where MWIUpdate is sent
    script = broker([a, b, c], ami=(0, 1, 2), server_keys={0: {"mwi_write": "none"}}, mwi="yes")
    a.control.ami_raw(b"Event: MessageWaiting\r\nPrivilege: call,all\r\nMailbox: 5@default\r\n"
                      b"Waiting: 1\r\nNew: -1\r\nOld: 0\r\n\r\n")  # set by hand, elsewhere
    for count in range(3):
        a.control.set_mailbox(f"{count}@default", 1, 0)
    wait_until(lambda: len(b.control.mailboxes()) == 3, message="the good counts on B")
    assert "5@default" not in b.control.mailboxes()
    script.wait_for_output("Dropped input from server-1: MessageWaiting: New '-1'")
    script.wait_for_output("server-3 refused MWIUpdate")
    assert len(script.lines("refused MWIUpdate")) == 1
    assert "mwi_write = none" in script.lines("refused MWIUpdate")[0]


def test_lamps_between_agents_through_the_hub(standins, agents):
    a, = standins(1, ami_port=0, voicemail="voicemail")
    b, = standins(1, ami_port=0, voicemail="external")
    agents([a], names="X", ami=(0,), MWI=True, MWI_WRITE="none")
    agents([b], names="Y", ami=(0,), MWI=True)
    a.control.set_mailbox(BOX, 2, 1)
    wait_until(lambda: b.control.mailboxes().get(BOX) == [2, 1], message="the lamp on Y's")
    a.control.set_mailbox(BOX, 0, 3)
    wait_until(lambda: b.control.mailboxes().get(BOX) == [0, 3], message="out on Y's")
    assert runs(a, "MWIUpdate") == 0  # Y's echoes go nowhere


def test_agents_keep_the_counts_right_through_restarts_of_either_asterisk(agents, processes):
    a = processes("a", voicemail="voicemail")
    b = processes("b", voicemail="external")
    agents([a], names="X", MWI=True, MWI_WRITE="none", RESYNC_INTERVAL=0)
    agents([b], names="Y", MWI=True, RESYNC_INTERVAL=0)
    a.control.set_mailbox(BOX, 1, 0)
    wait_until(lambda: b.control.mailboxes().get(BOX) == [1, 0], message="the lamp on Y's")
    b.kill()                           # Y's Asterisk restarts; a message comes meanwhile
    a.control.set_mailbox(BOX, 2, 0)
    b = restart(processes, b, "b")     # (its database still says 1, 0)
    wait_until(lambda: b.control.mailboxes().get(BOX) == [2, 0], message="Y's after its restart")
    a.kill()                           # X's Asterisk restarts: Y keeps the lamp lit
    a = restart(processes, a, "a")
    a.control.set_mailbox(BOX, 2, 0, poll=False)  # (its spool)
    wait_until(lambda: runs(a, "VoicemailUsersList") >= 1, message="X read after its restart")
    assert b.control.mailboxes().get(BOX) == [2, 0]
    a.control.set_mailbox(BOX, 3, 1)   # and the next message still reaches Y
    wait_until(lambda: b.control.mailboxes().get(BOX) == [3, 1], message="Y's after X's restart")


def test_agents_keep_the_counts_right_through_restarts_of_either_agent(standins, agents, hub,
                                                                       tmp_path):
    a, = standins(1, voicemail="voicemail")
    b, = standins(1, voicemail="external")
    x, = agents([a], names="X", MWI=True, MWI_WRITE="none", RESYNC_INTERVAL=0)
    y, = agents([b], names="Y", MWI=True, RESYNC_INTERVAL=0)
    a.control.set_mailbox(BOX, 1, 0)
    wait_until(lambda: b.control.mailboxes().get(BOX) == [1, 0], message="the lamp on Y's")
    urls = dict(ZMQ_PUB_URL=hub.pull_url, ZMQ_SUB_URL=hub.pub_url, MWI=True, RESYNC_INTERVAL=0)
    assert y.stop() == 0               # Y's agent restarts; a message comes meanwhile
    a.control.set_mailbox(BOX, 2, 0)
    start_agent(tmp_path, "Y", b, **urls)  # (it asks its peers for their states)
    wait_until(lambda: b.control.mailboxes().get(BOX) == [2, 0], message="after Y's restart")
    assert x.stop() == 0               # X's agent restarts; a message comes meanwhile
    a.control.set_mailbox(BOX, 3, 0, poll=False)
    start_agent(tmp_path, "X", a, MWI_WRITE="none", **urls)  # (it reads its mailboxes)
    wait_until(lambda: b.control.mailboxes().get(BOX) == [3, 0], message="after X's restart")
