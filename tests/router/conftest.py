"""Router tests run against real routers and replicas (see tests/serving.py)."""

from tests.serving import model_dir, offline, ray_cluster, start_module_router, start_router

__all__ = ["model_dir", "offline", "ray_cluster", "start_module_router", "start_router"]
