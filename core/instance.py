"""One process per resource: a lock file held for the life of a process, naming its holder.

Two managers on one database, or two proplets with one id on one machine, would both dispatch the
same tasks or take the broker session from each other; the second refuses to start instead, and
says who holds the resource. The kernel drops a `flock` when its holder exits, however it exits.
"""

from __future__ import annotations

import fcntl
import os
import socket
import sys
from pathlib import Path


class HeldElsewhere(Exception):
    """Another process holds the lock; `holder` says which (`pid 1234 on host-a (propeller serve)`)."""

    def __init__(self, holder: str) -> None:
        super().__init__(holder)
        self.holder = holder


def this_process() -> str:
    """How another process names this one in its error: `pid 1234 on host-a (propeller serve --port 7070)`."""
    program = Path(sys.argv[0])
    name = program.parent.name if program.name == "__main__.py" else program.name  # python -m propeller
    return f"pid {os.getpid()} on {socket.gethostname()} ({' '.join([name, *sys.argv[1:]])})"


def hold_lock_file(path: Path) -> int:
    """Lock `path` (created if missing) for this process and write `this_process()` into it; the
    descriptor to close when done. Raises HeldElsewhere naming the holder, or OSError when the file
    cannot be created."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.read(fd, 1000).decode(errors="replace").strip() or "a process that did not say which"
        os.close(fd)
        raise HeldElsewhere(holder) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{this_process()}\n".encode())
    return fd
