"""One run at a time per profile: a lock on ``artifacts/<profile>/.run.lock``.

The lock is an ``flock`` on the file, held for the whole run, so the operating system releases
it when the process ends in any way (finished, failed, killed). The file also says who holds
it (process id, command, start time) so that a second run can name the first. While the lock
is held, anything a run left behind in the profile's folder (temporary stage folders and
notebooks) belongs to a run that no longer exists and is safe to remove.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

logger = logging.getLogger("moecollab")
LOCK_NAME = ".run.lock"


class ProfileBusy(RuntimeError):
    """Another run is writing this profile's artifacts."""


@contextmanager
def profile_lock(profile_folder: Path, *, wait: bool = False) -> Iterator[None]:
    """Hold the profile's run lock for the duration of the block.

    Parameters
    ----------
    profile_folder : Path
        ``artifacts/<profile>``; created if missing.
    wait : bool
        Wait for the other run to finish instead of raising :class:`ProfileBusy`.
    """
    import fcntl  # POSIX; moecollab runs on Linux and macOS

    profile_folder.mkdir(parents=True, exist_ok=True)
    path = profile_folder / LOCK_NAME
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = describe_owner(path)
            if not wait:
                raise ProfileBusy(
                    f"profile {profile_folder.name!r} is being written by another run "
                    f"({owner}); wait for it to end, or pass --wait to queue behind it"
                ) from None
            logger.info("waiting for the run that holds profile %r (%s)",
                        profile_folder.name, owner)
            fcntl.flock(handle, fcntl.LOCK_EX)
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({
            "pid": os.getpid(), "command": _command_line(),
            "started": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")}) + "\n")
        handle.flush()
        try:
            yield
        finally:
            handle.seek(0)
            handle.truncate()
            fcntl.flock(handle, fcntl.LOCK_UN)


def _command_line() -> str:
    arguments = list(sys.argv) or [""]
    if Path(arguments[0]).name == "__main__.py":  # python -m moecollab
        arguments[:1] = ["-m", Path(arguments[0]).parent.name]
    return shlex.join(["python", *arguments])


def describe_owner(path: Path, attempts: int = 5) -> str:
    """"pid 123, `python -m moecollab run`, started …" from a held lock file."""
    for _ in range(attempts):  # the holder may be between truncating and writing
        try:
            owner = json.loads(path.read_text() or "null")
        except (OSError, json.JSONDecodeError):
            owner = None
        if owner:
            return f"pid {owner['pid']}, `{owner['command']}`, started {owner['started']}"
        time.sleep(0.05)
    return "owner not recorded"
