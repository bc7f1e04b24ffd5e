"""Stopping every process a run's private SuperLink started, even after ``kill -9``.

The SuperLink, SuperExec, ``flwr-simulation`` and the private Ray run in their own sessions
(Ctrl-C in the terminal is this process's to handle), so nothing ends them if the
``fedsim run`` process that owns them dies without cleaning up (``kill -9``, the OOM killer).
A watchdog does: ``python -m fedsim.superlink.reaper OWNER_PID OWNER_START TOKEN TMPDIR`` polls
its owner and, once the owner is gone, stops the run's processes and removes its temporary
folder. The owner stops the watchdog when it has cleaned up itself. The run folder needs no
such help: its lock dies with the owner (fedsim.runlock) and ``--resume`` continues it.

Processes are found by the token every process the SuperLink starts inherits, or as
descendants of one that has it: Ray's dashboard and runtime-env agents rename themselves
(setproctitle) and no longer show their environment, but stay children of the raylet.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from fedsim.edge.processes import processes_with_token

# How often the watchdog looks at its owner: a few seconds of orphaned processes at most.
POLL_S = 1.0


def process_state(pid: int) -> tuple[str, int, int] | None:
    """(state, parent pid, start time in clock ticks) of a live process, None when gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[1]), int(fields[19])


def alive(pid: int, start: int | None = None) -> bool:
    """Whether ``pid`` runs (not a zombie) and, given ``start``, is the same process (a
    recycled pid has another start time)."""
    st = process_state(pid)
    return st is not None and st[0] != "Z" and (start is None or st[2] == start)


def family(token: str) -> set[int]:
    """Live processes carrying ``token`` and all their descendants (module docstring)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else []:
        if entry.name.isdigit() and (st := process_state(int(entry.name))) is not None and st[0] != "Z":
            children.setdefault(st[1], []).append(int(entry.name))
    found: set[int] = set()
    todo = processes_with_token(token)
    while todo:
        pid = todo.pop()
        if pid not in found and pid != os.getpid():
            found.add(pid)
            todo.extend(children.get(pid, []))
    return found


def _signal(pids: set[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def stop_family(token: str, grace_s: float) -> None:
    """SIGTERM every process of ``token``'s family, ``grace_s`` to end, then SIGKILL what is
    left. The family is taken before anything ends (an orphan's parent is no longer the
    raylet) and again while waiting."""
    members = family(token)
    _signal(members, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    left = members
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        members |= family(token)
        left = {p for p in members if alive(p)}
    _signal(left, signal.SIGKILL)


def start_watchdog(token: str, tmpdir: Path, grace_s: float) -> subprocess.Popen:
    """The watchdog of this process (module docstring); stop it with :func:`stop_watchdog`.
    It does not carry ``token`` (its environment is this process's), so it is not part of the
    family it stops."""
    owner = os.getpid()
    st = process_state(owner)
    return subprocess.Popen(
        [sys.executable, "-m", __name__, str(owner), str(st[2] if st else 0), token, str(tmpdir), str(grace_s)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # Ctrl-C in the terminal must not end it before its owner
    )


def stop_watchdog(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def watch(owner: int, owner_start: int, token: str, tmpdir: Path, grace_s: float) -> None:
    """Until the owner is gone; then stop the family and remove ``tmpdir``."""
    while alive(owner, owner_start or None):
        time.sleep(POLL_S)
    stop_family(token, grace_s)
    shutil.rmtree(tmpdir, ignore_errors=True)


def main(argv: list[str]) -> int:
    owner, owner_start, token, tmpdir, grace_s = argv
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # the owner cleaned up itself
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    watch(int(owner), int(owner_start), token, Path(tmpdir), float(grace_s))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
