"""The one event loop each script runs: a zmq.Poller, timers, and a clean stop on SIGTERM/SIGINT.

Readers are called when their socket has input; timers when they are due.  Nothing else runs, so
the whole program is single-threaded and every handler may assume it runs alone.
"""
import heapq
import itertools
import logging
import signal
import socket
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import zmq

log = logging.getLogger(__name__)

Pollable = Union[zmq.Socket, int]


READ_BATCH = 1000  # messages handled per wake-up before other sockets get their turn
# s: under load the relays (broker, hub, agent) handle input in batches at most this often
# (EventLoop._pace), which adds at most this to a state's way through each of them.
BATCH_INTERVAL = 0.002
# Under load means: the loop's thread used more than BUSY_TO_BATCH of a CPU over the last
# LOAD_WINDOW; batching goes on until it uses less than BUSY_TO_STOP (batches cost less).
LOAD_WINDOW = 0.05
BUSY_TO_BATCH, BUSY_TO_STOP = 0.4, 0.2
# s: a wake-up this much later than the loop asked for, without the loop's thread running
# meanwhile, is a stall of the whole process (SIGSTOP, a paused VM, swapping): EventLoop.on_stall.
STALL = 1.0
# Plain ints: pyzmq turns each flag or option it is given into an enum, which costs about a
# microsecond; on the path of every message that adds up.
NOBLOCK = int(zmq.NOBLOCK)
SEND_MORE = NOBLOCK | int(zmq.SNDMORE)
POLLOUT, READABLE = int(zmq.POLLOUT), int(zmq.POLLIN | zmq.POLLERR)
# pyzmq's Socket.send and send_multipart are a Python layer (routing_id, group, a flag per frame)
# over its Cython send, and cost about a microsecond a call more: send_frames calls the latter.
_send_frame = zmq.backend.Socket.send

# TCP keep-alive on every connection we open, with short intervals: a peer that vanished without a
# word (a half-open connection: power cut, a NAT or firewall that forgot it) is found within
# about IDLE + INTERVAL * COUNT seconds, not after the kernel's default of two hours.
KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, KEEPALIVE_COUNT = 10, 5, 3


def keep_alive(sock: Union[zmq.Socket, socket.socket]) -> None:
    """Short TCP keep-alives on a ZeroMQ socket (for the connections it makes) or a TCP socket."""
    if isinstance(sock, zmq.Socket):
        sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
        sock.setsockopt(zmq.TCP_KEEPALIVE_IDLE, KEEPALIVE_IDLE)
        sock.setsockopt(zmq.TCP_KEEPALIVE_INTVL, KEEPALIVE_INTERVAL)
        sock.setsockopt(zmq.TCP_KEEPALIVE_CNT, KEEPALIVE_COUNT)
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (("TCP_KEEPIDLE", KEEPALIVE_IDLE), ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL),
                          ("TCP_KEEPCNT", KEEPALIVE_COUNT)):
        if hasattr(socket, option):  # Linux; elsewhere the system's defaults
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)


def drain(sock: zmq.Socket, handle: Callable[[List[Any]], None], copy: bool = True) -> int:
    """Hand each message waiting on sock to handle (up to READ_BATCH), without blocking, as a
    list of bytes (copy=False: of zmq.Frame objects, which carry their sender's User-Id).
    Returns how many there were.

    Frames are read as zmq.Frame, whose ``more`` tells where a message ends: cheaper than
    recv_multipart's getsockopt(RCVMORE) per frame."""
    for count in range(READ_BATCH):
        try:
            frame = sock.recv(NOBLOCK, copy=False)
        except zmq.Again:
            return count
        if not frame.more:  # the common case, a message of one frame
            handle([frame.bytes] if copy else [frame])
            continue
        frames = [frame]
        while frame.more:
            frame = sock.recv(NOBLOCK, copy=False)
            frames.append(frame)
        handle([frame.bytes for frame in frames] if copy else frames)
    return READ_BATCH


def send_frames(sock: zmq.Socket, frames: Sequence[bytes]) -> None:
    """Queue a message without blocking; zmq.Again if sock has no room for it.

    ZeroMQ checks its high-water mark at a message's first frame: when that one is taken, so are
    the others, and a message is never cut."""
    for frame in frames[:-1]:
        _send_frame(sock, frame, SEND_MORE)
    _send_frame(sock, frames[-1], NOBLOCK)


