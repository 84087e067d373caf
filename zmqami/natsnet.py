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
import json
import logging
import ssl
import sys
import threading
from collections import deque
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple

import zmq

from .config import ConfigError, check_each
from .envelope import ALL, topic
from .loop import NOBLOCK, EventLoop, drain
from .natsbucket import (MAX_VALUE_BYTES, PUT_TIMEOUT, RETRY_WAIT, BucketPutter, BucketReader,
                         why)
from .natsnames import HEARTBEAT_KEY, STATE_EVENTS, key_owner, state_key, subject_for, token
from .network import OnMessage, as_list
from .stats import Throttle, held_back, printable

log = logging.getLogger("agent")

CONNECT_TIMEOUT = 2.0     # s for each connection attempt
RECONNECT_WAIT = 1.0      # s between two attempts on the same server
STOP_TIMEOUT = 3.0        # s at exit to store what is pending and close
ALL_TOPIC = topic(ALL)



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
              f"{why(exc) if not isinstance(exc, asyncio.TimeoutError) else 'no answer within '}"
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


def carries_state(message: Any) -> bool:
    """True for a message that says what a peer's devices, presences or health are: over NATS
    these come from the bucket only, where each agent may put under its own name only."""
    if message.msg_type in ("AgentStates", "AgentHeartbeat", "AsteriskEvents"):
        return True
    data = message.field("data")
    return message.msg_type == "AsteriskEvent" and isinstance(data, dict) and \
        data.get("Event") in STATE_EVENTS


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

    def send(self, frames: List[bytes], body: Dict[str, Any]) -> None:
        self.client.submit(frames, body)

    def status(self) -> Dict[str, Any]:
        return {"nats": self.client.connected_url or "not connected",
                "states_not_yet_stored": len(self.client.putter.unstored)}

    def close(self) -> None:
        self.client.stop()
        self.loop.remove_reader(self.inbox)
        self.inbox.close()


