"""The job of ``brokerlock run``: one process group, stopped as a whole, and never
left running unlocked when the runner dies.

On POSIX the command starts a session of its own (``setsid``), so its process group
holds everything it starts (``sh -c '(sleep 5; work); true'`` included) unless a
process leaves on purpose (another ``setsid``, a daemon). Signals and stops go to the
whole group.

The lock is freed the instant the runner dies (the store sees its witness or presence
go), so the job must die with it, at once and without a grace period: whatever the job
did after that would be unprotected. Two mechanisms, each enough alone:

- Linux: the command's first process asks for SIGKILL when its parent dies
  (``PR_SET_PDEATHSIG``). The kernel sends it when the *thread* that forked the child
  ends, so the runner starts the job from its main thread, which lives exactly as long
  as the runner.
- Every POSIX system: a guard, a tiny ``/bin/sh`` in a session of its own, reads a pipe
  whose write end only the runner holds. The runner tells it the job's group at start
  and "done" at the end; end of file without "done" means the runner died, and the
  guard SIGKILLs the job's whole group (which the parent-death signal alone cannot
  reach). The guard ignores the signals a terminal or ``timeout`` sends to the
  runner's group.

Windows has neither: there the job runs on if the runner is killed (see docs/cron.rst).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from typing import Callable, List, Optional

# The guard: $1 is nothing; it reads the job's process group id, then waits for "done"
# or for end of file (the runner died). `kill -0` first so that a group that has ended
# is never signalled: its number could in principle be reused.
_GUARD = (
    'trap "" INT TERM HUP QUIT; read g || exit 0; read x; '
    'if [ "$x" != done ] && kill -0 -"$g" 2>/dev/null; then kill -KILL -"$g"; fi'
)


def _pdeathsig_setter() -> Optional[Callable[[], None]]:
    """A ``preexec_fn`` that makes the child die with its parent (Linux), or ``None``."""
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None  # another thread may end long before the runner: the guard alone
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.restype = ctypes.c_int
    parent = os.getpid()
    pr_set_pdeathsig = 1

    def set_pdeathsig() -> None:
        # Runs in the child between fork and exec: nothing but the system call and the
        # check that the parent did not die before it took effect.
        prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGKILL)

    return set_pdeathsig


class Job:
    """The command in a process group (session) of its own, with its guard."""

    def __init__(self, proc: subprocess.Popen[bytes], guard: Optional[subprocess.Popen[bytes]]) -> None:
        self.proc = proc
        self.guard = guard
        self.pgid = proc.pid  # a session leader's pid is its group's id

    @classmethod
    def start(cls, cmd: List[str]) -> Job:
        if sys.platform == "win32":
            return cls(subprocess.Popen(cmd, close_fds=True), None)
        guard = _start_guard()
        try:
            proc = subprocess.Popen(
                cmd, close_fds=True, start_new_session=True, preexec_fn=_pdeathsig_setter()
            )
        except BaseException:
            if guard is not None:  # end of file before a group: it exits, killing nothing
                _tell(guard, b"")
                guard.wait()
            raise
        if guard is not None:
            _tell(guard, f"{proc.pid}\n".encode(), close=False)
        return cls(proc, guard)

    def signal(self, signum: int) -> None:
        """Send ``signum`` to the whole job (on Windows, to the command only)."""
        if sys.platform == "win32":
            if self.proc.poll() is None:
                self.proc.send_signal(signum)
            return
        try:
            os.killpg(self.pgid, signum)
        except (ProcessLookupError, PermissionError):
            pass  # the group has ended (or only foreign processes of the same id remain)

    def kill(self) -> None:
        """SIGKILL the whole job (on Windows, terminate the command)."""
        if sys.platform == "win32":
            if self.proc.poll() is None:
                self.proc.kill()
        else:
            self.signal(signal.SIGKILL)

    def group_alive(self) -> bool:
        """Whether any process of the job's group still runs (after the first ended)."""
        if sys.platform == "win32":
            return self.proc.poll() is None
        if os.path.isdir("/proc/self/task"):
            return _group_runs(self.pgid)
        try:
            os.killpg(self.pgid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return True

    def done(self) -> None:
        """The runner ends normally: the guard must stand down."""
        if self.guard is not None:
            _tell(self.guard, b"done\n")
            try:
                self.guard.wait(5)
            except subprocess.TimeoutExpired:
                pass  # it will exit by itself: its pipe is closed


def _group_runs(pgid: int) -> bool:
    """Linux: whether a process of group ``pgid`` runs, zombies not counted.

    ``killpg(pgid, 0)`` counts zombies, and in a container whose first process never
    reaps orphans (no init), a killed job's orphans stay zombies for ever.
    """
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as stat:
                fields = stat.read().rpartition(b")")[2].split()
        except OSError:
            continue  # it has just gone
        if len(fields) > 2 and fields[2] == str(pgid).encode() and fields[0] not in (b"Z", b"X"):
            return True
    return False


def _start_guard() -> Optional[subprocess.Popen[bytes]]:
    try:
        return subprocess.Popen(
            ["/bin/sh", "-c", _GUARD], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, close_fds=True, start_new_session=True,
        )
    except OSError:
        return None  # no /bin/sh: the parent-death signal alone (Linux) remains


def _tell(guard: subprocess.Popen[bytes], line: bytes, close: bool = True) -> None:
    assert guard.stdin is not None
    try:
        guard.stdin.write(line)
        guard.stdin.flush()
        if close:
            guard.stdin.close()
    except OSError:
        pass  # the guard has gone: nothing to tell
