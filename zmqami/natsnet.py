"""The agent's network over NATS (NATS_URLS): a NATS cluster instead of the ZeroMQ hub.

Messages keep the hub network's envelope: the same JSON body, on subjects that mirror its topics
(the prefix is NATS_SUBJECT_PREFIX, ``zmqami`` by default):

    zmqami.all           [*]              every agent
    zmqami.node.<name>   [<name>]         one node (an agent, or a client such as a console)
    zmqami.stats         [AsteriskStats]  keep-alive reports

The states live in a JetStream key-value bucket (NATS_BUCKET, replicated NATS_REPLICAS times):
each agent puts its own Asterisk's states under its own keys, and mirrors the others' keys.  The
bucket republishes each change it stores on ``<prefix>.kv.<key>``, with its sequence number; an
agent subscribes to those, and reads the whole bucket (the latest value of each key) when it
starts and after each reconnection: it so has the current states at once, with no request and
answer round, and takes each key's values in the bucket's order, each once (ZeroMQ's Clone
pattern, done by JetStream).

    <name>.device.<device>       the body of its last AsteriskEvent for that device
    <name>.presence.<presence>   ... for that presence
    <name>.heartbeat             its last AgentHeartbeat: a stopped agent's is old

In subjects and keys a name keeps its letters, digits, ``-``, ``_`` and ``/``; every other byte
(UTF-8) is written ``=XX``: ``SIP/100`` stays, ``Custom:1`` becomes ``Custom=3A1``.

The NATS client (nats-py, asyncio) runs in a thread of its own.  It hands what it receives to the
agent's loop through an inproc ZeroMQ socket, and takes what the agent sends through the asyncio
loop's call_soon_threadsafe: the agent's one loop never waits for NATS, so an unreachable NATS
never keeps it from its own Asterisk.  A state that could not be stored is kept (its latest value
per key) and tried again until NATS takes it.
"""
import asyncio
import functools
import json
import logging
import ssl
import sys
import threading
import time
from collections import deque
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple

import zmq

from .config import ConfigError, check_each
from .envelope import ALL, STATS, build, topic
from .loop import NOBLOCK, EventLoop, drain
from .network import OnMessage, as_list
from .stats import Throttle, held_back, printable

log = logging.getLogger("agent")

CONNECT_TIMEOUT = 2.0     # s for each connection attempt
RECONNECT_WAIT = 1.0      # s between two attempts on the same server
PUT_TIMEOUT = 2.0         # s for JetStream to acknowledge a state
RETRY_WAIT = (0.25, 1.0)  # s before storing failed states again: first, then doubling up to
# (a stream without a leader takes seconds to elect one: the states are stored soon after)
READ_TIMEOUT = 10.0       # s: a read of the bucket that brings nothing for so long starts again
STALE_READS_MAX = 8       # reads in a row found behind the stream's leader, read again
BUCKET_CHECK_INTERVAL = 3.0  # s between checks that the bucket is there and the same one
# The largest value an agent stores: a presence of the largest valid subtype and message (4000
# bytes of UTF-8 each, escaped up to 3 times in JSON), in its envelope.  Larger values are
# neither stored by the bucket nor kept by an agent.
MAX_VALUE_BYTES = 32 * 1024
WATCH_HEARTBEAT = 1.0     # s: a read of the bucket silent for twice this is started again
STOP_TIMEOUT = 3.0        # s at exit to store what is pending and close
SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_/")
HEARTBEAT_KEY = "heartbeat"
ALL_TOPIC = topic(ALL)
STATE_EVENTS = {"DeviceStateChange": ("device", "Device"),
                "PresenceStateChange": ("presence", "Presentity")}


def token(name: str) -> str:
    """name as one token of a NATS subject or key: letters, digits, - _ / kept, other bytes =XX."""
    return "".join(chr(byte) if byte in SAFE else f"={byte:02X}" for byte in name.encode("utf-8"))


def untoken(text: str) -> str:
    """The name that token() wrote as text."""
    raw, index = bytearray(), 0
    while index < len(text):
        if text[index] == "=":
            raw.append(int(text[index + 1:index + 3], 16))
            index += 3
        else:
            raw.append(ord(text[index]))
            index += 1
    return raw.decode("utf-8")


def subject_for(prefix: str, target: str) -> str:
    """The subject of a hub topic's target: *, AsteriskStats, or a node's name."""
    if target == ALL:
        return f"{prefix}.all"
    if target == STATS:
        return f"{prefix}.stats"
    return f"{prefix}.node.{token(target)}"


def state_key(origin: str, data: Any) -> Optional[str]:
    """The bucket key of an AsteriskEvent's x_data when it is a state; None for anything else."""
    if not isinstance(data, dict) or data.get("Event") not in STATE_EVENTS:
        return None
    kind, field = STATE_EVENTS[data["Event"]]
    name = data.get(field)
    return f"{token(origin)}.{kind}.{token(name)}" if isinstance(name, str) and name else None