def _key(sock: Any) -> Pollable:
    return sock if isinstance(sock, (zmq.Socket, int)) else sock.fileno()


class Timer:
    """A call scheduled by EventLoop.call_later or call_every; cancel() stops it."""

    def __init__(self, when: float, callback: Callable[[], None], interval: Optional[float]) -> None:
        self.when = when
        self.callback = callback
        self.interval = interval
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class EventLoop:
    """batch_interval (seconds): under load (only), handle input at most once per batch_interval
    (_pace)."""

    def __init__(self, batch_interval: float = 0.0) -> None:
        self.poller = zmq.Poller()
        self.batch_interval = batch_interval
        self.batching = False  # under load: input is let in once per batch_interval
        self._batch_at = 0.0  # when _pace last let input in
        self._window = (0.0, 0.0)  # (monotonic, thread CPU) time where the load's measure began
        self.running = True  # until stop(), which may come before run() (a signal at start-up)
        self.stop_signal: Optional[str] = None
        self._readers: Dict[Pollable, Callable[[], None]] = {}
        self._writers: Dict[Pollable, Callable[[], None]] = {}
        self._timers: List[Tuple[float, int, Timer]] = []
        self._sequence = itertools.count()
        self._wakeup: Optional[Tuple[socket.socket, socket.socket]] = None
        self._on_hangup: Optional[Callable[[], None]] = None
        self._hangup_pending = False
        self._soon: Dict[Callable[[], None], None] = {}  # ordered, each callback once
        self._on_stall: Optional[Callable[[float], None]] = None

    # --- readers and writers ---------------------------------------------------------------------
    # zmq.Poller hands back a plain socket as its file descriptor: that is the key for those.
    def add_reader(self, sock: Pollable, callback: Callable[[], None]) -> None:
        self._readers[_key(sock)] = callback
        self._register(_key(sock))

    def remove_reader(self, sock: Pollable) -> None:
        if self._readers.pop(_key(sock), None) is not None:
            self._register(_key(sock))

    def add_writer(self, sock: Pollable, callback: Callable[[], None]) -> None:
        """callback is called while sock can be written to (a TCP connect done, room to send)."""
        self._writers[_key(sock)] = callback
        self._register(_key(sock))

    def remove_writer(self, sock: Pollable) -> None:
        if self._writers.pop(_key(sock), None) is not None:
            self._register(_key(sock))

    def _register(self, sock: Pollable) -> None:
        flags = (zmq.POLLIN if sock in self._readers else 0) | \
                (zmq.POLLOUT if sock in self._writers else 0)
        if flags:
            self.poller.register(sock, flags)
        elif sock in self.poller:
            self.poller.unregister(sock)

    def soon(self, callback: Callable[[], None]) -> None:
        """Call callback once the handlers of this wake-up have run, once however often asked:
        a batch of events queues its writes, then each server's are sent together."""
        self._soon[callback] = None

    def _run_soon(self) -> None:
        while self._soon:
            callbacks, self._soon = self._soon, {}
            for callback in callbacks:
                callback()

    # --- timers ----------------------------------------------------------------------------------
    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        return self._schedule(Timer(time.monotonic() + delay, callback, None))

    def call_every(self, interval: float, callback: Callable[[], None]) -> Timer:
        return self._schedule(Timer(time.monotonic() + interval, callback, interval))

    def _schedule(self, timer: Timer) -> Timer:
        heapq.heappush(self._timers, (timer.when, next(self._sequence), timer))
        return timer

    def _run_due_timers(self) -> None:
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            _, _, timer = heapq.heappop(self._timers)
            if timer.cancelled:
                continue
            if timer.interval is not None:
                timer.when = max(timer.when + timer.interval, now)
                self._schedule(timer)
            timer.callback()

    def _poll_timeout_ms(self) -> Optional[int]:
        if self._soon:
            return 0
        while self._timers and self._timers[0][2].cancelled:
            heapq.heappop(self._timers)
        if not self._timers:
            return None
        return max(0, int((self._timers[0][0] - time.monotonic()) * 1000) + 1)

    # --- stopping --------------------------------------------------------------------------------
    def stop(self) -> None:
        self.running = False

    def stop_on_signals(self) -> None:
        """SIGTERM and SIGINT (Ctrl-C) end run() after the handler that is running returns.

        The signal's number is written to a socketpair the poller watches (signal.set_wakeup_fd),
        so a blocking poll wakes at once instead of at its next timeout.
        """
        reader, writer = socket.socketpair()
        reader.setblocking(False)
        writer.setblocking(False)
        self._wakeup = (reader, writer)
        signal.set_wakeup_fd(writer.fileno())
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)
        self.add_reader(reader.fileno(), self._drain_wakeup)

    def reload_on_sighup(self, callback: Callable[[], None]) -> None:
        """SIGHUP calls callback from the loop (not from the signal handler)."""
        self._on_hangup = callback
        signal.signal(signal.SIGHUP, self._on_signal)

    def _on_signal(self, signum: int, frame: object) -> None:
        if signum == signal.SIGHUP:
            self._hangup_pending = True
            return
        self.stop_signal = signal.Signals(signum).name
        self.stop()

    def on_stall(self, callback: Callable[[float], None]) -> None:
        """callback(seconds) after the process did not run for seconds (more than STALL) while
        the loop was neither waiting for input nor handling it: its peers went on without it,
        and what they sent meanwhile may have been dropped (ZeroMQ's high-water marks)."""
        self._on_stall = callback

    def _drain_wakeup(self) -> None:
        try:
            self._wakeup[0].recv(64)
        except BlockingIOError:
            pass

    # --- running ---------------------------------------------------------------------------------
    def run(self) -> None:
        self._window = (time.monotonic(), time.thread_time())  # (CPU time: of this thread)
        since = self._window  # where the stall check's measure begins
        while self.running:
            timeout = self._poll_timeout_ms()
            ready = self.poller.poll(timeout)
            for sock, events in ready:
                if events & READABLE and sock in self._readers:
                    self._readers[sock]()
                if events & POLLOUT and sock in self._writers:
                    self._writers[sock]()
                if not self.running:
                    break
            self._run_soon()
            if self._hangup_pending and self.running:
                self._hangup_pending = False
                self._on_hangup()
            self._run_due_timers()
            if ready and self.batch_interval:
                self._pace()
            if self._on_stall is not None:
                since = self._check_stall(since, timeout)

    def _check_stall(self, since: Tuple[float, float], timeout_ms: Optional[int]
                     ) -> Tuple[float, float]:
        """At the end of a wake-up that began at since (monotonic time, this thread's CPU time),
        with a poll of timeout_ms: the time the thread neither ran nor was allowed to wait (the
        poll's timeout, a batch's pause) is time the process was held.  Returns now, where the
        next wake-up's measure begins (one clock reading of each kind per wake-up)."""
        now = (time.monotonic(), time.thread_time())
        if timeout_ms is not None:
            held = (now[0] - since[0]) - (now[1] - since[1]) - timeout_ms / 1000 - \
                self.batch_interval
            if held > STALL:
                self._on_stall(held)
        return now

    def _pace(self) -> None:
        """After input was handled: under load, let more gather until batch_interval after the
        last batch; otherwise wait for nothing.

        Each wake-up costs a poll, system calls, context switches in this process and in ZeroMQ's
        I/O thread, whatever it finds.  While messages come now and then, each is handled the
        moment it arrives.  At thousands a second, handling them one by one would keep the loop
        busy most of the time: then a batch every couple of milliseconds costs a fraction of
        that, and keeps a busy machine from falling behind.  The loop's load tells the two apart
        (the share of a CPU its thread used: not of the time it spent handling, which a machine
        busy with other work stretches); only under load does input wait, and at most
        batch_interval.
        """
        now = time.monotonic()
        if now - self._window[0] >= LOAD_WINDOW:
            self.measure_load(now, time.thread_time())
        if not self.batching:
            return
        wait = self._batch_at + self.batch_interval - now
        if wait > 0:
            time.sleep(wait)  # (a signal ends run() once this short wait is over)
            now += wait
        self._batch_at = now

    def measure_load(self, now: float, cpu: float) -> None:
        """The load over the window that ends now (monotonic time), when this thread has used
        cpu seconds: under load, or no longer, batching starts or stops."""
        load = (cpu - self._window[1]) / max(now - self._window[0], 1e-9)
        self.batching = load > (BUSY_TO_STOP if self.batching else BUSY_TO_BATCH)
        self._window = (now, cpu)

    def close(self) -> None:
        if self._wakeup:
            signal.set_wakeup_fd(-1)
            if self._on_hangup is not None:
                signal.signal(signal.SIGHUP, signal.SIG_DFL)
            self.remove_reader(self._wakeup[0].fileno())
            for sock in self._wakeup:
                sock.close()
            self._wakeup = None
