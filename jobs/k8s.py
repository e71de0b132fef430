"""`fluxbatch k8s [OPTIONS] COMMAND ... > job.yaml`: the KubeRay RayJob (or RayCronJob) that runs COMMAND.

COMMAND is a fluxbatch command as you ran it locally (`render MANIFEST OUTPUT --model ...`, `catalog run
SPEC.yaml`, `synthesize SPEC.yaml`). It is parsed by the same parser (jobs/cli.py) and its job loaded by the
same loaders as the local command, so a mistake is refused here, in one line, before anything reaches a
cluster; then it becomes the RayJob's entrypoint word for word. Two changes only: `--no-progress` is added
(a progress bar in a log is noise), and a spec file (`--job FILE`, SPEC) is shipped in a ConfigMap printed
before the RayJob and mounted on the head, where KubeRay runs the entrypoint, so its path there replaces the
local one. The RayJob brings up its own Ray cluster sized from the job (replicas, GPUs per replica) and
deletes it when the job ends; `--cluster NAME` submits to a running RayCluster instead.

Credentials never enter the output: the pods read AWS and Hugging Face credentials from Kubernetes Secrets
by reference (`envFrom`, optional, so a cluster with IAM roles for service accounts needs none), and a
command or spec file that carries credentials is refused. Pins here (Ray, image names) are checked against
pyproject.toml and the Makefile by tests/test_k8s.py; docs/kubernetes.md walks through the whole path.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import re
import shlex
import sys
from pathlib import PurePosixPath
from typing import Any

import yaml

from jobs.errors import UsageError

RAY_VERSION = "2.60.0"  # = pyproject's ray pin and the image's base (tests/test_k8s.py)
FLUXBATCH_VERSION = "0.1.0"  # = pyproject's version: the tag `make image` gives
GPU_IMAGE = f"fluxbatch:{FLUXBATCH_VERSION}-gpu"
CPU_IMAGE = f"fluxbatch:{FLUXBATCH_VERSION}-cpu"
RAY_UID, RAY_GID = 1000, 100  # the `ray` user of Ray's images (deploy/Dockerfile runs as it)
SPEC_MOUNT = "/home/ray/fluxbatch-specs"
CACHE_ROOT = "/home/ray/cache"  # deploy/Dockerfile: HF_HOME and the compile caches live under it
MODEL_CACHE_MOUNT = "/home/ray/model-cache"  # --model-cache-host-path: where GPU pods see the node's model cache
# KubeRay v1.7.0, ray-operator/controllers/ray/utils/constant.go: a RayJob's name leaves room for the cluster's
# suffix, a RayCronJob's for the RayJob's.
MAX_RAYJOB_NAME, MAX_RAYCRONJOB_NAME = 47, 36
COMMANDS = {("render",): "render", ("catalog", "run"): "catalog", ("synthesize",): "synthesize"}
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


class K8sError(UsageError):
    """A `fluxbatch k8s` command that cannot become a RayJob: it names what to change."""


# The options of `fluxbatch k8s` itself, before COMMAND (a misplaced one after it is named in the error).
OPTIONS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("--name", dict(help="the RayJob's (RayCronJob's) name (default: fluxbatch-<command>-<hash>)")),
    ("--namespace", dict(help="namespace to put it in (default: kubectl's current one)")),
    ("--schedule", dict(metavar="CRON", help="a RayCronJob on this cron expression (KubeRay's "
                         "alpha RayCronJob feature gate must be on)")),
    ("--fallback-cronjob", dict(action="store_true", help="with --schedule: a plain Kubernetes CronJob that "
                                "creates the RayJob, for clusters without the RayCronJob feature gate")),
    ("--time-zone", dict(help="time zone of --schedule, e.g. Europe/Berlin (default: the operator's)")),
    ("--cluster", dict(metavar="RAYCLUSTER", help="run on this running RayCluster (clusterSelector) "
                         "instead of a cluster of the job's own")),
    ("--image", dict(default=GPU_IMAGE, help=f"GPU workers' image (default {GPU_IMAGE}, `make image`)")),
    ("--head-image", dict(default=CPU_IMAGE, help=f"head and CPU workers' image (default {CPU_IMAGE})")),
    ("--gpus-per-pod", dict(type=int, help="GPUs of one worker pod (default: one replica's)")),
    ("--worker-cpu", dict(help="CPU of one worker pod (default: 8 per GPU, 4 for a CPU worker)")),
    ("--worker-memory", dict(help="memory of one worker pod (default: 64Gi per GPU, 16Gi for CPU)")),
    ("--aws-secret", dict(default="fluxbatch-aws", help="Secret whose keys become AWS_* variables")),
    ("--hf-secret", dict(default="fluxbatch-hf", help="Secret holding HF_TOKEN")),
    ("--model-cache-host-path", dict(metavar="PATH", help="a folder on each GPU node (writable by uid 1000) that "
                                     "keeps a model URL's files across pods and runs; default: the pod's own cache "
                                     "volume, fetched again by each new pod")),
    ("--env", dict(action="append", default=[], metavar="NAME=VALUE",
                         help="a variable for the job (e.g. AWS_ENDPOINT_URL=http://minio:9000; repeatable); "
                         "never a credential")),
    ("--ttl-seconds", dict(type=int, default=600,
                         help="keep the finished job's cluster this long before deleting it (default 600)")),
    ("--deadline-seconds", dict(type=int, default=86400,
                         help="stop the job after this long (activeDeadlineSeconds; default 86400)")),
    ("--backoff-limit", dict(type=int, default=2,
                         help="retries on a new cluster after a failed run; each resumes from the ledger (default 2)")),
)


def add_parsers(sub: Any) -> None:
    """Add `k8s` to the `fluxbatch` subcommands."""
    k8s = sub.add_parser(
        "k8s", help="print the KubeRay RayJob (or RayCronJob with --schedule) that runs a fluxbatch command",
        description="Print the KubeRay RayJob that runs COMMAND (render, catalog run or synthesize, with the "
        "same arguments as locally) on its own Ray cluster; with --schedule, a RayCronJob. Options of k8s come "
        "before COMMAND. See docs/kubernetes.md.",
        usage="fluxbatch k8s [OPTIONS] {render,catalog run,synthesize} ARGS ...")
    for flag, options in OPTIONS:
        k8s.add_argument(flag, **options)
    k8s.add_argument("words", nargs=argparse.REMAINDER, metavar="COMMAND ...",
                         help="the fluxbatch command, as run locally")


def run_command(args: argparse.Namespace) -> int:
    """Print the manifests of `fluxbatch k8s ...` to stdout."""
    sys.stdout.write(render_yaml(manifests(args)))
    return 0


class _Dumper(yaml.SafeDumper):
    """Text of several lines (a spec file, runtimeEnvYAML) as a `|` block, readable as it was written."""


def _text(dumper: yaml.SafeDumper, text: str) -> Any:
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style="|" if "\n" in text else None)


_Dumper.add_representer(str, _text)


def render_yaml(documents: list[dict[str, Any]]) -> str:
    """The documents as one YAML stream, in the order given (a ConfigMap before the RayJob that mounts it)."""
    return yaml.dump_all(documents, Dumper=_Dumper, sort_keys=False, width=10_000)  # no folded command lines


def manifests(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The ConfigMap (if the command reads a spec file) and the RayJob or RayCronJob for `args`."""
    words = list(args.words)
    command, job, spec_file = _parse_local_command(words)
    name = args.name or _default_name(command, words)
    # A scheduled job's RayJobs are named after it with a suffix: KubeRay's RayCronJob limit holds for both ways.
    max_length = MAX_RAYCRONJOB_NAME if args.schedule else MAX_RAYJOB_NAME
    if len(name) > max_length or not DNS1035.match(name):
        kind = "RayCronJob" if args.schedule else "RayJob"
        raise K8sError(f"--name {name!r}: a {kind} name must be lower-case letters, digits and '-', start with a "
                       f"letter and have at most {max_length} characters (KubeRay's limit)")
    documents: list[dict[str, Any]] = []
    if spec_file is not None:
        if args.cluster:
            raise K8sError(f"--cluster: the spec file {spec_file} cannot be mounted on a running cluster; run "
                           "without --cluster (the job brings its own cluster) or use `fluxbatch submit` there")
        key = _config_key(spec_file)
        documents.append(_config_map(f"{name}-spec", args.namespace, key, _read(spec_file)))
        words = _replace_spec_path(words, spec_file, f"{SPEC_MOUNT}/{key}")
    if "--no-progress" not in words:
        words.append("--no-progress")
    spec = _rayjob_spec(args, shlex.join(["fluxbatch", *words]), job, f"{name}-spec" if spec_file else None)
    metadata = _metadata(name, args.namespace, command)
    if args.fallback_cronjob and not args.schedule:
        raise K8sError("--fallback-cronjob: give the --schedule it runs on")
    if args.fallback_cronjob:
        cron = _cron_spec(args, spec)  # checks --schedule and --time-zone as for a RayCronJob
        rayjob = {"apiVersion": "ray.io/v1", "kind": "RayJob",
                  "metadata": {**metadata, "name": None, "generateName": f"{name}-"}, "spec": spec}
        del rayjob["metadata"]["name"]
        documents.extend(_fallback(name, args.namespace, command, cron, rayjob))
    elif args.schedule:
        documents.append({"apiVersion": "ray.io/v1", "kind": "RayCronJob", "metadata": metadata,
                          "spec": _cron_spec(args, spec)})
    else:
        documents.append({"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": metadata, "spec": spec})
    return documents


