"""Quality signals (issue 27): scores on the renderer, best-of-n, near-duplicates, the report, the planner.

Real parts throughout: the tiny random-weight pipeline renders, random-weight CLIP and aesthetic scorers built
offline (`fluxbatch model build --scorer`) score on the renderer actor, and the driver finds near-duplicates in
the ledger. No mocks.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from flux_worker.perceptual_hash import distance, phash
from flux_worker.scorer_build import build_scorer
from flux_worker.scorers import Scorers
from pipeline import render
from pipeline.store.near_duplicates import near_duplicate_groups
from schemas.quality import DEFAULT_DUPLICATE_DISTANCE, QualitySpec
from tests.conftest import write_manifest
from tests.helpers import assert_images_match_metadata, make_job, metadata
from tests.test_cli import call_cli

SIDE = {"width": 64, "height": 64, "steps": 2}
# CLIP score clamps negative cosines to 0, and random weights make many pairs negative: this weight seed scores the
# tiny pipeline's images above 0, so the scores differ from image to image.
CLIP_SEED = 4


@pytest.fixture(scope="module")
def scorers(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("scorers")
    return {"clip": str(build_scorer(folder / "clip", "clip", "tiny", CLIP_SEED)),
            "aesthetic": str(build_scorer(folder / "aesthetic", "aesthetic", "tiny"))}


def _by_key(output: Path) -> dict[str, dict]:
    return {row["key"]: row for row in metadata(str(output)).to_pylist()}


# -- scores on every image -------------------------------------------------------------------------------------------

PLAIN = [{"id": f"p{i}", "prompt": prompt, "seed": 11 + i, **SIDE}
         for i, prompt in enumerate(["a red fox in snow", "a lighthouse at dusk", "a bowl of ramen"])]
# The same prompt and seed under two ids: byte-identical images, which nothing but their hashes ties together.
BEST_OF = [{"id": "fox", "prompt": "a red fox in snow", "seed": 100, "num_images": 2, "candidates": 4, **SIDE},
           {"id": "crane", "prompt": "a paper crane", "seed": 200, "candidates": 3, **SIDE}]
# The fox row's candidates as plain rows: candidate c of a row renders as a plain row with seed + c.
FOX_CANDIDATES = [{"id": f"fox-c{c}", "prompt": "a red fox in snow", "seed": 100 + c, **SIDE} for c in range(4)]
TWINS = [{"id": f"twin-{i}", "prompt": "a paper crane", "seed": 5, **SIDE} for i in (1, 2)]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory, tiny_model, scorers) -> tuple[Path, Path]:
    """One manifest (plain rows, twins, best-of-n rows and the fox row's candidates as plain rows) rendered twice:
    one image per batch, and five per batch also writing the candidates not kept."""
    folder = tmp_path_factory.mktemp("quality")
    manifest = write_manifest(folder / "m.parquet", PLAIN + TWINS + BEST_OF + FOX_CANDIDATES)
    quality = {**scorers, "keep_by": "aesthetic_score"}
    outputs = []
    for batch_size, keep_candidates in ((1, False), (5, True)):
        out = folder / f"batch-{batch_size}"
        render(make_job(str(manifest), str(out), str(tiny_model), batch_size=batch_size,
                        quality={**quality, "keep_candidates": keep_candidates}), progress=False)
        outputs.append(out)
    return outputs[0], outputs[1]


@pytest.fixture(scope="module")
def scored(rendered) -> tuple[Path, Path]:
    return rendered


def test_each_image_gets_its_scores_as_columns_the_same_whatever_its_batch(scored, scorers):
    one, five = (_by_key(out) for out in scored)
    assert one.keys() == five.keys() and len(one) == 12
    for key, row in one.items():
        assert row["clip_score"] is not None and row["aesthetic_score"] is not None, key
        assert (row["clip_score"], row["aesthetic_score"]) == (five[key]["clip_score"], five[key]["aesthetic_score"])
        assert row["sha256"] == five[key]["sha256"]
    # the same picture the same scores (the twins; a kept fox and its candidate's plain row), another picture others
    assert len({row["aesthetic_score"] for row in one.values()}) == len({row["sha256"] for row in one.values()})
    assert len({round(row["clip_score"], 4) for row in one.values()}) > 1
    # What a user recomputes from a written PNG (the pixels scored, losslessly) is what the ledger says.
    again = Scorers(QualitySpec(**scorers), "cpu")
    for row in one.values():
        image = Image.open(row["image_uri"].removeprefix("file://"))
        recomputed = again.score(image, row["prompt"])
        assert recomputed["clip_score"] == pytest.approx(row["clip_score"], abs=1e-4)
        assert recomputed["aesthetic_score"] == pytest.approx(row["aesthetic_score"], abs=1e-4)
        assert row["phash"] == phash(image)


def test_byte_identical_images_are_reported_as_near_duplicates_and_kept(scored, capsys):
    out = scored[0]
    rows = _by_key(out)
    twins = sorted(key for key, row in rows.items() if row["request_id"].startswith("twin-"))
    # byte-identical images: the twins, and each kept fox image with its candidate's plain row
    same = {}
    for key, row in rows.items():
        same.setdefault(row["sha256"], []).append(key)
    expected = sorted(sorted(keys) for keys in same.values() if len(keys) > 1)
    assert twins in expected and len(expected) == 3
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["near_duplicates"]["groups"], summary["near_duplicates"]["images"]) == (3, 6)
    assert_images_match_metadata(str(out))  # nothing deleted
    found = pq.read_table(next((out / "runs").glob("*/near_duplicates.parquet"))).to_pylist()
    assert sorted(sorted(r["key"] for r in found if r["group"] == g) for g in {r["group"] for r in found}) == expected
    report = (out / "report.html").read_text()
    assert "near-duplicates" in report and twins[0] in report
    assert "aesthetic_score distribution" in report and "highest clip_score" in report
    verified = call_cli(capsys, "verify", str(out))
    assert verified.returncode == 0, verified.stdout
    assert "near-duplicate groups: 3 (6 images; none deleted)" in verified.stdout and twins[0] in verified.stdout


def test_a_one_pixel_change_to_a_rendered_image_keeps_its_hash_near(scored):
    row = next(iter(_by_key(scored[0]).values()))
    image = Image.open(row["image_uri"].removeprefix("file://")).convert("RGB")
    changed = image.copy()
    r, g, b = changed.getpixel((10, 10))
    changed.putpixel((10, 10), (255 - r, 255 - g, 255 - b))
    assert changed.tobytes() != image.tobytes()
    assert distance(phash(changed), row["phash"]) <= DEFAULT_DUPLICATE_DISTANCE
    # ... so the grouping the run and verify use finds the two as near-duplicates
    assert near_duplicate_groups([row["key"], "edited"], [row["phash"], phash(changed)]) == \
        [sorted([row["key"], "edited"])]


# -- best-of-n -------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def best(rendered) -> tuple[Path, Path]:
    return rendered


def test_best_of_n_keeps_the_k_best_the_same_across_runs_and_batch_sizes(best):
    one, three = (_by_key(out) for out in best)
    assert one.keys() == three.keys()
    for out in best:  # the fox's 4 candidates and the crane's 3, each rendered once whatever the batch size
        assert json.loads((out / "summary.json").read_text())["candidates_rendered"] == 4 + 3
    kept = {key: row for key, row in one.items() if row["candidates"]}
    assert sorted((row["request_id"], row["variant"]) for row in kept.values()) == [("crane", 0), ("fox", 0),
                                                                                   ("fox", 1)]
    plain = {row["seed"]: row for row in one.values() if row["request_id"].startswith("fox-c")}
    import pandas as pd

    read = pd.read_parquet(best[0] / "metadata")
    assert (str(read["candidates"].dtype), str(read["candidate"].dtype), str(read["seed"].dtype)) == \
        ("Int32", "Int32", "int64")  # best-of-n's nullable columns read as integers, the seed as ever
    for key, row in kept.items():
        assert (row["sha256"], row["candidate"]) == (three[key]["sha256"], three[key]["candidate"]), key
        recorded = row["candidate_scores"]
        assert [c["candidate"] for c in recorded] == list(range(row["candidates"]))
        ranked = sorted(recorded, key=lambda c: (-c["aesthetic_score"], c["candidate"]))
        # variant j is the candidate ranked j by aesthetic_score, with that candidate's seed and scores
        assert ranked[row["variant"]]["candidate"] == row["candidate"]
        assert row["seed"] == BEST_OF[0 if row["request_id"] == "fox" else 1]["seed"] + row["candidate"]
        assert row["aesthetic_score"] == ranked[row["variant"]]["aesthetic_score"]
        kept_count = 2 if row["request_id"] == "fox" else 1
        assert [c["kept_as"] for c in ranked] == [*range(kept_count), *[None] * (len(ranked) - kept_count)]
        if row["request_id"] == "fox":  # the kept image is the candidate's own render, byte for byte
            assert row["sha256"] == plain[row["seed"]]["sha256"]


def test_candidates_not_kept_are_written_only_when_asked(best):
    one, three = best  # three: five images per batch, with --keep-candidates
    assert not (one / "candidates").exists()
    assert all(c["image_uri"] is None for row in _by_key(one).values() for c in row["candidate_scores"] or ())
    written = {c["image_uri"]: c["sha256"] for row in _by_key(three).values() if row["variant"] == 0
               for c in row["candidate_scores"] or () if c["kept_as"] is None}
    assert len(written) == (4 - 2) + (3 - 1)
    import hashlib

    for uri, sha in written.items():
        assert hashlib.sha256(Path(uri.removeprefix("file://")).read_bytes()).hexdigest() == sha
    assert_images_match_metadata(str(three))


@pytest.mark.usefixtures("stand_in_for_this_test")  # driver behaviour: the stand-in renderer, scorer from bytes
def test_resume_renders_and_scores_only_what_is_missing_and_keeps_the_same_candidate(tiny_model, scorers, tmp_path):
    manifest = write_manifest(tmp_path / "m.parquet", BEST_OF + PLAIN)
    out = tmp_path / "out"
    # On a GPU (the session cluster's fake ones): Ray Data hands a GPU pool no whole blocks, which a best-of-n row's
    # candidates need, so such a job runs on the driver's own queue (fleet_stage.one_pool_stage).
    job = make_job(str(manifest), str(out), str(tiny_model), batch_size=2, gpus_per_replica=1,
                   quality={**scorers, "keep_by": "aesthetic_score"})
    render(job, progress=False)
    before = _by_key(out)
    again = render(job, progress=False)
    assert (again.images_rendered, again.images_already_done) == (0, len(before))
    assert _by_key(out) == before  # not one row rescored or rewritten
    fox_1 = next(row for row in before.values() if (row["request_id"], row["variant"]) == ("fox", 1))
    Path(fox_1["image_uri"].removeprefix("file://")).unlink()
    restored = render(job, progress=False)
    assert (restored.images_rendered, restored.candidates_rendered) == (1, 4)  # its row's 4 candidates, again
    after = _by_key(out)
    assert (after[fox_1["key"]]["sha256"], after[fox_1["key"]]["candidate"]) == (fox_1["sha256"], fox_1["candidate"])
    assert {k: r["finished_at"] for k, r in after.items() if k != fox_1["key"]} == \
        {k: r["finished_at"] for k, r in before.items() if k != fox_1["key"]}
    assert_images_match_metadata(str(out))


# -- mistakes, each one line -----------------------------------------------------------------------------------------


def test_a_missing_or_mismatched_scorer_and_candidates_without_a_score_are_one_line_each(tmp_path, tiny_model,
                                                                                        scorers, capsys):
    manifest = write_manifest(tmp_path / "m.parquet", [{"id": "a", "prompt": "a fox", **SIDE}])
    base = ["render", str(manifest), str(tmp_path / "out"), "--model", str(tiny_model)]
    other = build_scorer(tmp_path / "bench-aesthetic", "aesthetic", "bench")  # takes 64-value embeddings
    cases = {
        ("--clip", str(tmp_path / "no-such-clip")): "--clip " + str(tmp_path / "no-such-clip") + ": no such folder",
        ("--clip", scorers["clip"], "--aesthetic", str(tmp_path / "nothing")): "no such folder",
        ("--clip", scorers["clip"], "--aesthetic", str(other)): "takes 64-value CLIP embeddings",
        ("--keep-by", "clip_score"): "quality.keep_by clip_score needs its scorer: set --clip",
        ("--candidates", "4"): "candidates needs a score to keep the best by",
        ("--clip", "clip-vit-large-patch1"): "did you mean 'clip-vit-large-patch14'?",
    }
    for words, message in cases.items():
        result = call_cli(capsys, *base, *words)
        assert result.returncode == 2, (words, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (words, result.stderr)
    assert not (tmp_path / "out").exists()
    rows = write_manifest(tmp_path / "rows.parquet", [{"id": "a", "prompt": "a fox", "candidates": 3, **SIDE},
                                                      {"id": "b", "prompt": "a fox", "num_images": 4,
                                                       "candidates": 2, **SIDE}])
    checked = call_cli(capsys, "validate", str(rows), "--model", str(tiny_model), "--clip", scorers["clip"],
                       "--keep-by", "clip_score")
    assert checked.returncode == 1
    assert "candidates (2) must be at least num_images (4)" in checked.stdout + checked.stderr
    missing = call_cli(capsys, "validate", str(rows), "--model", str(tiny_model), "--clip", str(tmp_path / "nope"))
    assert missing.returncode == 2 and "no such folder" in missing.stderr  # validate checks the scorers as render


def test_the_planner_counts_the_scorers_on_gpu_0(capsys):
    from jobs.plan_command import plan_main

    assert plan_main(["--gpu-memory", "13GiB", "--dtype", "fp8"]) == 0
    assert "tensor-parallel degree: 1 GPU per replica" in capsys.readouterr().out
    # ViT-L/14 in fp32 (1.6 GiB) does not fit beside the fp8 transformer on one 13 GiB card: two are planned
    assert plan_main(["--gpu-memory", "13GiB", "--dtype", "fp8", "--clip", "clip-vit-large-patch14"]) == 0
    out = capsys.readouterr().out
    assert "tensor-parallel degree: 2 GPUs per replica" in out
    assert "scorers               0.428B     1.6 GiB  GPU 0 (fp32)" in out
    assert plan_main(["--gpu-memory", "80GiB", "--aesthetic", "/models/aesthetic"]) == 2
    assert "--aesthetic scores CLIP image embeddings" in capsys.readouterr().err  # errors on stderr, as every command's


def test_a_best_of_n_rows_images_share_one_batch_and_a_call_holds_no_more_than_the_batch():
    import pyarrow as pa

    from flux_worker.best_of import expand
    from flux_worker.renderer import render_rows
    from pipeline.plan import split_best_of

    rows = [{"request_id": "fox", "seed": 100, "keeps": 3}] * 3 + [{"request_id": "crane", "seed": 200, "keeps": 1},
                                                                   {"request_id": "plain", "seed": 1, "keeps": None}]
    plan = pa.Table.from_pylist(rows, schema=pa.schema([("request_id", pa.string()), ("seed", pa.int64()),
                                                         ("keeps", pa.int32())]))
    blocks = split_best_of(plan, batch_size=2)
    assert [b.column("request_id").to_pylist() for b in blocks] == [["fox"] * 3, ["crane", "plain"]]

    calls = []
    batch = [{"key": f"k{v}", "request_id": "fox", "variant": v, "seed": 100, "candidates": 8, "keeps": 2, "width": 64,
              "height": 64, "steps": 2, "guidance": 0.0, "max_sequence_length": 32, "adapters": [], "row": 0,
              "source": "m"} for v in range(2)]

    def render_group(group):
        calls.append(len(group))
        return []

    list(render_rows(expand(batch), render_group, batch_invariant=False, max_retries=0, most=len(batch)))
    assert sum(calls) == 8 and max(calls) == 2  # the row's 8 candidates once, two per call as the batch was


def test_a_scorer_failing_on_an_image_fails_that_image_alone():
    from datetime import datetime, timezone

    from flux_worker.best_of import Keeper
    from flux_worker.image_writer import Rendered

    class Failing:
        def score(self, image, prompt):
            if prompt == "bad":
                raise RuntimeError("CUDA out of memory")
            return {"clip_score": 1.0}

    now = datetime.now(timezone.utc)
    rows = [{"key": k, "prompt": p, "row": 0, "source": "m"} for k, p in (("a", "good"), ("b", "bad"))]
    out = list(Keeper(QualitySpec(clip="clip-vit-base-patch32"), Failing()).outcomes(
        [Rendered(row, None, 0.1, now) for row in rows], rows))
    assert out[0].scores == {"clip_score": 1.0}
    assert out[1]["error"] == "score: RuntimeError: CUDA out of memory"


def test_scorers_that_do_not_fit_beside_the_model_are_one_line_before_ray_starts(monkeypatch, tmp_path):
    from pipeline.scorer_check import ScorerError, check_scorers_fit
    from schemas import JobSpec

    job = JobSpec.model_validate({"manifest": str(tmp_path / "m.parquet"), "output": {"uri": str(tmp_path / "o")},
                                  "model": {"name": "flux.1-dev", "quantize": "fp8"}, "gpus_per_replica": 1,
                                  "quality": {"clip": "clip-vit-large-patch14"}})
    monkeypatch.setenv("FLUXBATCH_GPU_MEMORY", "13GiB")
    with pytest.raises(ScorerError, match=r"^gpus_per_replica 1 on 13GiB cards: the scorers \(--clip, --aesthetic\) "
                                          r"need 1\.6 GiB on GPU 0"):
        check_scorers_fit(job)
    monkeypatch.setenv("FLUXBATCH_GPU_MEMORY", "24GiB")
    check_scorers_fit(job)  # fits: nothing said


@pytest.mark.usefixtures("stand_in_for_this_test")  # driver behaviour: the stand-in renderer, scorer from bytes
def test_candidate_files_go_with_their_image_and_verify_names_one_missing_until_a_run_restores_it(
        tiny_model, scorers, tmp_path, capsys):
    quality = {**scorers, "keep_by": "aesthetic_score", "keep_candidates": True}
    out = tmp_path / "out"
    render(make_job(str(write_manifest(tmp_path / "m.parquet", BEST_OF)), str(out), str(tiny_model), batch_size=5,
                    quality=quality), progress=False)
    old_files = sorted((out / "candidates").rglob("*.png"))
    edited = write_manifest(tmp_path / "edited.parquet", [{**row, "candidates": 3} if row["id"] == "fox" else row
                                                          for row in BEST_OF])
    job = make_job(str(edited), str(out), str(tiny_model), batch_size=5, quality=quality)
    assert render(job, progress=False, rerender_changed=True).images_rendered == 2  # the fox row's two images
    files = sorted((out / "candidates").rglob("*.png"))
    fox_old = [f for f in old_files if f not in files]
    assert len(old_files) == 4 and len(fox_old) == 2  # the fox's 2 old files retired with its old image
    assert len(files) == 3  # the crane's 2, and the fox's 1 left of 3 candidates keeping 2
    assert call_cli(capsys, "verify", str(out)).returncode == 0

    files[0].unlink()
    found = call_cli(capsys, "verify", str(out))
    assert found.returncode == 1 and "missing candidate image: 1" in found.stdout, found.stdout
    assert call_cli(capsys, "verify", str(out), "--repair").returncode == 0
    assert render(job, progress=False).images_rendered == 1  # the row naming it renders again, with its candidates
    assert call_cli(capsys, "verify", str(out)).returncode == 0


def test_the_metadata_writer_commits_each_row_once_and_counts_a_rows_candidates_once(tmp_path):
    import pyarrow as pa

    from flux_worker.storage import filesystem
    from pipeline.store import ledger
    from schemas import IMAGE_RECORD_SCHEMA

    fs, root = filesystem(str(tmp_path))
    writer = ledger.MetadataWriter(fs, root, "20261205T000000-abcdef", [], seconds=3600)
    blank = {name: None for name in IMAGE_RECORD_SCHEMA.names}
    fox = [{**blank, "key": f"fox-{v}", "request_id": "fox", "seed": 100 + c, "candidate": c, "candidates": 4,
            "provenance": "xmp"} for v, c in ((0, 2), (1, 0))]
    plain = [{**blank, "key": "plain", "request_id": "plain", "seed": 1, "provenance": "xmp"}]
    for rows in (fox, plain):
        writer.add(pa.Table.from_pylist(rows, schema=IMAGE_RECORD_SCHEMA))
        writer.flush()
    keys = [key for part in ledger.parts(fs, f"{root}/metadata")
            for key in ledger.read_part(fs, root, part, ["key"]).column("key").to_pylist()]
    assert sorted(keys) == ["fox-0", "fox-1", "plain"] and writer.written == 3
    assert writer.candidates_rendered == 4  # the fox row's 4 candidates, once for its two kept images


@pytest.mark.usefixtures("stand_in_for_this_test")  # driver behaviour: the stand-in renderer, scorer from bytes
def test_a_run_renders_again_the_row_whose_candidate_file_went_missing_so_its_exit_0_means_verify_is_clean(
        tiny_model, scorers, tmp_path, capsys):
    out = tmp_path / "out"
    job = make_job(str(write_manifest(tmp_path / "m.parquet", BEST_OF)), str(out), str(tiny_model),
                   quality={**scorers, "keep_by": "aesthetic_score", "keep_candidates": True})
    render(job, progress=False)
    sorted((out / "candidates").rglob("*.png"))[0].unlink()
    assert call_cli(capsys, "verify", str(out)).returncode == 1
    again = render(job, progress=False)
    assert again.succeeded and again.images_rendered == 1  # the variant 0 naming the file, with its candidates
    assert call_cli(capsys, "verify", str(out)).returncode == 0
