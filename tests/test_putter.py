"""The agent's puts to the NATS bucket (natsbucket.BucketPutter): a put goes out at once, unless
puts went out less than PUT_INTERVAL ago; then it waits, and those that come meanwhile go with
it."""
import asyncio
from typing import List, Tuple

from zmqami.natsbucket import PUT_INTERVAL, BucketPutter


class RecordingNats:
    """nats-py's publish, noting each subject and when it went out."""

    def __init__(self) -> None:
        self.published: List[Tuple[str, float]] = []

    async def publish(self, subject: str, body: bytes, reply: str = "") -> None:
        self.published.append((subject, asyncio.get_running_loop().time()))


class Client:
    """What the putter uses of natsnet.NatsClient."""

    def __init__(self) -> None:
        self.aio = asyncio.get_running_loop()
        self.nc = RecordingNats()
        self.bucket_open = True
        self.put_prefix = "$KV.zmqami."
        self.name = "node1"

    def connected(self) -> bool:
        return True

    def warn(self, kind: str, text: str) -> None:
        raise AssertionError(text)


async def until(condition, seconds: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + seconds
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.001)


def test_a_lone_put_goes_out_at_once_and_those_right_after_it_go_together():
    async def scenario() -> None:
        client = Client()
        putter = BucketPutter(client)
        putter.inbox = "_INBOX.test"
        putter.store("node1.a", b"{}", {"Device": "a"})
        await asyncio.sleep(0)  # (the sender's one step: no wait)
        assert [subject for subject, _ in client.nc.published] == ["$KV.zmqami.node1.a"]
        putter.store("node1.b", b"{}", {"Device": "b"})
        putter.store("node1.c", b"{}", {"Device": "c"})
        await asyncio.sleep(0)
        assert len(client.nc.published) == 1  # b and c wait for the rest of the interval
        await until(lambda: len(client.nc.published) == 3)
        first = client.nc.published[0][1]
        assert all(sent >= first + PUT_INTERVAL for _, sent in client.nc.published[1:])
        assert len(putter.acks) == 3  # each awaits its acknowledgement
    asyncio.run(scenario())
