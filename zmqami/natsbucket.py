"""The agent's two jobs on the NATS key-value bucket, in the NATS thread (natsnet.NatsClient):

- ``BucketReader`` takes the peers' keys: the whole bucket read (at start, after a reconnection,
  after a loss), each change republished by the bucket, each key's values in the bucket's order
  and each once, within the bounds on peers and keys; and checks every few seconds that the
  bucket is there and the same one, and that no change was lost on its way (``Arrivals``).
- ``BucketPutter`` puts the agent's own states and heartbeat: the latest value per key, one put
  in flight per key, tried again until NATS takes it; the puts go out one after the other, and
  their acknowledgements come back to one inbox (not a request, a task and a timer each).  A put
  goes out at once, unless puts went out less than PUT_INTERVAL ago: then it waits for the rest
  of that interval, with those that come meanwhile.
"""
import asyncio
import functools
import itertools
import json
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Deque, Dict, List, Optional, Set, Tuple

from .envelope import ALL, build
from .natsnames import HEARTBEAT_KEY, state_key, untoken
from .stats import preview, printable

log = logging.getLogger("agent")

PUT_TIMEOUT = 2.0         # s for JetStream to acknowledge a state
# s: puts go out at most this often, together.  A replicated bucket costs its servers about as
# much per batch of puts as per put (each is one round of replication): at 1000 states/s, puts
# sent together every 5 ms took the three servers' CPU from 2.2 s to 1.4 s (BENCHMARKS.md).
PUT_INTERVAL = 0.005
RETRY_WAIT = (0.25, 1.0)  # s before storing failed states again: first, then doubling up to
# (a stream without a leader takes seconds to elect one: the states are stored soon after)
READ_TIMEOUT = 10.0       # s: a read of the bucket that brings nothing for so long starts again
STALE_READS_MAX = 8       # reads in a row found behind the stream's leader, read again
BUCKET_CHECK_INTERVAL = 3.0  # s between checks that the bucket is there and the same one
BUCKET_CHECK_SPACING = 0.2   # s at least between two checks, however many are asked for sooner
# The largest value an agent stores: a presence of the largest valid subtype and message (4000
# bytes of UTF-8 each, escaped up to 3 times in JSON), in its envelope.  Larger values are
# neither stored by the bucket nor kept by an agent.
MAX_VALUE_BYTES = 32 * 1024
WATCH_HEARTBEAT = 1.0     # s: a read of the bucket silent for twice this is started again
MAX_AHEAD = 100_000       # changes held that came after one still missing (Arrivals)


def stored_first(entries: List[Tuple[str, bytes, float]]) -> List[Tuple[str, bytes, float]]:
    """A read's entries, heartbeats first: each peer is known up or down before its states."""
    return sorted(entries, key=lambda entry: not entry[0].endswith("." + HEARTBEAT_KEY))


def why(exc: BaseException) -> str:
    """An error of nats-py in one line, with what the server said (its repr leaves that out)."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@dataclass
class Read:
    """One read of the bucket under way (an ordered consumer, dropped once it has caught up)."""
    number: int  # what the subscription brings counts only while it is the reader's number
    entries: Dict[str, Tuple[int, bytes, float]] = field(default_factory=dict)  # key ->
    # (sequence, body, age in s), handed over at once when the read is done
    target: int = 0    # the stream's last sequence as its leader told it when the read began:
    highest: int = 0   # a read that ends below it came from a server still catching up
    last: int = 0      # the stream's last sequence then, even if it holds nothing (purged)
    progress: float = 0.0  # (the NATS thread's loop time) when it last brought a key
    subscription: Any = None


class Arrivals:
    """Which of the bucket's changes have reached this agent.  The bucket numbers what it stores
    1, 2, 3... and republishes each on core NATS, which delivers at most once: a leaf node's link
    or a route that drops, drops changes while this agent's own connection stays up, and
    nothing else would tell.  A change still missing a whole check after the bucket's last
    sequence passed it was lost: the bucket must be read again."""

    def __init__(self) -> None:
        self.complete = 0  # every change up to this one has come (or a read caught up with it)
        self.ahead: Set[int] = set()  # changes that came after one still missing
        self.expected = 0  # the bucket's last sequence at the previous check

    def arrived(self, sequence: int) -> None:
        if sequence == self.complete + 1:
            self._complete_to(sequence)
        elif sequence > self.complete and len(self.ahead) < MAX_AHEAD:
            self.ahead.add(sequence)  # (the one before it may only be late: rare)

    def caught_up(self, sequence: int) -> None:
        """A read of the whole bucket took everything up to sequence."""
        if sequence > self.complete:
            self.ahead = {later for later in self.ahead if later > sequence}
            self._complete_to(sequence)

    def _complete_to(self, sequence: int) -> None:
        self.complete = sequence
        while self.complete + 1 in self.ahead:
            self.complete += 1
            self.ahead.discard(self.complete)

    def missed(self, last: int) -> int:
        """At a check, with the bucket's last sequence: the first change lost (else 0)."""
        lost = self.complete + 1 if self.complete < self.expected else 0
        self.expected = 0 if lost else last
        return lost

    def forget(self) -> None:
        """The bucket was made again: its sequences start again at 1."""
        self.complete = self.expected = 0
        self.ahead.clear()


