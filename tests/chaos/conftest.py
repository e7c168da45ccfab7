"""Chaos tests run against real routers and replicas (see tests/serving.py); every scenario ends with I4 and
I5 checked (tests/chaos/leaks.py): memory before its routers stop, leaks after."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.chaos.leaks import MemoryBaseline, assert_memory_flat, assert_no_leaks, tp_segments
from tests.chaos.load import Request, expected_outputs
from tests.serving import RouterThread, model_dir, ray_cluster, router_factory

__all__ = ["model_dir", "ray_cluster"]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Remember whether the test body passed: the end-of-scenario checks add nothing to a failure."""
    report = yield
    if report.when == "call":
        item.stash[_PASSED] = report.passed
    return report


_PASSED = pytest.StashKey[bool]()


@pytest.fixture(scope="package", autouse=True)
def warm_reference_engine(model_dir: Path) -> None:
    """Build a reference engine in this process once, first: its one-time costs (torch kernels, allocator
    pools) would otherwise count as the first scenario's router memory growth (I4)."""
    expected_outputs(model_dir, [Request([1, 2, 3], dict(max_tokens=2))])


@pytest.fixture(autouse=True)
def no_leaks(request: pytest.FixtureRequest) -> Iterator[None]:
    """I5 once the scenario's routers and replicas are gone (this fixture is set up first, so torn down last)."""
    segments = tp_segments()
    yield
    if request.node.stash.get(_PASSED, False):
        assert_no_leaks(segments)


@pytest.fixture
def start_router(
    request: pytest.FixtureRequest, ray_cluster: None, model_dir: Path
) -> Iterator[Callable[..., RouterThread]]:
    """Routers for one scenario, each with its memory baseline taken at start and checked (I4) at the end."""
    started: list[tuple[RouterThread, MemoryBaseline]] = []
    with router_factory(model_dir) as start:

        def start_checked(*args: Any, warm: Callable[[RouterThread], None] | None = None,
                          **kwargs: Any) -> RouterThread:
            """`warm(router)`, when given, runs before the baseline: one-time costs of a replica (structured
            output's token tables) are no growth."""
            router = start(*args, **kwargs)
            if warm is not None:
                warm(router)
            started.append((router, MemoryBaseline.take(router)))
            return router

        yield start_checked
        if request.node.stash.get(_PASSED, False):
            for router, baseline in started:
                assert_memory_flat(router, baseline)
