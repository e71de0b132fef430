"""What every renderer is told besides its model, as one typed value.

The render stage builds it once per run (pipeline/render_stage.py, `RenderOptions.for_job`) and hands the same
value to a one-device `Renderer` (flux_worker/renderer.py) and to every rank of a tensor-parallel group
(flux_worker/tensor_parallel_rank.py), as ray.data.llm hands one processor config to its stages. A field is added
here once; a wrong value or an unknown name fails when the stage is built, in the driver, not in N actors. The
fields that come from the job take the job's own field (default and bounds), so each default is written once.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from schemas.job import JobSpec, OutputSpec
from schemas.provenance import ProvenanceSpec
from schemas.quality import QualitySpec

_JOB, _OUTPUT = JobSpec.model_fields, OutputSpec.model_fields


class RenderOptions(BaseModel):
    """A renderer's settings: where and how it writes, how it retries, how many threads it runs."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    output_uri: str
    # Credentials ride in these options, never in a runtime_env (Ray logs those): kept out of repr and logs.
    storage_options: dict[str, Any] = Field(default_factory=dict, repr=False)
    batch_invariant: bool = _JOB["batch_invariant"]
    max_retries: int = _JOB["max_retries"]
    jpeg_quality: int = _OUTPUT["jpeg_quality"]
    webp_quality: int = _OUTPUT["webp_quality"]
    threads: int | None = Field(default=None, ge=1, description="torch CPU threads; None leaves torch's own")
    run_id: str | None = Field(default=None, description="where the actor's cold-start record goes; None: nowhere")
    compile_cache_options: dict[str, Any] | None = Field(
        default=None, repr=False, description="storage options of a model.compile_cache on an object store")
    reference_storage_options: dict[str, Any] = Field(
        default_factory=dict, repr=False, description="storage options for rows' reference images (the manifest's)")
    model_storage_options: dict[str, Any] = Field(
        default_factory=dict, repr=False, description="storage options for a model or scorer URL (the manifest's)")
    hub_token: str | None = Field(default=None, repr=False,
                                  description="the driver's Hugging Face token, for a hub model (gated weights)")
    embedding_cache_bytes: int = Field(default=256 * 2**20, ge=0, description="prompt encodings kept per actor")
    write_threads: int = Field(default=4, ge=1, description="images encoded and written while the next renders")
    image_counter: Any = Field(default=None, repr=False,
                               description="a Ray actor handle counting written images (pipeline/progress.py)")
    provenance: ProvenanceSpec = Field(default_factory=ProvenanceSpec)
    quality: QualitySpec = Field(default_factory=QualitySpec)  # the scorers each renderer loads, best-of-n
    # The C2PA certificate chain and private key as the driver read them (pipeline/signing.py): they travel like
    # storage credentials, in the actor's arguments, never in a runtime_env, a repr, a log or OUTPUT.
    signing: dict[str, str] | None = Field(default=None, repr=False,
                                           description="certificate (PEM chain), key (PEM), algorithm (es256 ...)")

    @classmethod
    def for_job(cls, job: JobSpec, *, storage_options: dict[str, Any], threads: int | None, run_id: str | None,
                compile_cache_options: dict[str, Any] | None = None,
                reference_storage_options: dict[str, Any] | None = None, model_storage_options: dict[str, Any] | None
                = None, hub_token: str | None = None, image_counter: Any = None,
                signing: dict[str, str] | None = None) -> RenderOptions:
        """The options a renderer of `job` gets; the storage options are resolved by the driver (credentials)."""
        return cls(output_uri=job.output.uri, storage_options=storage_options, batch_invariant=job.batch_invariant,
                   max_retries=job.max_retries, jpeg_quality=job.output.jpeg_quality,
                   webp_quality=job.output.webp_quality, threads=threads, run_id=run_id,
                   compile_cache_options=compile_cache_options,
                   reference_storage_options=reference_storage_options or {},
                   model_storage_options=model_storage_options or {}, hub_token=hub_token, image_counter=image_counter,
                   provenance=job.provenance, quality=job.quality, signing=signing)
