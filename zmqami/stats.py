"""Counters and rate-limited warnings (dropped input, refused writes), shared by the scripts."""
import logging
import time
from bisect import bisect_left
from collections import Counter
from typing import Dict, Optional

PREVIEW_BYTES = 120
PRINTABLE_CHARS = 100
# Control characters in text from the network would forge log lines: shown escaped instead.
_ESCAPES = {code: f"\\x{code:02x}" for code in list(range(32)) + [127]}


def printable(value: object) -> str:
    """Text from the network, safe in one log line: control characters escaped, length capped."""
    text = value if isinstance(value, str) else repr(value)
    text = text[:PRINTABLE_CHARS].translate(_ESCAPES)
    return text + ("..." if len(value if isinstance(value, str) else text) > PRINTABLE_CHARS else "")


def preview(raw: bytes) -> str:
    """The start of a raw message, printable in one log line."""
    text = repr(raw[:PREVIEW_BYTES])
    return text + ("..." if len(raw) > PREVIEW_BYTES else "")


# Upper bounds of the relay latency histogram's buckets, in seconds (then +Inf).
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                   5.0, 10.0)


class Histogram:
    """Counts per latency bucket (not cumulative) and their sum: cheap on the hot path; the
    metrics endpoint turns them into a Prometheus histogram."""
    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.sum += seconds


class Throttle:
    """Lets a warning through at most once per interval per key, counting those it holds back."""

    def __init__(self, interval: float = 60.0) -> None:
        self.interval = interval
        self._last: Dict[str, float] = {}
        self._held: Counter = Counter()

    def allow(self, key: str) -> Optional[int]:
        """None to hold this warning back; else how many were held back since the last one."""
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self._held[key] += 1
            return None
        self._last[key] = now
        return self._held.pop(key, 0)


def plural(count: int, noun: str) -> str:
    """'1 device', '2 devices': counts in log lines and messages read as English."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def held_back(count: int, what: str) -> str:
    return f" ({count} more {what} since the last warning)" if count else ""


class DropLog:
    """Counts input that is dropped, and logs it at most once per source per interval.

    A broken or hostile peer can send thousands of bad messages a second; one warning a minute per
    source says what is wrong without drowning the log.  The count of what was not logged is given
    with the next warning, and every drop is counted for the statistics line.
    """

    def __init__(self, log: logging.Logger, interval: float = 60.0, what: str = "input from") -> None:
        self.log = log
        self.what = what
        self.counts: Counter = Counter()
        self.throttle = Throttle(interval)

    def drop(self, source: str, reason: str, raw: bytes = b"") -> None:
        self.counts[source] += 1
        more = self.throttle.allow(source)
        if more is not None:
            self.log.warning("Dropped %s %s: %s%s%s", self.what, source, printable(reason),
                             f": {preview(raw)}" if raw else "", held_back(more, "dropped"))
