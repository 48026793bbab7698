"""The lock-file back end: one small record file per name, guarded by ``flock``."""

from .adapter import FileAdapter

__all__ = ["FileAdapter"]
