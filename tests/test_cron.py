"""``brokerlock run`` as cron uses it: the lock lasts as long as the job, the job is one
process group that never runs on unlocked, and exit codes a wrapper can tell apart.

Real processes throughout; jobs say where they are on stdout, and the tests wait for
that, not for sleeps.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Iterator, List

import pytest
from stores import needs_witness
from test_cli import Env, Jobs, cli, expect, finish, one_line

from brokerlock.durations import parse_duration

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="the jobs are POSIX shell commands")


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return {**os.environ, "BROKERLOCK_URL": f"sqlite:///{tmp_path}/locks.sqlite3"}


@pytest.fixture
def jobs() -> Iterator[Jobs]:
    made = Jobs()
    yield made
    for pid in made.orphans:  # whatever a failed test left behind, group and all
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    made.close()


def running(pid: int) -> bool:
    """Whether ``pid`` runs; a zombie does not (in a container without an init, killed
    orphans stay zombies for ever)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rpartition(b")")[2].split()[0] not in (b"Z", b"X")
    except FileNotFoundError:
        return False
    except OSError:  # no /proc (macOS): ask the kernel, zombies included
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


def wait_until_gone(pids: List[int], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while any(running(pid) for pid in pids):
        assert time.monotonic() < deadline, f"still running: {[p for p in pids if running(p)]}"
        time.sleep(0.02)


# -- the lock lasts as long as the job --------------------------------------------------
def test_a_job_longer_than_its_ttl_keeps_the_lock_by_default(env: Env, jobs: Jobs) -> None:
    job = jobs.start(env, "run", "--ttl", "1s", "job", "--", "sh", "-c", "echo started; sleep 5")
    expect(job.stdout, "started")
    started = time.monotonic()
    refused = []
    while time.monotonic() - started < 4.3:  # up to the job's end: five ttls and more
        result = cli(env, "run", "-n", "job", "--", "true")
        assert result.returncode == 75, result.stderr
        assert "not running 'true'" in one_line(result.stderr)
        refused.append(time.monotonic() - started)
        time.sleep(0.3)
    assert refused[-1] > 3, refused  # tried well past the ttl, not only in its first second
    code, _, err = finish(job)
    assert (code, err) == (0, "")


# -- one process group, stopped as a whole ------------------------------------------------
def test_a_forced_release_stops_the_whole_process_group(env: Env, jobs: Jobs, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    # The subshell is a grandchild: stopping the shell alone would leave it running.
    script = f"(echo started $$ $(sh -c 'echo $PPID'); sleep 5; touch {marker}) ; true"
    job = jobs.start(env, "run", "--ttl", "1s", "job", "--", "sh", "-c", script)
    shell, subshell = map(int, expect(job.stdout, "started").split()[1:])
    jobs.orphans.append(shell)
    assert os.getpgid(subshell) == shell, "the job is a process group of its own, led by its shell"

    broke = time.monotonic()
    assert cli(env, "release", "--force", "job").returncode == 0
    code, _, err = finish(job)
    assert code == 125, err
    assert "broken before its lease ended" in err and "stopping 'sh' and its process group" in err
    wait_until_gone([shell, subshell])
    assert time.monotonic() - broke < 4, "stopped at the renewal (ttl/3), not after the sleep"
    assert not marker.exists()


def test_the_sigkill_after_kill_after_reaches_the_whole_group(env: Env, jobs: Jobs) -> None:
    # Both ignore SIGTERM (the background sleep inherits the ignored signal).
    job = jobs.start(env, "run", "--ttl", "1s", "--kill-after", "0.5s", "job", "--", "sh", "-c",
                     "trap '' TERM; sleep 60 & echo started $$ $!; wait")
    pids = [int(pid) for pid in expect(job.stdout, "started").split()[1:]]
    jobs.orphans.append(pids[0])
    assert cli(env, "release", "--force", "job").returncode == 0
    code, _, err = finish(job)
    assert code == 125, err
    wait_until_gone(pids, timeout=1)  # run waited for the group before it exited


@needs_witness  # (without one, the killed runner's lease lasts its ttl: 10 minutes)
def test_a_killed_runner_takes_its_job_with_it(env: Env, jobs: Jobs) -> None:
    # A background grandchild too: the parent-death signal reaches only the shell.
    job = jobs.start(env, "run", "--ttl", "10m", "job", "--", "sh", "-c",
                     "sleep 60 & echo started $$ $!; wait")
    pids = [int(pid) for pid in expect(job.stdout, "started").split()[1:]]
    jobs.orphans.append(pids[0])
    job.kill()
    job.wait()

    # The next run gets in only once every process of the killed runner's job is gone:
    # it checks from inside the lock.
    check = (
        "import os\n"
        "def running(pid):\n"
        "    try:\n"
        "        with open(f'/proc/{pid}/stat', 'rb') as f:\n"
        "            return f.read().rpartition(b')')[2].split()[0] not in (b'Z', b'X')\n"
        "    except FileNotFoundError:\n"
        "        return False\n"
        "    except OSError:\n"
        "        try:\n"
        "            os.kill(pid, 0)\n"
        "        except ProcessLookupError:\n"
        "            return False\n"
        "        return True\n"
        # A process killed a moment ago closes its files (the witness among them, which
        # frees the lock) before the kernel marks it a zombie: it runs no code of its
        # own any more, but /proc still says it runs. Give that a moment.
        "import time\n"
        "until = time.monotonic() + 5\n"
        f"while any(running(p) for p in {pids}) and time.monotonic() < until:\n"
        "    time.sleep(0.01)\n"
        f"print('alive:', [p for p in {pids} if running(p)])\n"
    )
    deadline = time.monotonic() + 15
    while True:
        result = cli(env, "run", "-n", "job", "--", sys.executable, "-c", check)
        if result.returncode != 75:
            break
        assert time.monotonic() < deadline, "the killed runner's lock was never freed"
        time.sleep(0.05)
    assert (result.returncode, result.stdout) == (0, "alive: []\n"), result.stderr
    wait_until_gone(pids, timeout=1)


def test_forwarded_signals_reach_the_whole_group(env: Env, jobs: Jobs) -> None:
    job = jobs.start(env, "run", "job", "--", "sh", "-c", "sleep 60 & echo started $$ $!; wait")
    pids = [int(pid) for pid in expect(job.stdout, "started").split()[1:]]
    jobs.orphans.append(pids[0])
    job.terminate()
    code, _, err = finish(job)
    assert code == 143 and err == ""
    wait_until_gone(pids)


# -- exit codes ----------------------------------------------------------------------------
def test_exit_codes_tell_busy_lost_and_the_job_apart(env: Env, jobs: Jobs) -> None:
    holder = jobs.start(env, "run", "job", "--", "sh", "-c", "echo started; read x")
    expect(holder.stdout, "started")

    busy = cli(env, "run", "-n", "job", "--", "true")
    assert busy.returncode == 75 and "not running 'true'" in one_line(busy.stderr)
    assert cli(env, "run", "-n", "-E", "0", "job", "--", "true").returncode == 0  # cron: skip quietly
    assert finish(holder, b"\n")[0] == 0

    # A job's own code passes through, even the busy code; brokerlock says nothing then.
    own = cli(env, "run", "-n", "job", "--", "sh", "-c", "exit 75")
    assert (own.returncode, own.stderr) == (75, "")
    own = cli(env, "run", "-n", "job", "--", "sh", "-c", "exit 125")
    assert (own.returncode, own.stderr) == (125, "")

    for extra, expected in (([], 125), (["--lost-exit-code", "9"], 9)):
        job = jobs.start(env, "run", "--on-lost", "warn", *extra, "job", "--", "sh", "-c",
                         "echo started; read x; exit 3")
        expect(job.stdout, "started")
        assert cli(env, "release", "--force", "job").returncode == 0
        code, _, err = finish(job, b"\n")
        assert code == expected, err
        assert f"'sh' exited with 3 but was not protected by the lock to its end; exiting {expected}" in err


# -- small things ----------------------------------------------------------------------------
@pytest.mark.parametrize("args", [["list", "--json"], ["list"]])
def test_a_reader_that_went_away_without_pythonunbuffered(env: Env, args: List[str]) -> None:
    quiet: Dict[str, str] = {k: v for k, v in env.items() if k != "PYTHONUNBUFFERED"}
    read_end, write_end = os.pipe()
    os.close(read_end)  # as `brokerlock list --json | head -c0` once head has exited
    try:
        result = subprocess.run(
            [sys.executable, "-m", "brokerlock", *args], env=quiet, stdout=write_end,
            stderr=subprocess.PIPE, text=True, timeout=60,
        )
    finally:
        os.close(write_end)
    assert (result.returncode, result.stderr) == (141, "")


@pytest.mark.parametrize(
    "text, seconds",
    [("1h30m", 5400), ("2m30s", 150), ("1h 30m", 5400), ("2m 30s", 150), ("1d 2h 3m 4s", 93784),
     ("1m 0.5s", 60.5), ("2 minutes 30 seconds", 150)],
)
def test_compound_durations(text: str, seconds: float) -> None:
    assert parse_duration(text, "ttl") == seconds


@pytest.mark.parametrize(
    "text, says", [("1h30x", "unknown unit 'x'"), ("30s1m", "larger units"), ("1m30m", "larger units"),
                   ("1h30", "'1h30'"), ("1h -30m", "'1h -30m'")],
)
def test_bad_compound_durations_are_named(text: str, says: str) -> None:
    with pytest.raises(ValueError, match="ttl") as caught:
        parse_duration(text, "ttl")
    assert says in str(caught.value) and repr(text) in str(caught.value)


def test_a_compound_duration_on_the_command_line(env: Env) -> None:
    list_json = [sys.executable, "-m", "brokerlock", "list", "--json"]
    shown = cli(env, "run", "--ttl", "1h 30m", "job", "--", *list_json)
    assert shown.returncode == 0, shown.stderr
    import json
    from datetime import datetime

    (record,) = json.loads(shown.stdout)
    lease = datetime.fromisoformat(record["expires_at"]) - datetime.fromisoformat(record["acquired_at"])
    assert lease.total_seconds() == pytest.approx(5400, abs=1)
