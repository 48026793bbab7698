"""``brokerlock run``: hold a lock for the life of a child process.

The main thread waits for the child and reacts to everything, so signal handlers run
where the state lives. It sleeps in ``select()`` on the signal wake-up pipe, with a
SIGCHLD handler installed so that the child's exit wakes it at once (``Popen.wait``
with a timeout would poll every 50 ms). With ``--keepalive`` the library's renewer
thread extends the lease; its ``on_lost`` callback only sets a flag and writes to the
same pipe. Windows has neither SIGCHLD nor the pipe: there ``Popen.wait`` blocks on
the process handle, in slices of 0.1 s when a loss must be noticed.
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

EX_TEMPFAIL = 75
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


def _terminal_sent_it() -> bool:
    """Whether a SIGINT most likely came from the terminal (Ctrl-C).

    The terminal signals its whole foreground process group, which includes the
    child; forwarding would deliver a second SIGINT, and a second Ctrl-C is how many
    programs are told to skip their clean-up.
    """
    if sys.platform == "win32":
        return True  # a console Ctrl-C reaches every process attached to it
    for fd in (0, 1, 2):
        try:
            if os.isatty(fd) and os.tcgetpgrp(fd) == os.getpgrp():
                return True
        except OSError:
            continue
    return False


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
        say: Callable[[str], None],
    ) -> None:
        self.cmd, self.say = cmd, say
        self.keepalive, self.stop_on_loss, self.kill_after = keepalive, stop_on_loss, kill_after
        self.proc: Optional[subprocess.Popen[bytes]] = None
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
        if self.proc is not None:
            if signum != signal.SIGINT or not _terminal_sent_it():
                self.proc.send_signal(signum)
        elif self.starting:
            self.pending.append(signum)  # forwarded as soon as Popen returns
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
        """The child's exit status, or ``None`` if it still runs after ``timeout``."""
        assert self.proc is not None
        status = self.proc.poll()
        if status is not None or timeout == 0 or self.lost:
            return status
        if self.wake_r < 0:
            try:
                return self.proc.wait(timeout)
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
        return self.proc.poll()

    # -- the hold ------------------------------------------------------------------
    def start(self) -> Optional[int]:
        """Start the child; an exit code if it could not be started."""
        self.starting = True
        try:
            self.proc = subprocess.Popen(self.cmd, close_fds=True)
        except OSError as exc:
            self.say(f"cannot run {self.cmd[0]!r}: {exc.strerror or exc}")
            return EX_NOTFOUND if isinstance(exc, FileNotFoundError) else EX_NOEXEC
        finally:
            self.starting = False
        for signum in self.pending:
            self.proc.send_signal(signum)
        return None

    def supervise(self, item: BrokerLockItem) -> int:
        """Wait for the child, acting on a lost lease; the exit code to end with."""
        assert self.proc is not None
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
                    self.say(f"stopping {name!r} (SIGTERM now, SIGKILL in {self.kill_after:g}s): "
                             "it must not go on without the lock")
                    self.proc.terminate()
                    stopped, kill_at = True, time.monotonic() + self.kill_after
                else:
                    self.say(f"letting {name!r} finish (--on-lost warn), no longer protected by the lock")
            if kill_at is not None and time.monotonic() >= kill_at:
                self.proc.kill()
                kill_at = None
        code = 128 - status if status < 0 else status
        try:
            item.release()
        except LockLost:
            if not reported:
                self.say(f"{name!r} was not protected by the lock to its end "
                         "(use --keepalive or a longer --ttl)")
            self.lost = True
        except BrokerLockError as exc:
            self.say(f"could not release lock {item.name!r} (it ends with its lease): {exc}")
        # A job that ran (or went on) without its lock must not look like a success;
        # a job that failed by itself keeps its own code, which says more.
        if self.lost and (stopped or code == 0):
            return EX_TEMPFAIL
        return code


def run(
    lock: BrokerLock, name: str, cmd: List[str], *, ttl: Optional[float], timeout: Optional[float],
    keepalive: bool, stop_on_loss: bool, kill_after: float, conflict_exit_code: int,
    say: Callable[[str], None],
) -> int:
    """Hold the lock ``name`` while ``cmd`` runs; the exit code ``brokerlock run`` ends with."""
    keepalive = keepalive and ttl is not None
    runner = _Runner(cmd, keepalive=keepalive, stop_on_loss=stop_on_loss, kill_after=kill_after, say=say)
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
        restore()


def _release_quietly(item: BrokerLockItem) -> None:
    # Only on paths where the command never ran: a lost lease protected nothing.
    try:
        item.release()
    except BrokerLockError:
        pass