def nats_permissions(settings: Dict[str, Any], name: str) -> Dict[str, List[str]]:
    """The least a NATS user needs to be agent name (nats-server's permissions block): its own
    subjects, puts under its own keys only, reading the bucket; no deletion or purge of the
    stream or its consumers, no update of the stream, no publishing on the republish subjects
    (only the bucket itself does).  It may create the bucket when it is missing."""
    prefix, bucket = settings["NATS_SUBJECT_PREFIX"], settings["NATS_BUCKET"]
    domain = settings["NATS_JS_DOMAIN"]
    api = f"$JS.{domain}.API" if domain else "$JS.API"
    stream = f"KV_{bucket}"
    puts = f"$KV.{bucket}.{token(name)}.>"
    return {
        "publish": [f"{prefix}.all", f"{prefix}.node.>", f"{prefix}.stats",
                    f"{api}.{puts}" if domain else puts,
                    f"{api}.INFO", f"{api}.STREAM.INFO.{stream}",
                    f"{api}.STREAM.CREATE.{stream}",
                    f"{api}.CONSUMER.CREATE.{stream}", f"{api}.CONSUMER.CREATE.{stream}.>",
                    f"{api}.CONSUMER.INFO.{stream}.>", f"$JS.FC.{stream}.>"],
        "subscribe": [f"{prefix}.all", f"{prefix}.node.{token(name)}", f"{prefix}.kv.>",
                      "_INBOX.>"]}


LIST_TIMEOUT = 30.0  # s for --nats-ls to connect and read the whole bucket


def print_bucket(config_path: str, settings: Dict[str, Any]) -> int:
    """--nats-ls: every key of the bucket, when it was stored and its value, as NATS holds them
    (for administrators without the nats CLI, which neither PyPI nor Debian 12 has)."""
    import nats
    from nats.js.errors import NoKeysError, NotFoundError

    async def read() -> List[Tuple[str, float, bytes]]:
        client = await nats.connect(
            servers=as_list(settings["NATS_URLS"]), name="zmq-ami --nats-ls",
            user=settings["NATS_USER"], password=settings["NATS_PASSWORD"],
            user_credentials=settings["NATS_CREDS_FILE"], tls=tls_context(config_path, settings),
            connect_timeout=CONNECT_TIMEOUT, max_reconnect_attempts=0, allow_reconnect=False,
            error_cb=_no_report)  # (what fails is said once, below)
        try:
            bucket = await client.jetstream(domain=settings["NATS_JS_DOMAIN"]).key_value(
                settings["NATS_BUCKET"])
            try:
                keys = await bucket.keys()
            except NoKeysError:
                return []
            entries = []
            for key in sorted(keys):
                entry = await bucket.get(key)
                entries.append((key, entry.revision or 0, entry.value or b""))
            return entries
        finally:
            await client.close()
    try:
        entries = asyncio.run(asyncio.wait_for(read(), LIST_TIMEOUT))
    except NotFoundError:
        print(f"{config_path}: NATS_BUCKET: no bucket {settings['NATS_BUCKET']} on "
              f"{', '.join(as_list(settings['NATS_URLS']))}", file=sys.stderr)
        return 1
    except Exception as exc:  # cannot connect, no permission, a timeout: one line, as any error
        print(f"{config_path}: NATS_URLS: cannot read the bucket {settings['NATS_BUCKET']}: "
              f"{_why(exc) if not isinstance(exc, asyncio.TimeoutError) else 'no answer within '}"
              f"{f'{LIST_TIMEOUT:g} s' if isinstance(exc, asyncio.TimeoutError) else ''}",
              file=sys.stderr)
        return 1
    for key, revision, value in entries:
        print(f"{key}  (revision {revision})  {_stored_value(value)}")
    print(f"{len(entries)} keys in the bucket {settings['NATS_BUCKET']}")
    return 0


async def _no_report(exc: Exception) -> None:
    pass


def _stored_value(raw: bytes) -> str:
    """What a value of the bucket says, in one line: its state, or its sender's health."""
    try:
        message = json.loads(raw)
        if message.get("msg_type") == "AgentHeartbeat":
            return f"heartbeat of {printable(message.get('origin'))}: its Asterisk is " \
                   f"{printable(message.get('x_asterisk'))}"
        data = message["x_data"]
        return f"{printable(message.get('origin'))}: " + ", ".join(
            f"{key}={printable(value)}" for key, value in data.items() if key != "Event")
    except (ValueError, TypeError, KeyError, AttributeError):
        return printable(raw.decode("utf-8", "replace"))


def key_owner(key: str) -> str:
    """Whose key it is: the name in its first token (only that agent may put there)."""
    return untoken(key.split(".", 1)[0])


