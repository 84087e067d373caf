"""CURVE encryption and authentication of the hub's sockets, with pyzmq's own zmq.auth.

Keys are the certificate files that ``zmq.auth.create_certificates(folder, name)`` writes:
``name.key`` (public) and ``name.key_secret`` (public and secret).  The hub has one pair; every
agent or client has its own, and the hub accepts only the public keys in CURVE_CLIENTS_DIR.  The
folder is read again whenever it changes, so adding or removing a key takes effect at the next
connection, without a restart.

A key's file name is its owner's name: ``<SYSTEM_NAME>.key`` for an agent.  The authenticator
gives that name to ZeroMQ as the connection's User-Id, and the hub drops every message whose
``origin`` is not the name of the key that sent it: a client may only speak as itself.
"""
import inspect
import ipaddress
import logging
import os
import stat
from typing import Any, Dict, List, Optional, Set, Tuple
from urllib.parse import urlsplit

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

from .config import ConfigError, is_loopback

log = logging.getLogger(__name__)

KeyPair = Tuple[bytes, bytes]


def warn_if_readable_by_others(path: str) -> None:
    mode = os.stat(path).st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("%s is readable by others than its owner (mode %o): chmod 600 %s", path,
                    stat.S_IMODE(mode), path)


def load_key_pair(config_path: str, key: str, path: str) -> KeyPair:
    """Public and secret key from a .key_secret file; ConfigError naming the setting if not."""
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise ConfigError([f"{config_path}: {key}: cannot read a key pair from {path}: {exc}"]) \
            from None
    if secret is None:
        raise ConfigError([f"{config_path}: {key}: {path} holds no secret key (use the "
                           f".key_secret file)"])
    warn_if_readable_by_others(path)
    return public, secret


def load_public_key(config_path: str, key: str, path: str) -> bytes:
    try:
        return zmq.auth.load_certificate(path)[0]
    except (OSError, ValueError) as exc:
        raise ConfigError([f"{config_path}: {key}: cannot read a public key from {path}: "
                           f"{exc}"]) from None


def make_server(sock: zmq.Socket, keys: KeyPair) -> None:
    sock.curve_publickey, sock.curve_secretkey = keys
    sock.curve_server = True


def make_client(sock: zmq.Socket, server_key: bytes, keys: KeyPair) -> None:
    sock.curve_serverkey = server_key
    sock.curve_publickey, sock.curve_secretkey = keys


def binds_beyond_loopback(url: str) -> bool:
    """True when a bind address accepts connections from other hosts (tcp://*, a real address)."""
    parts = urlsplit(url)
    if parts.scheme != "tcp":
        return False
    host = parts.netloc.rsplit(":", 1)[0]
    return not is_loopback(host)


class ClientKeys:
    """The public keys allowed to connect, by owner: the .key files of a folder (``<name>.key``),
    read again on change."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.names: Dict[bytes, str] = {}  # z85 public key -> its owner's name
        self._signature: Optional[List[Tuple[str, float]]] = None
        self.reload()

    def reload(self) -> None:
        signature = sorted((entry.name, entry.stat().st_mtime) for entry in os.scandir(self.folder)
                           if entry.name.endswith(".key"))
        if signature == self._signature:
            return
        self._signature = signature
        names = {}
        for name, _ in signature:
            try:
                public, _secret = zmq.auth.load_certificate(os.path.join(self.folder, name))
            except (OSError, ValueError) as exc:
                log.error("Cannot read the client key %s in %s: %s", name, self.folder, exc)
                continue
            names[public] = name[:-len(".key")]
        self.names = names
        log.info("%d client keys allowed (from %s)", len(self.names), self.folder)

    def callback(self, domain: str, key: bytes) -> bool:
        """zmq.auth's credentials provider: is this client's public key (z85) allowed?"""
        try:
            self.reload()
        except OSError as exc:
            log.error("Cannot read the client keys in %s: %s", self.folder, exc)
        return key in self.names


REFUSED_KEPT = 1000  # refused (address, key) pairs remembered, so as to log each once


class Authenticator(ThreadAuthenticator):
    """pyzmq's authenticator thread, through its documented hooks: the credentials provider says
    which keys may connect (and logs each refused peer once, with its address), and
    curve_user_id names an admitted client by its key file (the hub checks origins against it)."""

    def __init__(self, context: zmq.Context, client_keys: ClientKeys) -> None:
        super().__init__(context)
        self.client_keys = client_keys
        self.refused: Set[Tuple[str, bytes]] = set()
        self._address = ""  # of the peer whose ZAP request is being handled

    async def handle_zap_message(self, msg: List[bytes]) -> None:
        # (frames: version, request id, domain, address, identity, mechanism, credentials)
        self._address = _ipv4_if_mapped(msg[3].decode("utf-8", "replace")) if len(msg) > 3 else ""
        result: Any = super().handle_zap_message(msg)
        if inspect.isawaitable(result):
            await result

    def callback(self, domain: str, key: bytes) -> bool:
        """The credentials provider: is this client's public key (z85) allowed?"""
        allowed = self.client_keys.callback(domain, key)
        if not allowed and (self._address, key) not in self.refused:
            if len(self.refused) >= REFUSED_KEPT:  # a flood of new keys: logged again, not kept
                self.refused.clear()
            self.refused.add((self._address, key))
            log.warning("Refused a connection from %s: a key not in CURVE_CLIENTS_DIR (%s)",
                        self._address, key.decode("ascii", "replace"))
        return allowed

    def curve_user_id(self, client_public_key: bytes) -> str:
        """An admitted client's user id: the name of its key file (Moscow.key: Moscow)."""
        z85_key = z85.encode(client_public_key)
        return self.client_keys.names.get(z85_key, z85_key.decode("ascii"))


def _ipv4_if_mapped(address: str) -> str:
    """127.0.0.1 rather than ::ffff:127.0.0.1 (sockets with IPv6 on see IPv4 peers so)."""
    try:
        mapped = ipaddress.ip_address(address).ipv4_mapped
    except ValueError:
        return address
    return str(mapped) if mapped else address


def start_authenticator(context: zmq.Context, clients_dir: str) -> Authenticator:
    client_keys = ClientKeys(clients_dir)
    authenticator = Authenticator(context, client_keys)
    authenticator.start()
    authenticator.configure_curve_callback(domain="*", credentials_provider=authenticator)
    return authenticator
