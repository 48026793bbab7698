"""Run the brokerlock CLI as another (numeric) user: ``as_user.py UID GID -- ARGS...``.

The interpreter may live where that user cannot read (``/root``), so everything the
command needs is imported first, as root; then the process becomes ``UID`` in group
``GID`` (its only group) for good, and runs ``brokerlock ARGS``.
"""

from __future__ import annotations

import os
import sys


def _import_everything() -> None:
    """Every module brokerlock imports anywhere (also inside functions, where it waits
    until needed), and every module of brokerlock itself."""
    import ast
    import importlib
    import pkgutil

    import brokerlock

    root = os.path.dirname(brokerlock.__file__)
    # (locale: gettext, which argparse's messages go through, imports it when the
    # parser is built; Python 3.11+ has it loaded by then, 3.9 and 3.10 do not.)
    wanted = {"encodings.idna", "sqlite3", "locale"}
    for directory, _dirs, files in os.walk(root):
        for name in files:
            if not name.endswith(".py"):
                continue
            with open(os.path.join(directory, name), encoding="utf-8") as f:
                tree = ast.parse(f.read())
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    wanted.update(alias.name for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    wanted.add(node.module)
    # Python 3.9 has no list of standard modules: it imports every module named, the
    # drivers too (harmless: they would be imported as root all the same).
    stdlib = getattr(sys, "stdlib_module_names", None)
    for module in sorted(wanted):
        if stdlib is None or module.split(".")[0] in stdlib:
            try:
                importlib.import_module(module)
            except ImportError:
                pass  # (another platform's: msvcrt, winreg)
    for info in pkgutil.walk_packages(brokerlock.__path__, "brokerlock."):
        if info.name.endswith("__main__"):
            continue  # (it would run the command line now)
        try:
            importlib.import_module(info.name)
        except ImportError:
            pass  # (a server driver that is not installed)


def main() -> int:
    uid, gid, separator, *args = sys.argv[1:]
    assert separator == "--", sys.argv
    _import_everything()
    from brokerlock.cli.main import main as cli

    os.setgroups([int(gid)])
    os.setgid(int(gid))
    os.setuid(int(uid))
    return cli(args)


if __name__ == "__main__":
    sys.exit(main())
