"""``brokerlock run``: hold a lock for the life of a child process.

The main thread waits for the child and reacts to everything, so signal handlers run
where the state lives. It sleeps in ``select()`` on the signal wake-up pipe, with a
SIGCHLD handler installed so that the child's exit wakes it at once (``Popen.wait``
with a timeout would poll every 50 ms). The library's renewer thread extends the lease
while the job lives (unless ``--no-keepalive``); its ``on_lost`` callback only sets a
flag and writes to the same pipe. Windows has neither SIGCHLD nor the pipe: there
``Popen.wait`` blocks on the process handle, in slices of 0.1 s when a loss must be
noticed. The job itself, its process group and its fate when the runner dies: ``job``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Callable, List, Optional

from ..errors import BrokerLockError, LockLost, LockTimeout
from ..lock import BrokerLock, BrokerLockItem
from .job import Job

#: Busy: the lock was not acquired in time, nothing ran (sysexits.h EX_TEMPFAIL).
EX_BUSY = 75
#: The command ran, but the lock was lost before it ended: as coreutils' wrappers
#: (timeout, env, nice) say 125 when the wrapper itself failed.
EX_LOST = 125
EX_NOEXEC = 126  # found but cannot be executed, as a POSIX shell reports it
EX_NOTFOUND = 127

if sys.platform == "win32":
    _FORWARDED = [signal.SIGINT, signal.SIGTERM]
else:
    _FORWARDED = [signal.SIGINT, signal.SIGTERM, signal.SIGHUP]


class _Interrupted(Exception):
    """A signal arrived before there was a child to forward it to."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _check_command(argv0: str) -> Optional[int]:
    """126/127 when ``argv0`` cannot run, as a shell would say, checked before the wait."""
    if sys.platform == "win32":
        import shutil  # knows PATHEXT

        return None if shutil.which(argv0) else EX_NOTFOUND
    if "/" in argv0:
        if os.path.isdir(argv0):
            return EX_NOEXEC
        candidates = [argv0]
    else:  # execvp's search, without importing shutil for it
        candidates = [os.path.join(d or ".", argv0) for d in os.get_exec_path()]
    found = False
    for path in candidates:
        if os.path.isfile(path):
            if os.access(path, os.X_OK):
                return None
            found = True
    return EX_NOEXEC if found else EX_NOTFOUND


