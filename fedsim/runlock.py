"""One writer per directory: a run (or a sweep) holds an flock on ``DIR/.lock`` for its whole lifetime.

Two processes writing one run directory interleave metrics lines and checkpoints and corrupt both. The
kernel releases an flock when its holder dies, even by SIGKILL, so a lock file left behind never blocks:
it only names the last holder. The file holds the holder's PID, host and start time, for the error
another process gets.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

LOCK_FILE = ".lock"


class DirectoryInUse(Exception):
    """Another live process holds the directory's lock."""


@contextmanager
def run_lock(directory: str | Path) -> Iterator[None]:
    """Hold ``directory``'s lock (the directory must exist) until the block ends; DirectoryInUse naming the
    holder's PID if another process holds it."""
    path = Path(directory) / LOCK_FILE
    # "a+": opening must not truncate a live holder's record before we know the lock is ours
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise DirectoryInUse(f"{directory} is in use by {_holder(f.read(), path)}") from None
        f.truncate(0)
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                            "started": time.strftime("%Y-%m-%d %H:%M:%S")}))
        f.flush()
        yield


def _holder(record: str, path: Path) -> str:
    try:
        holder = json.loads(record)
        return f"process {holder['pid']} (started {holder['started']} on {holder['host']})"
    except (ValueError, KeyError, TypeError):  # the holder has locked the file but not written it yet
        return f"another process (see {path})"
