"""What `tox -e pkg` checks: the distributions a user and a packager receive.

1. Build the sdist and the wheel (setuptools' warnings are errors).
2. `twine check --strict` both (the README must render on PyPI).
3. Install the wheel, with the test extra, into a fresh virtual environment, and run the
   demonstration and the command from it, away from the checkout.
4. Unpack the sdist and, with that environment, collect every test in it and run the
   documentation's examples: the sdist must carry everything the tests need.

Everything is written under the directory given as the only argument.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tarfile
import venv
from typing import Dict, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*cmd: str, cwd: str = ROOT, env: Optional[Dict[str, str]] = None) -> str:
    print("+", " ".join(cmd), flush=True)
    done = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    print(done.stdout, end="", flush=True)
    if done.returncode:
        sys.exit(f"failed ({done.returncode}): {' '.join(cmd)}")
    return done.stdout


def main() -> None:
    work = os.path.abspath(sys.argv[1])
    shutil.rmtree(work, ignore_errors=True)
    dist, env_dir, unpacked, state = (os.path.join(work, d) for d in ("dist", "venv", "sdist", "state"))

    log = run(sys.executable, "-m", "build", "--outdir", dist, ROOT)
    # The byte-compiling notices follow PYTHONDONTWRITEBYTECODE, not our metadata.
    warnings = [
        line for line in log.splitlines()
        if ("warning" in line.lower() or "deprecat" in line.lower()) and "byte-compiling" not in line
    ]
    if warnings:
        sys.exit("the build warned:\n" + "\n".join(warnings))
    (sdist,) = glob.glob(os.path.join(dist, "*.tar.gz"))
    (wheel,) = glob.glob(os.path.join(dist, "*.whl"))
    run(sys.executable, "-m", "twine", "check", "--strict", sdist, wheel)

    venv.create(env_dir, with_pip=True)
    bindir = os.path.join(env_dir, "Scripts" if os.name == "nt" else "bin")
    python = os.path.join(bindir, "python")
    run(python, "-m", "pip", "install", "-q", f"{wheel}[test]", cwd=work)
    # The default store, moved under `work` so that the check leaves nothing behind.
    env = {k: v for k, v in os.environ.items() if k != "BROKERLOCK_URL"}
    env["XDG_STATE_HOME"] = state
    demo = os.path.join(ROOT, "examples", "contend.py")
    run(python, demo, "--workers", "3", "--rounds", "2", cwd=work, env=env)
    out = run(python, "-c", "import brokerlock; print(brokerlock.__file__)", cwd=work, env=env)
    if not out.strip().startswith(env_dir):
        sys.exit(f"the demo did not import the installed wheel: {out.strip()}")
    command = os.path.join(bindir, "brokerlock")
    run(command, "run", "pkg-check", "--", python, "-c", "print('ran under the lock')", cwd=work, env=env)

    with tarfile.open(sdist) as archive:
        # Our own archive, just built; the "data" filter where Python has it (3.12+ warns without).
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        archive.extractall(unpacked, **safe)  # type: ignore[arg-type]
    (tree,) = glob.glob(os.path.join(unpacked, "*"))
    run(python, "-m", "pytest", "-qq", "-p", "no:cacheprovider", "--collect-only", cwd=tree, env=env)
    run(python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_readme.py", cwd=tree, env=env)
    print("package check passed:", os.path.basename(sdist), os.path.basename(wheel))


if __name__ == "__main__":
    main()
