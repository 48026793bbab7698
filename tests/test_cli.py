"""The ``brokerlock`` command, driven as cron and shell scripts drive it: real processes.

Jobs report that they run by printing a line that the test reads (``expect``), and are
told to finish through their stdin, so the tests wait for events, not for sleeps;
the few timed assertions are loose, for a busy 2-core machine.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import IO, Dict, Iterator, List, Optional, Tuple

import pytest
from stores import forks_with_threads

import brokerlock

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="the jobs are POSIX shell commands")

#: A job that says it started, then waits for a line on its stdin (the test's go-ahead).
WAIT_FOR_STDIN = ["sh", "-c", "echo started; read line; echo finished"]
#: A job that says it started (with its pid, which `exec` keeps), then sleeps.
SLEEP = ["sh", "-c", "echo started $$; exec sleep 60"]

Env = Dict[str, str]


@pytest.fixture(params=["sqlite", "file"])
def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> Env:
    url = f"sqlite:///{tmp_path}/locks.sqlite3" if request.param == "sqlite" else f"file://{tmp_path}/locks"
    return {**os.environ, "BROKERLOCK_URL": url}


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return {**os.environ, "BROKERLOCK_URL": f"sqlite:///{tmp_path}/locks.sqlite3"}


class Jobs:
    """Background ``brokerlock`` processes, killed at the end of the test if still running."""

    def __init__(self) -> None:
        self.procs: List[subprocess.Popen[bytes]] = []
        self.orphans: List[int] = []

    def start(self, env: Env, *args: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "brokerlock", *args], env=env, bufsize=0,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream:
                    stream.close()
        for pid in self.orphans:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture
def jobs() -> Iterator[Jobs]:
    made = Jobs()
    yield made
    made.close()


def cli(env: Env, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "brokerlock", *args], env=env, capture_output=True, text=True,
        timeout=timeout, stdin=subprocess.DEVNULL,
    )


def expect(stream: Optional[IO[bytes]], needle: str, timeout: float = 30) -> str:
    """Read lines from an unbuffered pipe until one contains ``needle``; that line."""
    deadline = time.monotonic() + timeout
    assert stream is not None
    seen: List[str] = []
    while True:
        left = deadline - time.monotonic()
        ready, _, _ = select.select([stream], [], [], max(0.0, left))
        assert ready, f"no {needle!r} within {timeout}s; saw {seen}"
        line = stream.readline().decode()
        assert line, f"the stream ended without {needle!r}; saw {seen}"
        if needle in line:
            return line
        seen.append(line)


def finish(proc: subprocess.Popen[bytes], stdin: bytes = b"", timeout: float = 30) -> Tuple[int, str, str]:
    out, err = proc.communicate(stdin, timeout=timeout)
    return proc.returncode, out.decode(), err.decode()


def loss_report(stderr: str) -> str:
    """The library's line saying the lock was lost and why, then ours saying what follows."""
    lines = stderr.strip().splitlines()
    assert len(lines) == 2 and "Traceback" not in stderr, stderr
    assert lines[0].startswith("brokerlock: lost lock 'job' fence "), stderr
    return lines[1]


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {stderr!r}"
    assert "Traceback" not in stderr
    return lines[0]


# -- contention -----------------------------------------------------------------------
def test_busy_lock_fails_fast_with_75_and_runs_nothing(any_store: Env, jobs: Jobs, tmp_path: Path) -> None:
    holder = jobs.start(any_store, "run", "nightly", "--", *WAIT_FOR_STDIN)
    expect(holder.stdout, "started")
    marker = tmp_path / "marker"

    busy = cli(any_store, "run", "--timeout", "0", "nightly", "--", "touch", str(marker))
    assert busy.returncode == 75
    line = one_line(busy.stderr)
    assert "'nightly'" in line and f"pid {holder.pid}" in line and "waited" in line and "until" in line
    assert not marker.exists(), "a busy lock must run nothing"

    # flock(1) -E: a chosen conflict code; -n as flock's --nonblock.
    chosen = cli(any_store, "run", "-n", "-E", "9", "nightly", "--", "touch", str(marker))
    assert chosen.returncode == 9 and not marker.exists()

    assert finish(holder, b"go\n")[:2] == (0, "finished\n")


