"""The replicas' resource plan against fake clusters: whole GPUs while they suffice, shares of one after."""

from __future__ import annotations

import pytest

from worker.resources import GPU_MEMORY_SHARED, plan_replicas


@pytest.mark.parametrize("num_gpus", [1, 2, 8])
def test_replicas_that_fit_get_whole_gpus(num_gpus: int) -> None:
    plan = plan_replicas(num_gpus, 1, True, {"GPU": num_gpus, "CPU": 64})
    assert (plan.num_gpus, plan.num_cpus, plan.gpu_memory_utilization) == (1.0, 1.0, None)  # the engine's default


@pytest.mark.parametrize(("num_gpus", "num_replicas", "per_gpu"), [(1, 4, 4), (2, 4, 2), (2, 3, 2), (8, 9, 2),
                                                                   (8, 64, 8)])
def test_more_replicas_than_gpus_share_them_evenly(num_gpus: int, num_replicas: int, per_gpu: int) -> None:
    plan = plan_replicas(num_replicas, 1, True, {"GPU": num_gpus, "CPU": 64})
    assert plan.num_gpus * per_gpu <= 1.0 < plan.num_gpus * (per_gpu + 1)  # per_gpu of them fit on a GPU
    assert per_gpu * num_gpus >= num_replicas  # and all of them on the cluster
    assert plan.gpu_memory_utilization == pytest.approx(GPU_MEMORY_SHARED / per_gpu, abs=1e-4)
    assert f"{per_gpu} to a GPU" in plan.summary


def test_the_issue_example_four_replicas_on_one_gpu() -> None:
    plan = plan_replicas(4, 1, True, {"GPU": 1.0, "CPU": 16.0})
    assert plan.ray_resources == {"CPU": 0.25, "GPU": 0.25}
    assert plan.summary == "4 replicas on 1 GPU, 4 to a GPU, 0.225 of its memory each"


def test_a_given_memory_share_is_per_replica_and_must_fit() -> None:
    assert plan_replicas(4, 1, True, {"GPU": 1}, gpu_memory_utilization=0.2).gpu_memory_utilization == 0.2
    with pytest.raises(ValueError, match=r"gpu_memory_utilization=0.3 is per replica, and 4 replicas share"):
        plan_replicas(4, 1, True, {"GPU": 1}, gpu_memory_utilization=0.3)
    assert plan_replicas(1, 1, True, {"GPU": 1}, gpu_memory_utilization=0.5).gpu_memory_utilization == 0.5


@pytest.mark.parametrize("num_gpus", [1, 2, 8])
def test_tensor_parallel_replicas_keep_whole_gpus_or_are_refused(num_gpus: int) -> None:
    if num_gpus >= 4:
        assert plan_replicas(2, 2, True, {"GPU": num_gpus}).num_gpus == 2.0
    else:
        with pytest.raises(ValueError, match=rf"2 replicas with tensor_parallel_size=2 need 4 whole GPUs, and the "
                                             rf"Ray cluster has {num_gpus} GPU"):
            plan_replicas(2, 2, True, {"GPU": num_gpus})


def test_gpu_replicas_on_a_cluster_without_gpus_are_refused() -> None:
    with pytest.raises(ValueError, match="need at least one GPU, and the Ray cluster has 0 GPUs"):
        plan_replicas(1, 1, True, {"CPU": 8})


@pytest.mark.parametrize(("num_cpus", "num_replicas", "share"), [(16, 4, 1.0), (2, 4, 0.5), (2, 3, 0.6666),
                                                                  (1, 8, 0.125)])
def test_cpu_replicas_share_the_cpus_when_there_are_more_of_them(num_cpus: int, num_replicas: int,
                                                                 share: float) -> None:
    plan = plan_replicas(num_replicas, 1, False, {"CPU": num_cpus, "GPU": 8})
    assert plan.ray_resources == {"CPU": share}
    assert share * num_replicas <= num_cpus


def test_no_cpu_is_refused() -> None:
    with pytest.raises(ValueError, match="no CPU"):
        plan_replicas(1, 1, False, {})
