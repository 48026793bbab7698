"""The ``brokerlock`` command: ``run``, ``status``, ``list`` and ``release``.

Everything here is for cron jobs and shell scripts, so two rules shape it: start-up
must stay cheap (``run`` is on the path of every job; heavy modules load only in the
command that needs them), and every failure ends in one line on stderr and an exit
code a script can test, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING, Any, Dict, List, NoReturn, Optional, Sequence

from .. import __version__
from .._log import show_warnings
from ..errors import BrokerLockError

if TYPE_CHECKING:
    from ..adapters.base import Lease
    from ..lock import BrokerLock

#: Bad usage, bad values, a store that cannot be opened (argparse's own code).
EX_USAGE = 2
#: The lock is busy (sysexits.h EX_TEMPFAIL: "try again later"); nothing ran.
EX_BUSY = 75
#: The command ran, but the lock was lost before it ended (coreutils' "the wrapper failed").
EX_LOST = 125

_RUN_EPILOG = """\
The command runs only while the lock is held, with stdin/stdout/stderr passed
through, as a process group (session) of its own. The lease is renewed every
ttl/3 for as long as the command runs, so the lock lasts as long as the command;
--ttl only bounds how long a runner that stopped renewing (frozen, unreachable)
keeps it. If the lock is lost anyway (broken with 'release --force', the store
lost the runner's connection), the whole process group is stopped (--on-lost).
If the runner itself is killed, its job is killed with it (Linux, macOS, BSD).

examples:
  # nightly backup, skipped (exit 75) while the previous one still runs
  brokerlock run --timeout 0 backup -- /usr/local/bin/backup.sh --full

  # in a crontab: a skipped run is no error (exit 0), a lost lock is (exit 125)
  */5 * * * * brokerlock run -n -E 0 sync -- /usr/local/bin/sync.sh

  # wait up to 5 minutes for the lock
  brokerlock run --timeout 5m reindex -- ./reindex.py

  # a lock shared by several hosts
  brokerlock run --url redis://locks.internal:6379/0 deploy -- make deploy

exit codes:
  CMD's code   the command ran and held the lock to its end (128+N: killed by
               signal N)
  75           busy: the lock was not acquired within --timeout, nothing ran
               (-E/--conflict-exit-code N changes it)
  125          the lock was lost while the command ran (--lost-exit-code N)
  126, 127     the command cannot be executed / was not found (as in a shell)
  2            bad usage or value, or the store cannot be opened
Whenever brokerlock itself chose the code (75, 125, 126, 127, 2) it says why in
one line on stderr starting with "brokerlock:"; a command's own code is passed
on without a word. Pick codes your command never uses to tell them apart by the
code alone.
"""

_STATUS_EPILOG = """\
exit codes: 0 free, 1 held, 2 error.

example:
  brokerlock status backup || echo "backup is running"
"""

_LIST_EPILOG = """\
examples:
  brokerlock list
  brokerlock list --json | jq -r '.[] | select(.expires_at == null) | .name'

Times are local, with their UTC offset. --json prints a list of {name, host,
pid, thread, acquired_at, expires_at, fence}, times in ISO 8601 with their
offset, e.g. "2026-12-07T03:00:00.250000+00:00" (expires_at null: no expiry).
"""

_RELEASE_EPILOG = """\
Breaking a lock lets the next waiter in while the holder may still be working.
The holder learns of it when it next renews or releases (brokerlock run then
reports the lock broken by force, stops its command and exits 125; with
--no-keepalive it learns only when the command ends).

exit codes: 0 broken, 1 it was not held, 2 refused (no --force) or error.

example:
  brokerlock status backup; brokerlock release --force backup
"""

_MAIN_EPILOG = """\
The store is --url, else $BROKERLOCK_URL, else an SQLite database in the user's
state directory. URLs: sqlite:////absolute/locks.db (or sqlite:/absolute/locks.db),
file:///lock/dir, redis://host:6379/0, postgresql://host/db. Paths must be
absolute; memory:// is refused (it would lock nothing between processes).

