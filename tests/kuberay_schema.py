"""Our own strict JSON Schema of the KubeRay and prometheus-operator objects fluxbatch writes.

Why ours: the CRDs cannot be kept in this repository, and the tests need no network. So this module states,
for only the fields fluxbatch writes (deploy/kuberay/ and jobs/k8s.py), the type, enum, required-ness and
limits that these CRDs give them, plus the single-field checks KubeRay makes in code rather than in its
schema (its validation.go). Every object here refuses unknown fields (`additionalProperties: false`), as
`kubectl apply`'s strict field validation does: a misspelt field fails, and so does a real field that
fluxbatch does not write yet (add it here, from the CRD, when a manifest starts using it). Checks across
fields, and checks that parse a value (cron, time zone, YAML), are in tests/test_k8s.py `kuberay_problems`.

Sources, each constraint below commented with the one it mirrors:
- KubeRay v1.7.0 (github.com/ray-project/kuberay, tag `v1.7.0`, commit 59d663aeec13760646da3db9c1cf8cfe883e30b7):
  `ray-operator/config/crd/bases/ray.io_{rayclusters,rayjobs,raycronjobs}.yaml`. A comment
  `rayjobs: spec.entrypoint` names the field path in that file's openAPIV3Schema of version v1 (`[]` is a list
  item). Code checks: `ray-operator/controllers/ray/utils/validation.go` (function named) and `constant.go`.
- prometheus-operator v0.93.0 (github.com/prometheus-operator/prometheus-operator, tag `v0.93.0`):
  `example/prometheus-operator-crd/monitoring.coreos.com_podmonitors.yaml`, likewise `podmonitors: spec...`.
- Kubernetes: metadata, pod templates and label selectors are not restated here but referenced
  (`$ref: #/$defs/io.k8s...`) in the strict v1.36.0 definitions (k8s.io/api v0.36.0, what KubeRay v1.7.0 is
  built against) that the PyPI package kubernetes-validate==1.37.0 ships (the `test` extra);
  tests/test_k8s.py loads them from the installed package and adds `DEFINITIONS` to them.

Refreshing for a newer KubeRay (or prometheus-operator): read the same CRD files at the new tag (e.g. with
`git show TAG:PATH` in a clone) and validation.go, compare each field below with its commented path, change
what changed, bump the versions here and in docs/kubernetes.md, and run tests/test_k8s.py. For a newer
Kubernetes, bump kubernetes-validate in pyproject.toml and `KUBERNETES_SCHEMAS`.
"""

from __future__ import annotations

from typing import Any

KUBERAY_VERSION = "v1.7.0"
PROMETHEUS_OPERATOR_VERSION = "v0.93.0"
KUBERNETES_SCHEMAS = "v1.36.0-local-strict"  # the folder in kubernetes-validate's kubernetes-json-schema/

# A RayJob's name is a DNS-1035 label (validation.go ValidateRayJobMetadata, ValidateRayClusterMetadata).
DNS1035 = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"


def core(name: str) -> dict[str, Any]:
    """A Kubernetes v1.36.0 definition, by its name after `io.k8s.`."""
    return {"$ref": f"#/$defs/io.k8s.{name}"}


def ours(name: str) -> dict[str, Any]:
    return {"$ref": f"#/$defs/fluxbatch.{name}"}


