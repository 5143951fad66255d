"""What stages ask the cluster for: a request no node can ever hold is one line naming the stage,
the request and the node types (fast checks, then against a real local Ray)."""

from __future__ import annotations

import pytest

from octoray.cluster.resources import NodeShape, require_feasible, resource_problems
from octoray.config import ConfigError, load_config
from octoray.errors import UserError


def test_node_shape_holds_and_describes() -> None:
    gpu = NodeShape("gpu_a100", {"CPU": 96, "GPU": 8, "node:10.0.0.1": 1, "memory": 1e12}, 4)
    assert gpu.holds({"CPU": 1, "GPU": 1}) and gpu.holds({"GPU": 8}) and not gpu.holds({"GPU": 9})
    assert not gpu.holds({"fake_gpu": 1}) and gpu.holds({"fake_gpu": 0})
    assert gpu.describe() == "gpu_a100 {CPU: 96, GPU: 8} x<=4"


def test_resource_settings_are_checked() -> None:
    assert resource_problems("worker_resources", None) == []
    assert resource_problems("worker_resources", {"fake_gpu": 1, "accelerator_type:A100": 0.001}) == []
    found = resource_problems("resources", {"GPU": 1, "x": -1, "y": "two"})
    assert len(found) == 3 and "own setting" in found[0]


def test_train_and_serve_take_extra_resources() -> None:
    from octoray.serving.app import ServeConfig
    from octoray.training.train_config import TrainConfig

    cfg = load_config(TrainConfig, None, ["worker_resources={fake_gpu: 1}"])
    assert cfg.worker_resources == {"fake_gpu": 1}
    with pytest.raises(ConfigError, match="worker_resources: 'GPU' has its own setting"):
        load_config(TrainConfig, None, ["worker_resources={GPU: 1}"])
    assert load_config(ServeConfig, None, ["model=m", "resources={fake_gpu: 1}"]).resources == {"fake_gpu": 1}


@pytest.mark.ray
def test_request_no_node_holds_is_one_line(ray_local) -> None:
    require_feasible("mine", [{"CPU": 1}] * 2)  # fits the 2-CPU local node: no error
    with pytest.raises(UserError) as err:
        require_feasible("train", [{"CPU": 1, "GPU": 1}] * 2, what="2 workers x {CPU: 1, GPU: 1}")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("train: asks for 2 workers x {CPU: 1, GPU: 1}, and no node type can hold")
    assert "live node {CPU: 2" in message
    with pytest.raises(UserError, match=r"mine: asks for .* \(3 CPU in all\) but the cluster can have at most 2 CPU"):
        require_feasible("mine", [{"CPU": 1}] * 3)


@pytest.mark.ray
def test_capacity_of_a_cluster_without_autoscaler_is_its_live_nodes(ray_local) -> None:
    from octoray.cluster.resources import cluster_capacity, cluster_shapes

    assert cluster_capacity("CPU") == 2
    assert cluster_capacity("GPU") == 0
    assert [s.name for s in cluster_shapes()] == ["live node"]