class _Runner:
    def __init__(
        self, cmd: List[str], *, keepalive: bool, stop_on_loss: bool, kill_after: float,
        lost_code: int, say: Callable[[str], None],
    ) -> None:
        self.cmd, self.say, self.lost_code = cmd, say, lost_code
        self.keepalive, self.stop_on_loss, self.kill_after = keepalive, stop_on_loss, kill_after
        self.job: Optional[Job] = None
        self.starting = False
        self.pending: List[int] = []
        self.lost = False
        # The wake-up pipe: signals (SIGCHLD included) and the renewer's loss reports
        # write to it, the main loop sleeps on it. The mutex keeps the renewer thread
        # from writing to the write end after restore() closed it (and the number
        # perhaps went to another file).
        self.wake_r = self.wake_w = -1
        self.mutex = threading.Lock()

    # -- events --------------------------------------------------------------------
    def on_signal(self, signum: int, frame: Any) -> None:
        if self.job is not None:
            # The job is a session of its own, so a terminal's Ctrl-C reaches only us:
            # forwarding it is the one copy the job gets. (On Windows the console sends
            # it to the command itself.)
            if sys.platform != "win32" or signum != signal.SIGINT:
                self.job.signal(signum)
        elif self.starting:
            self.pending.append(signum)  # forwarded as soon as the job has started
        else:
            raise _Interrupted(signum)

    def on_child(self, signum: int, frame: Any) -> None:
        """Nothing to do: the handler exists so that the wake-up pipe hears of SIGCHLD."""

    def on_lost(self, item: BrokerLockItem) -> None:
        """Called by the library (often in its renewer thread) once the lease is lost."""
        self.lost = True
        with self.mutex:
            if self.wake_w >= 0:
                try:
                    os.write(self.wake_w, b"L")
                except OSError:
                    pass  # the pipe is full: the loop wakes anyway

    def install(self) -> Callable[[], None]:
        saved = [(s, signal.signal(s, self.on_signal)) for s in _FORWARDED]
        saved_fd = None
        if sys.platform != "win32":
            self.wake_r, self.wake_w = os.pipe()  # both close-on-exec
            os.set_blocking(self.wake_r, False)
            os.set_blocking(self.wake_w, False)
            saved.append((signal.SIGCHLD, signal.signal(signal.SIGCHLD, self.on_child)))
            saved_fd = signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)

        def restore() -> None:
            for signum, handler in saved:
                signal.signal(signum, handler)
            if saved_fd is not None:
                signal.set_wakeup_fd(saved_fd)
                with self.mutex:
                    os.close(self.wake_r)
                    os.close(self.wake_w)
                    self.wake_r = self.wake_w = -1

        return restore

    def _wait(self, timeout: Optional[float]) -> Optional[int]:
        """The command's exit status, or ``None`` if it still runs after ``timeout``."""
        assert self.job is not None
        proc = self.job.proc
        status = proc.poll()
        if status is not None or timeout == 0 or self.lost:
            return status
        if self.wake_r < 0:
            try:
                return proc.wait(timeout)
            except subprocess.TimeoutExpired:
                return None
        import select

        # Whatever happens between poll() above and select() here writes to the pipe,
        # so no wake-up can be lost.
        select.select([self.wake_r], [], [], timeout)
        try:
            os.read(self.wake_r, 512)
        except BlockingIOError:
            pass
        return proc.poll()

    # -- the hold ------------------------------------------------------------------
    def start(self) -> Optional[int]:
        """Start the job; an exit code if it could not be started."""
        self.starting = True
        try:
            self.job = Job.start(self.cmd)
        except OSError as exc:
            self.say(f"cannot run {self.cmd[0]!r}: {exc.strerror or exc}")
            return EX_NOTFOUND if isinstance(exc, FileNotFoundError) else EX_NOEXEC
        finally:
            self.starting = False
        for signum in self.pending:
            self.job.signal(signum)
        return None

    def _stop(self, kill_at: float) -> None:
        """After a loss: wait for the rest of the group, SIGKILL it at ``kill_at``."""
        assert self.job is not None
        while self.job.group_alive():
            if time.monotonic() >= kill_at:
                self.job.kill()
                return
            time.sleep(0.05)  # nothing wakes us when an orphan of the group exits

    def supervise(self, item: BrokerLockItem) -> int:
        """Wait for the command, acting on a lost lease; the exit code to end with."""
        assert self.job is not None
        name = self.cmd[0]
        kill_at: Optional[float] = None
        reported = stopped = False
        while True:
            timeout = None if kill_at is None else max(0.0, kill_at - time.monotonic())
            if self.wake_r < 0 and self.keepalive:
                timeout = 0.1 if timeout is None else min(timeout, 0.1)  # no pipe: poll for a loss
            status = self._wait(timeout)
            if status is not None:
                break
            if self.lost and not reported:
                # The library has already logged the loss and its reason (one line).
                reported = True
                if self.stop_on_loss:
                    self.say(f"stopping {name!r} and its process group (SIGTERM now, SIGKILL in "
                             f"{self.kill_after:g}s): it must not go on without the lock")
                    self.job.signal(signal.SIGTERM)
                    stopped, kill_at = True, time.monotonic() + self.kill_after
                else:
                    self.say(f"letting {name!r} finish (--on-lost warn), no longer protected by the lock")
            if kill_at is not None and time.monotonic() >= kill_at:
                self.job.kill()
                kill_at = None
        if kill_at is not None:
            self._stop(kill_at)
        code = 128 - status if status < 0 else status
        try:
            item.release()
        except LockLost:
            self.lost = True
        except BrokerLockError as exc:
            self.say(f"could not release lock {item.name!r} (it ends with its lease): {exc}")
        if not self.lost:
            return code
        # A job that ran (or went on) without its lock must not look like its own
        # result, success or failure: a wrapper must be able to tell.
        if not stopped:
            hint = "" if self.keepalive else (
                " (with --no-keepalive the lease must outlast the command: use a longer --ttl)"
            )
            self.say(f"{name!r} exited with {code} but was not protected by the lock to its end{hint}; "
                     f"exiting {self.lost_code}")
        return self.lost_code


def run(
    lock: BrokerLock, name: str, cmd: List[str], *, ttl: Optional[float], timeout: Optional[float],
    keepalive: bool, stop_on_loss: bool, kill_after: float, conflict_exit_code: int = EX_BUSY,
    lost_exit_code: int = EX_LOST, say: Callable[[str], None],
) -> int:
    """Hold the lock ``name`` while ``cmd`` runs; the exit code ``brokerlock run`` ends with."""
    keepalive = keepalive and ttl is not None
    runner = _Runner(cmd, keepalive=keepalive, stop_on_loss=stop_on_loss, kill_after=kill_after,
                     lost_code=lost_exit_code, say=say)
    item = lock.item(name, ttl=ttl, timeout=timeout, keepalive=keepalive, on_lost=runner.on_lost)
    # A typo in the command should fail at once, not after waiting for the lock.
    code = _check_command(cmd[0])
    if code is not None:
        why = "no such file" if "/" in cmd[0] else "not found in PATH"
        why = "not executable" if code == EX_NOEXEC else why
        say(f"cannot run {cmd[0]!r}: {why}")
        return code
    restore = runner.install()
    try:
        try:
            item.acquire()
        except LockTimeout as exc:
            say(f"{exc}; not running {cmd[0]!r}")
            return conflict_exit_code
        code = runner.start()
        if code is not None:
            _release_quietly(item)
            return code
        return runner.supervise(item)
    except _Interrupted as exc:
        if item.acquired:
            _release_quietly(item)
            say(f"interrupted by {_signal_name(exc.signum)} before {cmd[0]!r} started")
        else:
            say(f"interrupted by {_signal_name(exc.signum)} while waiting for lock {item.name!r}; "
                f"not running {cmd[0]!r}")
        return 128 + exc.signum
    finally:
        if runner.job is not None:
            runner.job.done()
        restore()


def _release_quietly(item: BrokerLockItem) -> None:
    # Only on paths where the command never ran: a lost lease protected nothing.
    try:
        item.release()
    except BrokerLockError:
        pass
