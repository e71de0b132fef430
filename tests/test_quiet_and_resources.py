"""Resources no node has are refused at once on a cluster that cannot grow, and said to be pending on one
that may; a run prints its start line (dashboard, metrics endpoint), its progress and its summary, and
nothing from Ray or the libraries under it unless `-v`; its last metric values reach the endpoint before
the local cluster it started stops."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import threading
import time

import pytest

from pipeline.cluster.metrics import scrape
from tests.conftest import write_manifest
from tests.helpers import session_cluster_env
from tests.own_ray import REPO, OwnRay
from tests.test_cli import call_cli

START_LINE = re.compile(r"^fluxbatch: local Ray cluster \(1 node, \d+ CPUs, \d+ GPUs\); "
                        r"dashboard (?P<dashboard>\S+)(?P<token> \(its token: `ray get-auth-token`\))?; "
                        r"metrics (?P<metrics>http://\S+:\d+/metrics)$")
# Progress bar frames (tqdm redraws the line with \r): fluxbatch's own, "render: 50%|..."
PROGRESS = re.compile(r"^render: +\d+%\|")


def tiny_manifest(tmp_path):
    return write_manifest(tmp_path / "m.parquet", [
        {"id": "cat", "prompt": "a red cat", "width": 64, "height": 64, "steps": 2},
        {"id": "dog", "prompt": "a blue dog", "width": 64, "height": 64, "steps": 2},
    ])


# --- a cluster that cannot grow: refused in one line -------------------------------------------------------


@pytest.mark.parametrize("flag, value, named", [
    ("--cpus-per-replica", "64", "asks for 64 CPUs per replica"),  # the session cluster has 4 CPUs
    ("--gpus-per-replica", "8", "asks for 8 GPUs and 8 CPUs per replica"),  # ... and 4 (fake) GPUs
])
def test_more_per_replica_than_the_local_cluster_has_is_refused_at_once_in_one_line(
        flag, value, named, tmp_path, tiny_model, ray_cluster, capsys, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # the session's own cluster, which never grows
    out = tmp_path / "out"
    began = time.monotonic()

    result = call_cli(capsys, "render", str(tiny_manifest(tmp_path)), str(out), "--model", str(tiny_model),
                      flag, value, "--no-progress")

    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()], result.stderr
    assert result.stderr.startswith(f"error: {flag} {named}, but no node has that: the cluster has 4 GPUs and 4 CPUs")
    assert "Traceback" not in result.stderr
    assert time.monotonic() - began < 60
    # Refused before anything was written, so before any renderer actor could start (they start after _job.json).
    assert not out.exists() or not any(out.iterdir())


# Two nodes of 2 (fake) GPUs and 2 CPUs, as `alive_nodes()` reads them from `ray.nodes()`.
TWO_NODES = [{"CPU": 2.0, "GPU": 2.0, "memory": 8e9, "object_store_memory": 2e9, f"node:10.0.0.{i}": 1.0}
             for i in (1, 2)]


def test_a_tensor_parallel_group_larger_than_every_node_is_refused_though_the_cluster_has_enough_gpus():
    """A TP-2 group fits; a TP-4 group would have to span the nodes and is refused, although the cluster holds 4
    GPUs in all. (Groups on a live two-node cluster: tests/test_tensor_parallel.py.)"""
    from pipeline.cluster import resources
    from schemas import JobSpec

    def check(degree: int) -> str:
        job = JobSpec(manifest="m.parquet", output={"uri": "out"}, gpus_per_replica=degree)
        try:
            resources.check_fits(resources.replica_ask(job, float(degree), 4), TWO_NODES, can_grow=False,
                                 named={"gpus_per_replica": "--gpus-per-replica"})
        except resources.ClusterTooSmallError as error:
            return str(error)
        return "fits"

    assert check(2) == "fits"
    assert check(4) == ("--gpus-per-replica asks for 4 GPUs and 4 CPUs per replica, but no node has that: the "
                        "cluster has 2 nodes, each with at most 2 GPUs and 2 CPUs (a replica never spans nodes); "
                        "lower gpus_per_replica, or join a larger cluster with --ray-address")


# --- a cluster that may grow: say what is pending ----------------------------------------------------------


@pytest.mark.slow
def test_a_joined_cluster_is_not_refused_the_run_says_what_it_waits_for_and_names_its_job(
        tmp_path, tiny_model, ray_cluster):
    """Joining the session's cluster (as RAY_ADDRESS does), more CPUs per replica than it has: the run waits
    (an autoscaler could add a node) and says so once; the notice comes after FLUXBATCH_PENDING_NOTICE_SECONDS."""
    env = {**session_cluster_env(ray_cluster), "FLUXBATCH_PENDING_NOTICE_SECONDS": "3"}
    proc = subprocess.Popen([sys.executable, "-m", "jobs.cli", "render", str(tiny_manifest(tmp_path)),
                             str(tmp_path / "out"), "--model", str(tiny_model), "--cpus-per-replica", "64",
                             "--no-progress"], cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    seen = threading.Event()

    def read() -> None:  # on a thread: a readline that blocks must not outlive the deadline
        for line in proc.stderr:
            lines.append(line.rstrip("\n"))
            if "waiting for" in line:
                seen.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        seen.wait(timeout=240)
    finally:
        proc.kill()
        proc.communicate()
    names = [dict(info.config.metadata).get("job_name") for info in
             ray_cluster._private.worker.global_worker.gcs_client.get_all_job_info().values()
             if info.driver_pid == proc.pid]
    assert names == [f"fluxbatch render {tmp_path / 'out'}"]  # the dashboard's Jobs page shows it, not "-"
    waiting = [line for line in lines if "waiting for" in line]
    assert waiting == [
        "WARNING pipeline.cluster.resources: waiting for 64 CPUs per replica x 1 replica; the cluster has 4 GPUs and "
        "4 CPUs; check the autoscaler"], lines


# --- quiet by default, start line, metrics at the end ------------------------------------------------------


class EndpointWatcher:
    """Scrapes a metrics endpoint until it stops answering; keeps the last answer for `job`."""

    def __init__(self, job: str):
        self.job, self.url, self.last = job, None, None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self, url: str) -> None:
        self.url = url
        self.thread.start()

    def _run(self) -> None:
        failures = 0
        while failures < 20:  # the cluster is gone
            try:
                self.last = scrape(self.url, self.job)
                failures = 0
            except OSError:
                failures += 1
            time.sleep(0.2)


def render_on_own_cluster(tmp_path, tiny_model, *extra: str,
                          module: str = "jobs.cli") -> tuple[subprocess.CompletedProcess, EndpointWatcher]:
    """`fluxbatch render` with a local cluster of its own, its stderr a pseudo-terminal as in a user's shell; its
    metrics endpoint watched from its start line on. The result's `gaps`: seconds between what stderr showed,
    from the start of the process to its end."""
    ray = OwnRay()
    out = tmp_path / "out"
    watcher = EndpointWatcher(str(out))
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # 120 columns, as a terminal has
    chunks: list[str] = []
    try:
        # FLUXBATCH_WORKER_LOGS empty: the default (worker output only with -v), whatever OwnRay forces
        began = time.monotonic()
        proc = ray.start(["render", str(tiny_manifest(tmp_path)), str(out), "--model", str(tiny_model), *extra],
                         module=module, stderr=slave, FLUXBATCH_WORKER_LOGS="")
        os.close(slave)
        shown = [began]
        while True:  # stream: the endpoint must be watched while the run is alive
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the process and its children closed the terminal
                break
            if not data:
                break
            shown.append(time.monotonic())
            chunks.append(data.decode(errors="replace"))
            for line in lines_of("".join(chunks)):
                if (found := START_LINE.match(line)) and watcher.url is None:
                    watcher.start(found["metrics"])
        stdout = proc.stdout.read()
        proc.wait(timeout=600)
        shown.append(time.monotonic())
    finally:
        os.close(master)
        ray.cleanup()
    result = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, "".join(chunks).replace("\r\n", "\n"))
    result.gaps = [later - earlier for earlier, later in zip(shown, shown[1:])]
    return result, watcher


@pytest.fixture(scope="module")
def quiet_run(tmp_path_factory, tiny_model):
    return render_on_own_cluster(tmp_path_factory.mktemp("quiet"), tiny_model)


def lines_of(stderr: str) -> list[str]:
    """stderr as lines, tqdm's redraws (\\r) split apart."""
    return [part.strip() for line in stderr.splitlines() for part in line.split("\r") if part.strip()]


