"""The last known presences and voicemail lamps on disk (``state_file`` / ``STATE_FILE``).

A presence (or a lamp) has no owner: the same presentity is written on every server, so when
the broker (or an agent) starts, it cannot tell from the servers alone which of two different
values is the newer one.  With the values it knew when it stopped, it can: a server whose value
differs from the saved one changed while we were away, and its value wins.

The file is JSON, written to a temporary file and renamed over the old one (a crash leaves either
the old file or the new one), at most every SAVE_INTERVAL seconds while something changed, and at
exit.  A missing file is normal at the first start; a broken one is logged and ignored.

What it holds is checked as an event from Asterisk would be (a file can be edited, copied from
another machine or damaged): an entry whose name or value could not have come from Asterisk is
skipped, a time ahead of this machine's clock counts as now (else the saved value would beat
every real change until the clock caught up), and a file larger than the entries it may hold
could need is not read at all.
"""
import json
import logging
import os
import time
from typing import Any, Dict, Optional, Tuple

from .rules import (MAILBOX_PREFIX, MAX_NAME_BYTES, MAX_TEXT_BYTES, BadInput, StateUpdate,
                    check_text, event_for, relayed_update)
from .stats import Throttle, printable

log = logging.getLogger(__name__)

SAVE_INTERVAL = 5.0  # seconds between saves while something changed
FORMAT_VERSION = 1
# The most one entry can take in the file: a name, a value of subtype and message (base64 grows
# text by 4/3), a source, a time.  JSON escapes triple UTF-8 text at most (a 2-byte character
# becomes a 6-byte \uXXXX).
MAX_ENTRY_BYTES = 3 * (MAX_NAME_BYTES + 3 * MAX_TEXT_BYTES) + 100

Saved = Dict[str, Tuple[str, str, float]]  # variable -> (value, source, wall-clock time of change)


class StateFile:
    """max_entries: the most presences the program may know (the file may hold no more)."""

    def __init__(self, path: str, max_entries: int) -> None:
        self.path = path
        self.max_entries = max_entries
        self.saved: Optional[Saved] = None
        self.errors = Throttle()

    def load(self) -> Saved:
        """What was saved, checked entry by entry; {} (logged) if there is nothing usable."""
        try:
            presences = self._read()
        except FileNotFoundError:
            log.info("%s: no saved states yet (it is written while running)", self.path)
            return {}
        except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
            log.warning("%s: cannot use the saved states (%s): starting without them", self.path,
                        str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__)
            return {}
        saved: Saved = {}
        now, ahead, why = time.time(), 0.0, ""
        for variable, entry in presences.items():
            try:
                value, source, wall = _checked(variable, entry)
            except BadInput as exc:
                why = why or str(exc)
                continue
            if wall > now:
                ahead, wall = max(ahead, wall - now), now
            saved[variable] = value, source, wall
        skipped = len(presences) - len(saved)
        log.info("%s: %d saved presences%s", self.path, len(saved),
                 f" ({skipped} skipped, such as: {printable(why)})" if skipped else "")
        if ahead:
            log.warning("%s: saved presences stamped up to %d s ahead of this machine's clock "
                        "are taken as changed now", self.path, ahead)
        self.saved = dict(saved)
        return saved

    def _read(self) -> Dict[Any, Any]:
        """The file's presences, unchecked; ValueError for a file that is not one we wrote."""
        with open(self.path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            limit = self.max_entries * MAX_ENTRY_BYTES + 100
            if size > limit:
                raise ValueError(f"{size} bytes, more than {self.max_entries} presences could "
                                 f"take ({limit} bytes)")
            data = json.loads(handle.read().decode("utf-8"))
        presences = data["presences"]
        if data.get("version") != FORMAT_VERSION or not isinstance(presences, dict):
            raise ValueError("not a state file of this version")
        if len(presences) > self.max_entries:
            raise ValueError(f"{len(presences)} presences, more than the {self.max_entries} "
                             f"it may hold")
        return presences

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


def _checked(variable: Any, entry: Any) -> Tuple[str, str, float]:
    """An entry as (value, source, time), checked as the event that would bring it; BadInput."""
    if not (isinstance(variable, str) and variable.startswith(("PRESENCE_STATE(", MAILBOX_PREFIX))
            and variable.endswith(")") and isinstance(entry, list) and len(entry) == 3):
        raise BadInput("not a presence or mailbox entry")
    value, source, wall = entry
    try:
        wall = float(wall) if isinstance(wall, (int, float)) and not isinstance(wall, bool) \
            else -1.0
    except OverflowError:  # a whole number too large for a float
        wall = -1.0
    if not (isinstance(value, str) and isinstance(source, str) and source and wall >= 0):
        raise BadInput(f"{printable(variable)}: not a value, a source and a time")
    check_text("source", source)
    # The event that would bring this state gives exactly this entry back, or it is not one.
    update = StateUpdate(variable, value)
    try:
        same = relayed_update(event_for(update), presence=True, mwi=True) == update
    except BadInput:
        raise  # (says which field Asterisk would not send)
    except ValueError:  # a mailbox's value that is not "new,old"
        same = False
    if not same:
        raise BadInput(f"{printable(variable)}: not a state Asterisk would report")
    return value, source, wall