class BucketReader:
    def __init__(self, client: Any) -> None:
        self.client = client  # natsnet.NatsClient: its connection, names, warnings, hand-over
        self.read: Optional[Read] = None  # the read under way
        self.reads = 0                    # reads started (a read's number)
        self.has_read = False             # the first read is done
        self.stale_reads = 0              # reads in a row that ended behind the leader
        self.rereading: Optional["asyncio.Task[None]"] = None
        self.sequences: Dict[str, int] = {}  # key -> the bucket's sequence of its value known
        # When the bucket's stream was created: a new one means the bucket was lost and made
        # again.  No value of the bucket has a sequence beyond its last (_forged_sequences).
        self.stream_created: Any = None
        self.highest_sequence = 0  # of every value taken
        self.suspects: Dict[str, int] = {}  # keys beyond the stream's last sequence at a check
        self.arrivals = Arrivals()
        self.per_owner: Dict[str, int] = {}  # keys known per peer, bounded (MAX_DEVICES_PER_PEER)
        self.max_keys = client.settings["MAX_DEVICES_PER_PEER"] + 1  # its states, its heartbeat
        # Set to check the bucket before BUCKET_CHECK_INTERVAL is up (made in the NATS thread's
        # loop: an asyncio.Event of Python 3.9 binds to the loop of the thread that makes it).
        self.check_asked: Optional[asyncio.Event] = None

    # --- reading the whole bucket ---------------------------------------------------------------
    async def read_bucket(self) -> None:
        """Read the bucket's latest value of every key: at start, and after a reconnection, for
        the changes missed meanwhile."""
        from nats.js.api import DeliverPolicy
        client = self.client
        # What a read replaced had brought stays: its keys' sequences are known already, so the
        # new read would not bring them again.
        old = self.read
        if old is not None and old.subscription is not None:
            await old.subscription.unsubscribe()
        self.reads += 1
        read = self.read = Read(self.reads, old.entries if old is not None else {})
        # The stream's leader answers this: a read that ends below its last sequence was served
        # by a replica still catching up (a server just restarted) and misses changes.
        stream = await client.js.stream_info(client.stream)
        read.last = stream.state.last_seq
        read.target = read.last if stream.state.messages else 0
        read.subscription = await client.js.subscribe(
            client.key_prefix + ">", stream=client.stream,
            cb=functools.partial(self.on_read_entry, read.number), ordered_consumer=True,
            deliver_policy=DeliverPolicy.LAST_PER_SUBJECT, idle_heartbeat=WATCH_HEARTBEAT)
        read.progress = client.aio.time()
        client.aio.call_later(READ_TIMEOUT, self._check_read, read.number)
        info = await read.subscription.consumer_info()
        if info.num_pending == 0 and read.subscription.delivered == 0:
            if read.target:  # the callers try again later
                raise RuntimeError(f"the server that read it shows none of its "
                                   f"{stream.state.messages} entries yet: it is catching up")
            await self._read_done()

    def _check_read(self, number: int) -> None:
        """A read that brought nothing for READ_TIMEOUT (its consumer lost with a server that
        restarted, say) is started again; one that makes progress is left to finish."""
        read = self.read
        if read is None or number != self.reads:
            return
        silent = self.client.aio.time() - read.progress
        if silent < READ_TIMEOUT:
            self.client.aio.call_later(READ_TIMEOUT - silent, self._check_read, number)
            return
        self.client.warn("read", f"The read of the NATS bucket {self.client.bucket} brought "
                                 f"nothing for {READ_TIMEOUT:g} s: reading it again")
        self.read_again()

    def read_again(self) -> None:
        """Read the bucket again (after a reconnection, or changes dropped): a read under way
        is replaced, as it may have started before what it must catch."""
        if self.rereading is not None:
            self.rereading.cancel()
        self.rereading = self.client.aio.create_task(self._read_until_done())

    async def _read_until_done(self) -> None:
        wait = RETRY_WAIT[0]
        while self.client.connected():
            try:
                await self.read_bucket()
                return
            except Exception as exc:  # JetStream still electing a leader, say
                self.client.warn("bucket", f"Cannot read the NATS bucket again yet ({why(exc)})")
                await asyncio.sleep(wait)
                wait = min(2 * wait, RETRY_WAIT[1])

    async def on_read_entry(self, number: int, msg: Any) -> None:
        """One key of the bucket, read (its value stored that many seconds ago)."""
        if number != self.reads:
            return  # from a read since replaced
        read, meta = self.read, msg.metadata
        age = max(0.001, time.time() - meta.timestamp.timestamp())
        if read is not None:
            read.progress = self.client.aio.time()
            read.highest = max(read.highest, meta.sequence.stream)
        self.take_entry(msg.subject, meta.sequence.stream, msg, age)
        if meta.num_pending != 0 or read is None:
            return  # (None: late, after the read was done: a change like any other)
        if read.highest < read.target and self.stale_reads < STALE_READS_MAX:
            # Not the newest: a replica still catching up served it.  Read again a little later
            # (a few times at most: an administrator's purge can remove the last entry too).
            self.stale_reads += 1
            self.client.warn("read", f"The read of the NATS bucket {self.client.bucket} ended "
                                     f"at sequence {read.highest}, before its last, "
                                     f"{read.target}: its server is catching up; reading it again")
            self.reads += 1  # what this read brings from now on is not the read's
            self.client.aio.call_later(RETRY_WAIT[0] * self.stale_reads, self.read_again)
            return
        await self._read_done()

    async def _read_done(self) -> None:
        """The read has caught up: hand over what it brought (heartbeats first, so that each
        peer is known up or down before its states), unless a change came since."""
        read, self.read = self.read, None
        if read is None:
            return
        entries = stored_first([(key, body, age) for key, (sequence, body, age) in
                                read.entries.items() if self.sequences[key] == sequence])
        for key, body, age in entries:
            self.client.hand_over(key, body, age)
        if not self.has_read:
            log.info("Read %d states and heartbeats of the peers from the NATS bucket %s",
                     len(entries), self.client.bucket)
        else:
            log.info("Read the NATS bucket %s again: %d changes missed meanwhile",
                     self.client.bucket, len(entries))
        self.has_read = True
        self.stale_reads = 0
        self.arrivals.caught_up(read.last)
        if read.subscription is not None:
            await read.subscription.unsubscribe()

    # --- each value ---------------------------------------------------------------------------
    async def on_republished(self, msg: Any) -> None:
        """A change the bucket stored, republished at once (Nats-Subject: its key, and its
        Nats-Sequence in the bucket)."""
        headers = msg.headers or {}
        try:
            sequence = int(headers["Nats-Sequence"])
            subject = headers["Nats-Subject"]
        except (KeyError, ValueError):
            self.client.warn("input", f"Ignored a message on {msg.subject} that the bucket did "
                                      "not republish (no Nats-Sequence or Nats-Subject)")
            return
        self.arrivals.arrived(sequence)
        self.take_entry(subject, sequence, msg, None)

    def take_entry(self, subject: str, sequence: int, msg: Any, age: Optional[float]) -> None:
        """Each key's values in the bucket's order, each once, whichever way they came: a
        change (age None) is handed over at once, unless the first read is under way; what a
        read brings is handed over when the read is done."""
        client = self.client
        if not subject.startswith(client.key_prefix):
            return
        key = subject[len(client.key_prefix):]
        known = self.sequences.get(key)
        if known is not None and sequence <= known or key.startswith(client.own_keys):
            if age is None and known is not None and sequence < known:
                self.check_bucket_soon()  # a change numbered from 1 again: a new bucket?
            return
        if len(msg.data) > MAX_VALUE_BYTES:
            client.warn("input", f"Ignored a value of {len(msg.data)} bytes in the NATS bucket "
                                 f"({printable(key)}): more than {MAX_VALUE_BYTES}")
            return
        if known is None and not self._room_for(key):
            return
        self.sequences[key] = sequence
        if sequence > self.highest_sequence:
            self.highest_sequence = sequence
        if msg.headers and msg.headers.get("KV-Operation") in ("DEL", "PURGE"):
            return  # an administrator's purge: nothing to mirror
        if self.read is not None and (age is not None or not self.has_read):
            self.read.entries[key] = (sequence, msg.data, age or 0.001)
        else:
            client.hand_over(key, msg.data, 0.0)

    def _room_for(self, key: str) -> bool:
        """A new key is kept (its sequence, its value) only within the bounds on peers and on
        each peer's keys: what a peer puts in the bucket cannot exhaust this agent's memory."""
        owner = key.split(".", 1)[0]
        count = self.per_owner.get(owner)
        max_peers = self.client.settings["MAX_PEERS"]
        if count is None and len(self.per_owner) > max_peers:
            self.client.warn("input", f"Ignored the NATS bucket's keys of {printable(owner)}: "
                                      f"more than {max_peers} peers (MAX_PEERS)")
            return False
        if (count or 0) >= self.max_keys:
            self.client.warn("input", f"Ignored keys of {printable(owner)} in the NATS bucket: "
                                      f"more than {self.max_keys - 1} states "
                                      "(MAX_DEVICES_PER_PEER)")
            return False
        try:
            untoken(owner)
        except (ValueError, UnicodeDecodeError):
            self.client.warn("input", f"Ignored a key of the NATS bucket that no agent writes: "
                                      f"{printable(key)}")
            return False
        self.per_owner[owner] = (count or 0) + 1
        return True

    # --- is the bucket there, and the same one? -------------------------------------------------
    async def watch_bucket(self) -> None:
        """Every BUCKET_CHECK_INTERVAL: is the bucket there, and the same one?  One that was lost
        (deleted, or its only server restarted with an empty store) is made again if this agent
        may, else waited for; a new one (sequences start again at 1) makes this agent forget
        the sequences it held, read it again and put its own states again.  Sequences beyond the
        stream's last one were never the bucket's (a forged republished header): forgotten."""
        from nats.js.errors import NotFoundError
        client = self.client
        self.check_asked = asyncio.Event()
        while True:
            await asyncio.sleep(BUCKET_CHECK_SPACING)  # whoever asks (forged sequences too)
            try:
                await asyncio.wait_for(self.check_asked.wait(),
                                       BUCKET_CHECK_INTERVAL - BUCKET_CHECK_SPACING)
            except asyncio.TimeoutError:
                pass
            self.check_asked.clear()
            if not client.connected():
                continue
            try:
                info = await client.js.stream_info(client.stream)
            except NotFoundError:
                client.warn("lost", f"The NATS bucket {client.bucket} is gone: making it again "
                                    "(or waiting for it)")
                try:
                    await client.bucket_republishing()
                    self.check_asked.set()  # the check after it finds a new bucket: take it
                except Exception as exc:  # no permission: another agent or an admin makes it
                    client.warn("lost", f"Cannot make the NATS bucket {client.bucket} "
                                        f"({why(exc)}); waiting for it")
                continue
            except Exception as exc:  # no leader yet, a timeout: the next check
                log.debug("NATS bucket check: %s", why(exc))
                continue
            if info.created != self.stream_created:
                self._bucket_replaced(info)
                continue
            lost = self.arrivals.missed(info.state.last_seq) if self.read is None else 0
            if lost:
                client.warn("missed", f"A change stored in the NATS bucket {client.bucket} did "
                                      f"not reach this agent (sequence {lost}): reading the "
                                      "bucket again")
                self.read_again()
            forged = self._forged_sequences(info.state.last_seq)
            if forged:
                for key in forged:
                    del self.sequences[key]
                self.highest_sequence = max(self.sequences.values(), default=0)
                client.warn("forged", f"{len(forged)} keys of the NATS bucket had a sequence "
                                      f"beyond its last ({info.state.last_seq}), such as "
                                      f"{printable(forged[0])}: not from the bucket; reading it "
                                      "again")
                self.read_again()

    def check_bucket_soon(self) -> None:
        """A put found no stream, a change came numbered below one already taken, or the
        connection came back (perhaps to a server that lost its store): check the bucket now
        rather than at the next interval."""
        if self.check_asked is not None:
            self.check_asked.set()

    def _forged_sequences(self, last: int) -> List[str]:
        """The keys whose sequence was beyond the stream's last one at the previous check and
        still is: never the bucket's.  (Beyond it at one check only is normal: a change may
        be republished to us before the answer that tells the last sequence.)"""
        suspects, self.suspects = self.suspects, {}
        if self.highest_sequence <= last:
            return []
        self.suspects = {key: sequence for key, sequence in self.sequences.items()
                         if sequence > last}
        return [key for key, sequence in suspects.items() if self.suspects.get(key) == sequence]

    def _bucket_replaced(self, info: Any) -> None:
        """The bucket was made again: what this agent knew of the old one no longer holds."""
        log.warning("The NATS bucket %s was made again (it was lost): reading it again and "
                    "storing this agent's states again", self.client.bucket)
        self.stream_created = info.created
        self.sequences.clear()
        self.suspects.clear()
        self.highest_sequence = 0
        self.arrivals.forget()
        self.per_owner.clear()
        self.client.putter.store_again()
        self.read_again()


