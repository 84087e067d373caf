#!/usr/bin/env python3
"""The hub of the agent/server network: re-publishes what agents push to it.

    python server.py [CONFIG.py]     settings from server_config.py beside this script by default
"""
import sys

from zmqami.hub import main

if __name__ == "__main__":
    sys.exit(main())
