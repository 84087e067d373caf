# Settings of the agent (python agent.py), one agent on each Asterisk host.
# Each setting has the default shown; a setting left out takes its default.

# How much to log: 'debug', 'info', 'warning' or 'error'.
LOG_LEVEL = 'info'

# This node's name, unique in the network: other nodes send to '[<SYSTEM_NAME>]'.
# No brackets and no control characters.
SYSTEM_NAME = 'Moscow'

# This host's Asterisk over its own manager interface (plain AMI, the recommended way): the
# manager interface (manager.conf) and a manager user for the agent (docs/asterisk.md: "Plain AMI").  The
# agent runs on the Asterisk host: keep 127.0.0.1.  The secret is never written to the logs.
ASTERISK_AMI_URL = 'tcp://127.0.0.1:5038'
ASTERISK_AMI_USER = 'zmq-ami'
ASTERISK_AMI_SECRET = 'change-me'

# Or, with ASTERISK_AMI_USER = None, through res_zmq_manager's sockets (addr_cmd and addr_evt of
# /etc/asterisk/zmq_manager.conf), as the original agent did.  The module crashes Asterisk 15+
# during normal relaying (docs/asterisk.md: "res_zmq_manager on Asterisk 15+").
ASTERISK_CMD_URL = 'tcp://127.0.0.1:1967'
ASTERISK_EVT_URL = 'tcp://127.0.0.1:1968'

# Seconds between keep-alives: a Ping to Asterisk, reported to '[AsteriskStats]', and an
# AgentPing through the hub.
KEEP_ALIVE_INTERVAL = 30

# The hub (python server.py): its SUB_BIND_URL, where this agent pushes its messages, and its
# PUB_BIND_URL, where it subscribes.  127.0.0.1 is for a hub on this host: put the hub's real
# address here when it runs elsewhere.  With redundant hubs give a list of each, in the same
# order, e.g. ['tcp://<hub 1>:55556', 'tcp://<hub 2>:55556']: every message goes through
# every hub, and each is applied once.
ZMQ_PUB_URL = 'tcp://127.0.0.1:55556'
ZMQ_SUB_URL = 'tcp://127.0.0.1:55555'

# The pid file that keeps a second agent from starting; None: zmq_agent.pid beside agent.py.
PID_FILE = None

# Milliseconds to wait for Asterisk to answer an action before reconnecting (and sending a
# state again, or answering an AsteriskAction with null).
ASTERISK_TIMEOUT = 5000

# Relay device states (DeviceStateChange -> DEVICE_STATE(Custom:<device>) on the other hosts).
DEVICE_STATE = True

# Relay presences (PresenceStateChange -> PRESENCE_STATE(CustomPresence:<name>)); the original
# agent did not.  Every agent of the network should have the same value.
PRESENCE = False

# Relay voicemail lamps (MessageWaiting), and how this Asterisk's lamps are written:
# 'external' (MWIUpdate: res_mwi_external and res_mwi_external_ami loaded, app_voicemail not),
# 'none' (this Asterisk runs app_voicemail: its lamps are read, never written), or 'refresh'
# (app_voicemail on storage shared with the voicemail server: VoicemailRefresh, which needs
# write = user in manager.conf).  docs/broker.md: "Voicemail lamps".
MWI = False
MWI_WRITE = 'external'

# True: write on this Asterisk only the Custom: devices and CustomPresence: presentities its own
# dialplan hints name (read again at each resync, every RESYNC_INTERVAL and after a Reload).
HINTED_ONLY = False

# Filters, regular expressions matched anywhere in a name, in any case (device PJSIP/100,
# presentity CustomPresence:100, mailbox 100@default): only the names PUBLISH_FILTER matches are
# sent from this Asterisk to the peers, and only those ACCEPT_FILTER matches are written on it.
# None: all.
PUBLISH_FILTER = None
ACCEPT_FILTER = None

# Under load, send this host's states to the peers many to a message (AsteriskEvents): less
# work for the hub and the peers.  An original agent would miss those states: 'auto' packs
# only after five minutes without a word from an original agent; True: every agent on the
# network is of this version; False: never.  (Not over NATS, where each state has its key.)
PACK_EVENTS = 'auto'

# Seconds of silence after which a peer agent is down (its devices then show DOWN_STATE here);
# None: 3 x KEEP_ALIVE_INTERVAL.
PEER_TIMEOUT = None

