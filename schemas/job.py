"""The job spec: what to render (`ModelSpec`, `RenderDefaults`), where (`OutputSpec`), and how wide.

A job is loaded from YAML and overridden by CLI flags. `identity()` is the part of a job that decides
the bytes of an image; a re-run over the same OUTPUT must agree with it (see `_job.json`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from schemas.overrides import load_spec, validate_spec
from schemas.provenance import WATERMARK_MIN_PIXELS, ProvenanceSpec
from schemas.quality import QualitySpec
from schemas.request import ANY_MODEL, ModelLimits, OutputFormat, RenderRequest, row_value
from schemas.urls import manifest_url, storage_url

Dtype = Literal["auto", "bf16", "fp16", "fp32"]


class ModelSpec(BaseModel):
    """Which pipeline to load: a preset name, a hub id, a local folder or a storage URL of one, plus adapters by
    name."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(default="flux.1-schnell", description="preset name, hub id, local folder, or the fsspec URL "
                      "of a diffusers folder (s3://...; fetched once per node into model.cache_dir)")
    revision: str | None = Field(default=None, description="hub revision (commit) to pin")
    dtype: Dtype = Field(default="auto", description="auto: bf16 on GPUs, fp32 on CPU")
    # Rows refer to adapters by these names, so a manifest can never point the workers at a file.
    adapters: dict[str, str] = Field(default_factory=dict, description="adapter name -> safetensors path")
    max_sequence_length: int | None = Field(
        default=None, ge=16, le=512, description="prompt tokens the T5 encoder reads (default: the preset's)")
    # GPU fast path (flux_worker/fast_path.py); each trades something, see benchmarks/README.md.
    compile: bool = Field(default=False, description="torch.compile the transformer's repeated blocks (regional)")
    fuse_qkv: bool = Field(default=False, description="fuse the attention Q, K and V projections into one matmul")
    quantize: Literal["fp8"] | None = Field(
        default=None, description="fp8: torchao float8 weights and dynamic per-row activations (GPUs with fp8 only)"
    )
    cache: Literal["first-block"] | None = Field(
        default=None, description="first-block: skip the other blocks on steps whose first block barely changed"
    )
    cache_threshold: float = Field(default=0.12, gt=0, le=1, description="First-Block-Cache's relative-change bound")
    # Where compiled kernels are shared between actors and nodes; not part of an image's identity.
    compile_cache: str | None = Field(
        default=None, description="fsspec URL sharing model.compile's kernels between actors and nodes "
        "(default: ~/.cache/fluxbatch/compile-cache on each machine)")

    # Where each node keeps a model URL's files (flux_worker/model_cache.py); not part of an image's identity.
    cache_dir: str | None = Field(
        default=None, description="local folder where each node keeps a model URL's files (default: "
        "$FLUXBATCH_MODEL_CACHE, else ~/.cache/fluxbatch/models)")  # ~/.cache: $XDG_CACHE_HOME where set

    @field_validator("compile_cache")
    @classmethod
    def _compile_cache(cls, value: str | None) -> str | None:
        return value if value is None else storage_url(value)

    @field_validator("name")
    @classmethod
    def _model_url(cls, value: str) -> str:
        return storage_url(value) if "://" in value else value  # a URL's protocol and bucket, checked as any URL's

    @model_validator(mode="after")
    def _fast_path_with_adapters(self) -> ModelSpec:
        # Fused or fp8 linears no longer hold the separate q/k/v weights a LoRA adapter patches.
        if self.adapters and (self.fuse_qkv or self.quantize):
            option = "fuse_qkv" if self.fuse_qkv else f"quantize={self.quantize!r}"
            raise ValueError(f"model.{option} cannot be combined with model.adapters; drop one of them")
        return self


class RenderDefaults(BaseModel):
    """Values for manifest columns a row leaves null; unset here means the model preset's default."""

    model_config = ConfigDict(extra="forbid")

    width: int | None = Field(default=None, description="width for rows that give none (default: the preset's)")
    height: int | None = Field(default=None, description="height for rows that give none (default: the preset's)")
    steps: int | None = Field(default=None, description="steps for rows that give none (default: the preset's)")
    guidance: float | None = Field(default=None, description="guidance for rows that give none (default: the preset's)")
    output_format: OutputFormat = Field(default=OutputFormat.png, description="image format for rows that give none")
    candidates: int | None = Field(
        default=None, description="best-of-n: candidates rendered per row that gives none; the row keeps its "
        "num_images best by --keep-by")

    @field_validator("*", mode="before")
    @classmethod
    def _as_in_a_row(cls, value: Any, info: ValidationInfo) -> Any:
        # A default obeys the rule the same value obeys in a manifest row (RenderRequest's validators), with the
        # model's limits once they are known (validation context `limits`: check_defaults), else those of every model.
        if value is None:
            return None
        return row_value(info.field_name, value, (info.context or {}).get("limits") or ANY_MODEL)


