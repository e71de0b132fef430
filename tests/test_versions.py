"""Re-runs over one OUTPUT: a job with other render parameters is refused with what differs, or with
--new-version renders into OUTPUT/_versions/<n>/ without touching any image of an earlier version."""

from __future__ import annotations

import json

import pytest

from pipeline import render
from pipeline.store.ledger import JobMismatchError
from tests.conftest import write_manifest
from tests.helpers import assert_images_match_metadata, make_job

pytestmark = [pytest.mark.usefixtures("ray_cluster", "stand_in_renderer"), pytest.mark.slow]

ROWS = [{"id": "cat", "prompt": "a red cat", "width": 64, "height": 64, "num_images": 2}]


def snapshot(folder) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.stat().st_size)
            for p in (folder / "images").rglob("*") if p.is_file()}


def test_new_version_renders_beside_the_first_and_each_job_resumes_its_own_version(tmp_path, tiny_model):
    manifest = str(write_manifest(tmp_path / "m.parquet", ROWS))
    out = tmp_path / "out"
    first = make_job(manifest, str(out), str(tiny_model))
    second = make_job(manifest, str(out), str(tiny_model), defaults={"steps": 3})
    render(first, progress=False)
    before = snapshot(out)

    with pytest.raises(JobMismatchError, match=r"defaults\.steps was None, now 3\. .* pass --new-version to render "
                                               r"this job as a new version in .*out/_versions/2/"):
        render(second, progress=False)
    summary = render(second, new_version=True, progress=False)

    version = out / "_versions" / "2"
    assert summary.output == str(version)
    assert summary.images_rendered == 2
    assert json.loads((version / "_job.json").read_text())["version"] == 2
    assert json.loads((version / "_job.json").read_text())["identity"]["defaults"]["steps"] == 3
    assert_images_match_metadata(str(version))
    assert_images_match_metadata(str(out))  # version 1 still whole: its images and metadata untouched
    assert snapshot(out) == before
    # Each job finds its own version again, with or without the flag, and renders nothing twice.
    assert render(second, progress=False).images_already_done == 2
    assert render(first, new_version=True, progress=False).images_already_done == 2
    assert not (out / "_versions" / "3").exists()