def test_waiting_run_gets_the_lock_when_the_holder_is_done(env: Env, jobs: Jobs, tmp_path: Path) -> None:
    log = tmp_path / "log"
    holder = jobs.start(env, "run", "job", "--", "sh", "-c", f"echo started; read x; echo first >> {log}")
    expect(holder.stdout, "started")
    waiter = jobs.start(env, "run", "--timeout", "30s", "job", "--", "sh", "-c", f"echo second >> {log}")
    time.sleep(0.5)  # only to give the waiter a chance to run too early, which it must not
    assert waiter.poll() is None and not log.exists(), finish(waiter)

    assert finish(holder, b"go\n")[0] == 0
    assert finish(waiter)[0] == 0
    assert log.read_text() == "first\nsecond\n"


def test_a_missing_command_fails_at_once_without_waiting_for_the_lock(env: Env, jobs: Jobs) -> None:
    holder = jobs.start(env, "run", "job", "--", *WAIT_FOR_STDIN)
    expect(holder.stdout, "started")
    started = time.monotonic()
    result = cli(env, "run", "--timeout", "1m", "job", "--", "no-such-command-anywhere")
    assert result.returncode == 127
    assert "no-such-command-anywhere" in one_line(result.stderr)
    assert time.monotonic() - started < 20
    finish(holder, b"go\n")


# -- exit codes and signals -------------------------------------------------------------
@pytest.mark.parametrize(
    "command, code", [("echo out; echo err >&2; exit 0", 0), ("exit 7", 7), ("kill -TERM $$", 143)]
)
def test_exit_code_and_output_pass_through(env: Env, command: str, code: int) -> None:
    result = cli(env, "run", "job", "--", "sh", "-c", command)
    assert result.returncode == code
    if code == 0:
        assert (result.stdout, result.stderr) == ("out\n", "err\n")


def test_stdin_passes_through(env: Env) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "brokerlock", "run", "job", "--", "tr", "a-z", "A-Z"],
        input="shout\n", capture_output=True, text=True, env=env, timeout=60,
    )
    assert (result.returncode, result.stdout) == (0, "SHOUT\n")


# (getattr: Windows has no SIGHUP, and the list is built even where the module is skipped)
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, getattr(signal, "SIGHUP", 1)])
def test_signals_are_forwarded_and_the_lock_released_after(env: Env, jobs: Jobs, signum: int) -> None:
    proc = jobs.start(env, "run", "job", "--", *SLEEP)
    expect(proc.stdout, "started")
    proc.send_signal(signum)
    code, _, err = finish(proc)
    assert code == 128 + signum, err  # the sleep was killed by the forwarded signal
    assert cli(env, "status", "job").returncode == 0


def test_the_command_handles_the_signal_while_still_holding_the_lock(env: Env, jobs: Jobs) -> None:
    # The trap asks the store whether the lock is still held while the command winds down.
    status = f"{sys.executable} -m brokerlock status job"
    script = (
        f"trap '{status} >/dev/null; echo held=$?; exit 5' TERM; echo started; while :; do sleep 0.05; done"
    )
    proc = jobs.start(env, "run", "job", "--", "sh", "-c", script)
    expect(proc.stdout, "started")
    proc.terminate()
    code, out, _ = finish(proc)
    assert (code, out) == (5, "held=1\n")
    assert cli(env, "status", "job").returncode == 0


def on_a_terminal(env: Env, argv: List[str], typed: bytes = b"") -> Tuple[int, str]:
    """Run ``argv`` as the foreground job of a new terminal; type ``typed`` once it
    prints "started"; its exit code and what the terminal showed."""
    pty = pytest.importorskip("pty")
    pid, master = pty.fork()
    if pid == 0:  # pragma: no cover - the child becomes argv on the terminal
        os.execve(argv[0], argv, env)
    output = b""
    try:
        while True:
            ready, _, _ = select.select([master], [], [], 30)
            assert ready, output
            try:
                chunk = os.read(master, 1024)
            except OSError:  # EIO: every process of the terminal has gone
                break
            if not chunk:
                break
            if b"started" not in output and b"started" in output + chunk and typed:
                os.write(master, typed)
            output += chunk
        _, status = os.waitpid(pid, 0)
    finally:
        os.close(master)
    return os.waitstatus_to_exitcode(status), output.decode(errors="replace")


