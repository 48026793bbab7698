"""Sphinx configuration: ``sphinx-build -W --keep-going -n docs docs/_build/html``."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.abspath(".."))

import brokerlock  # after the path, so that the checkout is what is documented

project = "brokerlock"
author = "the brokerlock authors"
copyright = "the brokerlock authors"
release = brokerlock.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.viewcode",
]

autodoc_typehints = "signature"
autodoc_member_order = "bysource"
autodoc_mock_imports = ["redis", "psycopg"]

# Warnings are errors (-W) and every reference must resolve (-n), so that a renamed
# class or a broken link fails the build. The build needs no network, so there is no
# intersphinx: names from the standard library and the drivers are exempted here.
nitpicky = True
nitpick_ignore_regex = [
    (r"py:.*", r"(typing\.)?(Any|Optional|Union|Callable.*|Iterator|List|Dict|Tuple|Type)"),
    (r"py:.*", r"(abc\.ABC|Exception|TimeoutError|float|int|str|bool|None|NoneType)"),
    (r"py:.*", r"(datetime\.)?timedelta|threading\..*|pathlib\..*|os\.PathLike.*|types\..*"),
    (r"py:.*", r"(redis|psycopg)\..*"),
    # The decorator's type variable and the embedded stores' private base classes.
    (r"py:class", r"brokerlock\.lock\.F"),
    (r"py:class", r"brokerlock\.adapters\.(sqlite\.conn\.SQLiteConnections|embedded\.store\.EmbeddedStore)"),
]

exclude_patterns = ["_build"]
html_theme = "furo"
html_title = f"brokerlock {release}"
html_static_path: list[str] = []
