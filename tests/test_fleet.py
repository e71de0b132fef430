"""One job over a mixed GPU fleet: a replica shape per card type from the planner, one pool per type drawing from
one stream of batches (flux_worker/fleet_plan.py, fleet_replica.py; pipeline/replica_shape.fleet_pools).

The planner's answers are checked against counts worked out by hand. The driver runs in a process of its own on a
`ray.cluster_utils.Cluster` whose nodes carry two card types (`accelerator_type:<T>` resources, fake GPUs), with
the stand-in renderer at each type's own speed: GPUs cannot be had here, the scheduling and the ledger can.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest

from flux_worker.fleet_plan import described_fleet, fleet_types, memory_table, plan_fleet
from schemas import JobSpec

REPO = Path(__file__).resolve().parents[1]


def test_card_types_come_from_the_nodes_accelerator_type_resources():
    nodes = [{"Alive": True, "Resources": {"GPU": 8.0, "CPU": 64.0, "accelerator_type:H100": 1.0}},
             {"Alive": True, "Resources": {"GPU": 8.0, "accelerator_type:H100": 1.0}},
             {"Alive": True, "Resources": {"GPU": 4.0, "accelerator_type:L4": 1.0}},
             {"Alive": False, "Resources": {"GPU": 4.0, "accelerator_type:L4": 1.0}},  # gone
             {"Alive": True, "Resources": {"GPU": 2.0}},  # GPUs declared by hand: Ray cannot tell the type
             {"Alive": True, "Resources": {"CPU": 16.0}}]  # the head
    fleet = fleet_types(nodes)
    assert {name: (t.gpus, t.per_node) for name, t in fleet.items()} == {
        "GPU": (2, [2]), "H100": (16, [8, 8]), "L4": (4, [4])}
    assert described_fleet("H100:16,L4:10/4")["L4"].per_node == [4, 4, 2]
    assert memory_table("L4=24GB,80GiB") == {"L4": 24 * 10**9, "*": 80 * 2**30}


def test_flux1_dev_on_h100s_and_l4s_gets_one_gpu_on_the_big_cards_and_pairs_on_the_small():
    # By hand: FLUX.1-dev's transformer is 22.2 GiB in bf16; an H100 (80 GB = 74.5 GiB) holds it whole, an L4
    # (24 GB = 22.4 GiB, 21.4 GiB usable) does not, so L4s pair up: 8 nodes of 4 L4s make 8 x 2 = 16 replicas.
    pools = {p.card_type: p for p in plan_fleet("flux.1-dev", described_fleet("H100:16,L4:32/4"))}
    assert (pools["H100"].degree, pools["H100"].replicas) == (1, 16)
    assert (pools["L4"].degree, pools["L4"].replicas) == (2, 16)
    assert pools["H100"].images_per_second > pools["L4"].images_per_second > 0
    # A degree the user gives is taken as given where it fits: quads of L4s, 32 / 4 = 8 replicas.
    (l4,) = plan_fleet("flux.1-dev", described_fleet("H100:16,L4:32/4"), degrees={"L4": 4})
    assert (l4.card_type, l4.degree, l4.replicas) == ("L4", 4, 8)


def test_flux2_dev_is_left_out_of_a_card_type_that_cannot_hold_it_at_any_degree():
    # By hand: FLUX.2 [dev]'s transformer is ~60 GiB in bf16; T4s (16 GB = 14.9 GiB) two to a node hold at most
    # 2 x 14.9 GiB, less than half of it: left out, with the planner's reason. Four L4s to a node hold it at TP-4
    # (2 replicas of 8 cards); an H200 (141 GB) holds it alone.
    pools = {p.card_type: p for p in plan_fleet("flux.2-dev", described_fleet("H200:8,L4:8/4,T4:8/2"))}
    assert (pools["H200"].degree, pools["H200"].replicas) == (1, 8)
    assert (pools["L4"].degree, pools["L4"].replicas) == (4, 2)
    assert pools["T4"].degree is None and pools["T4"].replicas == 0
    assert pools["T4"].note.startswith("left out: the transformer needs ") and "even over 2 GPUs" in pools["T4"].note


def test_a_card_of_unknown_memory_is_named_and_a_number_given_for_it_is_taken():
    fleet = described_fleet("A100:16")
    (auto,) = plan_fleet("flux.1-dev", fleet)
    assert auto.degree is None and "--gpu-memory A100=80GB" in auto.note
    (given,) = plan_fleet("flux.1-dev", fleet, memory=memory_table("A100=80GB"))
    assert (given.degree, given.replicas) == (1, 16)
    (asked,) = plan_fleet("flux.1-dev", fleet, degrees={"A100": 2})
    assert (asked.degree, asked.replicas, asked.note) == (2, 8, "memory not known here: not checked")


def test_plan_prints_a_row_per_card_type_and_exits_1_when_none_holds_the_model(capsys):
    from jobs.cli import main

    assert main(["plan", "--model", "flux.2-dev", "--cards", "H200:8,T4:8/2"]) == 0
    out = capsys.readouterr().out
    assert "| H200 | 8 | 131.3 GiB | 1 | 8 | 1 |" in out and "| T4 | 8 | 14.9 GiB | does not fit | 0 |" in out
    assert main(["plan", "--model", "flux.2-dev", "--cards", "T4:8/2"]) == 1


@pytest.mark.parametrize("typed, expected", [
    ("H100=1,L4=2", {"H100": 1.0, "L4": 2.0}), ("L4=auto", {"L4": "auto"}), ("2", 2.0), ("auto", "auto")])
def test_gpus_per_replica_takes_a_number_auto_or_one_per_card_type(typed, expected):
    job = JobSpec.model_validate({"manifest": "m.parquet", "output": {"uri": "out"}, "gpus_per_replica": typed})
    assert job.gpus_per_replica == expected


@pytest.mark.parametrize("typed, reason", [
    ("L4=0", "L4: 0 GPUs per replica renders on CPU; leave the type out instead"),
    ("L4=2.5", "a tensor-parallel replica takes whole GPUs"),
    ("=2", "write TYPE=N,TYPE=N")])
def test_a_bad_mapping_is_one_line_naming_the_flag(typed, reason, tmp_path, capsys):
    from tests.test_cli import call_cli

    result = call_cli(capsys, "render", "m.parquet", str(tmp_path / "out"), "--gpus-per-replica", typed)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: --gpus-per-replica {typed}: ") and reason in line


FLEET_RUN = textwrap.dedent("""
    import json, os, signal, subprocess, sys, threading, time
    import pyarrow as pa, pyarrow.parquet as pq
    import ray
    from ray.cluster_utils import Cluster
    from pipeline import fleet_stage, render
    from schemas import JobSpec
    from tests.stand_in import stand_in_by_card_type

    folder, model = sys.argv[1], sys.argv[2]
    fleet_stage.WATCH_SECONDS = 1.0  # look for joined card types each second, not each 5
    # Two nodes (the head is one): a node process costs seconds to start on this machine.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 4, "num_gpus": 2,
                                                            "resources": {"accelerator_type:large": 1}})
    small = cluster.add_node(num_cpus=4, num_gpus=4, resources={"accelerator_type:small": 1})

    def manifest(name, rows):
        pq.write_table(pa.table({"id": [f"r{i}" for i in range(rows)], "prompt": [f"a lamp {i}" for i in range(rows)],
                                 "width": [64] * rows, "height": [64] * rows}), f"{folder}/{name}")
        return f"{folder}/{name}"

    def job(gpus, out, rows=48):
        return JobSpec.model_validate({"manifest": manifest(f"{rows}.parquet", rows),
                                       "output": {"uri": f"{folder}/{out}"}, "model": {"name": model},
                                       "gpus_per_replica": gpus, "batch_size": 2, "ray_address": cluster.address})

    def small_node_joins_then_goes():
        # The small type joins the running job (an autoscaled group), renders, and its node is then removed. A node
        # process of its own (`ray start --block`): Cluster.add_node works only from the main thread.
        time.sleep(1)
        node = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "ray"), "start", "--block",
                                 f"--address={cluster.address}", "--num-cpus=4", "--num-gpus=4",
                                 '--resources={"accelerator_type:small": 1}'], start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while not os.path.exists(f"{folder}/marks/small-rendered"):
            time.sleep(0.1)
        os.killpg(node.pid, signal.SIGKILL)  # the node's raylet and its workers, at once: a spot node reclaimed
        print(json.dumps({"removed": time.time()}), flush=True)

    try:
        renderer = stand_in_by_card_type({"large": 0.05, "small": 0.2})
        try:
            render(job({"huge": 1}, "refused"), progress=False, renderer_class=renderer)
        except Exception as error:
            print(json.dumps({"refused": str(error)}))
        summary = render(job({"large": 1, "small": 2, "huge": 1}, "out"), progress=False, renderer_class=renderer)
        print(json.dumps(summary.model_dump(mode="json")))

        cluster.remove_node(small)
        os.makedirs(f"{folder}/marks")
        changes = threading.Thread(target=small_node_joins_then_goes, daemon=True)
        changes.start()
        summary = render(job({"large": 1, "small": 2}, "joined", rows=64), progress=False,
                         # The large members render 5 batches each, then wait for the small type's first.
                         renderer_class=stand_in_by_card_type({"large": 0.1, "small": 0.2}, f"{folder}/marks",
                                                              wait_for=("small", 5)))
        changes.join(timeout=1)
        print(json.dumps(summary.model_dump(mode="json")))

        # `fluxbatch plan --ray-address`: a row per card type of the live cluster (the small node is gone).
        from jobs.cli import main
        ray.shutdown()
        main(["plan", "--model", model, "--ray-address", cluster.address, "--gpu-memory", "large=80GB", "--json"])
    finally:
        ray.shutdown()
        cluster.shutdown()