@pytest.mark.slow
def test_a_render_prints_its_phases_progress_and_summary_and_nothing_from_ray_or_libraries(quiet_run):
    result, _ = quiet_run
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.args[-3]
    assert result.stdout.strip().splitlines() == [
        f"2 rendered, 0 already done, 0 failed, 0 bad rows; 2/2 images in {out}",
        f"report: {out}/report.html",
        "exit 0: every image the manifest asks for is in OUTPUT"]
    err = lines_of(result.stderr)
    phases = [line.removeprefix("fluxbatch: ") for line in err if line.startswith("fluxbatch: ")]
    still = re.compile(r".* \.\.\.(: .*)? \(\d+ s\)$")  # "starting Ray ... (8 s)": a phase still under way
    assert [p for p in phases if not p.startswith(("local Ray cluster", "actors ready")) and not still.match(p)] == [
        "starting a local Ray cluster ...", "loading the model on 1 actor ...", "rendering",
        "checking the committed images in OUTPUT ...", "writing summary.json and report.html ..."], err
    # Said as the watcher sees each actor come up (polled each second: the tiny model may render before it looks).
    assert all(re.search(r"actors ready [01]/1\b", p) for p in phases if "actors ready" in p), err
    assert any(START_LINE.match(line) for line in err), err
    others = [line for line in err if not line.startswith("fluxbatch: ") and not PROGRESS.match(line)]
    assert not others, others  # no Ray, Ray Data or transformers line
    assert any(PROGRESS.match(line) and "2/2" in line for line in err), err  # the bar reached 100%


