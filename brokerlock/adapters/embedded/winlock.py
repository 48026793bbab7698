"""Byte-range locks on Windows: ``LockFileEx`` through ctypes.

Both the lock-file store's record lock and the liveness witness use them. Windows
drops a process's byte-range locks when the process ends, however it ends, which is
what the witness needs; a lock belongs to the handle that took it, so a second handle,
even in the same process, is kept out, as with ``flock``.

Why neither of the usual wrappers:
- ``portalocker`` calls this same ``LockFileEx`` on Windows, but through pywin32, a
  binary dependency of ~10 MB with DLLs of its own, for one call ctypes makes from the
  standard library.
- ``msvcrt.locking`` has no shared mode, locks at the file position (a seek before
  every call) and, asked to wait, retries once a second for ten seconds instead of
  waiting in the kernel.

Windows locks are mandatory: while a range is locked, nobody else can read or write
it. So whole-file locking is done on one byte far beyond any data (``RECORD_LOCK_AT``):
readers of a record are never kept out by its lock.
"""

from __future__ import annotations

import sys

#: Where the record lock of a lock file lies: far past any record it guards.
RECORD_LOCK_AT = 1 << 62

if sys.platform == "win32":
    import ctypes
    import msvcrt
    from ctypes import wintypes

    class _Overlapped(ctypes.Structure):
        _fields_ = [
            ("Internal", ctypes.c_void_p),
            ("InternalHigh", ctypes.c_void_p),
            ("Offset", wintypes.DWORD),
            ("OffsetHigh", wintypes.DWORD),
            ("hEvent", wintypes.HANDLE),
        ]

    _kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
    _LockFileEx = _kernel32.LockFileEx
    _LockFileEx.argtypes = [
        wintypes.HANDLE, wintypes.DWORD, wintypes.DWORD, wintypes.DWORD, wintypes.DWORD,
        ctypes.POINTER(_Overlapped),
    ]
    _LockFileEx.restype = wintypes.BOOL
    _UnlockFileEx = _kernel32.UnlockFileEx
    _UnlockFileEx.argtypes = [
        wintypes.HANDLE, wintypes.DWORD, wintypes.DWORD, wintypes.DWORD, ctypes.POINTER(_Overlapped)
    ]
    _UnlockFileEx.restype = wintypes.BOOL

    _FAIL_IMMEDIATELY = 0x1
    _EXCLUSIVE = 0x2
    _ERROR_LOCK_VIOLATION = 33
    _ERROR_IO_PENDING = 997

    def _overlapped(offset: int) -> _Overlapped:
        return _Overlapped(0, 0, offset & 0xFFFFFFFF, offset >> 32, None)

    def lock_range(fd: int, offset: int, *, shared: bool = False, blocking: bool = True) -> bool:
        """Lock one byte at ``offset`` of the open file ``fd``; with ``blocking=False``,
        False when another handle holds it."""
        flags = (0 if shared else _EXCLUSIVE) | (0 if blocking else _FAIL_IMMEDIATELY)
        handle = msvcrt.get_osfhandle(fd)
        if _LockFileEx(handle, flags, 0, 1, 0, ctypes.byref(_overlapped(offset))):
            return True
        error = ctypes.get_last_error()
        if not blocking and error in (_ERROR_LOCK_VIOLATION, _ERROR_IO_PENDING):
            return False
        raise ctypes.WinError(error)

    def unlock_range(fd: int, offset: int) -> None:
        handle = msvcrt.get_osfhandle(fd)
        if not _UnlockFileEx(handle, 0, 1, 0, ctypes.byref(_overlapped(offset))):
            raise ctypes.WinError(ctypes.get_last_error())
