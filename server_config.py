# Settings of the hub (python server.py).  Each has the default shown.

# How much to log: 'debug', 'info', 'warning' or 'error'.
LOG_LEVEL = 'info'

# Where the hub publishes every message to the agents (agents' ZMQ_SUB_URL connects here).
# 127.0.0.1 accepts only agents on this machine.  To accept agents on other hosts, bind the
# hub's address on the network that joins them, e.g. 'tcp://<hub address>:55555' ('tcp://*:55555'
# for every interface), and firewall the port to the agents' addresses.
PUB_BIND_URL = 'tcp://127.0.0.1:55555'

# Kept from the original configuration; not used.
PUB_CONNECT_URL = 'tcp://127.0.0.1:55555'

# Where agents push their messages to the hub (agents' ZMQ_PUB_URL connects here).  Open it up
# the same way as PUB_BIND_URL.
SUB_BIND_URL = 'tcp://127.0.0.1:55556'

# CURVE encryption and authentication of both sockets (docs/security.md).  Off while None.
# The hub's own key pair: the .key_secret file written by zmq.auth.create_certificates.
CURVE_SECRET_KEY_FILE = None

# With CURVE on: the folder of the public .key files of every agent and client allowed to
# connect, each named after its owner (<SYSTEM_NAME>.key): a message whose origin is not the name
# of the key that sent it is dropped.  Nobody else can send or receive.  Adding or removing a file takes effect at the
# next connection, without a restart.
CURVE_CLIENTS_DIR = None

# Logging: always to standard error (the journal under systemd); also to this file when set
# (reopened by itself when logrotate renames it), and to syslog when LOG_SYSLOG is True.
LOG_FILE = None
LOG_SYSLOG = False

# A local socket on which the hub answers with its status (python server.py --status):
# an ipc:// path or a tcp://127.0.0.1 port, e.g. 'ipc:///run/zmq-ami/hub.status'.  Off: None.
STATUS_SOCKET = None

# Prometheus metrics on http://<METRICS_ADDRESS>:<METRICS_PORT>/metrics (docs/operations.md);
# needs prometheus-client (pip install prometheus-client).  Off: None.
METRICS_PORT = None
METRICS_ADDRESS = '127.0.0.1'
