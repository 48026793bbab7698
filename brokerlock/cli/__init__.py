"""The ``brokerlock`` command: ``run``, ``status``, ``list`` and ``release``."""

from .main import main

__all__ = ["main"]
