"""Dataset synthesis: a spec draws the same manifest every time, and renders to files, WebDataset or HF Parquet."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from jobs.synthesize import SlotVocabularyError, draw_manifest, synthesize
from schemas.synthesis import SynthesisSpec
from tests.helpers import assert_images_match_metadata, error_lines, metadata

pytestmark = pytest.mark.usefixtures("stand_in_renderer")  # the driver's behaviour; the model does not matter


def make_spec(out: str, model: str = "flux.1-schnell", layout: str = "files", shard_size: int = 1000,
              **fields) -> SynthesisSpec:
    data = {
        "templates": ["a photo of a {color} {animal}", "a drawing of a {animal} in {place}"],
        "slots": {"color": ["red", "green", "blue"], "animal": ["cat", "dog", "owl", "fox"],
                  "place": ["a forest", "a city"]},
        "prompts": 5,
        "images_per_prompt": 1,
        "seed": 7,
        "label_slot": "animal",
        "output": {"uri": out, "layout": layout, "shard_size": shard_size},
        "model": {"name": model},
        "defaults": {"width": 64, "height": 64},
        "render": {"batch_size": 4},
    }
    data.update(fields)
    return SynthesisSpec.model_validate(data)


def test_same_spec_draws_the_same_manifest_and_more_prompts_keep_the_first(tmp_path):
    first = draw_manifest(make_spec(str(tmp_path)))
    again = draw_manifest(make_spec(str(tmp_path)))
    longer = draw_manifest(make_spec(str(tmp_path), prompts=9))
    other_seed = draw_manifest(make_spec(str(tmp_path), seed=8))

    assert first.equals(again)
    assert longer.slice(0, 5).equals(first)
    assert other_seed.column("prompt").to_pylist() != first.column("prompt").to_pylist()
    assert len(set(first.column("seed").to_pylist())) == 5


def test_drawn_prompts_fill_every_slot_and_carry_their_class_label(tmp_path):
    table = draw_manifest(make_spec(str(tmp_path), prompts=40))
    animals = ["cat", "dog", "owl", "fox"]
    for row in table.to_pylist():
        assert "{" not in row["prompt"]
        assert row["label"] == row["slot_animal"] and row["label"] in row["prompt"]
        assert row["label_id"] == animals.index(row["label"])
        if row["template"] == 0:
            assert row["prompt"] == f"a photo of a {row['slot_color']} {row['slot_animal']}"
    assert set(table.column("template").to_pylist()) == {0, 1}
    assert set(table.column("label").to_pylist()) == set(animals)


def test_slot_vocabulary_can_come_from_a_parquet_column(tmp_path):
    words = tmp_path / "animals.parquet"
    pq.write_table(pa.table({"name": ["heron", None, "  ", "otter"], "n": [1, 2, 3, 4]}), words)
    spec = make_spec(str(tmp_path), prompts=30,
                     slots={"color": ["red"], "animal": {"parquet": str(words), "column": "name"}, "place": ["x"]})
    assert set(draw_manifest(spec).column("label").to_pylist()) == {"heron", "otter"}

    missing = make_spec(str(tmp_path), slots={"color": ["red"], "place": ["x"],
                                              "animal": {"parquet": str(words), "column": "species"}})
    with pytest.raises(SlotVocabularyError, match=r"slot 'animal': .* has no column 'species'; it has: name, n"):
        draw_manifest(missing)


@pytest.mark.parametrize(("change", "message"), [
    ({"templates": ["a {colour} cat"]}, "uses slot 'colour', which `slots` does not declare"),
    ({"templates": ["a {color:>10} cat"]}, "is not a plain placeholder"),
    ({"label_slot": "place"}, "does not use the label slot {place}"),
    ({"slots": {"color": [], "animal": ["cat"], "place": ["x"]}}, "slot 'color' has an empty vocabulary"),
    ({"render": {"replicas": 0}}, "render.replicas: Input should be greater than or equal to 1"),
    ({"render": {"manifest": "x.parquet"}}, "render.manifest is set by the spec itself"),
])
def test_spec_mistakes_are_refused_with_what_to_fix(tmp_path, change, message):
    with pytest.raises(ValidationError, match=message.replace("{", r"\{").replace("}", r"\}")):
        make_spec(str(tmp_path), **change)


@pytest.mark.slow
@pytest.mark.usefixtures("ray_cluster")
def test_synthesis_writes_its_manifest_and_renders_webdataset_shards_that_webdataset_iterates(tmp_path, tiny_model):
    import webdataset as wds

    out = tmp_path / "out"
    spec = make_spec(str(out), str(tiny_model), images_per_prompt=2, layout="webdataset", shard_size=4)
    manifest, summary = synthesize(spec, progress=False)

    assert manifest == str(out / "manifest.parquet")
    assert pq.read_table(manifest).equals(draw_manifest(spec))
    assert (summary.images_rendered, summary.images_failed) == (10, 0)
    table = assert_images_match_metadata(str(out))
    shards = sorted((out / "webdataset").glob("*.tar"))
    assert [p.name for p in shards] == ["00000.tar", "00001.tar", "00002.tar"]

    samples = list(wds.WebDataset([str(p) for p in shards], shardshuffle=False).decode("pil"))
    assert len(samples) == 10
    by_key = {r["key"]: r for r in table.to_pylist()}
    assert {s["__key__"] for s in samples} == set(by_key)
    for sample in samples:
        row = by_key[sample["__key__"]]
        assert sample["png"].size == (64, 64)
        assert sample["txt"] == row["prompt"]
        assert sample["json"]["seed"] == row["seed"] and sample["json"]["label"] == row["label"]
    stats = [json.loads((out / "webdataset" / ".stats" / f"{i:05d}.json").read_text()) for i in range(3)]
    assert [s["count"] for s in stats] == [4, 4, 2]
    total = json.loads((out / "webdataset" / ".stats.json").read_text())
    assert (total["images"], total["shards"], total["formats"]) == (10, 3, {"png": 10})
    assert total["image_bytes"] == sum(table.column("bytes").to_pylist())


@pytest.mark.slow
@pytest.mark.usefixtures("ray_cluster")
def test_synthesis_renders_hf_parquet_that_datasets_loads_with_images_decoded(tmp_path, tiny_model, monkeypatch):
    import datasets

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "out"
    spec = make_spec(str(out), str(tiny_model), layout="hf-parquet", shard_size=3)
    synthesize(spec, progress=False)

    files = sorted(str(p) for p in (out / "hf").glob("*.parquet"))
    assert [Path(f).name for f in files] == ["00000.parquet", "00001.parquet"]
    loaded = datasets.load_dataset("parquet", data_files={"train": files}, split="train",
                                   cache_dir=str(tmp_path / "hf-cache"))
    assert isinstance(loaded.features["image"], datasets.Image)
    assert loaded.num_rows == 5
    rows = {r["key"]: r for r in metadata(str(out)).to_pylist()}
    for item in loaded:
        assert item["image"].size == (64, 64)
        assert item["prompt"] == rows[item["key"]]["prompt"]
        assert item["label"] == rows[item["key"]]["label"]


@pytest.mark.slow
@pytest.mark.usefixtures("ray_cluster")
def test_rerun_renders_new_prompts_rewrites_changed_shards_and_packs_only_the_manifest(tmp_path, tiny_model):
    out = tmp_path / "out"
    layout = {"layout": "webdataset", "shard_size": 3}
    synthesize(make_spec(str(out), str(tiny_model), prompts=4, **layout), progress=False)
    full_shard = (out / "webdataset" / "00000.tar").stat().st_mtime_ns

    manifest, summary = synthesize(make_spec(str(out), str(tiny_model), prompts=7, **layout), progress=False)

    assert (summary.images_already_done, summary.images_rendered) == (4, 3)
    assert (out / "webdataset" / "00000.tar").stat().st_mtime_ns == full_shard
    total = json.loads((out / "webdataset" / ".stats.json").read_text())
    assert (total["images"], total["shards"]) == (7, 3)

    # Fewer prompts: nothing renders, and only the current manifest's images are packed.
    _, summary = synthesize(make_spec(str(out), str(tiny_model), prompts=2, **layout), progress=False)
    assert summary.images_rendered == 0
    assert sorted(p.name for p in (out / "webdataset").glob("*.tar")) == ["00000.tar"]
    assert json.loads((out / "webdataset" / ".stats.json").read_text())["images"] == 2


def write_spec_yaml(path: Path, spec: SynthesisSpec) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(spec.model_dump(mode="json")))
    return path


def test_cli_synthesize_draw_only_writes_the_manifest_and_renders_nothing(tmp_path, capsys):
    from jobs.cli import main

    out = tmp_path / "out"
    # A default of 64 px is one flux.1-schnell cannot render: refused, naming the spec, before anything is drawn.
    bad = write_spec_yaml(tmp_path / "bad.yaml", make_spec("unused"))
    assert main(["synthesize", str(bad), "--output", str(out), "--draw-only"]) == 2
    assert f"error: {bad}: defaults.width: width must be between 256 and 2048" in capsys.readouterr().err
    assert not out.exists()
    spec_file = write_spec_yaml(tmp_path / "spec.yaml", make_spec("unused", defaults={}))  # the preset's size
    assert main(["synthesize", str(spec_file), "--output", str(out), "--draw-only"]) == 0

    assert pq.read_table(out / "manifest.parquet").equals(draw_manifest(make_spec(str(out))))
    assert json.loads((out / "synthesis.json").read_text())["prompts"] == 5
    assert not (out / "images").exists()
    assert f"drew 5 prompts x 1 images into {out / 'manifest.parquet'}" in capsys.readouterr().out


def test_cli_synthesize_names_the_slot_whose_parquet_column_is_missing(tmp_path, capsys):
    from jobs.cli import main

    words = tmp_path / "w.parquet"
    pq.write_table(pa.table({"name": ["cat"]}), words)
    spec = make_spec(str(tmp_path / "out"), defaults={}, slots={"color": ["red"], "place": ["x"],
                                                                "animal": {"parquet": str(words), "column": "species"}})
    assert main(["synthesize", str(write_spec_yaml(tmp_path / "s.yaml", spec)), "--draw-only"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: slot 'animal': {str(words)!r} has no column 'species'; it has: name"


@pytest.mark.slow
@pytest.mark.usefixtures("ray_cluster")
def test_synthesis_packs_hf_parquet_on_s3(tmp_path, tiny_model, s3_env, bucket):
    import hashlib

    import s3fs

    out = f"s3://{bucket}/synth"
    synthesize(make_spec(out, str(tiny_model), prompts=3, layout="hf-parquet"), progress=False)

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    assert sorted(fs.ls(f"{bucket}/synth/hf", detail=False)) == [f"{bucket}/synth/hf/.stats",
                                                                 f"{bucket}/synth/hf/.stats.json",
                                                                 f"{bucket}/synth/hf/00000.parquet"]
    table = pq.read_table(pa.BufferReader(fs.cat_file(f"{bucket}/synth/hf/00000.parquet")))
    assert json.loads(table.schema.metadata[b"huggingface"])["info"]["features"]["image"] == {"_type": "Image"}
    rows = {r["key"]: r for r in metadata(out).to_pylist()}
    assert table.num_rows == 3
    for row in table.to_pylist():
        assert hashlib.sha256(row["image"]["bytes"]).hexdigest() == rows[row["key"]]["sha256"]


@pytest.mark.slow
@pytest.mark.usefixtures("ray_cluster")
def test_cli_synthesize_names_an_image_altered_since_its_row_in_one_line(tmp_path, tiny_model, capsys):
    from jobs.cli import main

    out = tmp_path / "out"
    spec_file = write_spec_yaml(tmp_path / "s.yaml", make_spec(str(out), model=str(tiny_model), layout="webdataset"))
    assert main(["synthesize", str(spec_file), "--no-progress"]) == 0
    image = next((out / "images").rglob("*.png"))
    # The same length: a run's own check compares sizes (and renders an image of another size again); packing
    # reads every image, so it finds the bytes differ.
    image.write_bytes(image.read_bytes()[:-8] + b"tampered")
    for shard in (out / "webdataset").glob("*.tar"):  # packing must read every image again
        shard.unlink()
    capsys.readouterr()

    assert main(["synthesize", str(spec_file), "--no-progress"]) == 2
    err, = error_lines(capsys.readouterr().err)  # one line, after the run's phase lines
    assert "Traceback" not in err
    assert err.startswith(f"error: image {image} (key {image.stem}) does not match the sha256 in its metadata row")