@forks_with_threads  # (pty.fork(): the child exec()s at once)
def test_ctrl_c_on_a_terminal_stops_the_command_and_is_not_sent_twice(env: Env) -> None:
    # The job is a session of its own, so the terminal's Ctrl-C reaches only brokerlock,
    # which forwards it once: a second copy is how many programs are told to skip their
    # clean-up. The job counts the SIGINTs it gets for a moment after the first.
    count = (
        "import signal, sys, time\n"
        "n = []\n"
        "signal.signal(signal.SIGINT, lambda *a: n.append(1))\n"
        "print('started', flush=True)\n"
        "while not n: time.sleep(0.01)\n"
        "time.sleep(0.5)\n"
        "print('sigints', len(n), flush=True)\n"
        "sys.exit(130)\n"
    )
    run = [sys.executable, "-m", "brokerlock", "run", "job", "--", sys.executable, "-c", count]
    code, shown = on_a_terminal(env, run, typed=b"\x03")  # Ctrl-C
    assert code == 130 and "sigints 1" in shown, shown
    assert cli(env, "status", "job").returncode == 0


def test_signal_while_waiting_runs_nothing(env: Env, jobs: Jobs, tmp_path: Path) -> None:
    holder = jobs.start(env, "run", "job", "--", *WAIT_FOR_STDIN)
    expect(holder.stdout, "started")
    waiter = jobs.start(env, "run", "--timeout", "none", "job", "--", "touch", str(tmp_path / "marker"))
    time.sleep(0.5)
    waiter.terminate()
    code, _, err = finish(waiter)
    assert code == 143 and "waiting for lock 'job'" in one_line(err), err
    assert not (tmp_path / "marker").exists()
    finish(holder, b"go\n")


def test_the_lock_is_not_inherited_by_the_command(env: Env, jobs: Jobs) -> None:
    if os.path.isdir("/proc/self/fd"):
        count = "import os; print(len(os.listdir('/proc/self/fd')))"
        fds = cli(env, "run", "job", "--", sys.executable, "-c", count)
        assert fds.stdout == "4\n"  # 0, 1, 2 and the one listdir opened


# -- administration ---------------------------------------------------------------------
def test_status_and_list_while_jobs_run(env: Env, jobs: Jobs) -> None:
    first = jobs.start(env, "run", "--ttl", "5m", "alpha", "--", *WAIT_FOR_STDIN)
    second = jobs.start(env, "run", "--ttl", "none", "beta/β", "--", *WAIT_FOR_STDIN)
    expect(first.stdout, "started")
    expect(second.stdout, "started")

    held = cli(env, "status", "alpha")
    assert held.returncode == 1 and f"pid {first.pid}" in held.stdout and "until" in held.stdout
    free = cli(env, "status", "gamma")
    assert free.returncode == 0 and "free" in free.stdout

    table = cli(env, "list")
    assert table.returncode == 0
    assert "alpha" in table.stdout and "beta/β" in table.stdout and str(second.pid) in table.stdout

    records = json.loads(cli(env, "list", "--json").stdout)
    assert [r["name"] for r in records] == ["alpha", "beta/β"]
    alpha, beta = records
    assert set(alpha) == {"name", "host", "pid", "thread", "acquired_at", "expires_at", "fence"}
    assert alpha["pid"] == first.pid and isinstance(alpha["fence"], int)
    acquired, expires = (datetime.fromisoformat(alpha[key]) for key in ("acquired_at", "expires_at"))
    assert acquired.utcoffset() is not None and expires.utcoffset() is not None  # ISO 8601 with offset
    assert 250 < (expires - acquired).total_seconds() <= 300
    assert beta["expires_at"] is None

    finish(first, b"go\n")
    finish(second, b"go\n")
    assert json.loads(cli(env, "list", "--json").stdout) == []
    assert cli(env, "list").stdout == "no lock is held\n"


