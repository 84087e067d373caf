"""Configuration loading for the three scripts, and the logging set-up they share.

Every error names the file, the section (for ini files) and the key, in one line, so an
administrator can fix it without reading code.  Loaders collect every error they find and raise one
ConfigError holding them all; the scripts print them and exit with status 2.
"""
import argparse
import difflib
import inspect
import configparser
import ipaddress
import logging
import logging.handlers
import os
import re
import runpy
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Pattern, Sequence, Tuple

from .rules import DEVICE_STATES, MAILBOX_WRITES
from .stats import printable

PROJECT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the scripts' folder
SETTINGS_DIR = "/etc/zmq-ami"  # where installed commands look for their settings files
RUN_DIR = "/run/zmq-ami"       # where an installed agent keeps its pid file


def in_checkout() -> bool:
    """True when running from a source checkout (broker.py beside the package), not installed."""
    return os.path.isfile(os.path.join(PROJECT_DIR, "broker.py"))


def default_settings_path(name: str) -> str:
    """A settings file's default: beside the scripts in a checkout, else in /etc/zmq-ami."""
    return os.path.join(PROJECT_DIR if in_checkout() else SETTINGS_DIR, name)


def program_name(script: str) -> str:
    """How the user ran it: ``python agent.py`` from a checkout, ``zmq-ami-agent`` installed."""
    called = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return f"python {script}" if not called or called.endswith(".py") else called
# The original's format, with the program's name (broker, hub, agent) where it had its loggers'
# names (asterisk_agent, esb_server, ...): every line of a process says which program wrote it.
LOG_FORMAT = "%(asctime)s - {program} - %(levelname)s - %(message)s"
PROGRAMS = {"broker.py": "broker", "server.py": "hub", "agent.py": "agent"}
LOG_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO,
              "warning": logging.WARNING, "error": logging.ERROR}
CONFIG_ERROR_EXIT = 2