# -- the local command ------------------------------------------------------------------------------------

def _parse_local_command(words: list[str]) -> tuple[str, Any, str | None]:
    """(command, its JobSpec, its spec file or None), by the local parser and loaders; one line for any mistake."""
    from jobs.cli import build_parser

    command = next((value for key, value in COMMANDS.items() if tuple(words[:len(key)]) == key), None)
    if command is None:
        raise K8sError(f"k8s: expected a command to run, one of {', '.join(' '.join(k) for k in COMMANDS)}, got "
                       f"{' '.join(words[:2]) or 'nothing'!r}; k8s options go before it")
    misplaced = [word for word in words if word.split("=")[0] in {flag for flag, _ in OPTIONS}]
    if misplaced:
        raise K8sError(f"k8s: {misplaced[0]} is an option of `fluxbatch k8s`; put it before {words[0]!r}")
    local = build_parser().parse_args(words)  # the local command's own parser: same flags, same errors
    _refuse_credentials([option for option in local.storage_option or []])
    if command == "render":
        from jobs.cli import job_from_args
        from jobs.flags import flags_as_typed

        job = job_from_args(local)
        spec_file, paths, flags = local.job, [job.manifest], flags_as_typed(local)
    else:
        from jobs.dataset_commands import load_spec
        from schemas.catalog import CatalogSpec
        from schemas.synthesis import SynthesisSpec

        spec = load_spec(CatalogSpec if command == "catalog" else SynthesisSpec, local)
        job = spec.job_for("manifest.parquet")
        spec_file, paths, flags = local.spec, [getattr(spec, "products", None)], {}
        _refuse_credentials(list(spec.output.storage_options) + list(spec.storage_options), spec_file)
    _refuse_credentials(list(job.storage_options), spec_file)
    for path in [*paths, job.output.uri, *job.model.adapters.values()]:
        _refuse_relative(path)
    if job.model.name.startswith(".") or _exists(job.model.name):  # a local model folder, not a preset or hub id
        _refuse_relative(job.model.name)
    if isinstance(job.gpus_per_replica, dict):
        raise K8sError("k8s: a mapping of GPUs per card type needs a worker group per card type, which `fluxbatch "
                       "k8s` does not make yet; give one number, or `fluxbatch submit` the job to such a RayCluster")
    if job.gpus_per_replica == "auto":
        raise K8sError("k8s: --gpus-per-replica auto is decided on the cluster, but the pods are sized now; run "
                       "`fluxbatch plan --model ... --gpu-memory ...` and pass its number")
    _preflight(job, spec_file, flags)
    return command, job, spec_file


