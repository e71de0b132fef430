"""cluster.yaml is a valid Ray cluster launcher config, by the schema the installed Ray ships."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import ray
import yaml

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"


def load() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_cluster_yaml_validates_against_rays_cluster_schema():
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(load(), schema)


def test_cluster_yaml_passes_rays_own_launcher_checks():
    # What `ray up` runs: fill in the AWS defaults, then check the schema, the head type and node types.
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(load()))


def test_cluster_has_a_cpu_head_and_the_two_gpu_worker_types():
    config = load()
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    gpus = {name: t["resources"].get("GPU", 0) for name, t in types.items() if name != config["head_node_type"]}
    assert sorted(gpus.values()) == [4, 8]
    for name in gpus:
        assert 0 <= types[name]["min_workers"] <= types[name]["max_workers"] <= config["max_workers"]
    assert config["provider"]["type"] == "aws"
    assert config["docker"]["image"].startswith("rayproject/ray:" + ray.__version__)


def test_cluster_setup_installs_fluxbatch_with_a_pinned_torch():
    commands = " && ".join(load()["setup_commands"])
    assert "torch==" in commands
    assert "pip install --no-cache-dir /home/ray/fluxbatch" in commands
    assert "/home/ray/fluxbatch" in load()["file_mounts"]
