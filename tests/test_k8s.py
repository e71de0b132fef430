"""Kubernetes: every manifest in deploy/ and every `fluxbatch k8s` output is valid by the pinned schemas.

KubeRay's and prometheus-operator's kinds are checked by our own strict schema of the fields fluxbatch writes
(tests/kuberay_schema.py: each constraint names the KubeRay v1.7.0 / prometheus-operator v0.93.0 CRD field or
validation.go check it mirrors), Kubernetes' built-in kinds, metadata and pod templates by Kubernetes v1.36.0's
strict schemas from the kubernetes-validate package. Unknown fields fail, as with `kubectl apply`'s server-side
field validation. The rules KubeRay checks in code across fields are re-stated in `kuberay_problems`, each with
its source. No Docker, no cluster and no Ray are needed: these tests read files and run the CLI.
"""

from __future__ import annotations

import copy
import functools
import importlib.resources
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from jobs import k8s
from jobs.cli import build_parser, job_from_args
from tests import kuberay_schema

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
CORE_KINDS = {("v1", "ConfigMap"), ("v1", "ServiceAccount"), ("v1", "Secret"), ("batch/v1", "CronJob"),
              ("rbac.authorization.k8s.io/v1", "Role"), ("rbac.authorization.k8s.io/v1", "RoleBinding")}


# -- the schemas ------------------------------------------------------------------------------------------

@functools.cache
def core_definitions() -> dict[str, Any]:
    """Kubernetes v1.36.0's strict definitions, as the kubernetes-validate package ships them (the test extra)."""
    folder = importlib.resources.files("kubernetes_validate") / "kubernetes-json-schema"
    return json.loads((folder / kuberay_schema.KUBERNETES_SCHEMAS / "_definitions.json").read_text())


@functools.cache
def validator(definition: str, overlay: tuple[str, str] | None = None) -> jsonschema.protocols.Validator:
    """One definition of Kubernetes' document with ours added, so ours can $ref Kubernetes' (pod templates);
    `overlay` names a Kubernetes kind whose CORE_OVERLAYS constraints apply too."""
    document = core_definitions()
    schema = {**document, "$defs": {**document["$defs"], **kuberay_schema.DEFINITIONS},
              "$ref": f"#/$defs/{definition}"}
    if overlay is not None:
        schema["allOf"] = [kuberay_schema.CORE_OVERLAYS[overlay]]
    return jsonschema.Draft202012Validator(schema)


def core_definition(api_version: str, kind: str) -> str:
    group, _, version = api_version.rpartition("/")
    for name, schema in core_definitions()["$defs"].items():
        for gvk in schema.get("x-kubernetes-group-version-kind", []):
            if (gvk["group"], gvk["version"], gvk["kind"]) == (group, version, kind):
                return name
    raise AssertionError(f"{api_version} {kind}: not a Kubernetes v1.36 kind")


def schema_problems(document: dict[str, Any]) -> list[str]:
    """Every way `document` breaks its kind's schema: ours for KubeRay's and the PodMonitor, else Kubernetes'."""
    kind, api_version = document.get("kind"), document.get("apiVersion")
    if kind in kuberay_schema.KINDS:  # the apiVersion is checked by the schema (RayCronJob: ray.io/v1 only)
        check = validator(kuberay_schema.KINDS[kind])
    else:
        assert (api_version, kind) in CORE_KINDS, f"{api_version} {kind}: no schema pinned for it"
        overlay = (api_version, kind) if (api_version, kind) in kuberay_schema.CORE_OVERLAYS else None
        check = validator(core_definition(api_version, kind), overlay)
    return [f"{kind} {'.'.join(map(str, error.absolute_path))}: {error.message}"
            for error in check.iter_errors(document)]


# -- KubeRay's rules that a schema cannot express ---------------------------------------------------------

def kuberay_problems(document: dict[str, Any]) -> list[str]:
    """KubeRay v1.7.0's checks in code across fields or parsing a value, ray-operator/controllers/ray/utils/
    validation.go; its single-field checks (name lengths, ranges, containers) are in tests/kuberay_schema.py."""
    kind, spec = document["kind"], document.get("spec", {})
    if kind == "RayCluster":
        return cluster_problems(spec)
    if kind == "RayJob":
        return rayjob_problems(spec)
    if kind == "RayCronJob":
        return cron_problems(spec.get("schedule", ""), spec.get("timeZone")) + [
            f"jobTemplate: {p}" for p in rayjob_problems(spec.get("jobTemplate", {}))]
    if kind == "CronJob":
        return cron_problems(spec.get("schedule", ""), spec.get("timeZone"))
    return []


