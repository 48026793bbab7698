"""What the embedded stores (SQLite, lock files) share: the host's wall clock, the
process witness, and the bells of their waiters."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Callable, Optional

from .._witness import Witness, witness_for
from .base import Adapter

if TYPE_CHECKING:
    from .._bells import Bells


class EmbeddedStore(Adapter):
    def __init__(self, witness_path: str, bells_dir: str, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._witness: Witness = witness_for(witness_path)
        self._bells_dir = bells_dir
        self._bells_made: Optional[Bells] = None

    def now(self) -> float:
        return self._clock()

    @property
    def _bells(self) -> Bells:
        # Loaded when first needed (a wait, or a release with someone waiting): an
        # uncontended cron job does not pay for inotify's ctypes at start-up.
        if self._bells_made is None:
            from .._bells import Bells

            self._bells_made = Bells(self._bells_dir, self._witness.path)
        return self._bells_made