class NatsClient:
    """The connection to NATS, in its own thread and asyncio loop: subjects in and out, and the
    bucket (natsbucket: its reader and its putter).  Only submit(), stop() and the read-only
    counters are used from the agent's thread."""

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
        # From the agent's thread: (frames, the body they encode), so that it is not decoded here.
        self.outgoing: Deque[Tuple[List[bytes], Dict[str, Any]]] = deque()
        self.wake_pending = False
        self.connected_url: Optional[str] = None
        self.errors = Throttle()
        self.nc: Any = None
        self.js: Any = None
        self.outbox: Optional[zmq.Socket] = None
        self.bucket_open = False
        self.stopping: Optional[asyncio.Event] = None
        self.reader = BucketReader(self)
        self.putter = BucketPutter(self)

    # --- the agent's thread ----------------------------------------------------------------------
    def start(self) -> None:
        self.thread.start()
        self.started.wait()

    def submit(self, frames: List[bytes], body: Dict[str, Any]) -> None:
        """Queue a message for NATS; the NATS thread is woken once per batch, not per message."""
        self.outgoing.append((frames, body))
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
            await asyncio.wait_for(self.putter.until_stored(), STOP_TIMEOUT)
        except asyncio.TimeoutError:
            log.warning("Exiting with %d states not stored in NATS", len(self.putter.unstored))
        finally:
            serving.cancel()
            if self.nc is not None:
                await self.nc.close()
            self.outbox.close()

    def connected(self) -> bool:
        return self.nc is not None and self.nc.is_connected

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
        await self.putter.listen()
        await self.nc.subscribe(self.republished + ">", cb=self.reader.on_republished)
        await self._open_bucket()
        self.bucket_open = True
        self.putter.put_unstored()  # what the agent sent before the bucket was open
        self.aio.create_task(self.reader.watch_bucket())

    async def _open_bucket(self) -> None:
        """Find or create the bucket (republishing each change), then read it; tried again
        until JetStream answers."""
        wait = RETRY_WAIT[0]
        while True:
            try:
                await self.bucket_republishing()
                await self.reader.read_bucket()
                return
            except Exception as exc:  # JetStream off, no quorum yet, no permission...
                self.warn("bucket", f"Cannot open the NATS bucket {self.bucket} ({why(exc)}); "
                                    f"trying again")
                await asyncio.sleep(wait)
                wait = min(2 * wait, RETRY_WAIT[1])

    async def bucket_republishing(self) -> None:
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
        if self.reader.stream_created is None:  # (a bucket made again: the reader notices)
            self.reader.stream_created = info.created
        current = info.config.republish
        if current is None or (current.src, current.dest) != (republish.src, republish.dest):
            info.config.republish = republish
            await self.js.update_stream(info.config)
            log.info("The NATS bucket %s now republishes its changes on %s", self.bucket,
                     republish.dest)

    async def _on_connected(self) -> None:
        url = self.nc.connected_url
        self.connected_url = f"{url.scheme}://{url.netloc}" if url else None
        log.info("Connected to NATS at %s", self.connected_url)
        if self.bucket_open:
            self.putter.put_again_after_reconnecting()
            self.reader.read_again()  # the changes missed while disconnected
            self.reader.check_bucket_soon()  # (a server restarted may have lost the bucket)

    async def _on_disconnected(self) -> None:
        if self.connected_url is not None:
            log.warning("Lost NATS at %s; reconnecting", self.connected_url)
        self.connected_url = None

    async def _on_error(self, exc: Exception) -> None:
        from nats.errors import SlowConsumerError
        self.warn("error", f"NATS: {exc!r}")
        if isinstance(exc, SlowConsumerError) and self.bucket_open and self.reader.read is None:
            self.reader.read_again()  # changes were dropped: read them

    def warn(self, kind: str, text: str) -> None:
        more = self.errors.allow(kind)
        if more is not None:
            log.warning("%s%s", text, held_back(more, "such errors"))

    # --- NATS -> the agent -----------------------------------------------------------------------
    async def _on_published(self, msg: Any) -> None:
        self.outbox.send_multipart([self.subjects[msg.subject], msg.data], NOBLOCK)

    def hand_over(self, key: str, body: bytes, age: float) -> None:
        """A value of the bucket to the agent, with its age and the owner of its key."""
        self.outbox.send_multipart([ALL_TOPIC, body, f"{age:.3f}".encode(),
                                    key_owner(key).encode("utf-8")], NOBLOCK)

    # --- the agent -> NATS -----------------------------------------------------------------------
    def _take_outgoing(self) -> None:
        self.wake_pending = False  # before taking: a message queued meanwhile wakes us again
        while self.outgoing:
            (target, body), message = self.outgoing.popleft()
            self._route(target, body, message)

    def _route(self, target: bytes, body: bytes, message: Dict[str, Any]) -> None:
        """States and heartbeats to the bucket, everything else to its subject."""
        kind = message.get("msg_type")
        if kind == "AgentStates":
            # To everyone or to one peer: the states go to the bucket, never onto a subject
            # that any client may publish on (peers take states from the bucket only).
            self.putter.store_snapshot(message)
            return
        if target == ALL_TOPIC:
            key = (f"{token(self.name)}.{HEARTBEAT_KEY}" if kind == "AgentHeartbeat" else
                   state_key(self.name, message.get("x_data")) if kind == "AsteriskEvent" else
                   None)
            if key is not None:
                self.putter.store(key, body, message.get("x_data"))
                return
        if self.nc is None or self.nc.is_closed:
            return  # not connected yet: nothing but states is kept (they are in the bucket)
        self.aio.create_task(self._publish(
            subject_for(self.prefix, target.decode("utf-8")[1:-1]), body))

    async def _publish(self, subject: str, body: bytes) -> None:
        try:
            await self.nc.publish(subject, body)
        except Exception as exc:  # a message, not a state: lost as over a hub that is down
            self.warn("publish", f"Cannot publish to NATS ({why(exc)})")
