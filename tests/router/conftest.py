"""Router tests run against real routers and replicas (see tests/serving.py), or the client's against an in-process
fake server (tests/router/fake_server.py)."""

from collections.abc import Iterator

import pytest

from tests.router.fake_server import FakeServer, running_fake_server
from tests.serving import model_dir, offline, ray_cluster, start_module_router, start_router

__all__ = ["model_dir", "offline", "ray_cluster", "start_module_router", "start_router"]


@pytest.fixture
def fake() -> Iterator[FakeServer]:
    """A fake server for one test."""
    with running_fake_server() as server:
        yield server