def carries_state(message: Any) -> bool:
    """True for a message that says what a peer's devices, presences or health are: over NATS
    these come from the bucket only, where each agent may put under its own name only."""
    if message.msg_type in ("AgentStates", "AgentHeartbeat"):
        return True
    data = message.field("data")
    return message.msg_type == "AsteriskEvent" and isinstance(data, dict) and \
        data.get("Event") in STATE_EVENTS


def stored_first(entries: List[Tuple[str, bytes, float]]) -> List[Tuple[str, bytes, float]]:
    """A bucket's contents as an agent takes them at start: every heartbeat first, so that each
    peer is known up or down before its states are."""
    return sorted(entries, key=lambda entry: not entry[0].endswith("." + HEARTBEAT_KEY))


def tls_context(config_path: str, settings: Dict[str, Any]) -> Optional[ssl.SSLContext]:
    """TLS towards NATS when NATS_TLS_CA is set (or a URL is tls://); errors name the setting."""
    ca, cert, key = (settings[name] for name in ("NATS_TLS_CA", "NATS_TLS_CERT", "NATS_TLS_KEY"))
    if (cert is None) != (key is None):  # (one without the other would be ignored)
        missing = "NATS_TLS_KEY" if key is None else "NATS_TLS_CERT"
        raise ConfigError([f"{config_path}: {missing}: needed too (a client certificate needs "
                           "both NATS_TLS_CERT and NATS_TLS_KEY)"])
    if ca is None and cert is None and not any(url.startswith("tls://")
                                                for url in as_list(settings["NATS_URLS"])):
        return None
    try:
        context = ssl.create_default_context(cafile=ca)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError([f"{config_path}: NATS_TLS_CA: cannot use {ca}: {exc}"]) from None
    if cert is not None:
        try:
            context.load_cert_chain(cert, key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError([f"{config_path}: NATS_TLS_CERT: cannot use {cert} with {key}: "
                               f"{exc}"]) from None
    return context


def check_credentials_file(config_path: str, settings: Dict[str, Any]) -> None:
    """NATS_CREDS_FILE, if set, can be read, with the nkeys library it needs."""
    creds = settings["NATS_CREDS_FILE"]
    if creds is None:
        return
    try:
        with open(creds, encoding="utf-8"):
            pass
        import nkeys  # noqa: F401
    except OSError as exc:
        raise ConfigError([f"{config_path}: NATS_CREDS_FILE: cannot read {creds}: "
                           f"{exc.strerror}"]) from None
    except ImportError:
        raise ConfigError([f"{config_path}: NATS_CREDS_FILE: a credentials file needs the "
                           "nkeys library: pip install nkeys"]) from None


def check_nats_security(config_path: str, settings: Dict[str, Any]) -> None:
    """The TLS files and the credentials file of an agent over NATS."""
    if settings["NATS_URLS"]:
        check_each(config_path, settings, tls_context, check_credentials_file)


class NatsNetwork:
    """The agent's side of a NATS network: the same small interface as network.HubNetwork."""

    def __init__(self, loop: EventLoop, context: zmq.Context, settings: Dict[str, Any],
                 name: str, on_message: OnMessage, on_connected: Callable[[], None]) -> None:
        self.loop = loop
        self.on_message = on_message  # (a NATS connection needs no state request: the bucket)
        # Who sent a state is proven by the bucket key it came from (per-agent permissions), not
        # by the body: the agent checks origins against the key's owner.
        self.proves_origin = True
        self.kind = "NATS"  # in logs and the status
        self.source = "NATS at " + ", ".join(as_list(settings["NATS_URLS"]))  # for drop counts
        address = f"inproc://nats-{id(self)}"
        self.inbox = context.socket(zmq.PAIR)
        self.inbox.setsockopt(zmq.LINGER, 0)
        self.inbox.setsockopt(zmq.RCVHWM, 0)  # never dropped here: NATS bounds what it hands us
        self.inbox.bind(address)
        self.client = NatsClient(context, address, settings, name)

    def secure(self, config_path: str) -> None:
        """TLS and credentials (checked with the settings: check_nats_security)."""
        self.client.tls = tls_context(config_path, self.client.settings)

    def start(self) -> None:
        self.loop.add_reader(self.inbox, lambda: drain(self.inbox, self._deliver))
        self.client.start()

    def _deliver(self, frames: List[bytes]) -> None:
        # Four frames: the message came from the bucket, stored that many seconds ago (0: just
        # now), under a key of that agent's.
        if len(frames) == 4:
            self.on_message(frames[:2], float(frames[2]), frames[3].decode("utf-8"))
        else:
            self.on_message(frames[:2])

    def send(self, frames: List[bytes]) -> None:
        self.client.submit(frames)

    def status(self) -> Dict[str, Any]:
        return {"nats": self.client.connected_url or "not connected",
                "states_not_yet_stored": len(self.client.unstored)}

    def close(self) -> None:
        self.client.stop()
        self.loop.remove_reader(self.inbox)
        self.inbox.close()


class NatsClient:
    """The NATS side, in its own thread and asyncio loop.  Only submit(), stop() and the
    read-only counters are used from the agent's thread."""

    def __init__(self, context: zmq.Context, address: str, settings: Dict[str, Any],
                 name: str) -> None:
        self.context, self.address, self.settings, self.name = context, address, settings, name
        self.tls: Optional[ssl.SSLContext] = None
        prefix = settings["NATS_SUBJECT_PREFIX"]
        self.subjects = {subject_for(prefix, ALL): ALL_TOPIC,
                         subject_for(prefix, name): topic(name)}
        self.prefix = prefix
        self.bucket = settings["NATS_BUCKET"]
        self.key_prefix = f"$KV.{self.bucket}."
        self.stream = f"KV_{self.bucket}"
        self.republished = f"{prefix}.kv."  # where the bucket republishes what it stores
        domain = settings["NATS_JS_DOMAIN"]  # through a leaf node: the cluster's JetStream domain
        self.put_prefix = f"$JS.{domain}.API.{self.key_prefix}" if domain else self.key_prefix
        self.own_keys = token(name) + "."
        self.thread = threading.Thread(target=self._run, name="nats", daemon=True)
        self.started = threading.Event()
        self.aio: Optional[asyncio.AbstractEventLoop] = None
        self.outgoing: Deque[List[bytes]] = deque()  # from the agent's thread
        self.wake_pending = False
        self.connected_url: Optional[str] = None
        self.unstored: Dict[str, Tuple[bytes, Any]] = {}  # key -> (body, x_data) to put
        self.stored: Dict[str, Tuple[bytes, Any]] = {}  # key -> (body, x_data) the bucket has
        self.sequences: Dict[str, int] = {}  # key -> the bucket's sequence of its value known
        # A read of the bucket under way: key -> (sequence, body, age in s), handed over at once
        # when it is done; its subscription, and how many reads were started.
        self.read: Optional[Dict[str, Tuple[int, bytes, float]]] = None
        self.reading: Any = None
        self.reads = 0
        self.read_progress = 0.0  # (the NATS thread's loop time) when the read last brought a key
        # The stream's last sequence as its leader told it when the read began, and the highest
        # the read brought: a read that ends below it came from a server still catching up.
        self.read_target = 0
        self.read_highest = 0
        self.stale_reads = 0  # in a row
        self.has_read = False
        self.rereading: Optional["asyncio.Task[None]"] = None
        self.errors = Throttle()
        self.nc: Any = None
        self.js: Any = None
        self.outbox: Optional[zmq.Socket] = None
        self.putting: Dict[str, Tuple[int, bytes, Any]] = {}  # key -> (connection, body, data)
        self.connection = 0  # counts reconnections: a put knows on which one it was sent
        self.retry: Optional[asyncio.TimerHandle] = None  # after a failed put: all again, later
        self.retry_wait = RETRY_WAIT[0]
        self.bucket_open = False
        self.stopping: Optional[asyncio.Event] = None
        # When the bucket's stream was created: a new one means the bucket was lost and made
        # again.  No value of the bucket has a sequence beyond its last (_forged_sequences).
        self.stream_created: Any = None
        self.highest_sequence = 0  # of every value taken
        self.suspects: Dict[str, int] = {}  # keys beyond the stream's last sequence at a check
        self.per_owner: Dict[str, int] = {}  # keys known per peer, bounded (MAX_DEVICES_PER_PEER)
        self.max_keys = settings["MAX_DEVICES_PER_PEER"] + 1  # its states and its heartbeat

    # --- the agent's thread ----------------------------------------------------------------------
    def start(self) -> None:
        self.thread.start()
        self.started.wait()

    def submit(self, frames: List[bytes]) -> None:
        """Queue a message for NATS; the NATS thread is woken once per batch, not per message."""
        self.outgoing.append(frames)
        if not self.wake_pending and self.aio is not None:
            self.wake_pending = True
            self.aio.call_soon_threadsafe(self._take_outgoing)

    def stop(self) -> None:
        if self.aio is not None and self.thread.is_alive():
            self.aio.call_soon_threadsafe(self.stopping.set)
            self.thread.join(STOP_TIMEOUT + 2)

    # --- the NATS thread -------------------------------------------------------------------------
    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self.aio = asyncio.get_running_loop()
        self.stopping = asyncio.Event()
        self.outbox = self.context.socket(zmq.PAIR)
        self.outbox.setsockopt(zmq.LINGER, 0)
        self.outbox.setsockopt(zmq.SNDHWM, 0)
        self.outbox.connect(self.address)
        self.started.set()
        self._take_outgoing()  # anything sent before the thread started
        serving = asyncio.ensure_future(self._serve_until_set_up())
        try:
            await self.stopping.wait()
            await asyncio.wait_for(self._until_stored(), STOP_TIMEOUT)
        except asyncio.TimeoutError:
            log.warning("Exiting with %d states not stored in NATS", len(self.unstored))
        finally:
            serving.cancel()
            if self.nc is not None:
                await self.nc.close()
            self.outbox.close()

    async def _until_stored(self) -> None:
        while self.unstored or self.putting:
            await asyncio.sleep(0.05)

    async def _serve_until_set_up(self) -> None:
        """Connect, subscribe and open the bucket; after an unexpected failure, all again (the
        rest runs in callbacks: each message, each reconnection)."""
        while True:
            try:
                await self._serve()
                return
            except Exception as exc:  # a bug or an answer nobody expected: log, start again
                log.error("NATS set-up failed (%r); starting again", exc)
                if self.nc is not None:
                    await self.nc.close()
                self.nc, self.bucket_open = None, False
                await asyncio.sleep(RETRY_WAIT[1])

    async def _serve(self) -> None:
        import nats
        settings = self.settings
        self.nc = await nats.connect(
            servers=as_list(settings["NATS_URLS"]), name=f"zmq-ami agent {self.name}",
            user=settings["NATS_USER"], password=settings["NATS_PASSWORD"],
            user_credentials=settings["NATS_CREDS_FILE"], tls=self.tls,
            connect_timeout=CONNECT_TIMEOUT, reconnect_time_wait=RECONNECT_WAIT,
            max_reconnect_attempts=-1, no_echo=True, error_cb=self._on_error,
            disconnected_cb=self._on_disconnected, reconnected_cb=self._on_connected)
        await self._on_connected()
        self.js = self.nc.jetstream(timeout=PUT_TIMEOUT, domain=settings["NATS_JS_DOMAIN"])
        for subject in self.subjects:
            await self.nc.subscribe(subject, cb=self._on_published)
        await self.nc.subscribe(self.republished + ">", cb=self._on_republished)
        await self._open_bucket()
        self.bucket_open = True
        self._put_unstored()  # what the agent sent before the bucket was open
        self.aio.create_task(self._watch_bucket())

    async def _open_bucket(self) -> None:
        """Find or create the bucket (republishing each change), then read it; tried again
        until JetStream answers."""
        wait = RETRY_WAIT[0]
        while True:
            try:
                await self._bucket_republishing()
                await self._read_bucket()
                return
            except Exception as exc:  # JetStream off, no quorum yet, no permission...
                self._warn("bucket", f"Cannot open the NATS bucket {self.bucket} ({_why(exc)}); "
                                     f"trying again")
                await asyncio.sleep(wait)
                wait = min(2 * wait, RETRY_WAIT[1])

    async def _read_bucket(self) -> None:
        """Read the bucket's latest value of every key (an ordered consumer, dropped once it has
        caught up): at start, and after a reconnection, for the changes missed meanwhile."""
        from nats.js.api import DeliverPolicy
        if self.reading is not None:
            await self.reading.unsubscribe()
        # What a read replaced had brought stays: its keys' sequences are known already, so the
        # new read would not bring them again.
        self.read = {} if self.read is None else self.read
        self.reads += 1
        # The stream's leader answers this: a read that ends below its last sequence was served
        # by a replica still catching up (a server just restarted) and misses changes.
        stream = await self.js.stream_info(self.stream)
        self.read_target = stream.state.last_seq if stream.state.messages else 0
        self.read_highest = 0
        self.reading = reading = await self.js.subscribe(
            self.key_prefix + ">", stream=self.stream,
            cb=functools.partial(self._on_read_entry, self.reads), ordered_consumer=True,
            deliver_policy=DeliverPolicy.LAST_PER_SUBJECT, idle_heartbeat=WATCH_HEARTBEAT)
        self.read_progress = self.aio.time()
        self.aio.call_later(READ_TIMEOUT, self._check_read, self.reads)
        info = await reading.consumer_info()
        if info.num_pending == 0 and reading.delivered == 0:
            if self.read_target:  # the callers try again later
                raise RuntimeError(f"the server that read it shows none of its "
                                   f"{stream.state.messages} entries yet: it is catching up")
            await self._read_done()

    def _check_read(self, read: int) -> None:
        """A read that brought nothing for READ_TIMEOUT (its consumer lost with a server that
        restarted, say) is started again; one that makes progress is left to finish."""
        if read != self.reads or self.read is None:
            return
        silent = self.aio.time() - self.read_progress
        if silent < READ_TIMEOUT:
            self.aio.call_later(READ_TIMEOUT - silent, self._check_read, read)
            return
        self._warn("read", f"The read of the NATS bucket {self.bucket} brought nothing for "
                           f"{READ_TIMEOUT:g} s: reading it again")
        self._read_again()

    def _read_again(self) -> None:
        """Read the bucket again (after a reconnection, or changes dropped): a read under way
        is replaced, as it may have started before what it must catch."""
        if self.rereading is not None:
            self.rereading.cancel()
        self.rereading = self.aio.create_task(self._read_until_done())

    async def _read_until_done(self) -> None:
        wait = RETRY_WAIT[0]
        while self.nc is not None and self.nc.is_connected:
            try:
                await self._read_bucket()
                return
            except Exception as exc:  # JetStream still electing a leader, say
                self._warn("bucket", f"Cannot read the NATS bucket again yet ({_why(exc)})")
                await asyncio.sleep(wait)
                wait = min(2 * wait, RETRY_WAIT[1])

    async def _bucket_republishing(self) -> None:
        """The bucket, created if missing, republishing every change it stores on
        <prefix>.kv.<key>: a plain subscription gets each change at once, whatever the cluster's
        leaders do (the watch's consumer is lost with its server until a new one is made)."""
        from nats.js.api import RePublish
        from nats.js.errors import NotFoundError
        republish = RePublish(src=self.key_prefix + ">", dest=self.republished + ">")
        try:
            info = await self.js.stream_info(self.stream)
        except NotFoundError:
            await self.js.create_key_value(
                bucket=self.bucket, history=1, republish=republish,
                replicas=self.settings["NATS_REPLICAS"], max_value_size=MAX_VALUE_BYTES,
                max_bytes=self.settings["NATS_MAX_BYTES"])
            log.info("Created the NATS bucket %s (replicas: %d, at most %d bytes)", self.bucket,
                     self.settings["NATS_REPLICAS"], self.settings["NATS_MAX_BYTES"])
            info = await self.js.stream_info(self.stream)
        if self.stream_created is None:  # (a bucket made again is noticed by _watch_bucket)
            self.stream_created = info.created
        current = info.config.republish
        if current is None or (current.src, current.dest) != (republish.src, republish.dest):
            info.config.republish = republish
            await self.js.update_stream(info.config)
            log.info("The NATS bucket %s now republishes its changes on %s", self.bucket,
                     republish.dest)

    async def _watch_bucket(self) -> None:
        """Every BUCKET_CHECK_INTERVAL: is the bucket there, and the same one?  One that was lost
        (deleted, or its only server restarted with an empty store) is made again if this agent
        may, else waited for; a new one (sequences start again at 1) makes this agent forget
        the sequences it held, read it again and put its own states again.  Sequences beyond the
        stream's last one were never the bucket's (a forged republished header): forgotten."""
        from nats.js.errors import NotFoundError
        while True:
            await asyncio.sleep(BUCKET_CHECK_INTERVAL)
            if self.nc is None or not self.nc.is_connected:
                continue
            try:
                info = await self.js.stream_info(self.stream)
            except NotFoundError:
                self._warn("lost", f"The NATS bucket {self.bucket} is gone: making it again "
                                   "(or waiting for it)")
                try:
                    await self._bucket_republishing()
                except Exception as exc:  # no permission: another agent or an admin makes it
                    self._warn("lost", f"Cannot make the NATS bucket {self.bucket} ({_why(exc)})"
                                       "; waiting for it")
                continue
            except Exception as exc:  # no leader yet, a timeout: the next check
                log.debug("NATS bucket check: %s", _why(exc))
                continue
            if info.created != self.stream_created:
                self._bucket_replaced(info)
                continue
            forged = self._forged_sequences(info.state.last_seq)
            if forged:
                for key in forged:
                    del self.sequences[key]
                self.highest_sequence = max(self.sequences.values(), default=0)
                self._warn("forged", f"{len(forged)} keys of the NATS bucket had a sequence "
                                     f"beyond its last ({info.state.last_seq}), such as "
                                     f"{printable(forged[0])}: not from the bucket; reading it "
                                     "again")
                self._read_again()

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
                    "storing this agent's states again", self.bucket)
        self.stream_created = info.created
        self.sequences.clear()
        self.suspects.clear()
        self.highest_sequence = 0
        self.per_owner.clear()
        for key, value in self.stored.items():
            self.unstored.setdefault(key, value)
        self.stored.clear()
        self._put_unstored()
        self._read_again()

    async def _on_connected(self) -> None:
        url = self.nc.connected_url
        self.connected_url = f"{url.scheme}://{url.netloc}" if url else None
        log.info("Connected to NATS at %s", self.connected_url)
        if self.bucket_open:
            self._put_again_after_reconnecting()
            self._read_again()  # the changes missed while disconnected

    async def _on_disconnected(self) -> None:
        if self.connected_url is not None:
            log.warning("Lost NATS at %s; reconnecting", self.connected_url)
        self.connected_url = None

    async def _on_error(self, exc: Exception) -> None:
        from nats.errors import SlowConsumerError
        self._warn("error", f"NATS: {exc!r}")
        if isinstance(exc, SlowConsumerError) and self.bucket_open and self.read is None:
            self._read_again()  # changes were dropped: read them

    def _warn(self, kind: str, text: str) -> None:
        more = self.errors.allow(kind)
        if more is not None:
            log.warning("%s%s", text, held_back(more, "such errors"))

    # --- NATS -> the agent -----------------------------------------------------------------------
    async def _on_published(self, msg: Any) -> None:
        self.outbox.send_multipart([self.subjects[msg.subject], msg.data], NOBLOCK)

    async def _on_read_entry(self, read: int, msg: Any) -> None:
        """One key of the bucket, read (its value stored that many seconds ago)."""
        meta = msg.metadata
        if read != self.reads:
            return  # from a read since replaced
        self.read_progress = self.aio.time()
        age = max(0.001, time.time() - meta.timestamp.timestamp())
        self.read_highest = max(self.read_highest, meta.sequence.stream)
        self._take_entry(msg.subject, meta.sequence.stream, msg, age)
        if meta.num_pending != 0:
            return
        if self.read_highest < self.read_target and self.stale_reads < STALE_READS_MAX:
            # Not the newest: a replica still catching up served it.  Read again a little later
            # (a few times at most: an administrator's purge can remove the last entry too).
            self.stale_reads += 1
            self._warn("read", f"The read of the NATS bucket {self.bucket} ended at sequence "
                               f"{self.read_highest}, before its last, {self.read_target}: its "
                               f"server is catching up; reading it again")
            self.reads += 1  # what this read brings from now on is not the read's
            self.aio.call_later(RETRY_WAIT[0] * self.stale_reads, self._read_again)
            return
        await self._read_done()

    async def _on_republished(self, msg: Any) -> None:
        """A change the bucket stored, republished at once (Nats-Subject: its key, and its
        Nats-Sequence in the bucket)."""
        headers = msg.headers or {}
        try:
            sequence = int(headers["Nats-Sequence"])
            subject = headers["Nats-Subject"]
        except (KeyError, ValueError):
            self._warn("input", f"Ignored a message on {msg.subject} that the bucket did not "
                                "republish (no Nats-Sequence or Nats-Subject)")
            return
        self._take_entry(subject, sequence, msg, None)

    def _take_entry(self, subject: str, sequence: int, msg: Any, age: Optional[float]) -> None:
        """Each key's values in the bucket's order, each once, whichever way they came: a
        change (age None) is handed over at once, unless the first read is under way; what a
        read brings is handed over when the read is done."""
        if not subject.startswith(self.key_prefix):
            return
        key = subject[len(self.key_prefix):]
        known = self.sequences.get(key)
        if known is not None and sequence <= known or key.startswith(self.own_keys):
            return
        if len(msg.data) > MAX_VALUE_BYTES:
            self._warn("input", f"Ignored a value of {len(msg.data)} bytes in the NATS bucket "
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
            self.read[key] = (sequence, msg.data, age or 0.001)
        else:
            self._hand_over(key, msg.data, 0.0)

    def _room_for(self, key: str) -> bool:
        """A new key is kept (its sequence, its value) only within the bounds on peers and on
        each peer's keys: what a peer puts in the bucket cannot exhaust this agent's memory."""
        owner = key.split(".", 1)[0]
        count = self.per_owner.get(owner)
        if count is None and len(self.per_owner) > self.settings["MAX_PEERS"]:
            self._warn("input", f"Ignored the NATS bucket's keys of {printable(owner)}: more "
                                f"than {self.settings['MAX_PEERS']} peers (MAX_PEERS)")
            return False
        if (count or 0) >= self.max_keys:
            self._warn("input", f"Ignored keys of {printable(owner)} in the NATS bucket: more "
                                f"than {self.max_keys - 1} states (MAX_DEVICES_PER_PEER)")
            return False
        try:
            untoken(owner)
        except (ValueError, UnicodeDecodeError):
            self._warn("input", f"Ignored a key of the NATS bucket that no agent writes: "
                                f"{printable(key)}")
            return False
        self.per_owner[owner] = (count or 0) + 1
        return True

    def _hand_over(self, key: str, body: bytes, age: float) -> None:
        """A value of the bucket to the agent, with its age and the owner of its key."""
        self.outbox.send_multipart([ALL_TOPIC, body, f"{age:.3f}".encode(),
                                    key_owner(key).encode("utf-8")], NOBLOCK)

    async def _read_done(self) -> None:
        """The read has caught up: hand over what it brought (heartbeats first, so that each
        peer is known up or down before its states), unless a change came since."""
        if self.read is None:
            return
        entries = stored_first([(key, body, age) for key, (sequence, body, age) in
                                self.read.items() if self.sequences[key] == sequence])
        self.read = None
        for key, body, age in entries:
            self._hand_over(key, body, age)
        if not self.has_read:
            log.info("Read %d states and heartbeats of the peers from the NATS bucket %s",
                     len(entries), self.bucket)
        else:
            log.info("Read the NATS bucket %s again: %d changes missed meanwhile",
                     self.bucket, len(entries))
        self.has_read = True
        self.stale_reads = 0
        reading, self.reading = self.reading, None
        if reading is not None:
            await reading.unsubscribe()

    # --- the agent -> NATS -----------------------------------------------------------------------
    def _take_outgoing(self) -> None:
        self.wake_pending = False  # before taking: a message queued meanwhile wakes us again
        while self.outgoing:
            target, body = self.outgoing.popleft()
            self._route(target, body)

    def _route(self, target: bytes, body: bytes) -> None:
        """States and heartbeats to the bucket, everything else to its subject."""
        message = json.loads(body)
        kind = message.get("msg_type")
        if kind == "AgentStates":
            # To everyone or to one peer: the states go to the bucket, never onto a subject
            # that any client may publish on (peers take states from the bucket only).
            self._store_snapshot(message)
            return
        if target == ALL_TOPIC:
            key = (f"{token(self.name)}.{HEARTBEAT_KEY}" if kind == "AgentHeartbeat" else
                   state_key(self.name, message.get("x_data")) if kind == "AsteriskEvent" else
                   None)
            if key is not None:
                self._store(key, body, message.get("x_data"))
                return
        if self.nc is None or self.nc.is_closed:
            return  # not connected yet: nothing but states is kept (they are in the bucket)
        self.aio.create_task(self._publish(
            subject_for(self.prefix, target.decode("utf-8")[1:-1]), body))

    async def _publish(self, subject: str, body: bytes) -> None:
        try:
            await self.nc.publish(subject, body)
        except Exception as exc:  # a message, not a state: lost as over a hub that is down
            self._warn("publish", f"Cannot publish to NATS ({_why(exc)})")

    def _store_snapshot(self, message: Dict[str, Any]) -> None:
        """An AgentStates to every peer (at start, after its Asterisk's restart, anti-entropy):
        each state the bucket does not have yet is put there too."""
        events = message.get("x_events")
        for event in events if isinstance(events, list) else []:
            key = state_key(self.name, event)
            if key is not None and self.stored.get(key, (b"", None))[1] != event:
                self._store(key, build(ALL, "AsteriskEvent", self.name,
                                       heartbeat=message.get("x_heartbeat"), data=event)[1], event)

    def _store(self, key: str, body: bytes, data: Any) -> None:
        self.unstored[key] = (body, data)
        if key not in self.putting and self.bucket_open and self.retry is None:
            self._put(key)

    def _put(self, key: str) -> None:
        """Put a key's latest value; each key has at most one put in flight, so that a slow put
        never lands after a newer one."""
        body, data = self.unstored.pop(key)
        self.putting[key] = (self.connection, body, data)
        self.aio.create_task(self._put_and_check(key, self.connection, body, data))

    async def _put_and_check(self, key: str, connection: int, body: bytes, data: Any) -> None:
        try:
            await self.js.publish(self.put_prefix + key, body)
            failure = None
        except Exception as exc:  # no leader, connection lost, timeout...
            failure = exc
        if self.putting.get(key, (None,))[0] != connection:
            return  # sent on a connection since lost: already put again on the new one
        del self.putting[key]
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
            self._warn("store", f"NATS did not store a state ({failure!r}); trying again, "
                                f"{len(self.unstored)} states waiting")
            self.retry = self.aio.call_later(self.retry_wait, self._put_unstored)
            self.retry_wait = min(2 * self.retry_wait, RETRY_WAIT[1])

    def _put_unstored(self) -> None:
        """After a failure: put every waiting state again (those not in flight).  Not while
        disconnected: the reconnection does it."""
        self.retry = None
        if self.nc is None or not self.nc.is_connected:
            return
        for key in [key for key in self.unstored if key not in self.putting]:
            self._put(key)

    def _put_again_after_reconnecting(self) -> None:
        """What was put on a lost connection either was stored or never will be: put it again
        now rather than after its timeout (the same value twice is harmless)."""
        self.connection += 1
        for key, (_, body, data) in self.putting.items():
            self.unstored.setdefault(key, (body, data))
        self.putting.clear()
        if self.retry is not None:
            self.retry.cancel()
        self._put_unstored()


def _why(exc: BaseException) -> str:
    """An error of nats-py in one line, with what the server said (its repr leaves that out)."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
