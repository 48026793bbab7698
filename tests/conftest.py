from __future__ import annotations

import os
import sys
from typing import Iterator

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from sandbox import pytest_sessionfinish, pytest_sessionstart  # noqa: F401  (session hooks)
from servers import pgbouncer, postgres_server, redis_server  # noqa: F401  (session fixtures)
from stores import STORES, StoreFactory

from brokerlock import Adapter


@pytest.fixture(params=sorted(STORES))
def make_store(request: pytest.FixtureRequest, tmp_path: str) -> Iterator[StoreFactory]:
    """A factory of adapters on one fresh store of each back end in turn.

    Each call gives a new adapter (a new connection, as another process would have)
    onto the same store.
    """
    made = []
    build = STORES[request.param]
    servers = [request.getfixturevalue(name) for name in getattr(build, "needs", ())]
    factory = build(str(tmp_path), *servers)

    def make() -> Adapter:
        adapter = factory()
        made.append(adapter)
        return adapter

    yield make
    for adapter in made:
        adapter.close()


@pytest.fixture
def store(make_store: StoreFactory) -> Adapter:
    return make_store()