# Each default stands for a manifest column: the row's rule is the default's (RenderDefaults._as_in_a_row).
assert set(RenderDefaults.model_fields) <= set(RenderRequest.model_fields), "a default of no manifest column"


class OutputSpec(BaseModel):
    """Where the run writes, and how images are encoded."""

    model_config = ConfigDict(extra="forbid")

    uri: str = Field(description="any fsspec URL: a local folder, s3://bucket/prefix ...")
    jpeg_quality: int = Field(default=95, ge=1, le=100, description="JPEG quality, 1-100")
    webp_quality: int = Field(default=95, ge=1, le=100, description="WebP quality, 1-100")
    # Images are always written as files by the renderers (the ledger relies on it); a packed layout is
    # built from those files and the metadata after the render (pipeline/store/writers.py), so resume still works.
    layout: Literal["files", "webdataset", "hf-parquet"] = Field(
        default="files",
        description="files: images + metadata Parquet; webdataset: also OUTPUT/webdataset/NNNNN.tar shards; "
        "hf-parquet: also OUTPUT/hf/*.parquet with an Image column for the datasets library",
    )
    shard_size: int = Field(default=1000, ge=1, le=1_000_000, description="images per tar shard or Parquet file")
    # Credentials may live here; they are never written to _job.json, logs or summaries.
    storage_options: dict[str, Any] = Field(default_factory=dict, exclude=True, repr=False)

    @field_validator("uri")
    @classmethod
    def _uri(cls, value: str) -> str:
        return storage_url(value)