def test_release_force_breaks_a_stuck_holder_which_then_reports_the_loss(
    env: Env, jobs: Jobs, tmp_path: Path
) -> None:
    stuck = jobs.start(env, "run", "--ttl", "10m", "job", "--", *WAIT_FOR_STDIN)
    expect(stuck.stdout, "started")

    refused = cli(env, "release", "job")
    assert refused.returncode == 2 and "--force" in one_line(refused.stderr)
    assert cli(env, "status", "job").returncode == 1

    broken = cli(env, "release", "--force", "job")
    assert broken.returncode == 0 and f"pid {stuck.pid}" in broken.stdout
    assert cli(env, "status", "job").returncode == 0
    assert cli(env, "release", "--force", "job").returncode == 1  # nothing left to break
    assert cli(env, "run", "-n", "job", "--", "true").returncode == 0

    # Its next renewal is minutes away, so the runner learns of the break at release: the
    # command ran to its end unprotected, so the run must not look like a success.
    code, out, err = finish(stuck, b"go\n")
    assert (code, out) == (125, "finished\n")
    assert "not protected" in loss_report(err)
    assert "broken" in err and "ran out" not in err, err


# -- leases -------------------------------------------------------------------------------
def test_keepalive_holds_the_lock_for_three_ttls(env: Env, jobs: Jobs) -> None:
    ttl = 1.5
    job = jobs.start(env, "run", "--ttl", f"{ttl}s", "--keepalive", "job", "--", "sh", "-c",
                     f"echo started; sleep {3 * ttl}")
    expect(job.stdout, "started")
    started = time.monotonic()
    tries = []
    while time.monotonic() - started < 3 * ttl - 0.7:
        tries.append(cli(env, "run", "-n", "job", "--", "true").returncode)
        time.sleep(0.2)
    assert tries and set(tries) == {75}
    assert time.monotonic() - started > 2 * ttl, "contenders were tried after the first ttl ran out"
    assert finish(job)[0] == 0


def test_without_keepalive_an_overrun_lease_is_lost_and_reported(env: Env, jobs: Jobs) -> None:
    job = jobs.start(env, "run", "--ttl", "1s", "--no-keepalive", "job", "--", *WAIT_FOR_STDIN)
    expect(job.stdout, "started")
    time.sleep(1.3)
    assert cli(env, "run", "-n", "job", "--", "true").returncode == 0  # the lease ran out
    code, _, err = finish(job, b"go\n")
    assert code == 125 and "--no-keepalive" in loss_report(err)
    assert "ran out" in err


def test_loss_stops_the_command_by_default(env: Env, jobs: Jobs) -> None:
    job = jobs.start(env, "run", "--ttl", "1s", "--keepalive", "job", "--", *SLEEP)
    expect(job.stdout, "started")
    assert cli(env, "release", "--force", "job").returncode == 0
    started = time.monotonic()
    code, _, err = finish(job)
    assert code == 125  # not the 143 of the SIGTERM brokerlock sent
    assert "stopping 'sh'" in loss_report(err)
    assert time.monotonic() - started < 10


def test_a_command_that_ignores_sigterm_is_killed_after_the_grace(env: Env, jobs: Jobs) -> None:
    job = jobs.start(env, "run", "--ttl", "1s", "--keepalive", "--kill-after", "0.5s", "job", "--",
                     "sh", "-c", "trap '' TERM; echo started; exec sleep 60")
    expect(job.stdout, "started")
    assert cli(env, "release", "--force", "job").returncode == 0
    assert finish(job)[0] == 125


