"""``brokerlock run``: hold a lock for the life of a child process.

One thread does everything: it sleeps until the child exits, a signal arrives, or the
next renewal is due, so no state is shared between threads and signal handlers run
where the state lives. On POSIX the sleep is a ``select()`` on the signal wake-up pipe
with a SIGCHLD handler installed, so the child's exit wakes us at once (``Popen.wait``
with a timeout would poll every 50 ms); on Windows ``Popen.wait`` blocks on the
process handle.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from typing import Any, Callable, List, Optional

from .errors import BrokerLockError, LockLost, LockTimeout
from .lock import BrokerLockItem

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
    """126/127 when ``argv0`` cannot run, checked before we wait for the lock."""
    if os.sep in argv0 or (os.altsep and os.altsep in argv0):
        if not os.path.exists(argv0):
            return EX_NOTFOUND
        return None if os.access(argv0, os.X_OK) and not os.path.isdir(argv0) else EX_NOEXEC
    return None if shutil.which(argv0) else EX_NOTFOUND


class _Runner:
    def __init__(
        self, item: BrokerLockItem, cmd: List[str], *, keepalive: bool, stop_on_loss: bool,
        kill_after: float, say: Callable[[str], None],
    ) -> None:
        self.item, self.cmd, self.say = item, cmd, say
        self.keepalive = keepalive and item.ttl is not None
        self.stop_on_loss, self.kill_after = stop_on_loss, kill_after
        self.proc: Optional[subprocess.Popen[bytes]] = None
        self.starting = False
        self.pending: List[int] = []
        self.wake_fd = -1

    # -- signals -----------------------------------------------------------------
    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.proc is not None:
            if signum != signal.SIGINT or not _terminal_sent_it():
                self.proc.send_signal(signum)
        elif self.starting:
            self.pending.append(signum)  # forwarded as soon as Popen returns
        else:
            raise _Interrupted(signum)

    def _on_child(self, signum: int, frame: Any) -> None:
        """Nothing to do: the handler exists so that the wake-up pipe hears of SIGCHLD."""

    def install(self) -> Callable[[], None]:
        saved = [(s, signal.signal(s, self._on_signal)) for s in _FORWARDED]
        saved_fd = None
        if sys.platform != "win32":
            read_fd, write_fd = os.pipe()  # both close-on-exec
            os.set_blocking(read_fd, False)
            os.set_blocking(write_fd, False)
            self.wake_fd = read_fd
            saved.append((signal.SIGCHLD, signal.signal(signal.SIGCHLD, self._on_child)))
            saved_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)

        def restore() -> None:
            for signum, handler in saved:
                signal.signal(signum, handler)
            if saved_fd is not None:
                os.close(self.wake_fd)
                os.close(signal.set_wakeup_fd(saved_fd))

        return restore

    def _wait(self, timeout: Optional[float]) -> Optional[int]:
        """The child's exit code, or ``None`` if it still runs after ``timeout``."""
        assert self.proc is not None
        code = self.proc.poll()
        if code is not None or timeout == 0:
            return code
        if self.wake_fd < 0:
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                return None
        import select

        # SIGCHLD (or any handled signal) writes to the pipe, even when it arrives
        # between poll() above and select() here: no wake-up can be lost.
        select.select([self.wake_fd], [], [], timeout)
        try:
            os.read(self.wake_fd, 512)
        except BlockingIOError:
            pass
        return self.proc.poll()

    # -- the hold ----------------------------------------------------------------
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

    def supervise(self) -> int:
        """Wait for the child while renewing the lease; its exit code (75 on loss)."""
        assert self.proc is not None
        ttl = self.item.ttl or 0.0
        now = time.monotonic()
        valid_until = now + ttl
        renew_at: Optional[float] = now + ttl / 3 if self.keepalive else None
        kill_at: Optional[float] = None
        failing = False
        lost = stopped = False
        while True:
            due = [t for t in (renew_at, kill_at) if t is not None]
            status = self._wait(max(0.0, min(due) - time.monotonic()) if due else None)
            if status is not None:
                break
            now = time.monotonic()
            if kill_at is not None and now >= kill_at:
                self.proc.kill()
                kill_at = None
            if renew_at is None or now < renew_at:
                continue
            reason = None
            try:
                self.item.extend()
                valid_until, renew_at, failing = now + ttl, now + ttl / 3, False
            except LockLost:
                reason = "its lease was broken or ran out"
            except BrokerLockError as exc:
                if now >= valid_until:
                    reason = f"it could not be renewed before its lease ran out ({exc})"
                else:
                    if not failing:
                        self.say(f"could not renew lock {self.item.name!r}, retrying: {exc}")
                    failing = True
                    renew_at = min(now + max(0.05, min(1.0, ttl / 10)), valid_until)
            if reason is None:
                continue
            lost, renew_at = True, None
            if self.stop_on_loss:
                self.say(
                    f"lost lock {self.item.name!r} while {self.cmd[0]!r} ran: {reason}; stopping it "
                    f"(SIGTERM now, SIGKILL in {self.kill_after:g}s)"
                )
                self.proc.terminate()
                stopped, kill_at = True, time.monotonic() + self.kill_after
            else:
                self.say(
                    f"lost lock {self.item.name!r} while {self.cmd[0]!r} runs: {reason}; letting it finish"
                )
        code = 128 - status if status < 0 else status
        try:
            self.item.release()
        except LockLost:
            if not lost:
                self.say(
                    f"lock {self.item.name!r} was lost while {self.cmd[0]!r} ran: its lease of "
                    f"{self.item.ttl:g}s ran out (use --keepalive or a longer --ttl) or it was broken"
                )
            lost = True
        except BrokerLockError as exc:
            self.say(f"could not release lock {self.item.name!r} (it ends with its lease): {exc}")
        if lost and (stopped or code == 0):
            return EX_TEMPFAIL
        return code


def run(
    item: BrokerLockItem, cmd: List[str], *, keepalive: bool, stop_on_loss: bool, kill_after: float,
    conflict_exit_code: int, say: Callable[[str], None],
) -> int:
    """Hold ``item`` while ``cmd`` runs; the exit code ``brokerlock run`` should end with."""
    # A typo in the command should fail at once, not after waiting for the lock.
    code = _check_command(cmd[0])
    if code is not None:
        say(f"cannot run {cmd[0]!r}: {'command not found' if code == EX_NOTFOUND else 'not executable'}")
        return code
    runner = _Runner(
        item, cmd, keepalive=keepalive, stop_on_loss=stop_on_loss, kill_after=kill_after, say=say
    )
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
        return runner.supervise()
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