def rayjob_problems(spec: dict[str, Any]) -> list[str]:
    """ValidateRayJobSpec and validateDeletionConfiguration."""
    problems = []
    selector = spec.get("clusterSelector") or {}
    shutdown, backoff = spec.get("shutdownAfterJobFinishes", False), spec.get("backoffLimit")
    if spec.get("suspend") and not shutdown:
        problems.append("suspend requires shutdownAfterJobFinishes")
    if spec.get("ttlSecondsAfterFinished", 0) > 0 and not shutdown:
        problems.append("ttlSecondsAfterFinished requires shutdownAfterJobFinishes")
    # KubeRay errs when neither is set and silently ignores rayClusterSpec when both are: we refuse both.
    if bool(spec.get("rayClusterSpec")) == bool(selector):
        problems.append("exactly one of rayClusterSpec and clusterSelector")
    if selector:
        if spec.get("suspend"):
            problems.append("clusterSelector cannot be suspended")
        if spec.get("submissionMode") == "SidecarMode":
            problems.append("clusterSelector is not supported in SidecarMode")
        if backoff:
            problems.append("backoffLimit is incompatible with clusterSelector")
    if spec.get("submissionMode") == "InteractiveMode" and backoff:
        problems.append("backoffLimit is incompatible with InteractiveMode")
    if "runtimeEnvYAML" in spec:  # dashboardclient.UnmarshalRuntimeEnvYAML
        try:
            runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
        except yaml.YAMLError:
            runtime_env = None
        if not isinstance(runtime_env, dict):
            problems.append("runtimeEnvYAML must be a YAML mapping")
    if spec.get("rayClusterSpec"):
        problems += cluster_problems(spec["rayClusterSpec"])
    return problems


def cluster_problems(spec: dict[str, Any]) -> list[str]:
    """ValidateRayClusterSpec: replica bounds, token auth's Ray version."""
    problems = []
    for group in spec.get("workerGroupSpecs", []):
        low, high = group.get("minReplicas"), group.get("maxReplicas")
        if low is not None and high is not None and low > high:
            problems.append(f"group {group.get('groupName')}: minReplicas > maxReplicas")
    if (spec.get("authOptions") or {}).get("mode") == "token":
        version = re.match(r"^(\d+)\.(\d+)", str(spec.get("rayVersion", "")))
        if version is None or tuple(map(int, version.groups())) < (2, 52):
            problems.append("authOptions.mode token needs rayVersion 2.52.0 or later")
    return problems


def cron_problems(schedule: str, time_zone: str | None) -> list[str]:
    """ValidateRayCronJobSpec (and Kubernetes' CronJob): robfig/cron ParseStandard, a known time zone. The
    shape (5 fields, no TZ) is in the schema (kuberay_schema.CRON_SCHEDULE)."""
    from zoneinfo import ZoneInfo

    from croniter import croniter

    problems = []
    if not croniter.is_valid(schedule):
        problems.append(f"schedule {schedule!r}: not a cron expression")
    if time_zone is not None:
        try:
            ZoneInfo(time_zone)
        except Exception:  # noqa: BLE001 - any failure means an unknown zone
            problems.append(f"timeZone {time_zone!r} is not a time zone")
    return problems


def all_problems(document: dict[str, Any]) -> list[str]:
    """Schema and KubeRay rules; a ConfigMap carrying a RayJob (the CronJob fallback) has that RayJob checked too."""
    problems = schema_problems(document) + kuberay_problems(document)
    if document["kind"] == "ConfigMap":
        for key, text in document.get("data", {}).items():
            inner = yaml.safe_load(text) if key.endswith(".yaml") else None
            if isinstance(inner, dict) and inner.get("apiVersion") == "ray.io/v1":
                problems += [f"{key}: {p}" for p in all_problems(inner)]
    return problems


# -- what is checked --------------------------------------------------------------------------------------

