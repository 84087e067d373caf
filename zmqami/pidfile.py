"""The agent's pid file: keeps a second agent with the same settings from starting.

The original refused to start when the file existed; a file left by a process that is gone (a
crash, a power cut) is replaced here, with a warning.
"""
import errno
import logging
import os

log = logging.getLogger("agent")


class PidFileBusy(Exception):
    pass


def claim_pid_file(path: str) -> None:
    """Write our pid to path; PidFileBusy if it names a running process, replace it if stale."""
    try:
        with open(path, encoding="ascii", errors="replace") as handle:
            old_pid = int(handle.read().strip() or 0)
    except FileNotFoundError:
        old_pid = None
    except (OSError, ValueError):
        old_pid = 0
    if old_pid is not None:
        if old_pid > 0 and _process_exists(old_pid):
            raise PidFileBusy(f"{path} already exists (agent running as pid {old_pid}), exiting.")
        log.warning("%s names pid %s, which is not running: replacing it.", path, old_pid or "?")
        os.unlink(path)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(f"{os.getpid()}\n")


def release_pid_file(path: str) -> None:
    try:
        with open(path, encoding="ascii") as handle:
            if handle.read().strip() == str(os.getpid()):
                os.unlink(path)
    except (OSError, ValueError):
        pass


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError as exc:
        return exc.errno == errno.EPERM
    return True
