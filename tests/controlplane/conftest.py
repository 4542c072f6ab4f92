"""Fixtures of the router tests: an in-process cluster (tests/inprocess_cluster.py) on a lively tiny model."""
from __future__ import annotations

import pytest

from tests.inprocess_cluster import InProcessCluster


@pytest.fixture(scope="module")
def cluster(redis_server, tiny_model_variant):
    """Two workers on a lively tiny model (greedy output depends on the context), shared by a module."""
    c = InProcessCluster(redis_server.url, tiny_model_variant("gqa")).start()
    yield c
    c.stop()


@pytest.fixture
def make_cluster(redis_server, tiny_model_variant):
    """`make(num_workers=2)` -> a fresh InProcessCluster for tests that break things (a 1-s lease, so a
    crashed worker leaves the registry soon); stopped afterwards."""
    made: list[InProcessCluster] = []

    def make(num_workers: int = 2, **engine_config) -> InProcessCluster:
        made.append(InProcessCluster(redis_server.url, tiny_model_variant("gqa"), num_workers, lease_s=1.0,
                                     **engine_config).start())
        return made[-1]

    yield make
    for c in made:
        c.stop()
