"""Pre-flight: what a render checks on the driver before it writes anything to OUTPUT or starts Ray.

A mistake found here is one line (a FluxbatchError, exit 2) within seconds, and OUTPUT is left as it was:
no `_job.json` records a job that never ran, so the corrected run is not refused as another job. In order:

1. the model resolves: a preset, a local folder holding a safetensors pipeline of a class fluxbatch renders
   with (flux_worker/weights.py), or a hub id in the local cache or known to the hub (flux_worker/hub.py);
2. every adapter is a readable safetensors file (flux_worker/weights.py: what "allowed" means for adapters);
3. the manifest names Parquet files (listed only; the run reads and validates them under its lease);
4. the scorers the job names are there and go together (pipeline/scorer_check.py);
5. a C2PA certificate and key the job names can sign (pipeline/signing.py);
6. OUTPUT can be reached, holds nothing foreign (pipeline/store/ownership.py), and can be written: a probe file,
   named as fluxbatch's own temp files so that a run killed in between has it swept, is written and deleted.

Storage is asked with botocore's retries capped (storage.probe_options), so an endpoint nobody listens on is
reported in seconds; the run's own requests keep their retries.
"""

from __future__ import annotations

import contextlib
import os
import random
from pathlib import Path

from flux_worker.hub import check_hub_model
from flux_worker.model_folder import ModelFolder, is_model_url
from flux_worker.presets import PRESETS, ModelPreset, resolve_preset
from flux_worker.storage import Storage, StorageError, filesystem, probe_options
from flux_worker.weights import check_adapter, check_model_folder
from pipeline.manifest import list_manifest_files
from pipeline.scorer_check import check_scorers, check_scorers_fit
from pipeline.signing import signing_credentials
from pipeline.store import ledger, ownership
from schemas import JobSpec, ModelSpec
from schemas.job import check_defaults
from schemas.layout import JOB_FILE, PROBE_NAME, TMP_MARK
from schemas.provenance import needs_package


def check(job: JobSpec, allow_non_empty_output: bool = False) -> ModelPreset:
    """Raise the first mistake found in `job` as one FluxbatchError; returns the model's preset."""
    preset = check_model(job.model, job.storage_options)
    # each default by the rule of a row's value, with this model's limits (and a watermark's smallest image)
    check_defaults(job, job.row_limits(preset.limits))
    list_manifest_files(job.manifest, probe_options(job.manifest, job.storage_options), output=job.output.uri)
    check_provenance_packages(job)
    check_scorers(job)  # the scorers the job names are there, and go together (pipeline/scorer_check.py)
    check_scorers_fit(job)  # ... and fit beside the model, where the cards' memory is known
    signing_credentials(job)  # a C2PA certificate and key that can sign (pipeline/signing.py)
    check_output(job, allow_non_empty_output)
    return preset


def check_provenance_packages(job: JobSpec) -> None:
    """A watermark needs invisible-watermark on the renderers: missing here, it is one line, not a failed image
    per row (the container image and the test extra have it; C2PA's package is checked with its credentials)."""
    if job.provenance.enabled and job.provenance.watermark is not None:
        needs_package("imwatermark", "--watermark")


def check_model(model: ModelSpec, storage_options: dict | None = None) -> ModelPreset:
    """The model's preset, once its weights are known to be loadable from where the workers will look: a folder or
    a model URL (listed and its model_index.json read with the job's `storage_options`, no weights fetched) holds
    a pipeline of a supported class in safetensors; a hub id is cached or on the hub."""
    probe = probe_options(model.name, storage_options) if is_model_url(model.name) else None
    preset = resolve_preset(model.name, probe)  # an unknown preset name: "did you mean"
    if is_model_url(model.name):
        check_model_folder(ModelFolder(model.name, probe))
    elif Path(preset.source).expanduser().is_dir():
        check_model_folder(preset.source)
    else:
        check_hub_model(preset.source, model.revision, named=model.name if model.name in PRESETS else None)
    for name, path in model.adapters.items():
        check_adapter(name, path)
    return preset


def check_output(job: JobSpec, allow_non_empty_output: bool = False) -> None:
    """OUTPUT answers, is empty or fluxbatch's (ownership.refuse_foreign_output), and takes a write and a delete."""
    fs, root = filesystem(job.output.uri, probe_options(job.output.uri, job.output.storage_options))
    where = fs.uri(root)
    # The first request, named as the user wrote OUTPUT: no credentials, an endpoint down or a read refused are
    # reported as reading OUTPUT, not as some file inside it.
    # The first request is retried twice: a store that answers 500 or 503 once is there, and one nobody listens on
    # is reported at once anyway (botocore's connection errors are not retried: storage.py). The probe's removal
    # is tried once.
    Storage(fs.fs, tries=3).exists(root)
    once = Storage(fs.fs, tries=1)
    ownership.refuse_foreign_output(fs, root, allow_non_empty_output)
    for _, folder in [(1, root), *ledger.versions(fs, root)]:
        if fs.exists(f"{folder}/{JOB_FILE}"):
            ledger.recorded_identity(fs, folder)  # CorruptJobFileError naming a _job.json that is not one
    probe = f"{root}/{PROBE_NAME}{TMP_MARK}{os.getpid()}-{random.getrandbits(32):08x}"
    made = _missing_folders(root) if fs.local else []
    try:
        fs.write_bytes(probe, b"")
    except StorageError as error:
        raise StorageError(f"OUTPUT {where} cannot be written: {error}") from error
    with contextlib.suppress(FileNotFoundError):  # a run holding OUTPUT's lease may have swept it already
        once.rm_file(probe)
    for folder in made:  # the probe's folders go with it: a run refused later leaves no empty OUTPUT behind
        with contextlib.suppress(OSError):  # another driver's files are in it by now
            os.rmdir(folder)


def _missing_folders(path: str) -> list[str]:
    """The folders of `path` (itself included) that do not exist yet, deepest first."""
    missing = []
    while path and not os.path.isdir(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return missing