def _preflight(job: Any, source: str | None, flags: dict[str, str]) -> None:
    """The local pre-flight (pipeline/preflight.py), less what needs the cluster: the model resolves and its
    defaults obey a row's rules with its limits, in the local command's words. The manifest and OUTPUT are not
    asked (this machine may not reach the cluster's buckets), nor adapters (files of the pods); what cannot be
    known here is one note on stderr, and the manifests are printed."""
    from pathlib import Path

    from flux_worker.hub import HubUnreachableError, check_hub_model
    from flux_worker.model_folder import is_model_url
    from flux_worker.presets import PRESETS, resolve_preset
    from flux_worker.storage import probe_options
    from flux_worker.weights import check_model_folder
    from schemas.errors import FluxbatchError, first_line
    from schemas.job import check_defaults

    name = job.model.name
    if is_model_url(name):
        try:  # its small JSON files, from here; the pods fetch the weights
            preset = resolve_preset(name, probe_options(name, job.storage_options))
        except (FluxbatchError, OSError) as error:
            print(f"note: model {name} could not be read from here ({first_line(error)}), so it is not checked; "
                  "the cluster's pods fetch it when the job starts", file=sys.stderr)
            return
        check_defaults(job, job.row_limits(preset.limits), source=source, flags=flags)
        return
    if name.startswith("/") and not Path(name).exists():
        print(f"note: model {name!r} is not a folder on this machine; the cluster's pods must mount it there",
              file=sys.stderr)
        return
    preset = resolve_preset(name)  # a mistyped preset: "did you mean", as a local render says it
    if Path(preset.source).expanduser().is_dir():
        check_model_folder(preset.source)
    elif name not in PRESETS and name not in {known.source for known in PRESETS.values()}:
        # A preset's weights are on the hub by definition; the local cache says nothing of the pods' own.
        try:
            check_hub_model(preset.source, job.model.revision)
        except HubUnreachableError as error:
            print(f"note: model {name!r} is not in the local Hugging Face cache and {error.why}, so it is not "
                  f"checked here; the cluster's pods download it when the job starts{error.hint}", file=sys.stderr)
    check_defaults(job, job.row_limits(preset.limits), source=source, flags=flags)


