"""The last known presences on disk (``state_file`` / ``STATE_FILE``).

A presence has no owner: the same presentity is written on every server, so when the broker (or
an agent) starts, it cannot tell from the servers alone which of two different values is the
newer one.  With the values it knew when it stopped, it can: a server whose value differs from the
saved one changed while we were away, and its value wins.

The file is JSON, written to a temporary file and renamed over the old one (a crash leaves either
the old file or the new one), at most every SAVE_INTERVAL seconds while something changed, and at
exit.  A missing file is normal at the first start; a broken one is logged and ignored.
"""
import json
import logging
import os
from typing import Any, Dict, Optional, Tuple

from .rules import BadInput, parse_presence_value
from .stats import Throttle

log = logging.getLogger(__name__)

SAVE_INTERVAL = 5.0  # seconds between saves while something changed
FORMAT_VERSION = 1

Saved = Dict[str, Tuple[str, str, float]]  # variable -> (value, source, wall-clock time of change)


class StateFile:
    def __init__(self, path: str) -> None:
        self.path = path
        self.saved: Optional[Saved] = None
        self.errors = Throttle()

    def load(self) -> Saved:
        """What was saved, checked entry by entry; {} (logged) if there is nothing usable."""
        try:
            with open(self.path, encoding="utf-8") as handle:
                data = json.load(handle)
            presences = data["presences"]
            if data.get("version") != FORMAT_VERSION or not isinstance(presences, dict):
                raise ValueError("not a state file of this version")
        except FileNotFoundError:
            log.info("%s: no saved states yet (it is written while running)", self.path)
            return {}
        except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
            log.warning("%s: cannot use the saved states (%s): starting without them", self.path,
                        str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__)
            return {}
        saved: Saved = {}
        for variable, entry in presences.items():
            checked = _checked(variable, entry)
            if checked is not None:
                saved[variable] = checked
        skipped = len(presences) - len(saved)
        log.info("%s: %d saved presences%s", self.path, len(saved),
                 f" ({skipped} unreadable ones skipped)" if skipped else "")
        self.saved = dict(saved)
        return saved

    def save(self, snapshot: Saved) -> None:
        """Write snapshot unless it is what the file already holds."""
        if snapshot == self.saved:
            return
        temporary = f"{self.path}.tmp"
        data = {"version": FORMAT_VERSION,
                "presences": {variable: list(entry) for variable, entry in snapshot.items()}}
        try:
            with open(temporary, "w", encoding="utf-8") as handle:
                json.dump(data, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, self.path)
        except OSError as exc:
            more = self.errors.allow("save")
            if more is not None:
                log.error("%s: cannot save the states: %s", self.path, exc.strerror or exc)
            return
        self.saved = dict(snapshot)


def _checked(variable: Any, entry: Any) -> Optional[Tuple[str, str, float]]:
    if not (isinstance(variable, str) and variable.startswith("PRESENCE_STATE(")
            and isinstance(entry, list) and len(entry) == 3):
        return None
    value, source, wall = entry
    if not (isinstance(value, str) and isinstance(source, str)
            and isinstance(wall, (int, float)) and not isinstance(wall, bool)):
        return None
    try:
        parse_presence_value(value)
    except BadInput:
        return None
    return value, source, float(wall)
