from __future__ import annotations

import pytest

from pipeline.cluster_fit import WorkerRequest, alive_nodes, check_request, check_shared_paths, workers_that_fit
from pipeline.errors import ConfigError, StageError


def test_each_worker_must_fit_on_one_node():
    nodes = [{"CPU": 2.0}, {"CPU": 3.0, "GPU": 1.0}]
    assert workers_that_fit(WorkerRequest(4, cpus=1), nodes) == 5
    assert workers_that_fit(WorkerRequest(2, cpus=2), nodes) == 2  # 3 CPUs hold one 2-CPU worker, not 1.5
    assert workers_that_fit(WorkerRequest(2, cpus=4), nodes) == 0  # 5 CPUs in all, but no node has 4
    assert workers_that_fit(WorkerRequest(2, cpus=1, gpus=1), nodes) == 1
    assert workers_that_fit(WorkerRequest(1, cpus=0.5), [{"CPU": 1.0}]) == 2


def test_infeasible_request_on_a_fixed_cluster_is_one_line(ray_local):
    (node,) = alive_nodes()
    cpus = int(node["CPU"])
    check_request(WorkerRequest(cpus, cpus=1), can_grow=False)  # exactly full: fine
    with pytest.raises(ConfigError) as e:
        check_request(WorkerRequest(2, cpus=cpus), can_grow=False)
    assert str(e.value).startswith(f"2 Ray Train workers x ({cpus} CPU) do not fit on this Ray cluster "
                                   f"(1 node(s): {cpus} CPU)")
    assert "\n" not in str(e.value)


def test_infeasible_request_on_a_growable_cluster_warns_then_gives_up(ray_local):
    lines = []
    with pytest.raises(StageError, match=r"waited 1 s; nothing was added"):
        check_request(WorkerRequest(1, cpus=1, gpus=1), can_grow=True, log=lines.append, wait_s=1, poll_s=0.2)
    assert len(lines) == 1 and lines[0].startswith("warning: 1 Ray Train workers x (1 CPU + 1 GPU) do not fit")


def test_local_paths_on_one_node_need_no_declaration(ray_local, tmp_path):
    assert len(alive_nodes()) == 1  # on several nodes the same call raises (tests/test_multinode.py's cluster)
    assert check_shared_paths([("out", str(tmp_path)), ("data", "s3://b/x")], shared_fs=False) is None