Run 'brokerlock COMMAND --help' for examples.
"""


class _UsageError(Exception):
    """A bad command line; argparse's multi-line usage dump replaced by one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


def _say(message: str) -> None:
    # Cron mails stderr and log scrapers read it line by line: keep each report one line.
    print("brokerlock: " + " ".join(message.split()), file=sys.stderr, flush=True)


def _add_run(commands: Any, store: _Parser, raw: Any) -> None:
    run = commands.add_parser(
        "run", parents=[store], formatter_class=raw, epilog=_RUN_EPILOG,
        usage="brokerlock run [options] NAME -- CMD [ARGS...]",
        help="run a command while holding a lock",
        description="Acquire the lock NAME, run CMD, release the lock when CMD exits.",
    )
    run.add_argument("name", metavar="NAME", help="lock name")
    run.add_argument("cmd", nargs="*", metavar="CMD", help="the command and its arguments, after --")
    run.add_argument("--ttl", default="2m", metavar="D",
                     help="lease length, e.g. 90s, 2m, 1h30m, none; renewed every ttl/3 while CMD runs "
                          "(default 2m)")
    run.add_argument(
        "--timeout", "-w", "--wait", default="30s", metavar="D",
        help="how long to wait for a busy lock; 0 fails at once, none waits forever (default 30s)",
    )
    run.add_argument("--nonblock", "-n", action="store_const", const="0", dest="timeout",
                     help="fail at once if busy, as --timeout 0")
    run.add_argument("--keepalive", action="store_true", default=True,
                     help="renew the lease every ttl/3 while CMD runs (the default)")
    run.add_argument("--no-keepalive", action="store_false", dest="keepalive",
                     help="never renew: the lock ends after --ttl even if CMD still runs")
    run.add_argument(
        "--on-lost", choices=("stop", "warn"), default="stop",
        help="if the lock is lost while CMD runs: stop its process group (SIGTERM, later SIGKILL; "
             "default) or warn",
    )
    run.add_argument("--kill-after", default="10s", metavar="D",
                     help="SIGKILL a process group stopped by --on-lost stop after this long (default 10s)")
    run.add_argument("--conflict-exit-code", "-E", type=int, default=EX_BUSY, metavar="N",
                     help="exit code when the lock is busy and nothing ran (default 75)")
    run.add_argument("--lost-exit-code", type=int, default=EX_LOST, metavar="N",
                     help="exit code when the lock was lost while CMD ran (default 125)")


def _add_status(commands: Any, store: _Parser, raw: Any) -> None:
    status = commands.add_parser(
        "status", parents=[store], formatter_class=raw, epilog=_STATUS_EPILOG,
        help="show who holds a lock", description="Show who holds the lock NAME and until when.",
    )
    status.add_argument("name", metavar="NAME")


def _add_list(commands: Any, store: _Parser, raw: Any) -> None:
    listing = commands.add_parser(
        "list", parents=[store], formatter_class=raw, epilog=_LIST_EPILOG,
        help="list every held lock", description="List every held lock of the store.",
    )
    listing.add_argument("--json", action="store_true", help="machine-readable output")


def _add_release(commands: Any, store: _Parser, raw: Any) -> None:
    release = commands.add_parser(
        "release", parents=[store], formatter_class=raw, epilog=_RELEASE_EPILOG,
        help="break a stuck lock (needs --force)",
        description="Break the lock NAME, whoever holds it. An administrative action.",
    )
    release.add_argument("name", metavar="NAME")
    release.add_argument("--force", action="store_true", help="really break it")


def _columns() -> int:
    """The terminal's width as ``shutil.get_terminal_size`` tells it, without importing
    ``shutil`` (and its compression modules): argparse would, for every formatter it
    makes, ~20 per command line, though only ``--help`` ever prints with one."""
    try:
        return int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        pass
    try:
        return os.get_terminal_size(sys.__stdout__.fileno()).columns if sys.__stdout__ else 80
    except (AttributeError, ValueError, OSError):  # not a terminal, or no such descriptor
        return 80


class _Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24,
                 width: Optional[int] = None) -> None:
        super().__init__(prog, indent_increment, max_help_position, width or _columns() - 2)