def fields(properties: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    """An object of exactly these fields: any other is refused."""
    schema: dict[str, Any] = {"type": "object", "properties": properties, "additionalProperties": False}
    if required:
        schema["required"] = list(required)
    return schema


STRING = {"type": "string"}
BOOLEAN = {"type": "boolean"}
STRING_MAP = {"type": "object", "additionalProperties": STRING}


def int32(minimum: int = -2**31) -> dict[str, Any]:
    """The CRDs' `type: integer, format: int32` (jsonschema checks no format: the range says it)."""
    return {"type": "integer", "minimum": minimum, "maximum": 2**31 - 1}


def metadata(max_name: int | None = None) -> dict[str, Any]:
    """Kubernetes' ObjectMeta; a KubeRay kind's name also limited as KubeRay's code limits it."""
    meta = core("apimachinery.pkg.apis.meta.v1.ObjectMeta")
    if max_name is None:
        return meta
    return {"allOf": [meta, {"properties": {"name": {"type": "string", "maxLength": max_name, "pattern": DNS1035}}}]}


def kind(api_version: str, name: str, spec: dict[str, Any], max_name: int | None = None) -> dict[str, Any]:
    # The CRDs require none of these at the top (the API server does); fluxbatch always writes all four.
    return fields({"apiVersion": {"const": api_version}, "kind": {"const": name}, "metadata": metadata(max_name),
                   "spec": spec}, required=("apiVersion", "kind", "metadata", "spec"))


# -- RayCluster's spec: rayclusters `spec`, the same type as rayjobs `spec.rayClusterSpec` -----------------

POD_TEMPLATE = {"allOf": [
    core("api.core.v1.PodTemplateSpec"),  # rayclusters: spec.headGroupSpec.template (a core PodTemplateSpec)
    # rayclusters: spec.headGroupSpec.template.spec required [containers]; validation.go ValidateRayClusterSpec:
    # "headGroupSpec should have at least one container" (and each worker group)
    {"required": ["spec"], "properties": {"spec": {"required": ["containers"],
                                                   "properties": {"containers": {"minItems": 1}}}}},
]}

RAY_START_PARAMS = {
    **STRING_MAP,  # rayclusters: spec.headGroupSpec.rayStartParams, spec.workerGroupSpecs[].rayStartParams: string map
    "propertyNames": {"not": {"const": "labels"}},  # validation.go validateRayGroupLabels: no rayStartParams labels
}

RAY_CLUSTER_SPEC = fields({
    # rayclusters: spec.rayVersion, a string; ours: a plain version, which ValidateRayClusterSpec parses
    # (version.ParseGeneric) when authOptions.mode is token
    "rayVersion": {"type": "string", "pattern": r"^[0-9]+\.[0-9]+\.[0-9]+$"},
    "authOptions": fields({"mode": {"enum": ["disabled", "token"]}}),  # rayclusters: spec.authOptions.mode
    "enableInTreeAutoscaling": BOOLEAN,  # rayclusters: spec.enableInTreeAutoscaling
    "autoscalerOptions": fields({
        # rayclusters: spec.autoscalerOptions.idleTimeoutSeconds, int32; ValidateRayClusterSpec: non-negative
        "idleTimeoutSeconds": int32(0),
        "upscalingMode": {"enum": ["Default", "Aggressive", "Conservative"]},  # ...autoscalerOptions.upscalingMode
    }),
    # rayclusters: spec.headGroupSpec, required [template]
    "headGroupSpec": fields({"rayStartParams": RAY_START_PARAMS, "template": POD_TEMPLATE}, required=("template",)),
    "workerGroupSpecs": {"type": "array", "items": fields({  # rayclusters: spec.workerGroupSpecs[]
        "groupName": STRING,  # ...groupName
        "replicas": int32(),  # ...replicas, int32
        # ...minReplicas, maxReplicas: int32; ValidateRayClusterSpec: "has negative minReplicas/maxReplicas"
        "minReplicas": int32(0),
        "maxReplicas": int32(0),
        "rayStartParams": RAY_START_PARAMS,
        "template": POD_TEMPLATE,
    }, required=("groupName", "maxReplicas", "minReplicas", "template"))},  # ...workerGroupSpecs[] required
}, required=("headGroupSpec",))  # rayclusters: spec required [headGroupSpec]


# -- RayJob's spec: rayjobs `spec`, the same type as raycronjobs `spec.jobTemplate` -------------------------

RAY_JOB_SPEC = fields({
    "entrypoint": STRING,  # rayjobs: spec.entrypoint
    # rayjobs: spec.submissionMode is a string in the CRD; ours: only JobSubmissionMode's values
    # (ray-operator/apis/ray/v1/rayjob_types.go), so a misspelt mode fails here
    "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]},
    "runtimeEnvYAML": STRING,  # rayjobs: spec.runtimeEnvYAML (that it parses: kuberay_problems)
    "activeDeadlineSeconds": int32(1),  # rayjobs: spec.activeDeadlineSeconds, int32; ValidateRayJobSpec: positive
    "backoffLimit": int32(0),  # rayjobs: spec.backoffLimit, int32; ValidateRayJobSpec: "must be a positive integer"
    "shutdownAfterJobFinishes": BOOLEAN,  # rayjobs: spec.shutdownAfterJobFinishes
    "ttlSecondsAfterFinished": int32(0),  # rayjobs: spec.ttlSecondsAfterFinished, int32; ValidateRayJobSpec: >= 0
    "suspend": BOOLEAN,  # rayjobs: spec.suspend (fluxbatch writes none; Kueue does, so its rules are checked)
    # rayjobs: spec.clusterSelector, a string map; ValidateRayJobSpec: "cluster name in ClusterSelector should
    # not be empty" (the key is RayJobClusterSelectorKey)
    "clusterSelector": {**STRING_MAP, "required": ["ray.io/cluster"],
                        "properties": {"ray.io/cluster": {"type": "string", "minLength": 1}}},
    "rayClusterSpec": ours("RayClusterSpec"),  # rayjobs: spec.rayClusterSpec
}, required=("entrypoint",))  # ours: not required by the CRD (InteractiveMode has none); every fluxbatch job has one

# raycronjobs: spec.schedule is a string; ValidateRayCronJobSpec: no "TZ" in it (timeZone instead) and
# cron.ParseStandard. Ours: the five fields only (no @daily descriptors; fluxbatch writes none); whether the
# fields are valid cron is `cron_problems`. Kubernetes' own CronJob has the same rules in code (its
# validateScheduleFormat), so `CORE_OVERLAYS` applies this to it too.
CRON_SCHEDULE = {"type": "string", "pattern": r"^\s*\S+(\s+\S+){4}\s*$", "not": {"pattern": "TZ"}}

RAY_CRON_JOB_SPEC = fields({
    "schedule": CRON_SCHEDULE,
    "timeZone": {"type": "string", "minLength": 1},  # raycronjobs: spec.timeZone, minLength 1 (zone: cron_problems)
    "jobTemplate": ours("RayJobSpec"),  # raycronjobs: spec.jobTemplate, a RayJobSpec
}, required=("jobTemplate", "schedule"))  # raycronjobs: spec required [jobTemplate, schedule]


# -- PodMonitor: podmonitors `spec` ------------------------------------------------------------------------

DURATION = {  # podmonitors: spec.podMetricsEndpoints[].interval, a Prometheus duration by this pattern
    "type": "string", "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?"
                                 r"(([0-9]+)ms)?)$"}

POD_MONITOR_SPEC = fields({
    "selector": core("apimachinery.pkg.apis.meta.v1.LabelSelector"),  # podmonitors: spec.selector, a LabelSelector
    "podMetricsEndpoints": {"type": "array", "items": fields({  # podmonitors: spec.podMetricsEndpoints[]
        "port": STRING,  # ...port, a container port's name
        "honorLabels": BOOLEAN,  # ...honorLabels
        "interval": DURATION,
        "relabelings": {"type": "array", "items": fields({  # ...relabelings[]
            "sourceLabels": {"type": "array", "items": STRING},  # ...sourceLabels: strings
            "targetLabel": STRING,  # ...targetLabel
        })},
    })},
}, required=("selector",))  # podmonitors: spec required [selector]


# -- what tests/test_k8s.py uses ---------------------------------------------------------------------------

# constant.go: MaxRayClusterNameLength 53, MaxRayJobNameLength = 53 - 6, MaxRayCronJobNameLength = 47 - 11
# (ValidateRayClusterMetadata, ValidateRayJobMetadata, ValidateRayCronJobSpec). A RayCronJob's name is only
# limited in length there, but its RayJobs are named after it and must be DNS-1035 labels: ours requires it.
DEFINITIONS: dict[str, Any] = {
    "fluxbatch.RayClusterSpec": RAY_CLUSTER_SPEC,
    "fluxbatch.RayJobSpec": RAY_JOB_SPEC,
    "fluxbatch.RayCluster": kind("ray.io/v1", "RayCluster", ours("RayClusterSpec"), max_name=53),
    "fluxbatch.RayJob": kind("ray.io/v1", "RayJob", ours("RayJobSpec"), max_name=47),
    "fluxbatch.RayCronJob": kind("ray.io/v1", "RayCronJob", RAY_CRON_JOB_SPEC, max_name=36),  # only ray.io/v1
    "fluxbatch.PodMonitor": kind("monitoring.coreos.com/v1", "PodMonitor", POD_MONITOR_SPEC),
}
KINDS = {name.removeprefix("fluxbatch."): name for name in DEFINITIONS if not name.endswith("Spec")}

# Constraints added to a Kubernetes kind's own definition (kubernetes-validate has its schema, not its code rules).
CORE_OVERLAYS: dict[tuple[str, str], dict[str, Any]] = {
    ("batch/v1", "CronJob"): {"properties": {"spec": {"properties": {"schedule": CRON_SCHEDULE}}}},
}

# The fields under which KubeRay v1.7.0's CRDs carry x-kubernetes-validations (CEL) rules, which jsonschema
# cannot run. None is in the schema above, so no manifest that passes it can hold one of them.
CEL_RULE_FIELDS = {
    "RayCluster": ["spec.gcsFaultToleranceOptions.backend", "spec.managedBy"],
    "RayJob": ["spec.deletionStrategy", "spec.deletionStrategy.deletionRules.condition", "spec.managedBy",
               "spec.rayClusterSpec.gcsFaultToleranceOptions.backend", "spec.rayClusterSpec.managedBy"],
    "RayCronJob": ["spec.jobTemplate.deletionStrategy", "spec.jobTemplate.deletionStrategy.deletionRules.condition",
                   "spec.jobTemplate.managedBy", "spec.jobTemplate.rayClusterSpec.gcsFaultToleranceOptions.backend",
                   "spec.jobTemplate.rayClusterSpec.managedBy"],
}
