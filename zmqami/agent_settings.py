"""The agent's settings (agent_config.py): each with its default and check, and the checks
that span several settings (run by --check-config and at start alike)."""
from typing import Any, Dict

from .config import (COMMON_SETTINGS, Schema, Setting, check_each, is_action_names, is_bool,
                     is_down_state, is_log_level, is_name_token, is_nats_urls, is_one_of,
                     is_optional_regex, is_optional_text, is_url, is_url_or_urls,
                     is_whole_number, number_between)
from .envelope import is_node_name
from .natsnet import check_nats_security
from .network import curve_client_keys
from .rules import MAILBOX_WRITES


# Actions a client may have an agent run: read-only ones.  Others (Originate, Setvar, Command, ...)
# must be listed in ALLOWED_ACTIONS by the administrator who wants them.
READ_ONLY_ACTIONS = ("Ping", "CoreStatus", "CoreSettings", "CoreShowChannels", "DeviceStateList",
                     "PresenceStateList", "PresenceState", "ExtensionStateList", "ExtensionState",
                     "SIPpeers", "SIPshowpeer", "PJSIPShowEndpoints", "PJSIPShowEndpoint",
                     "QueueStatus", "QueueSummary", "Mailboxcount", "MailboxStatus")


def check_agent_settings(path: str, settings: Dict[str, Any]) -> None:
    """What spans several settings: CURVE's two key files, NATS's TLS and credentials files."""
    check_each(path, settings, curve_client_keys, check_nats_security)


AGENT_SETTINGS = Schema({
    "LOG_LEVEL": Setting("info", is_log_level),
    "SYSTEM_NAME": Setting("Moscow", lambda v: None if is_node_name(v) else
                           "must be a name without brackets or control characters"),
    "ASTERISK_CMD_URL": Setting("tcp://127.0.0.1:1967", is_url),
    "ASTERISK_EVT_URL": Setting("tcp://127.0.0.1:1968", is_url),
    "KEEP_ALIVE_INTERVAL": Setting(30, number_between(0.1, 86400, "seconds")),
    "ZMQ_PUB_URL": Setting("tcp://127.0.0.1:55556", is_url_or_urls),
    "ZMQ_SUB_URL": Setting("tcp://127.0.0.1:55555", is_url_or_urls),
    "PID_FILE": Setting(None, is_optional_text),
    "ASTERISK_TIMEOUT": Setting(5000, number_between(10, 600_000, "milliseconds")),
    "DEVICE_STATE": Setting(True, is_bool),
    "PRESENCE": Setting(False, is_bool),
    "MWI": Setting(False, is_bool),
    "MWI_WRITE": Setting("external", is_one_of(*MAILBOX_WRITES)),
    "HINTED_ONLY": Setting(False, is_bool),
    "PUBLISH_FILTER": Setting(None, is_optional_regex),
    "ACCEPT_FILTER": Setting(None, is_optional_regex),
    "PACK_EVENTS": Setting("auto", lambda v: None if v is True or v is False or v == "auto"
                           else "must be True, False or 'auto'"),
    "PEER_TIMEOUT": Setting(None, number_between(0.1, 864000, "seconds", none=True)),
    "DOWN_STATE": Setting("UNAVAILABLE", is_down_state),
    "RESYNC_INTERVAL": Setting(300, number_between(0.1, 86400, "seconds", zero=True)),
    "ALLOWED_ACTIONS": Setting(list(READ_ONLY_ACTIONS), is_action_names),
    "MAX_PEERS": Setting(1000, number_between(1, 100_000, "peers")),
    "STATE_FILE": Setting(None, is_optional_text),
    "MAX_DEVICES_PER_PEER": Setting(10_000, number_between(1, 10_000_000, "devices")),
    "ASTERISK_AMI_URL": Setting("tcp://127.0.0.1:5038", is_url),
    "ASTERISK_AMI_USER": Setting(None, is_optional_text),
    "ASTERISK_AMI_SECRET": Setting(None, is_optional_text),
    "CURVE_SERVER_KEY_FILE": Setting(None, is_optional_text),
    "CURVE_SECRET_KEY_FILE": Setting(None, is_optional_text),
    "NATS_URLS": Setting(None, is_nats_urls),
    "NATS_USER": Setting(None, is_optional_text),
    "NATS_PASSWORD": Setting(None, is_optional_text),
    "NATS_CREDS_FILE": Setting(None, is_optional_text),
    "NATS_TLS_CA": Setting(None, is_optional_text),
    "NATS_TLS_CERT": Setting(None, is_optional_text),
    "NATS_TLS_KEY": Setting(None, is_optional_text),
    "NATS_BUCKET": Setting("zmqami", is_name_token("bucket name")),
    "NATS_REPLICAS": Setting(1, is_whole_number(1, 5, "replicas")),
    "NATS_SUBJECT_PREFIX": Setting("zmqami", is_name_token("subject prefix", dots=True)),
    "NATS_JS_DOMAIN": Setting(None, is_name_token("JetStream domain", none=True)),
    "NATS_MAX_BYTES": Setting(256 * 1024 * 1024, is_whole_number(1024 * 1024, 2 ** 50, "bytes")),
    **COMMON_SETTINGS,
}, together=check_agent_settings)
# What a SIGHUP cannot change: who the agent is and how it reaches the hubs.
RESTART_SETTINGS = ("SYSTEM_NAME", "ZMQ_PUB_URL", "ZMQ_SUB_URL", "PID_FILE", "STATE_FILE",
                    "CURVE_SERVER_KEY_FILE", "CURVE_SECRET_KEY_FILE", "STATUS_SOCKET",
                    *(name for name in AGENT_SETTINGS if name.startswith("NATS_")))
ASTERISK_SETTINGS = ("ASTERISK_CMD_URL", "ASTERISK_EVT_URL", "ASTERISK_AMI_URL",
                     "ASTERISK_AMI_USER", "ASTERISK_AMI_SECRET", "ASTERISK_TIMEOUT")
