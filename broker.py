#!/usr/bin/env python3
"""Central broker: mirrors device states and presences between Asterisk servers.

    python broker.py config.ini     relay between the servers of config.ini
    python broker.py --demo         see it work on three stand-in servers, no Asterisk needed
"""
import sys

from zmqami.broker import main

if __name__ == "__main__":
    sys.exit(main())