# What the devices of a peer that is down (or whose Asterisk is down) show here until it is
# back: 'UNAVAILABLE' or any device state; None keeps their last state.
DOWN_STATE = 'UNAVAILABLE'

# Seconds between sending this host's states to every peer again and checking the mirrors on
# this Asterisk, to repair anything missed; 0: never.
RESYNC_INTERVAL = 300

# AMI actions that other nodes and clients may run on this Asterisk with AsteriskAction.  The
# default is read-only.  Getvar, Status, Challenge, ListCommands, WaitEvent and Filter are always
# refused (they crash Asterisk through res_zmq_manager), and an Originate is always made
# asynchronous.  Add 'Originate' only if every client that can reach the hub may place calls.
ALLOWED_ACTIONS = ['Ping', 'CoreStatus', 'CoreSettings', 'CoreShowChannels', 'DeviceStateList',
                   'PresenceStateList', 'PresenceState', 'ExtensionStateList', 'ExtensionState',
                   'SIPpeers', 'SIPshowpeer', 'PJSIPShowEndpoints', 'PJSIPShowEndpoint',
                   'QueueStatus', 'QueueSummary', 'Mailboxcount', 'MailboxStatus']

# Keep the presences known here, so that a change made on this Asterisk while the agent was
# stopped wins at its next start (docs/broker.md: "The right final state"); None: no file.
# E.g. '/var/lib/zmq-ami/agent.state'.
STATE_FILE = None

# Bounds on what the peers can make this agent hold (and write into Asterisk's database): peers
# tracked, and states kept per peer.  What exceeds them is dropped, counted and logged.
MAX_PEERS = 1000
MAX_DEVICES_PER_PEER = 10000

# CURVE towards the hub (docs/security.md); off while None.  Set both or neither:
# the hub's public key (its .key file) and this agent's own key pair (its .key_secret file).
# The hub knows this agent by its key's file name: <SYSTEM_NAME>.key in its CURVE_CLIENTS_DIR.
CURVE_SERVER_KEY_FILE = None
CURVE_SECRET_KEY_FILE = None

# Over NATS instead of the hub (docs/nats.md): the NATS servers of the cluster, or
# of this office's leaf node, e.g. ['nats://<nats 1>:4222', 'nats://<nats 2>:4222'] (tls:// for
# TLS).  With NATS_URLS set, ZMQ_PUB_URL, ZMQ_SUB_URL and CURVE_* are not used.  None: the hub.
# Needs nats-py (pip install nats-py).  Every agent of a network uses the same transport.
NATS_URLS = None
# Credentials: a user and password, or a credentials file (.creds, from nsc).
NATS_USER = None
NATS_PASSWORD = None
NATS_CREDS_FILE = None
# TLS: the CA that signed the servers' certificates; a client certificate and its key if the
# servers ask for one (verify: true).
NATS_TLS_CA = None
NATS_TLS_CERT = None
NATS_TLS_KEY = None
# The key-value bucket that holds the states (created by the first agent, with NATS_REPLICAS
# copies: 3 in a cluster of 3), and the first token of every subject.
NATS_BUCKET = 'zmqami'
NATS_REPLICAS = 1
# The most the bucket may hold, in bytes, set when it is created (a value is at most 32 KiB).
NATS_MAX_BYTES = 268435456
NATS_SUBJECT_PREFIX = 'zmqami'
# Through a leaf node whose own JetStream (if any) is not the cluster's: the cluster's JetStream
# domain (its jetstream { domain: ... }).  None: the JetStream of the servers it connects to.
NATS_JS_DOMAIN = None

# Logging: always to standard error (the journal under systemd); also to this file when set
# (reopened by itself when logrotate renames it), and to syslog when LOG_SYSLOG is True.
LOG_FILE = None
LOG_SYSLOG = False

# A local socket on which the agent answers with its status (python agent.py --status):
# an ipc:// path or a tcp://127.0.0.1 port, e.g. 'ipc:///run/zmq-ami/agent.status'.  Off: None.
STATUS_SOCKET = None

# Prometheus metrics on http://<METRICS_ADDRESS>:<METRICS_PORT>/metrics (docs/operations.md);
# needs prometheus-client (pip install prometheus-client).  Off: None.
METRICS_PORT = None
METRICS_ADDRESS = '127.0.0.1'
