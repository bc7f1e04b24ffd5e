"""One writing process per run folder: an OS lock on ``<run folder>/.lock``.

``fcntl.flock`` on a file inside the folder; the kernel releases it when the process
exits, however it exits (kill -9 included), so a stale lock cannot exist and there is
nothing to clean up. The file stays (removing it would let a second process lock a new
file while the first still holds the old one). Holding is counted per process, so code
that locks a folder this process already holds (a test calling the CLI twice) goes on.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

LOCK_FILE = ".lock"

_held: dict[str, tuple[int, int]] = {}  # lock file -> (fd, count)


class FolderLocked(RuntimeError):
    """Another process holds the folder's lock; the message is one line."""


def _key(folder: Path) -> str:
    return os.path.realpath(folder / LOCK_FILE)


def lock_folder(folder: Path) -> None:
    """Take the folder's lock without waiting (FolderLocked if another process has it)."""
    key = _key(folder)
    if key in _held:
        fd, count = _held[key]
        _held[key] = (fd, count + 1)
        return
    fd = os.open(key, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            holder = os.read(fd, 32).decode(errors="replace").strip()
        finally:
            os.close(fd)
        who = f" (pid {holder})" if holder.isdigit() else ""
        raise FolderLocked(
            f"{folder}: run folder is being written by another fedsim process{who}; wait for it to finish or stop it first"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    _held[key] = (fd, 1)


def unlock_folder(folder: Path) -> None:
    """Release one hold of the folder's lock (the lock goes when the last hold does)."""
    key = _key(folder)
    if key not in _held:
        return
    fd, count = _held.pop(key)
    if count > 1:
        _held[key] = (fd, count - 1)
    else:
        os.close(fd)  # closing the descriptor releases the flock


def lock_holder(folder: Path) -> int | None:
    """The pid written by the process that holds the folder's lock, or None when no process
    holds it (checked with a non-blocking ``flock``, released at once; this process's own
    hold counts as held). A process that writes into a folder on another's behalf (Flower's
    simulation process for ``fedsim run``) checks this instead of taking the lock."""
    key = _key(folder)
    if key in _held:
        return os.getpid()
    try:
        fd = os.open(key, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip()
            return int(holder) if holder.isdigit() else -1
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
