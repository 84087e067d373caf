"""zmq-ami-broker: keeps the device states and presences of Asterisk servers in step.

The three scripts at the top of the project (broker.py, server.py, agent.py) are thin: what they
share lives here, written once: the relay rules, the Asterisk connection, the agent envelope,
configuration loading, the event loop and the stand-in Asterisk used by tests, demo and benchmarks.
"""
__version__ = "2.0.0.dev0"