def _refuse_credentials(names: list[str], where: str | None = None) -> None:
    """A credential in the command line or a spec file would be stored in the cluster's objects for all to read."""
    for word in names:
        key = word.split("=", 1)[0].lower()
        if key in ("key", "secret", "token", "password") or any(part in key for part in ("secret", "token",
                                                                                       "password", "access_key")):
            place = f"{where}: storage option {key!r}" if where else f"{word.split('=', 1)[0]!r}"
            raise K8sError(f"k8s: {place} is a credential, and the manifest would store it in the cluster for "
                           "anyone who may read the RayJob; put it in the Secret named by --aws-secret instead")


def _refuse_relative(path: str | None) -> None:
    """A relative path names a file on this machine, which the cluster's pods do not have."""
    if path and "://" not in path and not path.startswith("/"):
        raise K8sError(f"k8s: {path!r} is a path on this machine, which the cluster's pods do not have; give an "
                       "s3:// (or other fsspec) URL, or an absolute path that every pod mounts")


def _exists(path: str) -> bool:
    from pathlib import Path

    return Path(path).exists()


def _default_name(command: str, words: list[str]) -> str:
    """Stable for the same command, so printing it twice and `kubectl apply`ing both updates one object."""
    return f"fluxbatch-{command}-{hashlib.sha256(shlex.join(words).encode()).hexdigest()[:8]}"


def _config_key(path: str) -> str:
    key = re.sub(r"[^-._a-zA-Z0-9]", "-", PurePosixPath(path).name)
    return key if key.strip(".") else "spec.yaml"


def _read(path: str) -> str:
    from pathlib import Path

    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise K8sError(f"k8s: cannot read the spec file {path}: {error.strerror}") from error


def _replace_spec_path(words: list[str], local: str, mounted: str) -> list[str]:
    """The spec file's word (SPEC, `--job FILE` or `--job=FILE`) pointed at its copy on the head."""
    out, done = [], False
    for word in words:
        if not done and word == local:
            word, done = mounted, True
        elif not done and word == f"--job={local}":
            word, done = f"--job={mounted}", True
        out.append(word)
    return out


# -- the objects ------------------------------------------------------------------------------------------

def _metadata(name: str, namespace: str | None, command: str) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name}
    if namespace:
        metadata["namespace"] = namespace
    metadata["labels"] = {"app.kubernetes.io/name": "fluxbatch", "app.kubernetes.io/component": command}
    return metadata


def _config_map(name: str, namespace: str | None, key: str, text: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _metadata(name, namespace, "spec"),
            "data": {key: text}}


