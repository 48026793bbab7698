"""Bells that ring through named events: push wake-ups on Windows.

Each waiter's bell has an auto-reset event named after it, in the session's
``Local\\`` namespace; the waiter sleeps in ``WaitForSingleObject`` on it and a ring
opens it by name and sets it. Processes in other sessions (a service and a desktop
program) cannot see each other's ``Local\\`` events: their waiters fall back to the
safety net's periodic look. (``Global\\`` names would need a privilege that ordinary
programs lack.)
"""

from __future__ import annotations

import sys
import threading
from typing import Any, Dict, List, Optional

from ..base import Waiter
from .liveness import UNWATCHED, Watch, Watches

if sys.platform == "win32":
    import ctypes
    from ctypes import wintypes

    _kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
    _CreateEventW = _kernel32.CreateEventW
    _CreateEventW.argtypes = [wintypes.LPVOID, wintypes.BOOL, wintypes.BOOL, wintypes.LPCWSTR]
    _CreateEventW.restype = wintypes.HANDLE
    _OpenEventW = _kernel32.OpenEventW
    _OpenEventW.argtypes = [wintypes.DWORD, wintypes.BOOL, wintypes.LPCWSTR]
    _OpenEventW.restype = wintypes.HANDLE
    _SetEvent = _kernel32.SetEvent
    _SetEvent.argtypes = [wintypes.HANDLE]
    _SetEvent.restype = wintypes.BOOL
    _CloseHandle = _kernel32.CloseHandle
    _CloseHandle.argtypes = [wintypes.HANDLE]
    _CloseHandle.restype = wintypes.BOOL
    _WaitForSingleObject = _kernel32.WaitForSingleObject
    _WaitForSingleObject.argtypes = [wintypes.HANDLE, wintypes.DWORD]
    _WaitForSingleObject.restype = wintypes.DWORD
    _OpenProcess = _kernel32.OpenProcess
    _OpenProcess.argtypes = [wintypes.DWORD, wintypes.BOOL, wintypes.DWORD]
    _OpenProcess.restype = wintypes.HANDLE
    _WaitForMultipleObjects = _kernel32.WaitForMultipleObjects
    _WaitForMultipleObjects.argtypes = [
        wintypes.DWORD, ctypes.POINTER(wintypes.HANDLE), wintypes.BOOL, wintypes.DWORD
    ]
    _WaitForMultipleObjects.restype = wintypes.DWORD

    _EVENT_MODIFY_STATE = 0x0002
    _SYNCHRONIZE = 0x00100000
    _INFINITE = 0xFFFFFFFF
    _WAIT_TIMEOUT = 0x102
    _WAIT_FAILED = 0xFFFFFFFF
    _WAIT_ABANDONED = 0x80
    _ERROR_ACCESS_DENIED = 5

    def event_name(bell: str) -> str:
        return "Local\\brokerlock.bell." + bell

    def make_event(bell: str) -> int:
        """The auto-reset event of ``bell``, created unset; its handle."""
        handle = _CreateEventW(None, False, False, event_name(bell))
        if not handle:
            raise ctypes.WinError(ctypes.get_last_error())
        return int(handle)

    def close_event(handle: int) -> None:
        _CloseHandle(handle)

    #: Events this thread set lately, kept open: the next release is likely to ring the
    #: same waiters, and opening and closing an event is two calls into the kernel
    #: (into wineserver under Wine) for the one that rings. A kept handle keeps a gone
    #: waiter's event alive, unset by anyone who matters: bell names are never reused.
    _rung = threading.local()
    _KEEP = 16

    class _Kept(Dict[str, int]):
        """A thread's kept event handles, closed when the thread's state is dropped."""

        def __del__(self, _close: Any = _CloseHandle) -> None:
            for handle in self.values():
                _close(handle)

    def ring_event(bell: str) -> None:
        """Set the event of ``bell``; a bell whose waiter is gone has no event left."""
        kept: Optional[_Kept] = getattr(_rung, "events", None)
        if kept is None:
            kept = _rung.events = _Kept()
        handle = kept.get(bell)
        if handle is None:
            handle = _OpenEventW(_EVENT_MODIFY_STATE, False, event_name(bell))
            if not handle:
                return
            while len(kept) >= _KEEP:
                _CloseHandle(kept.pop(next(iter(kept))))
            kept[bell] = handle
        _SetEvent(handle)

    def pid_alive(pid: int) -> bool:
        """Whether a process ``pid`` exists (``os.kill(pid, 0)`` would terminate it
        on Windows); a reused pid only keeps a stale bell a little longer."""
        handle = _OpenProcess(_SYNCHRONIZE, False, pid)
        if not handle:
            return ctypes.get_last_error() == _ERROR_ACCESS_DENIED  # another user's
        try:
            return bool(_WaitForSingleObject(handle, 0) == _WAIT_TIMEOUT)
        finally:
            _CloseHandle(handle)

    def open_process(pid: int) -> int:
        """A handle that is signalled when process ``pid`` ends; -1 if none can be had
        (gone already, or another user's). A pid reused by another process only costs
        a missed push (or a spurious one): the waiter's looks go by the witness."""
        handle = _OpenProcess(_SYNCHRONIZE, False, pid)
        return int(handle) if handle else -1

    class EventWaiter(Waiter):
        """Sleeps in ``WaitForMultipleObjects`` on its thread's bell event and on the
        processes whose death concerns it (``liveness``, via ``watch``)."""

        def __init__(self, handle: int, watches: Optional[Watches] = None) -> None:
            self._handle = handle
            self._watches = watches
            self._handles = (wintypes.HANDLE * 1)(handle)
            self._extra: List[int] = []

        def watch(self, watch: Watch) -> str:
            """Watch the deaths ``watch`` names too (see ``Watches.choose``)."""
            if self._watches is None:
                return UNWATCHED
            state = self._watches.choose(watch)
            extra = list(self._watches.chosen)
            if extra != self._extra:
                self._extra = extra
                self._handles = (wintypes.HANDLE * (1 + len(extra)))(self._handle, *extra)
            return state

        def wait(self, timeout: Optional[float]) -> None:
            ms = _INFINITE if timeout is None else min(int(max(0.0, timeout) * 1000) + 1, _INFINITE - 1)
            if not self._extra:
                _WaitForSingleObject(self._handle, ms)
                return
            got = _WaitForMultipleObjects(len(self._handles), self._handles, False, ms)
            if got in (0, _WAIT_TIMEOUT):
                return
            index = got - _WAIT_ABANDONED if got >= _WAIT_ABANDONED else got
            # A process ended (or the wait failed: then drop every watch rather than fail
            # at once again and again). Its watch is spent; the look that follows finds
            # whom to watch next.
            fired = self._extra if got == _WAIT_FAILED or index > len(self._extra) else [
                self._extra[index - 1]
            ]
            if self._watches is not None:
                self._watches.fired(fired)
            self._extra = []  # (chosen anew at the next look)
            self._handles = (wintypes.HANDLE * 1)(self._handle)

        def close(self) -> None:
            pass  # the handle is the thread's bell's, kept for its next wait