def deploy_documents() -> list[tuple[str, dict[str, Any]]]:
    documents = []
    for path in sorted(DEPLOY.rglob("*.yaml")):
        if path.parent.name in ("specs", "helm"):  # fluxbatch job specs and Helm values: not Kubernetes objects
            continue
        for index, document in enumerate(yaml.safe_load_all(path.read_text())):
            documents.append((f"{path.relative_to(ROOT)}[{index}]", document))
    return documents


def generate(*words: str, cwd: Path | None = None, monkeypatch: Any = None) -> list[dict[str, Any]]:
    """`fluxbatch k8s WORDS` in-process, its YAML parsed back."""
    if cwd is not None:
        monkeypatch.chdir(cwd)
    args = build_parser().parse_args(["k8s", *words])
    return list(yaml.safe_load_all(k8s.render_yaml(k8s.manifests(args))))


COMMANDS = {
    "render, one GPU a replica": ["render", "s3://in/m.parquet", "s3://out/run", "--model", "flux.1-dev",
                                  "--replicas", "4", "--gpus-per-replica", "1"],
    "render, tensor-parallel pairs": ["render", "s3://in/", "s3://out/run", "--replicas", "3",
                                      "--gpus-per-replica", "2"],
    "render, half a GPU a replica, 4-GPU pods": ["--gpus-per-pod", "4", "render", "s3://in/m.parquet",
                                                 "s3://out/run", "--replicas", "16", "--gpus-per-replica", "0.5"],
    "render on CPU, a selected cluster": ["--cluster", "fluxbatch", "--namespace", "render", "render",
                                          "s3://in/m.parquet", "s3://out/run"],
    "render, scheduled": ["--schedule", "*/30 * * * *", "--env", "AWS_ENDPOINT_URL=http://minio:9000", "render",
                          "s3://in/m.parquet", "s3://out/run", "--steps", "4", "--compile"],
    "render from a model URL, its node cache on the host": [
        "--model-cache-host-path", "/var/cache/fluxbatch/models", "render", "s3://in/m.parquet", "s3://out/run",
        "--model", "s3://models/flux1-dev", "--gpus-per-replica", "1"],
    "catalog run, scheduled in a time zone": ["--schedule", "0 3 * * *", "--time-zone", "Europe/Berlin",
                                              "catalog", "run", "deploy/kuberay/specs/catalog.yaml"],
    "catalog run, CronJob fallback": ["--schedule", "0 3 * * 1-5", "--fallback-cronjob", "--namespace", "shop",
                                      "catalog", "run", "deploy/kuberay/specs/catalog.yaml"],
}


@pytest.mark.parametrize("where, document", deploy_documents(), ids=[where for where, _ in deploy_documents()])
def test_every_manifest_in_deploy_is_valid_by_kuberays_and_kubernetes_schemas_and_kuberays_rules(where, document):
    assert all_problems(document) == [], where