@pytest.mark.parametrize("own_code, expected", [(0, 125), (3, 125)])
def test_on_lost_warn_lets_the_command_finish(env: Env, jobs: Jobs, own_code: int, expected: int) -> None:
    job = jobs.start(env, "run", "--ttl", "1s", "--keepalive", "--on-lost", "warn", "job", "--",
                     "sh", "-c", f"echo started; read x; echo finished; exit {own_code}")
    expect(job.stdout, "started")
    assert cli(env, "release", "--force", "job").returncode == 0
    expect(job.stderr, "lost lock 'job'")  # said at once, while the command still runs
    expect(job.stderr, "letting 'sh' finish")
    code, out, err = finish(job, b"go\n")
    assert (code, out) == (expected, "finished\n")
    assert f"'sh' exited with {own_code} but was not protected" in err  # its own code, said


# -- errors -------------------------------------------------------------------------------
def bad_command_lines(tmp_path: Path) -> List[Tuple[List[str], int, str]]:
    text_file = tmp_path / "notes.txt"
    text_file.write_text("not a database\n" * 100)
    script = tmp_path / "script.sh"
    script.write_text("#!/bin/sh\necho hi\n")  # not executable
    return [
        (["run", "--ttl", "5 parsecs", "x", "--", "true"], 2, "'5 parsecs'"),
        (["run", "--timeout=-1s", "x", "--", "true"], 2, "'-1s'"),
        (["run", "--ttl", "0", "x", "--", "true"], 2, "ttl"),
        (["run", "--kill-after", "soon", "x", "--", "true"], 2, "'soon'"),
        (["run", "--url", "bogus://x", "x", "--", "true"], 2, "bogus://x"),
        (["run", "--url", f"sqlite:///{text_file}", "x", "--", "true"], 2, str(text_file)),
        (["status", "--url", f"sqlite:///{tmp_path}", "x"], 2, str(tmp_path)),
        (["list", "--url", f"file://{text_file}"], 2, str(text_file)),
        (["run", "x", "--", str(tmp_path / "missing")], 127, "missing"),
        (["run", "x", "--", str(script)], 126, "script.sh"),
        (["run", "x"], 2, "no command"),
        (["run", "x", "--"], 2, "no command"),
        (["run", "--conflict-exit-code", "300", "x", "--", "true"], 2, "300"),
        (["run", "--lost-exit-code", "-1", "x", "--", "true"], 2, "-1"),
        (["run", "--on-lost", "panic", "x", "--", "true"], 2, "panic"),
        (["status", ""], 2, "empty"),
        (["release", "x"], 2, "--force"),
        (["frobnicate"], 2, "frobnicate"),
        ([], 2, "required"),
        (["list", "--bogus"], 2, "--bogus"),
    ]


def test_every_error_is_one_line_and_a_clear_exit_code(env: Env, tmp_path: Path) -> None:
    for args, code, needle in bad_command_lines(tmp_path):
        result = cli(env, *args)
        assert result.returncode == code, (args, result.stderr)
        assert needle in one_line(result.stderr), (args, result.stderr)
        assert result.stdout == ""


def test_a_reader_that_went_away_is_not_an_error(env: Env) -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)  # as `brokerlock list | head -0` once head has exited
    try:
        result = subprocess.run(
            [sys.executable, "-m", "brokerlock", "list"], env=env, stdout=write_end,
            stderr=subprocess.PIPE, text=True, timeout=60,
        )
    finally:
        os.close(write_end)
    assert (result.returncode, result.stderr) == (141, "")


def test_help_and_version() -> None:
    for command in ([], ["run"], ["status"], ["list"], ["release"]):
        result = cli(dict(os.environ), *command, "--help")
        assert result.returncode == 0 and "example" in result.stdout, command
    version = cli(dict(os.environ), "--version")
    assert (version.returncode, version.stdout) == (0, f"brokerlock {brokerlock.__version__}\n")


def test_main_returns_the_exit_code_in_process(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    from brokerlock.cli import main

    monkeypatch.setenv("BROKERLOCK_URL", env["BROKERLOCK_URL"])
    assert main(["status", "job"]) == 0
    assert main(["run", "job", "--", "sh", "-c", "exit 4"]) == 4
    assert main(["run", "--ttl", "nope", "job", "--", "true"]) == 2
