"""The session's sandbox check (tests/sandbox.py) catches a test that writes outside."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@pytest.mark.parametrize("writes_outside", [False, True])
def test_a_stray_file_fails_the_run(tmp_path: Path, writes_outside: bool) -> None:
    # A miniature project whose temporary directory, home and working tree all lie in
    # our own tmp_path: the inner run's "outside" is still inside ours.
    tree, home, temp = tmp_path / "tree", tmp_path / "home", tmp_path / "temp"
    for d in (tree, home, temp):
        d.mkdir()
    (tree / "conftest.py").write_text(
        f"import sys\nsys.path.insert(0, {str(HERE)!r})\n"
        "from sandbox import pytest_sessionfinish, pytest_sessionstart\n"
    )
    target = tree / "stray.txt" if writes_outside else temp / "fine.txt"
    (tree / "test_inner.py").write_text(
        f"def test_writes():\n    open({str(target)!r}, 'w').write('x')\n    assert True\n"
    )
    env = {**os.environ, "HOME": str(home), "USERPROFILE": str(home), "XDG_STATE_HOME": str(home / "state")}
    env.update(TMPDIR=str(temp), TMP=str(temp), TEMP=str(temp))  # POSIX, then Windows
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tree), str(tree)],
        cwd=tree, env=env, capture_output=True, text=True, timeout=120,
    )
    if writes_outside:
        assert run.returncode == 1, run.stdout + run.stderr
        assert "sandbox violated" in run.stdout and str(target) in run.stdout
    else:
        assert run.returncode == 0, run.stdout + run.stderr
        assert "sandbox violated" not in run.stdout
