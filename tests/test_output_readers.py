"""Every output opens with the common readers as they are, default arguments: `datasets`, `webdataset`,
Ray Data and pandas. One small render of mixed formats, packed as files and hf-parquet (a WebDataset of mixed
formats is refused), and one of a single format packed as WebDataset."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline import render
from pipeline.plan import MixedFormatsError
from schemas import JobSpec
from tests.helpers import metadata
from tests.own_ray import REPO
from tests.stand_in import stand_in

HIGH_SEED = 2**63 + 5  # a seed the manifest may give (0 to 2**64-1) that int64 cannot hold as it is
BAD_ROW = 3  # the manifest's fourth row, as pandas numbers it: df.iloc[3]
# With these ids (their keys order the ledger within a shape) a shard of 2 that took images in ledger order
# held the jpg sample, then the webp one: the mix that broke Ray's default WebDataset decoder.
ROWS = [
    {"id": "jug", "prompt": "a clay jug", "width": 64, "height": 64, "num_images": 1, "seed": None,
     "output_format": "jpeg"},
    {"id": "mug", "prompt": "a speckled mug", "width": 64, "height": 64, "num_images": 1, "seed": 11,
     "output_format": "webp"},
    {"id": "lamp", "prompt": "a brass lamp", "width": 80, "height": 64, "num_images": 2, "seed": HIGH_SEED,
     "output_format": "png"},
    {"id": "wide", "prompt": "too wide", "width": 1000, "height": 64, "num_images": 1, "seed": 3,
     "output_format": "png"},
]
SIZES = {"lamp": (80, 64), "mug": (64, 64), "jug": (64, 64)}


@pytest.fixture(scope="module")
def out(tmp_path_factory, tiny_model, ray_cluster, stand_in_renderer) -> Path:
    """One render into OUTPUT (the stand-in renderer: what readers see does not depend on the model), then packed
    as HF Parquet (a re-run that renders nothing)."""
    folder = tmp_path_factory.mktemp("readers")
    manifest = folder / "manifest.parquet"
    schema = pa.schema([("id", pa.string()), ("prompt", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
                        ("num_images", pa.int32()), ("seed", pa.uint64()), ("output_format", pa.string())])
    pq.write_table(pa.Table.from_pylist(ROWS, schema=schema), manifest)  # seed: uint64, as a user may write it
    output = folder / "out"
    for layout in ("files", "hf-parquet"):
        job = JobSpec.model_validate({"manifest": str(manifest), "model": {"name": str(tiny_model)},
                                      "replicas": 1, "batch_size": 8,
                                      "output": {"uri": str(output), "layout": layout, "shard_size": 2}})
        summary = render(job, progress=False)
        assert summary.images_total_done == 4 and summary.invalid_rows == 1
    return output


@pytest.fixture(scope="module")
def wds(tmp_path_factory, tiny_model, ray_cluster) -> Path:
    """The same rows in one format (jpeg), rendered by the stand-in renderer and packed as WebDataset shards of 2."""
    folder = tmp_path_factory.mktemp("readers-wds")
    manifest = folder / "manifest.parquet"
    rows = [{**row, "output_format": "jpeg", "seed": row["seed"] if row["seed"] != HIGH_SEED else 5} for row in ROWS]
    pq.write_table(pa.Table.from_pylist(rows), manifest)
    output = folder / "out"
    job = JobSpec.model_validate({"manifest": str(manifest), "model": {"name": str(tiny_model)}, "batch_size": 8,
                                  "output": {"uri": str(output), "layout": "webdataset", "shard_size": 2}})
    summary = render(job, progress=False, renderer_class=stand_in())
    assert summary.images_total_done == 4 and summary.invalid_rows == 1
    return output


def test_webdataset_of_mixed_formats_is_refused_and_leaves_the_output_as_it_was(out, tiny_model):
    before = {p.relative_to(out): p.read_bytes() if p.is_file() else None for p in out.rglob("*")}
    job = JobSpec.model_validate({"manifest": str(out.parent / "manifest.parquet"), "replicas": 1, "batch_size": 8,
                                  "model": {"name": str(tiny_model)},
                                  "output": {"uri": str(out), "layout": "webdataset", "shard_size": 2}})

    with pytest.raises(MixedFormatsError, match="--layout webdataset holds images of one format"):
        render(job, progress=False)

    assert {p.relative_to(out): p.read_bytes() if p.is_file() else None for p in out.rglob("*")} == before


@pytest.mark.slow
def test_webdataset_shards_load_whole_with_load_dataset_of_the_path_alone(wds, tmp_path, monkeypatch):
    loaded = load_offline(wds / "webdataset", tmp_path, monkeypatch)

    rows = by_key(wds)
    assert sorted(loaded["__key__"]) == sorted(rows)
    for item in loaded:
        assert item["jpg"] is not None and item["jpg"].size == SIZES[rows[item["__key__"]]["request_id"]]


def load_offline(folder: Path, tmp_path: Path, monkeypatch) -> object:
    """`datasets.load_dataset(folder)` at its defaults, with no hub and a cache of the test's own."""
    import datasets

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    return datasets.load_dataset(str(folder), split="train")


def by_key(output: Path) -> dict[str, dict]:
    return {row["key"]: row for row in metadata(str(output)).to_pylist()}


