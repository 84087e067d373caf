"""A hub that treats messages as the original Python 2 server.py did, for the compatibility test.

The original formatted every message for its debug line, calling len() on each value of the body
that is not false (docs/protocol.md, section 4; issue 12): a number there raised TypeError and the hub
died, which stopped the whole network.  This one applies the same rule, dies the same way, and
prints each msg_type the first time it relays one.

    python tests/original_hub.py PULL_URL PUB_URL
"""
import json
import sys

import zmq


def main(pull_url: str, pub_url: str) -> None:
    context = zmq.Context()
    pull = context.socket(zmq.PULL)
    pull.bind(pull_url)
    pub = context.socket(zmq.PUB)
    pub.bind(pub_url)
    print("Started", flush=True)
    seen = set()
    while True:
        target, body = pull.recv_multipart()
        message = json.loads(body)
        " ".join(f"{key}={len(value)}" for key, value in message.items() if value)  # the rule
        pub.send_multipart([target, body])
        if message["msg_type"] not in seen:
            seen.add(message["msg_type"])
            print(f"relayed {message['msg_type']}", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:3])