def _build_parser(only: Optional[str] = None) -> _Parser:
    """The command line's parser; with ``only``, the other commands' parsers are left
    out (each costs a CLI start ~1 ms of gettext look-ups: see ``_parse``)."""
    raw = _Formatter
    parser = _Parser(
        prog="brokerlock",
        description="Named, time-limited locks for cron jobs and shell scripts.",
        epilog=_MAIN_EPILOG,
        formatter_class=raw,
    )
    parser.add_argument("--version", action="version", version=f"brokerlock {__version__}")
    store = _Parser(add_help=False, formatter_class=raw)
    store.add_argument(
        "--url", metavar="URL", help="lock store (default: $BROKERLOCK_URL, else the per-user SQLite store)"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    adders = {"run": _add_run, "status": _add_status, "list": _add_list, "release": _add_release}
    for name, add in adders.items():
        if only in (None, name):
            add(commands, store, raw)
    return parser


def _parse(argv: List[str]) -> argparse.Namespace:
    # Split at "--" ourselves: argparse would take the command's own options (e.g.
    # "ls -l") for ours, and its handling of "--" with nargs has changed between versions.
    command: Optional[List[str]] = None
    if argv[:1] == ["run"] and "--" in argv:
        cut = argv.index("--")
        argv, command = argv[:cut], argv[cut + 1 :]
    args = _build_parser(argv[0] if argv[:1] and argv[0] in _COMMANDS else None).parse_args(argv)
    if args.command == "run":
        if command is not None:
            if args.cmd:
                raise _UsageError(f"brokerlock run: unexpected {args.cmd[0]!r} before '--'")
            args.cmd = command
        if not args.cmd:
            raise _UsageError("brokerlock run: no command given: brokerlock run NAME -- CMD [ARGS...]")
        for option, code in (("--conflict-exit-code", args.conflict_exit_code),
                             ("--lost-exit-code", args.lost_exit_code)):
            if not 0 <= code <= 255:
                raise _UsageError(f"brokerlock run: {option} {code} is not an exit code (0-255)")
    return args


def _duration(text: str, option: str, allow_none: bool) -> Optional[float]:
    from ..durations import parse_duration

    if allow_none and text.strip().lower() in ("none", "forever", "never"):
        return None
    return parse_duration(text, option)


def _open(url: Optional[str]) -> BrokerLock:
    from ..lock import BrokerLock
    from ..urls import ENV_URL, check_cli_url

    source = "--url"
    if url is None:
        url = os.environ.get(ENV_URL, "").strip() or None
        source = "$" + ENV_URL
    if url is None:
        return BrokerLock()  # the per-user default store
    check_cli_url(url, source)
    return BrokerLock.from_url(url)


def _shown(text: object) -> str:
    # Names, hosts and thread names come from the store, i.e. from anyone who can write
    # to it: never let them put escape sequences or line breaks on a terminal.
    text = str(text)
    return text if text.isprintable() and text.strip() == text and text else repr(text)


def _when(epoch: Optional[float]) -> str:
    from ..adapters.base import local_time

    return "never" if epoch is None else local_time(epoch)


def _iso(epoch: Optional[float]) -> Optional[str]:
    if epoch is None:
        return None
    from datetime import datetime

    return datetime.fromtimestamp(epoch).astimezone().isoformat()


def _cmd_run(args: argparse.Namespace) -> int:
    from .run import run

    ttl = _duration(args.ttl, "--ttl", allow_none=True)
    timeout = _duration(args.timeout, "--timeout", allow_none=True)
    kill_after = _duration(args.kill_after, "--kill-after", allow_none=False)
    lock = _open(args.url)
    try:
        return run(
            lock, args.name, args.cmd, ttl=ttl, timeout=timeout, keepalive=args.keepalive,
            stop_on_loss=args.on_lost == "stop", kill_after=kill_after or 0.0,
            conflict_exit_code=args.conflict_exit_code, lost_exit_code=args.lost_exit_code, say=_say,
        )
    finally:
        lock.close()


def _cmd_status(args: argparse.Namespace) -> int:
    from ..names import validate_name

    name = validate_name(args.name)
    lock = _open(args.url)
    try:
        lease = lock.adapter.get(name)
        lease = None if lease is None else lock.adapter.on_wall_clock(lease)
    finally:
        lock.close()
    if lease is None:
        print(f"lock {name!r} is free")
        return 0
    print(f"lock {name!r} is {lease.describe()}")
    return 1


def _lease_record(lease: Lease) -> Dict[str, Any]:
    # Never the token: whoever has it can release or extend the holder's lease.
    return {
        "name": lease.name, "host": lease.host, "pid": lease.pid, "thread": lease.thread,
        "acquired_at": _iso(lease.acquired_at), "expires_at": _iso(lease.expires_at), "fence": lease.fence,
    }


def _cmd_list(args: argparse.Namespace) -> int:
    lock = _open(args.url)
    try:
        leases = sorted(map(lock.adapter.on_wall_clock, lock.adapter.list()), key=lambda lease: lease.name)
    finally:
        lock.close()
    if args.json:
        import json

        print(json.dumps([_lease_record(lease) for lease in leases], indent=2))
        return 0
    if not leases:
        print("no lock is held")
        return 0
    rows = [("NAME", "HOLDER", "ACQUIRED", "EXPIRES", "FENCE")]
    for lease in leases:
        holder = f"{_shown(lease.host)} pid {lease.pid} ({_shown(lease.thread)})"
        rows.append(
            (_shown(lease.name), holder, _when(lease.acquired_at), _when(lease.expires_at), str(lease.fence))
        )
    widths = [max(len(row[col]) for row in rows) for col in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1])
    return 0


