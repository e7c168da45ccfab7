"""Tests for cluster.yaml: Ray's own launcher accepts it, rejects broken copies, and auth stays on."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

ray_util = pytest.importorskip("ray.autoscaler._private.util", reason="ray is not installed (extra: cluster)")
jsonschema = pytest.importorskip("jsonschema", reason="jsonschema (a ray[default] dependency) is not installed")

CLUSTER_YAML = Path(__file__).resolve().parent.parent / "cluster.yaml"


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def validate(config: dict[str, Any]) -> None:
    """What `ray up` does before it calls the cloud: fill in the provider's defaults, then validate."""
    ray_util.validate_config(ray_util.prepare_config(copy.deepcopy(config)))


def test_ray_accepts_the_cluster_config(config: dict[str, Any]) -> None:
    validate(config)


def _unknown_head_type(c: dict) -> None:
    c["head_node_type"] = "no_such_type"


def _no_provider(c: dict) -> None:
    del c["provider"]


def _misspelt_key(c: dict) -> None:
    c["setup_command"] = c.pop("setup_commands")


def _fractional_gpus(c: dict) -> None:
    c["available_node_types"]["gpu_worker"]["resources"]["GPU"] = 0.5


@pytest.mark.parametrize(
    ("break_it", "error"),
    [
        (_unknown_head_type, ValueError),
        (_no_provider, KeyError),
        (_misspelt_key, jsonschema.ValidationError),
        (_fractional_gpus, jsonschema.ValidationError),
    ],
)
def test_ray_rejects_a_broken_copy(
    config: dict[str, Any], break_it: Callable[[dict], None], error: type[Exception]
) -> None:
    broken = copy.deepcopy(config)
    break_it(broken)
    with pytest.raises(error):
        validate(broken)


def test_every_node_starts_ray_with_token_auth(config: dict[str, Any]) -> None:
    starts = [cmd for key in ("head_start_ray_commands", "worker_start_ray_commands") for cmd in config[key]]
    ray_starts = [cmd for cmd in starts if "ray start" in cmd]
    assert len(ray_starts) == 2
    assert all("RAY_AUTH_MODE=token" in cmd for cmd in ray_starts)
    assert not any("RAY_AUTH_MODE=disabled" in cmd for cmd in starts)
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"


def test_router_starts_on_the_head_after_ray(config: dict[str, Any]) -> None:
    head = config["head_start_ray_commands"]
    (ray_start,) = [i for i, cmd in enumerate(head) if "ray start --head" in cmd]
    (router,) = [i for i, cmd in enumerate(head) if "-m router" in cmd]
    assert router > ray_start
    assert "--ray-address auto" in head[router] and "--port 50051" in head[router]
