"""Data shapes of fluxbatch: manifest rows, job specs, output and failure rows, Arrow schemas.

Nothing here imports Ray or torch, so the driver, the workers and the tests share one definition.
"""

from schemas.job import JobSpec, ModelSpec, OutputSpec, RenderDefaults
from schemas.records import (
    FAILURE_SCHEMA,
    IMAGE_RECORD_SCHEMA,
    PLAN_SCHEMA,
    RESULT_SCHEMA,
    FailureRecord,
)
from schemas.render_options import RenderOptions
from schemas.request import (
    MANIFEST_COLUMNS,
    REQUEST_SCHEMA,
    AdapterRef,
    ModelLimits,
    OutputFormat,
    RenderRequest,
    RowError,
    request_id,
    row_errors,
)
from schemas.summary import ActorStart, RunSummary

__all__ = [
    "ActorStart",
    "FAILURE_SCHEMA",
    "IMAGE_RECORD_SCHEMA",
    "MANIFEST_COLUMNS",
    "AdapterRef",
    "FailureRecord",
    "JobSpec",
    "ModelLimits",
    "ModelSpec",
    "OutputFormat",
    "OutputSpec",
    "PLAN_SCHEMA",
    "REQUEST_SCHEMA",
    "RESULT_SCHEMA",
    "RenderDefaults",
    "RenderOptions",
    "RenderRequest",
    "RowError",
    "RunSummary",
    "request_id",
    "row_errors",
]
