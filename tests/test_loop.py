"""The event loop: input is handled the moment it arrives, and batched only under load."""
import threading

import zmq

from harness import wait_until
from zmqami.loop import BUSY_TO_BATCH, BUSY_TO_STOP, EventLoop, drain


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