@pytest.mark.parametrize("words", COMMANDS.values(), ids=COMMANDS.keys())
def test_every_k8s_output_is_valid_by_kuberays_and_kubernetes_schemas_and_kuberays_rules(words, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # a model URL is not readable from here
    documents = generate(*words, cwd=ROOT, monkeypatch=monkeypatch)
    assert documents
    for document in documents:
        assert all_problems(document) == [], document["kind"]


def test_the_validation_catches_a_misspelt_field_and_each_kuberay_rule():
    # The checks above could pass by checking nothing: each breakage here must be reported.
    documents = {doc["kind"]: doc for _, doc in deploy_documents()}
    rayjob, cron, raycron, monitor = (documents[kind] for kind in ("RayJob", "CronJob", "RayCronJob", "PodMonitor"))
    selected = {"clusterSelector": {"ray.io/cluster": "fluxbatch"}}

    def broken(change: Any, document: dict[str, Any] = rayjob) -> list[str]:
        document = copy.deepcopy(document)
        change(document)
        return all_problems(document)

    assert broken(lambda d: d["spec"].update(shutdownAfterJobFinish=True))  # typo: unknown field
    assert broken(lambda d: d["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
                  .update(imagePullPolicy=3))
    assert broken(lambda d: d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]
                  .update(tolerationz=[]))  # a pod template is Kubernetes' strict PodSpec
    assert broken(lambda d: d["metadata"].update(labels={"a": 1}))  # ObjectMeta by Kubernetes' schema
    assert broken(lambda d: d["spec"].update(submissionMode="K8SJobMode"))
    assert broken(lambda d: d["spec"].update(shutdownAfterJobFinishes=False, ttlSecondsAfterFinished=0,
                                             suspend=True)) == ["suspend requires shutdownAfterJobFinishes"]
    assert "exactly one of rayClusterSpec and clusterSelector" in broken(lambda d: d["spec"].update(selected))
    assert broken(lambda d: d["spec"].pop("rayClusterSpec")) == ["exactly one of rayClusterSpec and clusterSelector"]
    assert "backoffLimit is incompatible with clusterSelector" in broken(
        lambda d: (d["spec"].pop("rayClusterSpec"), d["spec"].update(selected)))
    assert broken(lambda d: d["metadata"].update(name="x" * 48))
    assert broken(lambda d: d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].update(minReplicas=9))
    assert broken(lambda d: d["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"].update(containers=[]))
    assert broken(lambda d: d["spec"]["jobTemplate"]["spec"]["template"]["spec"].update(restartPolicyy="Never"),
                  cron)  # Kubernetes' strict schema
    assert broken(lambda d: d["spec"].update(schedule="CRON_TZ=UTC 0 3 * * *"), cron)
    assert broken(lambda d: d.update(apiVersion="ray.io/v1alpha1"), raycron)  # RayCronJob is ray.io/v1 only
    assert broken(lambda d: d["spec"].update(schedule="0 3 * *"), raycron)
    assert broken(lambda d: d["spec"].update(schedule="0 3 * * * *"), raycron)
    assert broken(lambda d: d["spec"].update(schedule="0 25 * * *"), raycron)  # five fields, but hour 25
    assert broken(lambda d: d["metadata"].update(name="x" * 37), raycron)
    assert broken(lambda d: d["spec"]["jobTemplate"].update(backoffLimit=-1), raycron)
    assert broken(lambda d: d["spec"]["podMetricsEndpoints"][0].update(honourLabels=True), monitor)
    assert broken(lambda d: d["spec"]["podMetricsEndpoints"][0].update(interval="15 seconds"), monitor)


def test_no_field_that_carries_a_cel_rule_in_kuberays_crds_passes_our_schema():
    # jsonschema cannot run the CRDs' CEL rules (x-kubernetes-validations): our schema admits none of the
    # fields that carry one, so nothing that passes it (every manifest above) can be wrong by such a rule.
    documents = {doc["kind"]: doc for _, doc in deploy_documents()}
    assert set(kuberay_schema.CEL_RULE_FIELDS) == {"RayCluster", "RayJob", "RayCronJob"}
    for kind, paths in kuberay_schema.CEL_RULE_FIELDS.items():
        assert schema_problems(documents[kind]) == []
        for path in paths:  # set the field (and the parents it needs): the first one added must be refused
            document = copy.deepcopy(documents[kind])
            node, added = document, None
            for key in path.split("."):
                added = added or (key if key not in node else None)
                node = node.setdefault(key, {})
            problems = schema_problems(document)
            assert any(f"'{added}' was unexpected" in problem for problem in problems), (kind, path, problems)


def test_generated_manifests_in_deploy_equal_what_fluxbatch_k8s_prints_today(monkeypatch):
    generated = [path for path in sorted(DEPLOY.rglob("*.yaml"))
                 if "# generated by: fluxbatch k8s " in path.read_text()]
    assert {path.name for path in generated} == {"rayjob-render.yaml", "raycronjob-catalog.yaml",
                                                 "cronjob-fallback.yaml"}
    monkeypatch.chdir(DEPLOY / "kuberay")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # rayjob-render's model URL: not readable here
    for path in generated:
        text = path.read_text()
        command = re.search(r"^# generated by: fluxbatch k8s (.*)$", text, re.M).group(1)
        args = build_parser().parse_args(["k8s", *shlex.split(command)])
        body = text[text.index("\n", text.index("# generated by:")) + 1:]
        assert body == k8s.render_yaml(k8s.manifests(args)), f"{path.name}: regenerate it with the command in it"


# -- fluxbatch k8s ----------------------------------------------------------------------------------------

