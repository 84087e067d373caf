"""Counters and the rate-limited log of dropped input, shared by the three scripts."""
import logging
import time
from collections import Counter
from typing import Dict

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


class DropLog:
    """Counts input that is dropped, and logs it at most once per source per interval.

    A broken or hostile peer can send thousands of bad messages a second; one warning a minute per
    source says what is wrong without drowning the log.  The count of what was not logged is given
    with the next warning, and every drop is counted for the statistics line.
    """

    def __init__(self, log: logging.Logger, interval: float = 60.0, what: str = "input from") -> None:
        self.log = log
        self.interval = interval
        self.what = what
        self.counts: Counter = Counter()
        self._last_warning: Dict[str, float] = {}
        self._not_logged: Counter = Counter()

    def drop(self, source: str, reason: str, raw: bytes = b"") -> None:
        self.counts[source] += 1
        now = time.monotonic()
        last = self._last_warning.get(source)
        if last is not None and now - last < self.interval:
            self._not_logged[source] += 1
            return
        self._last_warning[source] = now
        more = self._not_logged.pop(source, 0)
        self.log.warning("Dropped %s %s: %s%s%s", self.what, source, printable(reason),
                         f": {preview(raw)}" if raw else "",
                         f" ({more} more dropped since the last warning)" if more else "")
