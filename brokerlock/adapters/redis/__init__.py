"""The Redis back end: owner-checked Lua scripts, FIFO queues and BLPOP wake-ups."""

from .adapter import RedisAdapter

__all__ = ["RedisAdapter"]