@pytest.mark.slow
def test_a_render_in_a_terminal_is_never_silent_for_10_seconds(quiet_run):
    """From the process's start to its end, stderr shows something new at least every 10 s: Ray starting, the
    model loading, the bar, the checks at the end (the tiny model; a big one loads longer, and says so)."""
    result, _ = quiet_run
    assert result.returncode == 0
    assert max(result.gaps) < 10, [round(gap, 1) for gap in result.gaps]


@pytest.mark.slow
def test_the_start_line_names_the_dashboard_and_the_metrics_endpoint(quiet_run):
    result, watcher = quiet_run
    found = next(START_LINE.match(line) for line in lines_of(result.stderr) if START_LINE.match(line))
    assert found and found["dashboard"].startswith("http://"), result.stderr[:500]
    assert found["token"], "the dashboard asks for the token: the start line says where it is"
    assert watcher.url == found["metrics"]
    assert watcher.last is not None, "the printed metrics endpoint never answered"


@pytest.mark.slow
def test_the_last_metric_values_reach_the_endpoint_before_the_local_cluster_stops(quiet_run):
    result, watcher = quiet_run
    assert result.returncode == 0
    assert watcher.last is not None
    assert watcher.last.get("ray_fluxbatch_rows_pending") == 0.0, watcher.last
    assert watcher.last.get("ray_fluxbatch_images_total") == 2.0, watcher.last


@pytest.mark.slow
def test_verbose_shows_what_ray_and_ray_data_print(tmp_path, tiny_model, ray_cluster):
    # What Ray prints depends on neither the model nor whose cluster it is: the stand-in renderer
    # (tests/stand_in_cli.py), on the session's cluster.
    command = [sys.executable, "-m", "tests.stand_in_cli", "render", str(tiny_manifest(tmp_path)),
               str(tmp_path / "out"), "--model", str(tiny_model), "-v"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**session_cluster_env(ray_cluster), "FLUXBATCH_WORKER_LOGS": ""})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Connected to Ray cluster" in result.stderr  # Ray's own logger
    assert "core_worker.cc" in result.stderr  # Ray's C++ core: "constructor arguments in the object store"
    assert "streaming_executor.py" in result.stderr  # Ray Data's "execution finished"


def test_a_cpu_replica_runs_no_more_torch_threads_than_its_machine_has_cores():
    import os

    from flux_worker.cpu_threads import cpu_threads

    cores = len(os.sched_getaffinity(0))
    # The session cluster declares 4 CPUs on this machine: a replica given all 4 runs one thread per core.
    assert cpu_threads(cores + 2) == cores
    assert cpu_threads(1) == 1 and cpu_threads(0) == 1