def _rayjob_spec(args: argparse.Namespace, entrypoint: str, job: Any, config_map: str | None) -> dict[str, Any]:
    """A RayJob's spec by KubeRay's rules (validation.go): a selected cluster takes no backoffLimit, shutdown or TTL."""
    spec: dict[str, Any] = {"entrypoint": entrypoint, "submissionMode": "K8sJobMode"}
    env = _env_vars(args.env)
    if env:
        spec["runtimeEnvYAML"] = yaml.safe_dump({"env_vars": env}, sort_keys=False)
    spec["activeDeadlineSeconds"] = args.deadline_seconds
    if args.cluster:
        spec["clusterSelector"] = {"ray.io/cluster": args.cluster}
        return spec
    spec.update(backoffLimit=args.backoff_limit, shutdownAfterJobFinishes=True,
                ttlSecondsAfterFinished=args.ttl_seconds, rayClusterSpec=_cluster_spec(args, job, config_map))
    return spec


def _cron_spec(args: argparse.Namespace, job_spec: dict[str, Any]) -> dict[str, Any]:
    from croniter import croniter

    if "TZ" in args.schedule or len(args.schedule.split()) != 5 or not croniter.is_valid(args.schedule):
        raise K8sError(f"--schedule {args.schedule!r}: give a 5-field cron expression (minute hour day month "
                       "weekday), without TZ (use --time-zone)")
    spec: dict[str, Any] = {"schedule": args.schedule}
    if args.time_zone is not None:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(args.time_zone)
        except (ZoneInfoNotFoundError, ValueError):
            raise K8sError(f"--time-zone {args.time_zone!r}: not a time zone name (e.g. Europe/Berlin)") from None
        spec["timeZone"] = args.time_zone
    spec["jobTemplate"] = job_spec
    return spec