""")


@pytest.mark.slow
def test_one_job_renders_on_two_card_types_each_with_its_own_shape_every_image_once(tmp_path, tiny_model):
    """Two renders on one two-type cluster: a mapping no type can serve is refused before anything is written; a
    mapping naming both types (and one the cluster lacks) renders each image once, both pools drawing from one
    stream."""
    from tests.helpers import assert_images_match_metadata

    result = subprocess.run([sys.executable, "-c", FLEET_RUN, str(tmp_path), str(tiny_model)], cwd=REPO,
                            capture_output=True, text=True, timeout=300,
                            env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-3000:]
    refused, summary, removed, joined, plan = (json.loads(line) for line in result.stdout.strip().splitlines()[-5:])
    assert refused == {"refused": "gpus_per_replica huge=1.0: no card type of the cluster (large, small) can hold a "
                                  "replica; see `fluxbatch plan --ray-address auto`"}
    assert not (tmp_path / "refused").exists()

    assert ("fluxbatch: gpus_per_replica: card type huge: no node of the cluster has one (large, small); it joins the "
            "run if one joins the cluster") in result.stderr
    assert "fluxbatch: pools: large: 2 x 1 GPU; small: 2 x 2 GPU" in result.stderr
    table = assert_images_match_metadata(str(tmp_path / "out"))  # each image once, with its file
    assert table.num_rows == summary["images_rendered"] == 48
    pools = {pool["card_type"]: pool for pool in summary["pools"]}
    assert {name: (pool["replicas"], pool["gpus_per_replica"]) for name, pool in pools.items()} == {
        "large": (2, 1.0), "small": (2, 2.0)}
    assert pools["large"]["images"] + pools["small"]["images"] == 48
    assert pools["large"]["images"] > pools["small"]["images"] > 0  # the faster pool takes more: no static split
    saved = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [pool["card_type"] for pool in saved["pools"]] == ["large", "small"]
    report = (tmp_path / "out" / "report.html").read_text()
    assert "<h2>pools" in report and f"<td>large</td><td>2</td><td>1</td><td>{pools['large']['images']}</td>" \
        in report.replace("\n", "")

    # A card type whose nodes join the cluster mid-run joins the run and takes from the same queue; when its node
    # is removed mid-batch, its batches go back to the queue: every image once, none failed.
    assert "card type small: no node of the cluster has one (large); it joins the run if one" in result.stderr
    assert "fluxbatch: card type small joined the cluster: 2 x 2 GPU, drawing from the same queue" in result.stderr
    table = assert_images_match_metadata(str(tmp_path / "joined"))
    assert table.num_rows == joined["images_rendered"] == 64 and joined["images_failed"] == 0
    pools = {pool["card_type"]: pool for pool in joined["pools"]}
    assert pools["small"]["images"] > 0 and pools["large"]["images"] + pools["small"]["images"] == 64
    assert removed["removed"] < pd.Timestamp(pools["large"]["last_finished_at"]).timestamp()  # removed mid-run

    # The live cluster planned per card type: the head's 2 "large" GPUs, each a replica of the tiny model (the
    # small node may still be listed, for the seconds Ray takes to call it dead: its memory was not given).
    rows = {row["card_type"]: (row["gpus"], row["degree"], row["replicas"]) for row in plan}
    assert rows["large"] == (2, 1, 2) and rows.get("small", (4, None, 0)) == (4, None, 0)


def test_a_ray_address_where_no_cluster_answers_is_one_line_in_seconds(tmp_path, tiny_model, capsys):
    """A mistyped --ray-address: Ray's own connect waits minutes (3 min 25 s measured for a refused local port),
    then prints a traceback. `plan` and `render` say it in one line, before anything is written."""
    from jobs.cli import main
    from tests.conftest import free_port, write_manifest

    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    assert main(["plan", "--model", "flux.1-dev", "--ray-address", address]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: ray address {address}: no Ray cluster answers there (") and "--ray-address" in line

    manifest = write_manifest(tmp_path / "m.parquet", [{"id": "a", "prompt": "a fox"}])
    # A process of its own: this one holds the session's Ray, which a render would use.
    result = subprocess.run([sys.executable, "-c", "import sys; from jobs.cli import main; sys.exit(main())", "render",
                             str(manifest), str(tmp_path / "out"), "--model", str(tiny_model), "--ray-address",
                             address], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: ray address {address}: no Ray cluster answers")
    assert not (tmp_path / "out").exists()