@pytest.mark.slow
def test_hf_parquet_folder_loads_with_load_dataset_of_the_path_alone(out, tmp_path, monkeypatch):
    import datasets

    loaded = load_offline(out / "hf", tmp_path, monkeypatch)

    rows = by_key(out)
    assert isinstance(loaded.features["image"], datasets.Image)
    assert loaded.features["seed"].dtype == "int64"
    assert sorted(loaded["key"]) == sorted(rows)
    for item in loaded:
        assert item["image"].size == SIZES[item["request_id"]]
        assert item["prompt"] == rows[item["key"]]["prompt"]


@pytest.mark.slow
def test_webdataset_shards_read_with_ray_data_read_webdataset_defaults(wds):
    import ray

    samples = ray.data.read_webdataset(str(wds / "webdataset")).take_all()

    rows = by_key(wds)
    assert sorted(s["__key__"] for s in samples) == sorted(rows)
    for sample in samples:
        row = rows[sample["__key__"]]
        assert sample["txt"] == row["prompt"]
        assert sample["json"]["seed"] == row["seed"]
        width, height = SIZES[row["request_id"]]
        if row["output_format"] == "webp":  # Ray's default decoder knows png and jpg; webp stays as its bytes
            assert Image.open(io.BytesIO(sample["webp"])).size == (width, height)
        else:
            image = sample["png" if row["output_format"] == "png" else "jpg"]
            assert image.shape == (height, width, 3)


@pytest.mark.slow
def test_webdataset_shards_iterate_with_the_webdataset_library(wds):
    import webdataset

    shards = sorted(str(p) for p in (wds / "webdataset").glob("*.tar"))
    samples = list(webdataset.WebDataset(shards, shardshuffle=False).decode("pil"))

    rows = by_key(wds)
    assert sorted(s["__key__"] for s in samples) == sorted(rows)
    for sample in samples:
        row = rows[sample["__key__"]]
        suffix = {"png": "png", "jpeg": "jpg", "webp": "webp"}[row["output_format"]]
        assert sample[suffix].size == SIZES[row["request_id"]]
        assert sample["json"] == json.loads(json.dumps(sample["json"])) and sample["json"]["key"] == row["key"]
    for shard in shards:  # one format in every shard: readers take one shard's columns for all
        formats = {name.rsplit(".", 1)[-1] for name in tarfile.open(shard).getnames()}
        assert formats - {"json", "txt"} == {"jpg"}, (shard, formats)


@pytest.mark.slow
def test_images_folder_reads_with_ray_data_read_images(out):
    import ray

    # Ray's default file_extensions leave out webp (README: pass them to read every image).
    plain = ray.data.read_images(str(out / "images")).take_all()
    every = ray.data.read_images(str(out / "images"),
                                 file_extensions=["png", "jpg", "jpeg", "webp"], include_paths=True).take_all()

    formats = [row["output_format"] for row in by_key(out).values()]
    assert len(plain) == len(formats) - formats.count("webp")
    assert len(every) == len(formats)
    shapes = sorted(row["image"].shape for row in every)
    assert shapes == sorted([(64, 80, 3)] * 2 + [(64, 64, 3)] * 2)


@pytest.mark.slow
def test_tables_read_with_pandas_keep_integers_and_seeds_fit_int64(out):
    meta = pd.read_parquet(out / "metadata")
    hf = pd.read_parquet(out / "hf")
    failed = pd.read_parquet(out / "failures")

    for table in (meta, hf):
        assert str(table["seed"].dtype) == "int64" and str(table["variant"].dtype) == "int32"
        lamp = table[table["request_id"] == "lamp"].sort_values("variant")["seed"].tolist()
        # 2**63 + 5 and + 6 do not fit: stored as the same 64 bits, signed; % 2**64 gives the seed back.
        assert [seed % 2**64 for seed in lamp] == [HIGH_SEED, HIGH_SEED + 1]
        assert lamp == [HIGH_SEED - 2**64, HIGH_SEED + 1 - 2**64]
    # No unsigned column anywhere: Spark and several warehouses refuse them.
    for path in [*(out / "metadata").glob("*.parquet"), *(out / "hf").glob("*.parquet")]:
        assert not any(pa.types.is_unsigned_integer(f.type) for f in pq.read_schema(path))
    # A null in an integer column leaves it an integer column (pandas' nullable Int32 / Int64).
    assert str(failed["variant"].dtype) == "Int32" and str(failed["row"].dtype) == "Int64"
    assert failed["variant"].isna().all()
    assert set(failed["row"]) == {BAD_ROW}
    source = pd.read_parquet(failed["source"].iloc[0])
    assert source.iloc[int(failed["row"].iloc[0])]["id"] == "wide"


@pytest.mark.slow
def test_validate_prints_the_row_the_failures_table_holds_counted_from_0(out, tiny_model):
    manifest = out.parent / "manifest.parquet"
    result = subprocess.run([sys.executable, "-m", "jobs.cli", "validate", str(manifest), "--model", str(tiny_model)],
                            capture_output=True, text=True, timeout=300, cwd=REPO)

    assert result.returncode == 1, result.stderr[-2000:]
    assert f"{manifest} row {BAD_ROW} (id 'wide')" in result.stdout
    assert "rows are counted from 0, as pandas counts them" in result.stderr
    assert pd.read_parquet(manifest).iloc[BAD_ROW]["id"] == "wide"
