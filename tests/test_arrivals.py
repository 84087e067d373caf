"""The agent's count of the NATS bucket's changes (natsbucket.Arrivals): which were lost."""
from zmqami.natsbucket import MAX_AHEAD, Arrivals


def test_changes_in_order_miss_nothing():
    arrivals = Arrivals()
    arrivals.caught_up(10)  # the first read
    assert arrivals.missed(12) == 0  # 11 and 12 may be on their way
    arrivals.arrived(11)
    arrivals.arrived(12)
    assert arrivals.missed(12) == 0


def test_a_change_still_missing_a_check_later_is_lost():
    arrivals = Arrivals()
    arrivals.caught_up(10)
    arrivals.arrived(12)  # 11 was dropped
    arrivals.arrived(13)
    assert arrivals.missed(13) == 0
    arrivals.arrived(14)  # later changes keep coming: still 11 missing
    assert arrivals.missed(14) == 11
    arrivals.caught_up(14)  # read again
    arrivals.arrived(15)
    assert arrivals.missed(15) == 0
    assert arrivals.missed(15) == 0


def test_a_late_change_is_not_taken_for_a_lost_one():
    arrivals = Arrivals()
    arrivals.caught_up(10)
    arrivals.arrived(12)
    assert arrivals.missed(12) == 0
    arrivals.arrived(11)  # overtaken, not lost
    assert arrivals.complete == 12 and not arrivals.ahead
    assert arrivals.missed(12) == 0


def test_a_read_takes_what_came_before_it_and_keeps_what_came_after():
    arrivals = Arrivals()
    for sequence in (3, 4, 9, 10, 11):  # before the first read was done
        arrivals.arrived(sequence)
    arrivals.caught_up(9)
    assert arrivals.complete == 11 and not arrivals.ahead


def test_the_lost_tail_is_found_too():
    arrivals = Arrivals()
    arrivals.caught_up(5)
    assert arrivals.missed(6) == 0  # 6 stored, never came, nothing after it
    assert arrivals.missed(6) == 6


def test_what_is_held_ahead_is_bounded():
    arrivals = Arrivals()
    for sequence in range(2, MAX_AHEAD + 100):  # 1 never came
        arrivals.arrived(sequence)
    assert len(arrivals.ahead) == MAX_AHEAD
    arrivals.caught_up(1)
    assert arrivals.complete == MAX_AHEAD + 1
