"""RouterConfig: the bounds it derives for the replicas."""

from __future__ import annotations

from router.config import RouterConfig


def test_a_replica_outwaits_any_silence_of_a_live_router() -> None:
    """A replica aborts its requests as orphans only after a silence a live router cannot leave: a health check
    answered just within its timeout, the interval, then one that takes as long to arrive. Before, replicas waited
    5 s, as long as one check may take, so a router slowed by a loaded machine could lose its streams."""
    assert RouterConfig(health_interval_s=1.0, health_timeout_s=5.0).replica_orphan_timeout_s == 11.0
    assert RouterConfig(health_interval_s=2.0, health_timeout_s=15.0).replica_orphan_timeout_s == 32.0