def test_k8s_entrypoint_is_the_local_command_and_loads_the_same_job(monkeypatch):
    words = COMMANDS["render, one GPU a replica"]
    (rayjob,) = generate(*words)
    entry = shlex.split(rayjob["spec"]["entrypoint"])
    assert entry == ["fluxbatch", *words, "--no-progress"]
    local, remote = (job_from_args(build_parser().parse_args(w)) for w in (words, entry[1:]))
    assert remote.model_dump() == local.model_dump()


def test_k8s_spec_file_travels_in_a_configmap_mounted_on_the_head(monkeypatch):
    config_map, rayjob = generate("catalog", "run", "deploy/kuberay/specs/catalog.yaml", cwd=ROOT,
                                  monkeypatch=monkeypatch)
    assert config_map["data"]["catalog.yaml"] == (DEPLOY / "kuberay/specs/catalog.yaml").read_text()
    assert rayjob["spec"]["entrypoint"] == f"fluxbatch catalog run {k8s.SPEC_MOUNT}/catalog.yaml --no-progress"
    head = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    assert {"name": "spec", "configMap": {"name": config_map["metadata"]["name"]}} in head["volumes"]
    assert {"name": "spec", "mountPath": k8s.SPEC_MOUNT, "readOnly": True} in head["containers"][0]["volumeMounts"]


def test_k8s_sizes_worker_pods_so_a_tensor_parallel_group_is_never_split():
    (rayjob,) = generate(*COMMANDS["render, tensor-parallel pairs"])
    (group,) = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 3
    assert group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "2"
    shm = {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "16Gi"}}  # NCCL's shared memory
    assert shm in group["template"]["spec"]["volumes"]
    (rayjob,) = generate(*COMMANDS["render, half a GPU a replica, 4-GPU pods"])
    assert rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] == 2  # 16 x 0.5 GPU in 4-GPU pods


def test_k8s_mounts_the_model_cache_of_the_node_on_gpu_pods_only(monkeypatch, capsys):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens: the model cannot be read here
    (rayjob,) = generate(*COMMANDS["render from a model URL, its node cache on the host"])
    assert "note: model s3://models/flux1-dev could not be read from here" in capsys.readouterr().err
    cluster = rayjob["spec"]["rayClusterSpec"]
    (worker,) = [group["template"]["spec"] for group in cluster["workerGroupSpecs"]]
    assert {"name": "model-cache", "hostPath": {"path": "/var/cache/fluxbatch/models", "type": "DirectoryOrCreate"}
            } in worker["volumes"]
    (container,) = worker["containers"]
    assert {"name": "model-cache", "mountPath": k8s.MODEL_CACHE_MOUNT} in container["volumeMounts"]
    assert {"name": "FLUXBATCH_MODEL_CACHE", "value": k8s.MODEL_CACHE_MOUNT} in container["env"]
    head = cluster["headGroupSpec"]["template"]["spec"]
    assert all(volume["name"] != "model-cache" for volume in head["volumes"])


def run_cli(*words: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs.cli", "k8s", *words], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("words, expected", [
    (["render", "s3://in/m.parquet", "s3://out", "--schedule", "0 3 * * *"], "put it before 'render'"),
    (["--schedule", "0 3 * *", "render", "s3://in/m.parquet", "s3://out"], "5-field cron expression"),
    (["--name", "Render_1", "render", "s3://in/m.parquet", "s3://out"], "at most 47 characters"),
    (["render", "s3://in/m.parquet", "out", "--gpus-per-replica", "1"], "'out' is a path on this machine"),
    (["render", "s3://in/m.parquet", "s3://out", "--gpus-per-replica", "auto"], "fluxbatch plan"),
    (["render", "s3://in/m.parquet", "s3://out", "--storage-option", "secret=hunter2"], "is a credential"),
    (["--env", "AWS_SECRET_ACCESS_KEY=hunter2", "render", "s3://in/m.parquet", "s3://out"], "is a credential"),
    (["--gpus-per-pod", "3", "render", "s3://in/m.parquet", "s3://out", "--gpus-per-replica", "2"], "multiple of 2"),
    (["validate", "s3://in/m.parquet"], "expected a command to run"),
    (["render", "s3://in/m.parquet", "s3://out", "--replicas", "0"], "--replicas"),
])
def test_k8s_mistakes_are_one_line_with_exit_2_and_print_no_manifest(words, expected, capsys):
    from jobs.cli import main

    try:  # in-process: the same `main` as the console script, without an interpreter start per case
        code = main(["k8s", *words])
    except SystemExit as exit:  # argparse's own usage errors
        code = exit.code
    out, err = capsys.readouterr()
    assert code == 2, err
    assert out == ""
    assert len(err.strip().splitlines()) == 1 and expected in err, err