def _env_vars(pairs: list[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", name):
            raise K8sError(f"--env {pair!r}: expected NAME=VALUE")
        _refuse_credentials([name])
        env[name] = value
    return env


def _cluster_spec(args: argparse.Namespace, job: Any, config_map: str | None) -> dict[str, Any]:
    """A fixed-size Ray cluster for one job: a CPU head (the driver; no renderer) and one worker group."""
    gpus = float(job.gpus_per_replica)
    per_pod = args.gpus_per_pod or max(1, math.ceil(gpus))
    if gpus >= 1 and per_pod % int(gpus):
        raise K8sError(f"--gpus-per-pod {per_pod}: a tensor-parallel replica of {gpus:g} GPUs must fit whole in "
                       f"one pod; give a multiple of {gpus:g}")
    pods = math.ceil(job.replicas * gpus / per_pod) if gpus else job.replicas
    head = _pod("ray-head", args.head_image, args, {"cpu": "4", "memory": "16Gi"}, config_map, head=True)
    if gpus:
        resources = {"cpu": args.worker_cpu or str(8 * per_pod), "memory": args.worker_memory or f"{64 * per_pod}Gi",
                         "nvidia.com/gpu": str(per_pod)}
        worker = _pod("ray-worker", args.image, args, resources, None)
    else:
        resources = {"cpu": args.worker_cpu or str(job.cpus_per_replica or 4), "memory": args.worker_memory or "16Gi"}
        worker = _pod("ray-worker", args.head_image, args, resources, None)
    return {
        "rayVersion": RAY_VERSION,
        "authOptions": {"mode": "token"},  # Ray 2.60 requires a token; KubeRay makes one and gives it to the pods
        "enableInTreeAutoscaling": False,  # sized for the job; nothing to scale
        "headGroupSpec": {"rayStartParams": {"num-cpus": "0"}, "template": head},  # no renderer on the head
        "workerGroupSpecs": [{"groupName": "gpu" if gpus else "cpu", "replicas": pods, "minReplicas": pods,
                              "maxReplicas": pods, "rayStartParams": {}, "template": worker}],
    }


def _pod(container: str, image: str, args: argparse.Namespace, resources: dict[str, str], config_map: str | None,
         *, head: bool = False) -> dict[str, Any]:
    """A Ray pod: non-root, secrets by reference, caches and (on GPU pods) shared memory for NCCL as volumes."""
    gpu = "nvidia.com/gpu" in resources
    mounts = [{"name": "cache", "mountPath": CACHE_ROOT}]
    volumes: list[dict[str, Any]] = [{"name": "cache", "emptyDir": {}}]
    if gpu and args.model_cache_host_path:  # a model URL's node cache (flux_worker/model_cache.py), kept by the node
        mounts.append({"name": "model-cache", "mountPath": MODEL_CACHE_MOUNT})
        volumes.append({"name": "model-cache", "hostPath": {"path": args.model_cache_host_path,
                                                             "type": "DirectoryOrCreate"}})
    if gpu:  # NCCL between the ranks of a tensor-parallel group goes through /dev/shm; the default is 64 MiB
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "16Gi"}})
    if config_map:
        mounts.append({"name": "spec", "mountPath": SPEC_MOUNT, "readOnly": True})
        volumes.append({"name": "spec", "configMap": {"name": config_map}})
    ports = [{"containerPort": 8080, "name": "metrics"}]  # what deploy/kuberay/podmonitor.yaml scrapes
    if head:
        ports = [{"containerPort": 6379, "name": "gcs-server"}, {"containerPort": 8265, "name": "dashboard"},
                 {"containerPort": 10001, "name": "client"}, *ports]
    pod: dict[str, Any] = {
        "securityContext": {"runAsNonRoot": True, "runAsUser": RAY_UID, "runAsGroup": RAY_GID, "fsGroup": RAY_GID},
        "containers": [{
            "name": container, "image": image, "ports": ports,
            "envFrom": [{"secretRef": {"name": args.aws_secret, "optional": True}},
                        {"secretRef": {"name": args.hf_secret, "optional": True}}],
            **({"env": [{"name": "FLUXBATCH_MODEL_CACHE", "value": MODEL_CACHE_MOUNT}]}
               if gpu and args.model_cache_host_path else {}),
            "resources": {"requests": dict(resources), "limits": dict(resources)},
            "volumeMounts": mounts,
        }],
        "volumes": volumes,
    }
    if gpu:
        pod["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    return {"metadata": {"labels": {"app.kubernetes.io/name": "fluxbatch"}}, "spec": pod}


KUBECTL_IMAGE = "registry.k8s.io/kubectl:v1.36.0"  # the Kubernetes version of the schemas tests/test_k8s.py uses


def _fallback(name: str, namespace: str | None, command: str, cron: dict[str, Any],
              rayjob: dict[str, Any]) -> list[dict[str, Any]]:
    """A CronJob whose pod `kubectl create`s the RayJob (a new name each time), with the one right it needs.

    concurrencyPolicy Forbid only keeps two kubectl pods apart, which finish in seconds; two RayJobs of one
    OUTPUT can still overlap, and the second then stops at OUTPUT's lease (exit 2) having written nothing.
    """
    def meta(suffix: str) -> dict[str, Any]:
        return _metadata(f"{name}{suffix}", namespace, command)

    subject = {"kind": "ServiceAccount", "name": f"{name}-creator"}
    if namespace:
        subject["namespace"] = namespace
    pod = {
        "serviceAccountName": f"{name}-creator",
        "restartPolicy": "Never",
        "securityContext": {"runAsNonRoot": True, "runAsUser": 65532, "runAsGroup": 65532},
        "containers": [{
            "name": "create-rayjob", "image": KUBECTL_IMAGE,
            "command": ["kubectl", "create", "-f", "/rayjob/rayjob.yaml"],
            "env": [{"name": "HOME", "value": "/tmp"}],  # kubectl's discovery cache
            "volumeMounts": [{"name": "rayjob", "mountPath": "/rayjob", "readOnly": True},
                             {"name": "tmp", "mountPath": "/tmp"}],
        }],
        "volumes": [{"name": "rayjob", "configMap": {"name": f"{name}-rayjob"}}, {"name": "tmp", "emptyDir": {}}],
    }
    cron_spec = {key: value for key, value in cron.items() if key != "jobTemplate"}
    cron_spec.update(concurrencyPolicy="Forbid", startingDeadlineSeconds=3600, successfulJobsHistoryLimit=3,
                     failedJobsHistoryLimit=3, jobTemplate={"spec": {"backoffLimit": 2, "template": {"spec": pod}}})
    return [
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta("-rayjob"),
         "data": {"rayjob.yaml": render_yaml([rayjob])}},
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta("-creator")},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": meta("-creator"),
         "rules": [{"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": ["create"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": meta("-creator"),
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": f"{name}-creator"},
         "subjects": [subject]},
        {"apiVersion": "batch/v1", "kind": "CronJob", "metadata": meta(""), "spec": cron_spec},
    ]
