"""The exceptions a user can act on; the CLI prints them as one line instead of a traceback."""

from __future__ import annotations

from flux_worker.loading import UnsafeWeightsError
from flux_worker.presets import UnknownModelError
from pipeline.ledger import JobMismatchError
from pipeline.manifest import ManifestError

USER_ERRORS: tuple[type[BaseException], ...] = (
    ManifestError,
    JobMismatchError,
    UnknownModelError,
    UnsafeWeightsError,
    FileNotFoundError,
    PermissionError,
)
