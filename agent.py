#!/usr/bin/env python3
"""The agent for one Asterisk host of the agent/server network.

    python agent.py [CONFIG.py]     settings from agent_config.py beside this script by default
"""
import sys

from zmqami.agent import main

if __name__ == "__main__":
    sys.exit(main())