def k8s_line(capsys, *words: str) -> tuple[int, str, str]:
    """`fluxbatch k8s WORDS` in-process: (exit status, stdout, stderr)."""
    from jobs.cli import main

    capsys.readouterr()
    try:
        code = main(["k8s", *words])
    except SystemExit as exit:
        code = exit.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    """An empty hub cache of our own, HF_HUB_OFFLINE set: no test may reach the network."""
    for name in list(__import__("os").environ):
        if name.startswith(("HF_", "HUGGINGFACE_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the variable once, when first imported: a process that imported it here would stay
    # offline for the tests after this one (and one that imported it before would never be).
    monkeypatch.setattr(__import__("huggingface_hub.constants").constants, "HF_HUB_OFFLINE", True)


RENDER = ["render", "s3://a/", "s3://b/run"]


@pytest.mark.parametrize("words", [
    [*RENDER, "--model", "flux.1-schnel"],
    [*RENDER, "--width", "1000"],
    [*RENDER, "--model", "flux.1-dev", "--height", "4096"],
    [*RENDER, "--model", "flux.2-klein-4b", "--guidance", "3.5"],
    ["render", "s3://a/**.parquet", "s3://b/run"],
    ["render", "s3://a/", "s4://b/run"],
    [*RENDER, "--storage-option", "endpont_url=http://minio:9000"],
], ids=["mistyped preset", "width not a multiple of 16", "height over the model's", "guidance for klein",
        "glob fsspec cannot read", "unknown protocol", "unknown s3 option"])
@pytest.mark.usefixtures("offline_hub")
def test_k8s_refuses_what_a_local_render_refuses_before_the_cluster_with_the_same_line(words, capsys, monkeypatch):
    import pipeline.run

    monkeypatch.setattr(pipeline.run, "_ensure_ray", lambda *_: pytest.fail("the local render started Ray"))
    code, out, err = k8s_line(capsys, "--image", "X", *words)
    assert (code, out) == (2, ""), err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err, err
    local = call_local(capsys, *words)
    assert (local.returncode, local.stderr) == (2, err)


def call_local(capsys, *words: str) -> subprocess.CompletedProcess:
    from tests.test_cli import call_cli

    return call_cli(capsys, *words, "--no-progress")


@pytest.mark.usefixtures("offline_hub")
def test_k8s_asks_neither_the_clusters_storage_nor_the_hub_and_notes_a_model_it_cannot_confirm_here(capsys,
                                                                                                  monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nobody listens: any storage request would fail
    code, out, err = k8s_line(capsys, "render", "s3://no-bucket-here/m.parquet", "s3://b/run", "--model",
                              "acme/flux-finetune")
    assert code == 0, err
    assert "kind: RayJob" in out and "--model acme/flux-finetune" in out
    assert err.strip() == ("note: model 'acme/flux-finetune' is not in the local Hugging Face cache and "
                           "HF_HUB_OFFLINE is set, so it is not checked here; the cluster's pods download it when the "
                           "job starts")
    code, out, err = k8s_line(capsys, "render", "s3://a/", "s3://b/run", "--model", "/models/flux-finetune")
    assert code == 0, err
    assert err.strip() == ("note: model '/models/flux-finetune' is not a folder on this machine; the cluster's pods "
                           "must mount it there")
    code, out, err = k8s_line(capsys, *RENDER, "--model", "flux.1-dev")  # a preset: nothing to note
    assert (code, err) == (0, "")


@pytest.fixture
def hub_without_the_model(monkeypatch, tmp_path):
    """A hub on loopback that has no model at all (404 RepoNotFound, as huggingface.co answers), an empty cache."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class NoSuchModel(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            self.send_response(404)
            self.send_header("X-Error-Code", "RepoNotFound")
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"error": "Repository not found"}')

        def log_message(self, *_: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), NoSuchModel)
    thread = __import__("threading").Thread(target=server.serve_forever, daemon=True)
    thread.start()
    for name in list(__import__("os").environ):
        if name.startswith(("HF_", "HUGGINGFACE_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setattr(__import__("huggingface_hub.constants").constants, "HF_HUB_OFFLINE", False)  # see offline_hub
    yield
    server.shutdown()
    server.server_close()


@pytest.mark.usefixtures("hub_without_the_model")
def test_k8s_refuses_a_hub_id_the_hub_says_it_lacks_with_the_local_renders_did_you_mean(capsys, monkeypatch):
    import pipeline.run

    monkeypatch.setattr(pipeline.run, "_ensure_ray", lambda *_: pytest.fail("the local render started Ray"))
    words = [*RENDER, "--model", "black-forest-labs/FLUX.1-dvv"]
    code, out, err = k8s_line(capsys, *words)
    assert (code, out) == (2, ""), err
    assert "has no such model" in err and err.strip().endswith("did you mean 'black-forest-labs/FLUX.1-dev'?")
    assert call_local(capsys, *words).stderr == err


@pytest.mark.parametrize(("change", "expected"), [
    ("model: {name: flux.1-dvv}", "error: model 'flux.1-dvv' is not a preset"),
    ("defaults: {width: 1000}", "error: {spec}: defaults.width: width must be a multiple of 16, got 1000"),
    ("defaults: {width: 4096}", "error: {spec}: defaults.width: width must be between 256 and 2048 for this model, "
                                "got 4096"),
    ("output: s4://shop-assets/catalog", "error: {spec}: output.uri: unknown protocol 's4' (did you mean s3://?), "
                                         "got 's4://shop-assets/catalog'"),
])
@pytest.mark.usefixtures("offline_hub")
def test_k8s_catalog_spec_is_checked_as_the_local_pre_flight_checks_it(change, expected, tmp_path, capsys):
    spec = tmp_path / "catalog.yaml"
    spec.write_text((DEPLOY / "kuberay" / "specs" / "catalog.yaml").read_text() + change + "\n")
    code, out, err = k8s_line(capsys, "catalog", "run", str(spec))
    assert (code, out) == (2, ""), err
    assert err.startswith(expected.format(spec=spec)) and len(err.strip().splitlines()) == 1, err


def test_k8s_output_holds_no_credential_from_the_environment_and_secrets_only_by_reference(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret-value-123")
    monkeypatch.setenv("HF_TOKEN", "hf_env_token_456")
    result = run_cli(*COMMANDS["render, scheduled"])
    assert result.returncode == 0, result.stderr
    assert "env-secret-value-123" not in result.stdout and "hf_env_token_456" not in result.stdout
    assert "kind: Secret" not in result.stdout
    assert result.stdout.count("secretRef:") == 4  # AWS and HF, on the head and the workers


# -- deploy/: secrets, metrics, the image ---------------------------------------------------------------

CREDENTIAL = re.compile(r"SECRET|TOKEN|PASSWORD|ACCESS_KEY", re.I)


def test_no_manifest_in_deploy_carries_a_credential_inline():
    for where, document in deploy_documents():
        assert document["kind"] != "Secret", where
        for match in re.finditer(r"'name': '([^']*)', 'value'", str(document)):
            assert not CREDENTIAL.search(match.group(1)), (where, match.group(1))


def test_podmonitor_scrapes_the_metrics_port_of_every_fluxbatch_ray_pod_and_keeps_the_dashboards_job_label():
    (monitor,) = [d for _, d in deploy_documents() if d["kind"] == "PodMonitor"]
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["honorLabels"] is True  # the dashboard selects on fluxbatch's own `job` label
    dashboard = (ROOT / "dashboards" / "fluxbatch.json").read_text()
    assert 'job=~\\"$job\\"' in dashboard
    selector = monitor["spec"]["selector"]["matchLabels"]
    pods = [d for _, d in deploy_documents() if d["kind"] == "RayCluster"] + [
        generate(*COMMANDS["render, one GPU a replica"])[0]]
    for document in pods:
        spec = document["spec"].get("rayClusterSpec", document["spec"])
        for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
            labels = {**group["template"]["metadata"]["labels"], "ray.io/is-ray-node": "yes"}  # KubeRay adds the last
            assert selector.items() <= labels.items()
            ports = {p["name"] for p in group["template"]["spec"]["containers"][0]["ports"]}
            assert endpoint["port"] in ports


def pyproject() -> dict[str, Any]:
    """The pins these tests compare (read by pattern: tomllib is Python 3.11+, fluxbatch supports 3.10)."""
    text = (ROOT / "pyproject.toml").read_text()
    return {"version": re.search(r'^version = "([^"]+)"$', text, re.M).group(1),
            "ray": re.search(r'"ray\[[^\]]*\]==([^"]+)"', text).group(1),
            "packages": re.findall(r'"(\w+)"', re.search(r"^packages = \[(.*)\]$", text, re.M).group(1))}


def dockerfile_args() -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", (DEPLOY / "Dockerfile").read_text(), re.M))


def test_dockerfile_pins_agree_with_pyproject_the_makefile_cluster_yaml_and_fluxbatch_k8s():
    project = pyproject()
    ray_pin = project["ray"]
    makefile = (ROOT / "Makefile").read_text()
    torch_pin = re.search(r"^TORCH_SPEC \?= torch==(\S+)$", makefile, re.M).group(1)
    args = dockerfile_args()
    assert args["RAY_VERSION"] == ray_pin == k8s.RAY_VERSION
    assert args["TORCH_VERSION"] == torch_pin
    assert f"torch=={torch_pin}" in (ROOT / "cluster.yaml").read_text()
    assert "cu128" in args["TORCH_INDEX_GPU"] and "cu128" in (ROOT / "cluster.yaml").read_text()
    assert project["version"] == k8s.FLUXBATCH_VERSION
    assert "FROM rayproject/ray:${RAY_VERSION}-py311-${VARIANT}" in (DEPLOY / "Dockerfile").read_text()
    dry_run = subprocess.run(["make", "-n", "image"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert f"--build-arg RAY_VERSION={ray_pin}" in dry_run and f"--build-arg TORCH_VERSION={torch_pin}" in dry_run
    assert f"-t fluxbatch:{project['version']}-$variant" in dry_run
    assert k8s.GPU_IMAGE == f"fluxbatch:{project['version']}-gpu" and k8s.CPU_IMAGE.endswith("-cpu")


def test_dockerfile_installs_fluxbatch_non_editable_as_non_root_with_caches_as_volumes_and_no_credentials():
    text = (DEPLOY / "Dockerfile").read_text()
    packages = pyproject()["packages"]
    assert packages == ["schemas", "pipeline", "flux_worker", "jobs"]
    for package in packages:
        assert f"COPY --chown=1000:100 {package} /tmp/fluxbatch/{package}" in text
    assert not re.search(r"^COPY \S*\s*\.\s", text, re.M)  # never the whole checkout (.venv, outputs, models)
    assert 'pip install --no-cache-dir "/tmp/fluxbatch${extra}"' in text and " -e " not in text
    assert re.findall(r"^USER (\S+)$", text, re.M)[-1] == f"{k8s.RAY_UID}:{k8s.RAY_GID}"
    assert 'VOLUME ["/home/ray/cache/huggingface", "/home/ray/cache/fluxbatch"]' in text
    assert "HF_HOME=/home/ray/cache/huggingface" in text and k8s.CACHE_ROOT == "/home/ray/cache"
    for line in re.findall(r"^(?:ENV|ARG)\b.*$", text, re.M):
        assert not CREDENTIAL.search(line) and "HF_TOKEN" not in line, line


def test_operator_values_turn_the_raycronjob_gate_on_and_keep_the_charts_other_gates():
    values = yaml.safe_load((DEPLOY / "kuberay" / "helm" / "kuberay-operator-values.yaml").read_text())
    gates = {gate["name"]: gate["enabled"] for gate in values["featureGates"]}
    assert gates["RayCronJob"] is True
    assert gates["RayJobDeletionPolicy"] and gates["RayClusterStatusConditions"]  # as chart v1.7.0 sets them


def test_make_image_without_docker_says_so_and_builds_nothing(tmp_path):
    fake = tmp_path / "docker"  # a docker client whose daemon is not there, as on this machine
    fake.write_text("#!/bin/sh\necho \"$@\" >> \"$(dirname \"$0\")/calls\"\nexit 1\n")
    fake.chmod(0o755)
    result = subprocess.run(["make", "image"], cwd=ROOT, capture_output=True, text=True,
                            env={"PATH": f"{tmp_path}:/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert "no image was built" in result.stdout
    assert (tmp_path / "calls").read_text().split() == ["info"]  # asked, built nothing
