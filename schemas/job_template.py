"""`JobTemplate`: a job spec without its manifest, for jobs that draw their own (synthesis, catalog assets).

It holds the same `output`, `model` and `defaults` as `JobSpec`, and the rest of `JobSpec`'s fields
(replicas, batch size, GPUs per replica ...) under `render`, checked against `JobSpec` when it loads.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from schemas.job import JobSpec, ModelSpec, OutputSpec, RenderDefaults
from schemas.overrides import load_spec
from schemas.request import row_errors


def template_fields(template: str) -> list[str]:
    """The {placeholder} names a prompt template uses, in order; refuses format specs, indexing and positions."""
    names = []
    for _, name, spec, conversion in string.Formatter().parse(template):
        if name is None:
            continue
        if not name.isidentifier() or spec or conversion:
            raise ValueError(f"template {template!r}: {{{name}}} is not a plain placeholder; write {{name}}, "
                             "and {{ or }} for a literal brace")
        names.append(name)
    return names


# Fields of JobSpec that a template sets itself, so `render` may not.
_OWN_FIELDS = {"manifest", "output", "model", "defaults", "storage_options"}


class JobTemplate(BaseModel):
    """Where to write and what to render with; the manifest is drawn by the job (see jobs/)."""

    model_config = ConfigDict(extra="forbid")

    output: OutputSpec
    model: ModelSpec = Field(default_factory=ModelSpec)
    defaults: RenderDefaults = Field(default_factory=RenderDefaults)
    render: dict[str, Any] = Field(
        default_factory=dict,
        description="other JobSpec fields: replicas, batch_size, gpus_per_replica, cpus_per_replica, max_retries, "
        "batch_invariant, ray_address",
    )

    @model_validator(mode="after")
    def _render_fields(self) -> JobTemplate:
        self.job_for("manifest.parquet")  # fails here, at load time, rather than after the manifest is drawn
        return self

    def job_for(self, manifest: str) -> JobSpec:
        """The render job for a drawn manifest; it reads the manifest with the output's storage options."""
        taken = sorted(_OWN_FIELDS & set(self.render))
        if taken:
            raise ValueError(f"render.{taken[0]} is set by the spec itself; move it to the top level")
        try:
            job = JobSpec.model_validate(
                {**self.render, "manifest": manifest, "output": self.output, "model": self.model,
                 "defaults": self.defaults}
            )
        except ValidationError as error:
            problems = "; ".join(f"render.{e.field}: {e.reason}" if e.field else e.reason for e in row_errors(error))
            raise ValueError(problems) from None
        job.storage_options = dict(self.output.storage_options)
        return job

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> Any:
        """Load a spec from YAML; `overrides` are dotted keys (`output.uri`) that win over the file."""
        return load_spec(cls, path, "spec", overrides)
