"""Run the brokerlock CLI as another (numeric) user: ``as_user.py UID GID -- ARGS...``.

The interpreter may live where that user cannot read (``/root``), so everything the
command needs is imported first, as root; then the process becomes ``UID`` in group
``GID`` (its only group) for good, and runs ``brokerlock ARGS``.
"""

from __future__ import annotations

import os
import sys


def main() -> int:
    uid, gid, separator, *args = sys.argv[1:]
    assert separator == "--", sys.argv
    for module in (
        "ctypes", "ctypes.util", "datetime", "encodings.idna", "hashlib", "json", "secrets",
        "select", "shlex", "shutil", "signal", "socket", "sqlite3", "subprocess", "uuid",
    ):
        __import__(module)

    import brokerlock.adapters.embedded.bells
    import brokerlock.adapters.embedded.wakeup
    import brokerlock.adapters.file
    import brokerlock.adapters.sqlite
    import brokerlock.cli.run  # noqa: F401
    from brokerlock.cli.main import main as cli

    os.setgroups([int(gid)])
    os.setgid(int(gid))
    os.setuid(int(uid))
    return cli(args)


if __name__ == "__main__":
    sys.exit(main())
