"""Two Ray nodes on one machine (ray.cluster_utils.Cluster): same bits as one node.

The cluster runs in its own process (the test session already holds a local Ray). Workers are
spread over the two nodes (ray.placement=spread); resources.json records where each actor ran.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from small_runs import NO_EVAL, SMALL

from fedsim.runio import load_weights

RUN = [
    *NO_EVAL,
    "train.cohort_batch=2",
    "ray.workers=2",
    "algorithm.name=scaffold",
]

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import ray
    from ray.cluster_utils import Cluster
    from rich.console import Console
    from fedsim.config import load_config
    from fedsim.driver import run

    out, overrides = sys.argv[1], json.loads(sys.argv[2])
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    try:
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        run(load_config(None, overrides), out, console=Console(quiet=True),
            show_progress=False)
    finally:
        ray.shutdown()
        cluster.shutdown()
    """
)


@pytest.mark.slow
def test_two_nodes_give_the_bits_of_one(tmp_path, toy_path, cache_dir, ray_session):
    from rich.console import Console

    from fedsim.config import load_config
    from fedsim.driver import run

    common = [*SMALL, *RUN, f"cache_dir={cache_dir}"]
    one = run(
        load_config(None, common),
        tmp_path / "one-node",
        console=Console(quiet=True),
        show_progress=False,
    )
    two_dir = tmp_path / "two-nodes"
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            SCRIPT,
            str(two_dir),
            json.dumps([*common, "ray.placement=spread"]),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    placed = json.loads((two_dir / "resources.json").read_text())["nodes"]
    # The two workers ran on the two nodes.
    assert placed["worker0"] != placed["worker1"]
    w2 = load_weights(two_dir / "final" / "projector.safetensors")
    assert set(w2) == set(one.weights)
    for k, v in one.weights.items():
        assert torch.equal(v, w2[k]), k
    # One node: both workers share it.
    here = json.loads((Path(one.out_dir) / "resources.json").read_text())["nodes"]
    assert here["worker0"] == here["worker1"]


def test_cluster_files_follow_their_schemas_and_agree_with_the_config():
    import ray
    import yaml

    from fedsim.config import load_config

    root = Path(__file__).resolve().parents[1] / "cluster"
    aws = yaml.safe_load((root / "aws.yaml").read_text())
    assert aws["provider"]["type"] == "aws"
    assert aws["head_node_type"] in aws["available_node_types"]
    gpu = aws["available_node_types"]["gpu"]
    assert gpu["resources"]["GPU"] >= 1 and gpu["resources"]["fedsim_evaluator"] == 1
    assert any("fedsim" in c for c in aws["setup_commands"])
    docs = list(yaml.safe_load_all((root / "kuberay.yaml").read_text()))
    rc = next(d for d in docs if d["kind"] == "RayCluster")
    assert rc["apiVersion"] == "ray.io/v1"
    # The image's Ray must be the driver's: same major.minor as the Ray installed here.
    assert rc["spec"]["rayVersion"].split(".")[:2] == ray.__version__.split(".")[:2]
    group = rc["spec"]["workerGroupSpecs"][0]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] >= 1
    assert json.loads(json.loads(group["rayStartParams"]["resources"])) == {
        "fedsim_evaluator": 1
    }
    claim = next(d for d in docs if d["kind"] == "PersistentVolumeClaim")
    assert "ReadWriteMany" in claim["spec"]["accessModes"]
    # The evaluator placement the files advertise is a valid fedsim config.
    cfg = load_config(
        None, ["ray.evaluator_resources={fedsim_evaluator: 1}", "ray.placement=spread"]
    )
    assert cfg.ray.evaluator_resources == {"fedsim_evaluator": 1}
