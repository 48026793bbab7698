"""The library's log records, without loading ``logging`` before anyone can listen.

Importing ``logging`` takes 4-19 ms (it pulls in threading, traceback, string
formatting): most of what ``import brokerlock`` would cost a cron job. Yet nobody can
receive a record before ``logging`` is loaded: a handler, a level or a filter can only
be set up by importing it. So while ``logging`` is not in ``sys.modules``, a record
goes nowhere, exactly where it would have gone (the library's own NullHandler); once
anything has loaded it (the application configuring its logs, a driver such as
redis-py or psycopg), records go out through the ``"brokerlock"`` logger, whose
NullHandler is installed before the first of them. No record anyone could have
received is lost.

A program that shows the library's warnings itself (the ``brokerlock`` command, whose
warnings belong on the job's stderr) registers a sink (``show_warnings``) instead of a
``logging`` handler: it sees every WARNING and worse record, formatted, without
loading ``logging``; the records still go to ``logging`` too whenever it is loaded.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, Callable, Optional

if TYPE_CHECKING:
    import logging

NAME = "brokerlock"
# logging's level numbers, fixed by its documentation, so callers need not import it.
DEBUG, INFO, WARNING, ERROR = 10, 20, 30, 40

_logger: Optional[logging.Logger] = None
#: Shown every WARNING and worse record: its message, and the exception being handled
#: for ``log.exception`` (see ``show_warnings``).
Sink = Callable[[str, Optional[BaseException]], None]
_sink: Optional[Sink] = None


def show_warnings(sink: Optional[Sink]) -> None:
    """Pass every later WARNING and worse record to ``sink`` as well (None: stop)."""
    global _sink
    _sink = sink


def _to_sink(level: int, msg: str, args: Any, exc: Optional[BaseException] = None) -> None:
    sink = _sink
    if sink is not None and level >= WARNING:
        sink(msg % args if args else msg, exc)


def logger() -> logging.Logger:
    """The ``"brokerlock"`` logger with its NullHandler (loads ``logging``)."""
    global _logger
    if _logger is None:
        import logging

        log = logging.getLogger(NAME)
        # A library must not print: without a handler of the application's, Python's
        # last-resort handler would write our warnings to stderr.
        if not any(type(h) is logging.NullHandler for h in log.handlers):
            log.addHandler(logging.NullHandler())
        _logger = log
    return _logger


def _listening() -> Optional[logging.Logger]:
    if _logger is not None:
        return _logger
    if "logging" not in sys.modules:
        return None  # nobody could have set up a handler: the record would go nowhere
    return logger()


class _Log:
    """What the modules of the library log through: ``logging.Logger``'s calls. Each
    record names the caller's file and line, not this module's (``stacklevel``)."""

    def isEnabledFor(self, level: int) -> bool:
        if _sink is not None and level >= WARNING:
            return True
        log = _listening()
        return log is not None and log.isEnabledFor(level)

    def log(self, level: int, msg: str, *args: Any) -> None:
        _to_sink(level, msg, args)
        log = _listening()
        if log is not None:
            log.log(level, msg, *args, stacklevel=2)

    def debug(self, msg: str, *args: Any) -> None:
        log = _listening()
        if log is not None:
            log.debug(msg, *args, stacklevel=2)

    def info(self, msg: str, *args: Any) -> None:
        log = _listening()
        if log is not None:
            log.info(msg, *args, stacklevel=2)

    def warning(self, msg: str, *args: Any) -> None:
        _to_sink(WARNING, msg, args)
        log = _listening()
        if log is not None:
            log.warning(msg, *args, stacklevel=2)

    def exception(self, msg: str, *args: Any) -> None:
        """An error record with the exception being handled (call it in ``except``)."""
        _to_sink(ERROR, msg, args, sys.exc_info()[1])
        log = _listening()
        if log is not None:
            log.exception(msg, *args, stacklevel=2)


log = _Log()