class JobSpec(BaseModel):
    """One render job: the manifest, the model, the output and the size of the actor pool."""

    model_config = ConfigDict(extra="forbid")

    manifest: str = Field(description="a Parquet file, a folder of them or a glob; local or s3://")
    output: OutputSpec
    model: ModelSpec = Field(default_factory=ModelSpec)
    defaults: RenderDefaults = Field(default_factory=RenderDefaults)
    provenance: ProvenanceSpec = Field(default_factory=ProvenanceSpec)
    quality: QualitySpec = Field(default_factory=QualitySpec)
    replicas: int = Field(default=1, ge=1, le=4096, description="renderer actors: the size of the pool")
    batch_size: int = Field(default=4, ge=1, le=256, description="images per batch sent to a replica")
    gpus_per_replica: float | Literal["auto"] | dict[str, float | Literal["auto"]] = Field(
        default=0.0,
        description="0 renders on CPU; a fraction shares a GPU; 2 or more (a whole number) shards the transformer "
        "over a tensor-parallel group on one node; auto asks the memory planner (per card type on a mixed "
        "fleet); TYPE=N,TYPE=N (a mapping in a job file) gives each card type its own",
    )
    cpus_per_replica: int | None = Field(
        default=None, ge=1, description="CPU cores per replica (default: all cores / replicas)")
    max_retries: int = Field(default=3, ge=0, le=100, description="tries per image after the first")
    max_renderer_deaths: int = Field(
        default=3, ge=0, le=100,
        description="times a batch is re-run after the renderer process rendering it died (killed, OOM-killed, "
        "node lost); past that its images are recorded as failed and the next run tries them again",
    )
    commit_seconds: float = Field(
        default=30.0, ge=0, le=3600,
        description="commit finished images to the metadata at least this often; a killed driver loses at most "
        "this much work (their images are rendered again by the next run)",
    )
    # Not part of identity(): how long a killed driver blocks OUTPUT never changes an image (pipeline/store/lease.py).
    lease_seconds: float = Field(
        default=60.0, ge=1, le=3600,
        description="a driver's lease on OUTPUT goes stale this long after its last renewal (every quarter of it), "
        "so another driver may take over OUTPUT this long after this one was killed on another machine",
    )
    batch_invariant: bool = Field(
        default=True,
        description="render each image alone through the transformer, so its bytes never depend on its "
        "batch-mates; off (false) batches same-shape images for throughput (last-bit differences)",
    )
    ray_address: str | None = Field(default=None, description="Ray cluster to join; unset starts or joins a local one")
    # Not part of identity(): where references may be read from never changes an image (their sha256 is in its key).
    reference_roots: list[str] = Field(
        default_factory=list,
        description="folder or bucket URL that rows' reference_images may be read from; anything outside is a "
        "failure row, never read (default: the manifest's own folder, or its bucket on S3)",
    )
    storage_options: dict[str, Any] = Field(
        default_factory=dict, exclude=True, repr=False, description="fsspec options for the manifest"
    )

    @field_validator("gpus_per_replica", mode="before")
    @classmethod
    def _per_card_type_flag(cls, value: Any) -> Any:
        """`--gpus-per-replica H100=1,L4=auto`: the flag's form of the job file's mapping."""
        if not isinstance(value, str) or "=" not in value:
            return value
        parsed = {}
        for pair in [p.strip() for p in value.split(",") if p.strip()]:
            name, _, number = pair.partition("=")
            if not name.strip() or not number.strip():
                raise ValueError(f"{value!r}: write TYPE=N,TYPE=N with Ray's card type names (e.g. H100=1,L4=2)")
            parsed[name.strip()] = number.strip()
        return parsed

    @field_validator("gpus_per_replica")
    @classmethod
    def _gpus_per_replica(cls, value: float | str | dict) -> float | str | dict:
        if isinstance(value, dict):
            if not value:
                raise ValueError("a mapping per card type names at least one type (e.g. {H100: 1, L4: 2})")
            for name, each in value.items():
                if each != "auto" and not each:
                    raise ValueError(f"{name}: 0 GPUs per replica renders on CPU; leave the type out instead")
            return {name: cls._gpus_per_replica(each) for name, each in value.items()}
        if value == "auto":
            return value
        if not 0 <= value <= 64:
            raise ValueError(f"gpus_per_replica {value} is outside 0..64")
        if value > 1 and value != int(value):
            raise ValueError(f"gpus_per_replica {value}: a tensor-parallel replica takes whole GPUs (2, 4, 8 ...)")
        return float(value)

    def most_gpus_per_replica(self) -> float:
        """The most GPUs one replica asks for: the number, the largest of a mapping's numbers ("auto" counts as 1,
        as one GPU at least)."""
        values = self.gpus_per_replica.values() if isinstance(self.gpus_per_replica, dict) else [self.gpus_per_replica]
        return max(1.0 if value == "auto" else float(value) for value in values)

    @model_validator(mode="after")
    def _fp8_needs_gpus(self) -> JobSpec:
        if self.model.quantize == "fp8" and self.most_gpus_per_replica() == 0:
            raise ValueError("model.quantize='fp8' renders on GPUs with fp8 matmuls only; set gpus_per_replica "
                             "or drop model.quantize")
        return self

    @field_validator("manifest")
    @classmethod
    def _manifest(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("manifest is empty; give a Parquet file, folder or glob")
        return manifest_url(value)

    @field_validator("reference_roots")
    @classmethod
    def _reference_roots(cls, value: list[str]) -> list[str]:
        return [storage_url(url, named=True) for url in value]

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> JobSpec:
        """Load a job from YAML; `overrides` are dotted keys (`model.name`) that win over the file."""
        return load_spec(cls, path, "job", overrides)

    def identity(self) -> dict[str, Any]:
        """The fields that decide an image's bytes; a re-run must match them (written to `_job.json`)."""
        return {
            "model": self.model.model_dump(mode="json", exclude={"compile_cache", "cache_dir"}),
            # Not `candidates`: a row's candidates are compared per row (pipeline/store/changed_rows.py), so a changed
            # default is a changed row, refused or rendered again with --rerender-changed as any other.
            "defaults": self.defaults.model_dump(mode="json", exclude={"candidates"}),
            # How the images are packed afterwards does not change their bytes: a re-run may re-pack them.
            "output": self.output.model_dump(mode="json", exclude={"uri", "layout", "shard_size"}),
            "provenance": self.provenance.identity(),
            "quality": self.quality.identity(),
        }

    def row_limits(self, limits: ModelLimits) -> ModelLimits:
        """The limits this job's rows are checked with: the model's, a watermark's smallest image, and whether a
        row may ask for candidates (best-of-n needs quality.keep_by)."""
        limits = limits.model_copy(update={"keeps_best": self.quality.keep_by is not None,
                                           "default_candidates": self.defaults.candidates})
        if self.provenance.watermark is None or limits.min_side ** 2 >= WATERMARK_MIN_PIXELS:
            return limits
        return limits.model_copy(update={"min_side": int(WATERMARK_MIN_PIXELS ** 0.5),
                                         "sides_set_by": f"{limits.sides_set_by} with a watermark (256 at least)"})


def check_defaults(job: JobSpec, limits: ModelLimits, *, source: str | None = None,
                   flags: dict[str, str] | None = None) -> None:
    """Refuse a default that a manifest row could not hold with this model (its sizes, its guidance): the job
    validated again with the model's limits, so each mistake is named as any other, by its flag, else the file
    (`source`) and the field (schemas/overrides.py)."""
    validate_spec(JobSpec, job.model_dump(mode="json"), source=source, flags=flags, context={"limits": limits})