class BucketPutter:
    def __init__(self, client: Any) -> None:
        self.client = client  # natsnet.NatsClient
        self.unstored: Dict[str, Tuple[bytes, Any]] = {}  # key -> (body, x_data) to put
        self.stored: Dict[str, Tuple[bytes, Any]] = {}  # key -> (body, x_data) the bucket has
        self.putting: Dict[str, Tuple[int, bytes, Any]] = {}  # key -> (connection, body, data)
        self.connection = 0  # counts reconnections: a put knows on which one it was sent
        self.retry: Optional[asyncio.TimerHandle] = None  # after a failed put: all again, later
        self.retry_wait = RETRY_WAIT[0]
        self.sending: Deque[str] = deque()  # keys whose put is to be published, in order
        self.sender: Optional["asyncio.Task[None]"] = None
        self.inbox = ""  # JetStream acknowledges each put on <inbox>.<its token>
        self.tokens = itertools.count()
        # token -> (key, connection, when sent): the puts awaiting their acknowledgement, oldest
        # first (a put unacknowledged for PUT_TIMEOUT failed)
        self.acks: Dict[str, Tuple[str, int, float]] = {}
        self.sweep: Optional[asyncio.TimerHandle] = None
        self.sent_at = -PUT_INTERVAL  # (the NATS thread's loop time) when puts last went out

    async def listen(self) -> None:
        """Subscribe to the inbox of this connection's acknowledgements (nats-py subscribes
        again after each reconnection)."""
        self.inbox = self.client.nc.new_inbox()
        await self.client.nc.subscribe(self.inbox + ".*", cb=self.on_ack)

    def store_snapshot(self, message: Dict[str, Any]) -> None:
        """An AgentStates to every peer (at start, after its Asterisk's restart, anti-entropy):
        each state the bucket does not have yet is put there too."""
        events = message.get("x_events")
        name = self.client.name
        for event in events if isinstance(events, list) else []:
            key = state_key(name, event)
            if key is not None and self.stored.get(key, (b"", None))[1] != event:
                self.store(key, build(ALL, "AsteriskEvent", name,
                                      heartbeat=message.get("x_heartbeat"), data=event)[1], event)

    def store(self, key: str, body: bytes, data: Any) -> None:
        self.unstored[key] = (body, data)
        if key not in self.putting and self.client.bucket_open and self.retry is None:
            self._put(key)

    def _put(self, key: str) -> None:
        """Put a key's latest value; each key has at most one put in flight, so that a slow put
        never lands after a newer one."""
        body, data = self.unstored.pop(key)
        self.putting[key] = (self.connection, body, data)
        self.sending.append(key)
        if self.sender is None:
            self.sender = self.client.aio.create_task(self._send_puts())

    async def _send_puts(self) -> None:
        """Publish the puts waiting, each with the reply subject of its acknowledgement, once
        PUT_INTERVAL has passed since puts last went out (those that come meanwhile join)."""
        try:
            wait = self.sent_at + PUT_INTERVAL - self.client.aio.time()
            if wait > 0:
                await asyncio.sleep(wait)
            self.sent_at = self.client.aio.time()
            while self.sending:
                key = self.sending.popleft()
                connection, body, _ = self.putting.get(key, (None, b"", None))
                if connection != self.connection:
                    continue  # (reconnected meanwhile: it is put again from unstored)
                token = str(next(self.tokens))
                self.acks[token] = (key, connection, self.client.aio.time())
                try:
                    await self.client.nc.publish(self.client.put_prefix + key, body,
                                                 reply=f"{self.inbox}.{token}")
                except Exception as exc:  # connection closed, buffer full...
                    del self.acks[token]
                    self._put_done(key, connection, why(exc))
        finally:
            self.sender = None
        if self.acks and self.sweep is None:
            self.sweep = self.client.aio.call_later(PUT_TIMEOUT / 4, self._time_out_puts)

    async def on_ack(self, msg: Any) -> None:
        """JetStream's answer to a put: its acknowledgement, an error, or "no responders"."""
        entry = self.acks.pop(msg.subject[len(self.inbox) + 1:], None)
        if entry is None:
            return  # timed out already, or not a put of ours
        key, connection, _ = entry
        status = (msg.headers or {}).get("Status")
        if status == "503":  # no responders: the bucket's stream is gone, or has no leader
            self.client.reader.check_bucket_soon()
            self._put_done(key, connection, "status 503: no stream answered")
            return
        if status:
            self._put_done(key, connection, f"status {printable(status)}")
            return
        try:
            answer = json.loads(msg.data)
        except ValueError:
            answer = None
        error = answer.get("error") if isinstance(answer, dict) else None
        if isinstance(answer, dict) and "seq" in answer and error is None:
            self._put_done(key, connection, None)
        elif isinstance(error, dict):
            self._put_done(key, connection, f"JetStream: {printable(error.get('description'))}")
        else:
            self._put_done(key, connection, f"an answer that is no acknowledgement: "
                                            f"{preview(msg.data)}")

    def _time_out_puts(self) -> None:
        """Every PUT_TIMEOUT / 4 while puts await their acknowledgement: those sent PUT_TIMEOUT
        ago or more failed (an answer lost, a stream without a leader)."""
        self.sweep = None
        expired = self.client.aio.time() - PUT_TIMEOUT
        while self.acks:
            token, (key, connection, sent) = next(iter(self.acks.items()))  # the oldest
            if sent > expired:
                break
            del self.acks[token]
            self._put_done(key, connection, f"no acknowledgement within {PUT_TIMEOUT:g} s")
        if self.acks:
            self.sweep = self.client.aio.call_later(PUT_TIMEOUT / 4, self._time_out_puts)

    def _put_done(self, key: str, connection: int, failure: Optional[str]) -> None:
        if self.putting.get(key, (None,))[0] != connection:
            return  # sent on a connection since lost: already put again on the new one
        body, data = self.putting.pop(key)[1:]
        if failure is None:
            self.stored[key] = (body, data)
            if self.retry is None and self.retry_wait > RETRY_WAIT[0]:
                self.retry_wait = RETRY_WAIT[0]
                log.info("NATS stores states again")
            if key in self.unstored and self.retry is None:
                self._put(key)
            return
        self.unstored.setdefault(key, (body, data))  # unless a newer value came
        if self.retry is None:
            self.client.warn("store", f"NATS did not store a state ({failure}); trying again, "
                                      f"{len(self.unstored)} states waiting")
            self.retry = self.client.aio.call_later(self.retry_wait, self.put_unstored)
            self.retry_wait = min(2 * self.retry_wait, RETRY_WAIT[1])

    def put_unstored(self) -> None:
        """After a failure: put every waiting state again (those not in flight).  Not while
        disconnected: the reconnection does it."""
        self.retry = None
        if not self.client.connected():
            return
        for key in [key for key in self.unstored if key not in self.putting]:
            self._put(key)

    def put_again_after_reconnecting(self) -> None:
        """What was put on a lost connection either was stored or never will be: put it again
        now rather than after its timeout (the same value twice is harmless)."""
        self.connection += 1
        for key, (_, body, data) in self.putting.items():
            self.unstored.setdefault(key, (body, data))
        self.putting.clear()
        self.sending.clear()
        self.acks.clear()
        if self.retry is not None:
            self.retry.cancel()
        self.put_unstored()

    def store_again(self) -> None:
        """The bucket was made again: everything this agent stored must be put again."""
        for key, value in self.stored.items():
            self.unstored.setdefault(key, value)
        self.stored.clear()
        self.put_unstored()

    async def until_stored(self) -> None:
        while self.unstored or self.putting:
            await asyncio.sleep(0.05)
