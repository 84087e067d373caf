"""The event loop: input is handled the moment it arrives, and batched only under load; a stall
of the process is noticed."""
import threading
import time

import zmq

from harness import wait_until
from zmqami.loop import BUSY_TO_BATCH, BUSY_TO_STOP, STALL, EventLoop, drain


def test_a_loop_that_is_not_loaded_handles_each_message_at_once(context):
    """With a batch interval of a minute: a loop that batched would hold the second message for
    a minute (issue 27: every relay held a steady 1000/s stream up to 2 ms in each process)."""
    inbox, outbox = context.socket(zmq.PAIR), context.socket(zmq.PAIR)
    inbox.bind("inproc://loop-test")
    outbox.connect("inproc://loop-test")
    loop = EventLoop(batch_interval=60.0)
    got = []

    def take() -> None:
        drain(inbox, got.extend)
        if len(got) == 1:
            loop.call_later(0.01, lambda: outbox.send(b"second"))
        elif len(got) == 2:
            loop.stop()
    loop.add_reader(inbox, take)
    loop.call_later(0.0, lambda: outbox.send(b"first"))
    running = threading.Thread(target=loop.run, daemon=True)
    running.start()
    wait_until(lambda: not running.is_alive(), timeout=30, message="both messages handled")
    assert got == [b"first", b"second"] and not loop.batching
    inbox.close()
    outbox.close()


def test_batching_starts_under_load_and_stops_when_it_is_gone():
    loop = EventLoop(batch_interval=0.002)
    window = 0.05
    cpu, now = 0.0, 0.0

    def measure(share: float) -> bool:
        nonlocal cpu, now
        now, cpu = now + window, cpu + share * window
        loop.measure_load(now, cpu)
        return loop.batching
    assert measure(0.0) is False
    assert measure(BUSY_TO_BATCH - 0.05) is False
    assert measure(BUSY_TO_BATCH + 0.05) is True
    assert measure(BUSY_TO_STOP + 0.05) is True  # (batches cost less: it stays on)
    assert measure(BUSY_TO_STOP - 0.05) is False
    assert measure(BUSY_TO_BATCH - 0.05) is False


def test_a_wake_up_long_after_its_timeout_without_running_is_a_stall():
    """Wall time the thread neither ran nor was allowed to wait for (the poll's timeout, a
    batch's pause) is a stall of the process: a paused VM, SIGSTOP."""
    loop = EventLoop(batch_interval=0.002)
    stalls = []
    loop.on_stall(stalls.append)
    now, cpu = time.monotonic(), time.thread_time()
    loop._check_stall((now - 0.5, cpu), 1000)  # woke before its timeout: input
    loop._check_stall((now - 1.5, cpu), 1000)  # its timeout, then a little late
    loop._check_stall((now - STALL - 2, cpu - STALL - 2), 0)  # it was busy all along
    loop._check_stall((now - STALL - 2, cpu), None)  # (no timeout: it waited for input)
    assert stalls == []
    loop._check_stall((now - STALL - 2, cpu), 1000)  # held for more than STALL
    assert len(stalls) == 1 and stalls[0] > STALL
