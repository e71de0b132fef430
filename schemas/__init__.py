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
    ImageRecord,
)
from schemas.request import (
    MANIFEST_COLUMNS,
    AdapterRef,
    ModelLimits,
    OutputFormat,
    RenderRequest,
    RowError,
    row_errors,
)
from schemas.summary import RunSummary

__all__ = [
    "FAILURE_SCHEMA",
    "IMAGE_RECORD_SCHEMA",
    "MANIFEST_COLUMNS",
    "AdapterRef",
    "FailureRecord",
    "ImageRecord",
    "JobSpec",
    "ModelLimits",
    "ModelSpec",
    "OutputFormat",
    "OutputSpec",
    "PLAN_SCHEMA",
    "RESULT_SCHEMA",
    "RenderDefaults",
    "RenderRequest",
    "RowError",
    "RunSummary",
    "row_errors",
]