def _cmd_release(args: argparse.Namespace) -> int:
    from ..names import validate_name

    name = validate_name(args.name)
    if not args.force:
        _say(
            f"refusing to break lock {name!r} without --force: its holder may still be working and "
            "would not know until it next renews or releases; check 'brokerlock status', then add --force"
        )
        return EX_USAGE
    lock = _open(args.url)
    try:
        lease = lock.adapter.get(name)
        lease = None if lease is None else lock.adapter.on_wall_clock(lease)
        broken = lock.adapter.force_release(name)
    finally:
        lock.close()
    if not broken:
        print(f"lock {name!r} was not held")
        return 1
    who = f" (it was {lease.describe()})" if lease is not None else ""
    print(f"broke lock {name!r}{who}")
    return 0


def _show_warning(message: str, exc: Optional[BaseException]) -> None:
    """The library's warnings (a lease lost and why, a renewal retried, a damaged lock
    file) matter to whoever reads the job's stderr: show them, one line each, in the
    command's own format. Through ``_log``'s sink, not a ``logging`` handler: loading
    ``logging`` would cost every cron job ~10 ms of start-up."""
    if exc is not None:
        message += f" ({exc!r})"  # never a traceback
    _say(message)


_COMMANDS = {"run": _cmd_run, "status": _cmd_status, "list": _cmd_list, "release": _cmd_release}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    show_warnings(_show_warning)
    try:
        args = _parse(args_list)
        code = _COMMANDS[args.command](args)
        # Flush here, not at exit: with a buffered stdout (PYTHONUNBUFFERED unset, as
        # under cron) a reader that has gone is only noticed by this write.
        sys.stdout.flush()
        return code
    except SystemExit as exc:  # argparse after --help / --version
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else EX_USAGE)
    except _UsageError as exc:
        print(exc, file=sys.stderr)
        return EX_USAGE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `brokerlock list | head -1`: the reader has gone, as for any Unix tool; keep
        # the interpreter's final flush from complaining about it too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13  # as if killed by SIGPIPE, which is what a shell shows for other tools
    except ImportError as exc:
        # A server back end whose driver is not installed (pip install 'brokerlock[redis]').
        _say(f"cannot use this store: {exc}")
        return EX_USAGE
    except (BrokerLockError, ValueError, TypeError, OSError) as exc:
        _say(str(exc) or type(exc).__name__)
        return EX_USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