class ConfigError(Exception):
    """One or more configuration errors, each a line naming file, section and key."""

    def __init__(self, errors: List[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors

    def report(self) -> int:
        """Print the errors, one a line, on stderr; return the exit status for them."""
        for line in self.errors:
            print(line, file=sys.stderr)
        return CONFIG_ERROR_EXIT


_logging_program = ["zmq-ami"]  # the program's name, kept for a reload's set-up


def setup_logging(level: int, log_file: Optional[str] = None, syslog: bool = False,
                  program: str = "") -> None:
    """Log in the original project's format: to stderr (the journal picks it up), and to a file
    and to syslog when asked.

    The file is reopened when logrotate renames it (WatchedFileHandler), so neither copytruncate
    nor a signal is needed.  Called again (a reload), it replaces the handlers it set up before.
    """
    program = program or _logging_program[0]
    _logging_program[0] = program
    handlers: List[logging.Handler] = [logging.StreamHandler()]
    if log_file:
        handlers.append(logging.handlers.WatchedFileHandler(log_file, encoding="utf-8"))
    if syslog:
        address = "/dev/log" if os.path.exists("/dev/log") else ("localhost", 514)
        syslog_handler = logging.handlers.SysLogHandler(address=address)
        syslog_handler.setFormatter(logging.Formatter(f"zmq-ami: {program} - %(levelname)s - "
                                                      "%(message)s"))
        handlers.append(syslog_handler)
    formatter = logging.Formatter(LOG_FORMAT.format(program=program))
    for handler in handlers[:2]:
        handler.setFormatter(formatter)
    logging.basicConfig(level=level, handlers=handlers, force=True)


# --- addresses ---------------------------------------------------------------------------------
_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
URL_EXAMPLE = "'tcp://127.0.0.1:55555'"


def host_problem(host: str) -> Optional[str]:
    """Why host is not a host name, an IPv4 or an IPv6 address (brackets optional), or None."""
    literal = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ipaddress.ip_address(literal)
        return None
    except ValueError:
        pass
    if ":" in host:
        return f"{host!r} is not an IP address or a host name (a port goes in its own setting)"
    labels = host[:-1].split(".") if host.endswith(".") else host.split(".")
    if not host or len(host) > 253 or not all(_HOST_LABEL.fullmatch(label) for label in labels):
        return f"{host!r} is not a host name or an IP address"
    return None


def url_problem(url: Any, bind: bool = False) -> Optional[str]:
    """Why url is not a ZeroMQ address this program can use, or None.

    ``tcp://<host>:<port>`` with a host name, an IPv4 address or an IPv6 address in brackets
    (``tcp://[::1]:55555``); for a bind also ``*`` (every interface) or an interface name; or
    ``ipc://<path>``.
    """
    if not isinstance(url, str):
        return f"must be a ZeroMQ address such as {URL_EXAMPLE}"
    scheme, separator, rest = url.partition("://")
    if scheme == "ipc" and separator and rest and not re.search(r"[\x00-\x1f\x7f]", rest):
        return None
    if scheme != "tcp" or not separator:
        return f"must be a ZeroMQ address such as {URL_EXAMPLE} or 'ipc:///path'"
    host, colon, port = rest.rpartition(":")
    if not colon or not port.isdigit() or not 0 < int(port) < 65536:
        return f"{url!r} has no port from 1 to 65535 (e.g. {URL_EXAMPLE})"
    if ":" in host and not (host.startswith("[") and host.endswith("]")):
        return f"{url!r}: an IPv6 address goes in brackets, e.g. 'tcp://[::1]:55555'"
    if bind and host == "*":
        return None
    problem = host_problem(host)
    return f"{url!r}: {problem}" if problem else None


def metrics_library_missing() -> Optional[str]:
    """Why metrics cannot be served (the optional library is not installed), or None."""
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        return ("metrics need the prometheus-client library: pip install prometheus-client "
                "(or install this program with its extra: pip install '<checkout>[metrics]')")
    return None


def nats_library_missing() -> Optional[str]:
    """Why NATS cannot be used (the optional library is not installed), or None."""
    try:
        import nats  # noqa: F401
    except ImportError:
        return ("NATS needs the nats-py library: pip install nats-py (or install this "
                "program with its extra: pip install '<checkout>[nats]')")
    return None


def nats_url_problem(url: Any) -> Optional[str]:
    """Why url is not a NATS server address (nats://host:port or tls://host:port), or None."""
    example = "'nats://127.0.0.1:4222'"
    if not isinstance(url, str):
        return f"must be a NATS address such as {example}"
    scheme, separator, rest = url.partition("://")
    if scheme not in ("nats", "tls") or not separator:
        return f"{url!r} must be a NATS address such as {example} (or tls://...)"
    if "@" in rest:
        return f"{url!r}: give credentials in NATS_USER/NATS_PASSWORD or NATS_CREDS_FILE"
    problem = url_problem("tcp://" + rest)
    return problem.replace(URL_EXAMPLE, example).replace("tcp://", scheme + "://") \
        if problem else None


def is_nats_urls(value: Any) -> Optional[str]:
    """NATS_URLS: None (the ZeroMQ hub) or a list of NATS servers, with nats-py installed."""
    if value is None:
        return None
    urls = value if isinstance(value, (list, tuple)) else [value]
    problems = [nats_url_problem(url) for url in urls]
    if not urls or any(problems):
        return next((p for p in problems if p), "must be a list of NATS addresses")
    return nats_library_missing()


def is_name_token(what: str, dots: bool = False, none: bool = False
                  ) -> Callable[[Any], Optional[str]]:
    """A NATS bucket name or domain (dots=False) or subject prefix (dots between tokens); None
    too when none is True."""
    pattern = re.compile(r"[A-Za-z0-9_-]{1,64}(\.[A-Za-z0-9_-]{1,64}){0,7}" if dots else
                         r"[A-Za-z0-9_-]{1,64}")

    def check(value: Any) -> Optional[str]:
        if (none and value is None) or (isinstance(value, str) and pattern.fullmatch(value)):
            return None
        return f"must be a {what}: letters, digits, - and _" + (
            ", tokens joined by ." if dots else "") + (" (or None)" if none else "")
    return check


def is_metrics_port(value: Any) -> Optional[str]:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value < 65536:
        return "must be None (no metrics) or a port from 1 to 65535"
    return metrics_library_missing()


def is_host(value: Any) -> Optional[str]:
    return host_problem(value) if isinstance(value, str) else "must be a host name or address"


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost: the addresses the demo and tests may use."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


# --- broker: config.ini --------------------------------------------------------------------------

@dataclass
class ServerConfig:
    """One Asterisk server, as a [server-N] section describes it: reached through
    res_zmq_manager (cmd_port, evt_port), or over plain AMI when ami_user is set."""
    section: str
    name: str
    addr: str
    cmd_port: int
    evt_port: int
    ami_trace: bool = False
    ami_user: Optional[str] = None
    ami_secret: str = field(default="", repr=False)  # never printed
    ami_port: int = 5038
    mwi_write: str = "external"  # how its voicemail lamps are written (rules.MAILBOX_WRITES)
    hinted_only: Optional[bool] = None  # None: as [general] says
    publish_filter: Optional[Pattern[str]] = None  # only the names it matches are taken from it
    accept_filter: Optional[Pattern[str]] = None   # only the names it matches are written to it

    @property
    def cmd_url(self) -> str:
        return f"tcp://{_url_host(self.addr)}:{self.cmd_port}"

    @property
    def evt_url(self) -> str:
        return f"tcp://{_url_host(self.addr)}:{self.evt_port}"


@dataclass
class BrokerConfig:
    path: str
    device_state: bool = True
    presence: bool = False
    mwi: bool = False
    hinted_only: bool = False
    log_level: int = logging.INFO
    request_timeout: int = 1000
    count_messages: bool = False
    verbose_messages: bool = False
    ping_interval: float = 10.0
    server_timeout: float = 30.0
    down_state: Optional[str] = "UNAVAILABLE"
    resync_interval: float = 300.0
    max_devices: int = 100_000
    state_file: Optional[str] = None
    metrics_port: int = 0
    metrics_address: str = "127.0.0.1"
    log_file: Optional[str] = None
    log_syslog: bool = False
    status_socket: Optional[str] = None
    servers: List[ServerConfig] = field(default_factory=list)


def _url_host(addr: str) -> str:
    return f"[{addr}]" if ":" in addr and not addr.startswith("[") else addr


class _IniReader:
    """Reads typed values from one ini file, collecting errors instead of stopping at the first."""

    def __init__(self, path: str, parser: configparser.ConfigParser) -> None:
        self.path = path
        self.parser = parser
        self.errors: List[str] = []

    def error(self, section: str, key: Optional[str], message: str) -> None:
        # (names from the file, escaped: a section listed as "a\n\x0cb" keeps the error one line)
        where = f"[{printable(section)}] {printable(key)}" if key else f"[{printable(section)}]"
        self.errors.append(f"{self.path}: {where}: {message}")

    def raw(self, section: str, key: str, default: Optional[str] = None) -> Optional[str]:
        if not self.parser.has_section(section):
            return default
        value = self.parser.get(section, key, fallback=None)
        if value is None or value.strip() == "":
            if default is None:
                self.error(section, key, "missing")
            return default
        return value.strip()

    def regex(self, section: str, key: str) -> Optional[Pattern[str]]:
        """A filter: a regular expression, matched anywhere in a name, in any case."""
        text = self.raw(section, key, "")
        if not text:
            return None
        problem = regex_problem(text)
        if problem:
            self.error(section, key, problem)
            return None
        return name_filter(text)

    def boolean(self, section: str, key: str, default: bool) -> bool:
        value = self.raw(section, key, "yes" if default else "no")
        if value.lower() not in configparser.ConfigParser.BOOLEAN_STATES:
            self.error(section, key, f"{value!r} is not yes or no")
            return default
        return configparser.ConfigParser.BOOLEAN_STATES[value.lower()]

    def integer(self, section: str, key: str, default: Optional[int], low: int, high: int) -> int:
        value = self.raw(section, key, None if default is None else str(default))
        if value is None:
            return 0
        try:
            number = int(value)
        except ValueError:
            self.error(section, key, f"{value!r} is not a whole number")
            return default or 0
        if not low <= number <= high:
            self.error(section, key, f"{number} is not between {low} and {high}")
        return number

    def seconds(self, section: str, key: str, default: float, low: float, high: float,
                zero: bool = False) -> float:
        """A number of seconds from low to high (or 0, if zero means off)."""
        value = self.raw(section, key, str(default))
        try:
            number = float(value)
        except ValueError:
            self.error(section, key, f"{value!r} is not a number of seconds")
            return default
        if not (low <= number <= high or (zero and number == 0)):
            self.error(section, key, f"{value} is not {'0 or ' if zero else ''}between {low:g} "
                       f"and {high:g} seconds")
        return number

    def choice(self, section: str, key: str, default: str, choices: Dict[str, Any]) -> Any:
        value = self.raw(section, key, default).lower()
        if value not in choices:
            self.error(section, key, f"{value!r} is not one of {', '.join(choices)}")
            return choices[default]
        return choices[value]


def load_broker_config(path: str) -> BrokerConfig:
    """Read and check the broker's ini file (example_config.ini documents every key)."""
    parser = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=(";",))
    try:
        with open(path, encoding="utf-8") as handle:
            parser.read_file(handle)
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read the file: {exc.strerror}"]) from None
    except (configparser.Error, UnicodeDecodeError) as exc:
        first_line = str(exc).splitlines()[0]
        raise ConfigError([f"{path}: not a valid ini file: {first_line}"]) from None

    ini = _IniReader(path, parser)
    config, default = BrokerConfig(path=path), BrokerConfig(path=path)  # (the one set of defaults)
    config.device_state = ini.boolean("general", "device_state", default.device_state)
    config.presence = ini.boolean("general", "presence", default.presence)
    config.mwi = ini.boolean("general", "mwi", default.mwi)
    config.hinted_only = ini.boolean("general", "hinted_only", default.hinted_only)
    config.log_level = ini.choice("general", "log_level", logging.getLevelName(
        default.log_level).lower(), LOG_LEVELS)
    config.request_timeout = ini.integer("general", "request_timeout", default.request_timeout,
                                         10, 600_000)
    config.count_messages = ini.boolean("general", "count_messages", default.count_messages)
    config.verbose_messages = ini.boolean("general", "verbose_messages",
                                          default.verbose_messages)
    config.ping_interval = ini.seconds("general", "ping_interval", default.ping_interval,
                                       0.1, 3600)
    config.server_timeout = ini.seconds("general", "server_timeout", 3 * config.ping_interval,
                                        config.ping_interval, 36000)
    config.resync_interval = ini.seconds("general", "resync_interval", default.resync_interval,
                                         0.1, 86400, zero=True)
    config.max_devices = ini.integer("general", "max_devices", default.max_devices, 1,
                                     10_000_000)
    down_state = parser.get("general", "down_state", fallback=default.down_state).strip().upper()
    if down_state and down_state not in DEVICE_STATES:
        ini.error("general", "down_state", f"{down_state!r} is not one of "
                  f"{', '.join(sorted(DEVICE_STATES))}, or empty to keep the last state")
    config.down_state = down_state or None
    config.log_file = parser.get("general", "log_file", fallback="").strip() or None
    config.state_file = parser.get("general", "state_file", fallback="").strip() or None
    config.metrics_port = ini.integer("general", "metrics_port", default.metrics_port, 0, 65535)
    config.metrics_address = ini.raw("general", "metrics_address", default.metrics_address)
    problem = host_problem(config.metrics_address)
    if problem:
        ini.error("general", "metrics_address", problem)
    if config.metrics_port and metrics_library_missing():
        ini.error("general", "metrics_port", metrics_library_missing())
    config.log_syslog = ini.boolean("general", "log_syslog", default.log_syslog)
    config.status_socket = parser.get("general", "status_socket", fallback="").strip() or None
    if config.status_socket and url_problem(config.status_socket, bind=True):
        ini.error("general", "status_socket", f"{config.status_socket!r} is not an address such "
                  "as ipc:///run/zmq-ami/broker.status or tcp://127.0.0.1:5599")

    if not parser.has_section("servers"):
        ini.errors.append(f"{path}: [servers]: section missing")
        raise ConfigError(ini.errors)
    sections = [s.strip() for s in (ini.raw("servers", "sections") or "").split(",") if s.strip()]
    if not sections and not ini.errors:
        ini.error("servers", "sections", "names no server section")
    for section in sections:
        if not parser.has_section(section):
            ini.error(section, None, "section missing (listed in [servers] sections)")
            continue
        ami_user = parser.get(section, "ami_user", fallback="").strip() or None
        # Over AMI the res_zmq_manager ports are not used: 0 when left out.
        zmq_default = 0 if ami_user else None
        config.servers.append(ServerConfig(
            section=section,
            name=ini.raw(section, "name", section),
            addr=ini.raw(section, "addr") or "",
            cmd_port=ini.integer(section, "cmd_port", zmq_default, 0 if ami_user else 1, 65535),
            evt_port=ini.integer(section, "evt_port", zmq_default, 0 if ami_user else 1, 65535),
            ami_trace=ini.boolean(section, "ami_trace", False),
            ami_user=ami_user,
            ami_secret=(ini.raw(section, "ami_secret") or "") if ami_user else "",
            ami_port=ini.integer(section, "ami_port", 5038, 1, 65535),
            mwi_write=ini.choice(section, "mwi_write", "external",
                                 {mode: mode for mode in MAILBOX_WRITES}),
            hinted_only=ini.boolean(section, "hinted_only", config.hinted_only),
            publish_filter=ini.regex(section, "publish_filter"),
            accept_filter=ini.regex(section, "accept_filter"),
        ))
    _check_server_names(ini, config.servers)
    _check_server_addresses(ini, config.servers)
    _check_names(ini, sections)
    if ini.errors:
        raise ConfigError(ini.errors)
    return config


GENERAL_KEYS = ("device_state", "presence", "mwi", "hinted_only", "log_level", "request_timeout",
                "count_messages", "verbose_messages", "ping_interval", "server_timeout", "resync_interval",
                "max_devices", "down_state", "log_file", "state_file", "metrics_port",
                "metrics_address", "log_syslog", "status_socket")
SERVER_KEYS = ("name", "addr", "cmd_port", "evt_port", "ami_trace", "ami_user", "ami_secret",
               "ami_port", "mwi_write", "hinted_only", "publish_filter", "accept_filter")
PLACEHOLDER_SECRETS = ("change-me",)  # example_config.ini's


def _check_names(ini: _IniReader, servers: List[str]) -> None:
    """Every section and key must be one the broker reads: a typo (presense = yes) would
    otherwise pass unnoticed, and what it meant to set would silently not be."""
    parser = ini.parser
    known = {"general": GENERAL_KEYS, "servers": ("sections",),
             **{section: SERVER_KEYS for section in servers}}
    defaults = list(parser.defaults())
    for key in [key for key in defaults if key not in GENERAL_KEYS + SERVER_KEYS]:
        ini.error("DEFAULT", key, "not a known key" + _did_you_mean(key, GENERAL_KEYS +
                                                                    SERVER_KEYS))
    for section in parser.sections():
        if section not in known and not servers:
            continue  # (sections names none: that error says it)
        if section not in known and set(parser[section]) <= set(SERVER_KEYS + tuple(defaults)):
            ini.error(section, None, "a server section that [servers] sections does not list "
                      "(add it there, or remove it)")
            continue
        if section not in known:
            ini.error(section, None, "not a known section (neither general, servers nor one "
                      f"listed in [servers] sections){_did_you_mean(section, list(known))}")
            continue
        for key in parser[section]:
            if key not in known[section] and key not in defaults:
                ini.error(section, key, "not a known key" + _did_you_mean(key, known[section]))


def _did_you_mean(name: str, names: Sequence[str]) -> str:
    """A known name close to a misspelt one (in any case), as a hint."""
    spelt = {known.lower(): known for known in names}
    close = difflib.get_close_matches(name.lower(), list(spelt), n=1, cutoff=0.6)
    return f" (did you mean {spelt[close[0]]}?)" if close else ""


def placeholder_secrets(config: "BrokerConfig") -> List[str]:
    """Warnings for secrets left at the example's placeholder (for --check-config)."""
    return [f"{config.path}: [{server.section}] ami_secret: warning: still the example's "
            f"placeholder {server.ami_secret!r}: set the secret of the manager.conf user "
            f"{server.ami_user}" for server in config.servers
            if server.ami_user and server.ami_secret in PLACEHOLDER_SECRETS]


def _check_server_addresses(ini: _IniReader, servers: List[ServerConfig]) -> None:
    seen: Dict[Tuple, str] = {}
    for server in servers:
        problem = host_problem(server.addr) if server.addr else None
        if problem:
            ini.error(server.section, "addr", problem)
            continue
        host = server.addr.strip("[]").lower()
        where = (host, "ami", server.ami_port) if server.ami_user else \
            (host, server.cmd_port, server.evt_port)
        if where in seen:
            ini.error(server.section, "addr", f"the same server as [{seen[where]}] (same "
                      "address and ports)")
        seen.setdefault(where, server.section)


def _check_server_names(ini: _IniReader, servers: List[ServerConfig]) -> None:
    if len(set(s.section for s in servers)) < len(servers):
        ini.error("servers", "sections", "a section is listed twice")
    names = [s.name for s in servers]
    for server in servers:
        if names.count(server.name) > 1:
            ini.error(server.section, "name", f"{server.name!r} is used by another server")


# --- agent and hub: Python settings files ---------------------------------------------------------

@dataclass(frozen=True)
class Setting:
    """One setting of a Python settings file: its default and a check that returns an error or None."""
    default: Any
    check: Callable[[Any], Optional[str]]


def is_text(value: Any) -> Optional[str]:
    return None if isinstance(value, str) and value else "must be a non-empty string"


def is_optional_text(value: Any) -> Optional[str]:
    return None if value is None or isinstance(value, str) else "must be a string or None"


def is_url(value: Any) -> Optional[str]:
    """A ZeroMQ address to connect to."""
    return url_problem(value)


def is_bind_url(value: Any) -> Optional[str]:
    """A ZeroMQ address to bind: also tcp://*:<port> or an interface name."""
    return url_problem(value, bind=True)


def is_url_or_urls(value: Any) -> Optional[str]:
    urls = value if isinstance(value, (list, tuple)) else [value]
    problems = [url_problem(url) for url in urls]
    if not urls or any(problems):
        return next((p for p in problems if p), "must be a ZeroMQ address such as " +
                    URL_EXAMPLE) + ", or a list of them"
    return None


def number_between(low: float, high: float, unit: str, zero: bool = False,
                   none: bool = False) -> Callable[[Any], Optional[str]]:
    """A check of a number from low to high (or 0 when zero means off, or None when allowed)."""
    def check(value: Any) -> Optional[str]:
        if (none and value is None) or (zero and value == 0 and not isinstance(value, bool)):
            return None
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and \
            low <= value <= high
        if ok:
            return None
        alternatives = "".join([" (or None)" if none else "", " (or 0: off)" if zero else ""])
        return f"must be a number of {unit} from {low:g} to {high:g}{alternatives}"
    return check


def is_whole_number(low: int, high: int, unit: str) -> Callable[[Any], Optional[str]]:
    def check(value: Any) -> Optional[str]:
        if isinstance(value, int) and not isinstance(value, bool) and low <= value <= high:
            return None
        return f"must be a whole number of {unit} from {low} to {high}"
    return check


def is_down_state(value: Any) -> Optional[str]:
    if value is None or value in DEVICE_STATES:
        return None
    return f"must be None (keep the last state) or one of {', '.join(sorted(DEVICE_STATES))}"


def is_action_names(value: Any) -> Optional[str]:
    ok = isinstance(value, (list, tuple, set, frozenset)) and all(
        isinstance(name, str) for name in value)
    return None if ok else "must be a list of AMI action names"


def is_bool(value: Any) -> Optional[str]:
    return None if isinstance(value, bool) else "must be True or False"


def name_filter(text: str) -> Pattern[str]:
    """A filter of state names (publish_filter, accept_filter): a regular expression, matched
    anywhere in a name, in any case."""
    return re.compile(text, re.IGNORECASE)


def regex_problem(text: str) -> Optional[str]:
    """Why text is not a regular expression a filter can use, or None."""
    try:
        name_filter(text)
    except re.error as exc:
        return f"{printable(text)!r} is not a regular expression: {exc}"
    return None


def is_optional_regex(value: Any) -> Optional[str]:
    if value is None:
        return None
    return regex_problem(value) if isinstance(value, str) else "must be a regular expression"


def is_one_of(*choices: str) -> Callable[[Any], Optional[str]]:
    def check(value: Any) -> Optional[str]:
        return None if value in choices else f"must be one of {', '.join(map(repr, choices))}"
    return check


def is_optional_bind_url(value: Any) -> Optional[str]:
    return None if value is None else is_bind_url(value)


def is_log_level(value: Any) -> Optional[str]:
    ok = isinstance(value, str) and value.lower() in LOG_LEVELS
    return None if ok else f"must be one of {', '.join(LOG_LEVELS)}"


Together = Callable[[str, Dict[str, Any]], None]


class Schema(dict):
    """One program's settings (name -> Setting), with together: the checks that span several
    settings and the files they name (it raises ConfigError).  load_settings runs both, so that
    --check-config rejects everything a start would."""

    def __init__(self, settings: Dict[str, Setting], together: Optional[Together] = None) -> None:
        super().__init__(settings)
        self.together = together


def collecting(errors: List[str], load: Callable[..., Any], *args: Any) -> Any:
    """load(*args); None, with the lines of its ConfigError added to errors, if it raises one."""
    try:
        return load(*args)
    except ConfigError as exc:
        errors += exc.errors
        return None


def check_each(path: str, settings: Dict[str, Any], *checks: Together) -> None:
    """Run every check; one ConfigError with all their errors."""
    errors: List[str] = []
    for check in checks:
        collecting(errors, check, path, settings)
    if errors:
        raise ConfigError(errors)


def load_settings(path: str, schema: Dict[str, Setting]) -> Dict[str, Any]:
    """Run a Python settings file (as the original's ``import agent_config`` did) and check it.

    Returns every setting of the schema, from the file or its default.  Any other public name
    (most often a misspelt setting) is an error, as is anything the file raises; a name that
    starts with _ and an imported module are allowed.
    """
    if not os.path.isfile(path):
        raise ConfigError([f"{path}: cannot read the file: No such file"])
    try:
        namespace = runpy.run_path(path)
    except SyntaxError as exc:
        raise ConfigError([f"{path}: line {exc.lineno}: {exc.msg}"]) from None
    except SystemExit as exc:  # (not an Exception): a settings file must not end the program
        raise ConfigError([f"{path}: the settings file exits (sys.exit({exc.code!r})) instead "
                           "of setting values"]) from None
    except Exception as exc:  # the settings file is code: report whatever it raised, in one line
        raise ConfigError([f"{path}: {type(exc).__name__}: {exc}"]) from None
    errors = [f"{path}: {key}: not a known setting{_did_you_mean(key, list(schema))}"
              for key, value in namespace.items()
              if not key.startswith("_") and key not in schema and not inspect.ismodule(value)]
    settings = {}
    for key, setting in schema.items():
        value = namespace.get(key, setting.default)
        problem = setting.check(value)
        if problem:
            errors.append(f"{path}: {key}: {problem} (found {value!r})")
        settings[key] = value
    if errors:
        raise ConfigError(errors)
    together = getattr(schema, "together", None)
    if together is not None:
        together(path, settings)
    return settings


# Settings every Python settings file has (server_config.py, agent_config.py).
COMMON_SETTINGS = {
    "LOG_FILE": Setting(None, is_optional_text),
    "LOG_SYSLOG": Setting(False, is_bool),
    "STATUS_SOCKET": Setting(None, is_optional_bind_url),
    "METRICS_PORT": Setting(None, is_metrics_port),
    "METRICS_ADDRESS": Setting("127.0.0.1", is_host),
}


def load_script_settings(path: str, schema: Dict[str, Setting], quiet: bool = False,
                         program: str = "") -> Dict[str, Any]:
    """load_settings for a script: also sets up logging at LOG_LEVEL (unless quiet: --status)."""
    settings = load_settings(path, schema)
    if quiet:
        return settings
    try:
        setup_logging(LOG_LEVELS[settings["LOG_LEVEL"].lower()], settings["LOG_FILE"],
                      settings["LOG_SYSLOG"], program)
    except OSError as exc:
        raise ConfigError([f"{path}: LOG_FILE: {exc}"]) from None
    return settings


def example_text(name: str) -> str:
    """A commented example settings file (example_config.ini, server_config.py or
    agent_config.py), as the package carries it (zmqami/examples: in a checkout, links to the
    files at its root)."""
    from importlib import resources
    return resources.files("zmqami").joinpath("examples", name).read_text(encoding="utf-8")


def script_arguments(script: str, description: str, default_name: str,
                     argv: Optional[List[str]],
                     extra: Sequence[Tuple[str, Dict[str, Any]]] = ()) -> argparse.Namespace:
    """The command line of server.py and agent.py: [CONFIG] --check-config --status --version,
    and the script's own options (extra: flag, add_argument's keywords)."""
    from . import __version__
    parser = argparse.ArgumentParser(prog=program_name(script), description=description)
    parser.add_argument("config", nargs="?", default=default_settings_path(default_name),
                        help=f"settings file (default: {default_name} beside the script in a "
                             f"checkout, {SETTINGS_DIR}/{default_name} when installed: "
                             f"{default_settings_path(default_name)})")
    parser.add_argument("--check-config", action="store_true",
                        help="check the settings file, print every error, exit 0 or 2")
    parser.add_argument("--status", action="store_true",
                        help="print the status of the process running with these settings")
    parser.add_argument("--json", action="store_true", help="with --status: as JSON")
    parser.add_argument("query", nargs="*", metavar="devices [REGEX]",
                        help="with --status: what each source reports for each device and "
                             "presence whose name REGEX matches, and what was written here")
    parser.add_argument("--example-config", action="store_true",
                        help=f"print a commented example {default_name} to start from")
    parser.add_argument("--version", action="version", version=f"zmq-ami-broker {__version__}")
    for flag, options in extra:
        parser.add_argument(flag, **options)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.status:
        from .status import split_status_query
        args.config, args.query = split_status_query(args.config, args.query,
                                                     default_settings_path(default_name))
    elif args.query:
        parser.error(f"{' '.join(args.query)}: only --status takes more than the settings file")
    return args


Command = Callable[[argparse.Namespace, str, Dict[str, Any]], Optional[int]]


def run_settings_script(script: str, description: str, default_name: str,
                        schema: Dict[str, Setting], argv: Optional[List[str]],
                        run: Callable[[str, Dict[str, Any]], int],
                        extra: Sequence[Tuple[str, Dict[str, Any]]] = (),
                        command: Optional[Command] = None) -> int:
    """main() of server.py and agent.py: the options every script has, the script's own (extra,
    done by command: its exit status, or None to run), then run(path, settings)."""
    from .status import print_status
    args = script_arguments(script, description, default_name, argv, extra)
    if args.example_config:
        print(example_text(default_name), end="")
        return 0
    if args.check_config:
        return check_settings(args.config, schema)
    quiet = args.status or any(getattr(args, flag.lstrip("-").replace("-", "_")) is not None
                               for flag, _ in extra)
    try:
        settings = load_script_settings(args.config, schema, quiet, PROGRAMS.get(script, ""))
    except ConfigError as exc:
        return exc.report()
    if args.status:
        return print_status(args.config, "STATUS_SOCKET", settings["STATUS_SOCKET"], args.json,
                            args.query)
    if command is not None:
        status = command(args, args.config, settings)
        if status is not None:
            return status
    return run(args.config, settings)


def check_settings(path: str, schema: Dict[str, Setting]) -> int:
    """--check-config for a Python settings file."""
    try:
        settings = load_settings(path, schema)
    except ConfigError as exc:
        return exc.report()
    for key, value in settings.items():
        if key.endswith(("_SECRET", "_PASSWORD")) and value in PLACEHOLDER_SECRETS:
            print(f"{path}: {key}: warning: still the example's placeholder {value!r}")
    print(f"{path}: OK")
    return 0


def reload_settings(path: str, schema: Dict[str, Setting], running: Dict[str, Any],
                    needs_restart: Tuple[str, ...], log: logging.Logger) -> Optional[Dict[str, Any]]:
    """SIGHUP for a Python settings file: the new settings, or None (logged) if they are broken.

    Settings that only a restart can change keep their running value, with a warning.
    """
    try:
        settings = load_settings(path, schema)
        setup_logging(LOG_LEVELS[settings["LOG_LEVEL"].lower()], settings["LOG_FILE"],
                      settings["LOG_SYSLOG"])
    except ConfigError as exc:
        for line in exc.errors:
            log.error("Reload failed, running on as before: %s", line)
        return None
    except OSError as exc:
        log.error("Reload failed, running on as before: %s: LOG_FILE: %s", path, exc)
        return None
    for key in needs_restart:
        if settings[key] != running[key]:
            log.warning("%s: %s changed: it takes effect at the next restart", path, key)
            settings[key] = running[key]
    log.info("Reloaded %s", path)
    return settings
