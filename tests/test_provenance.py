"""Provenance: every image says it is AI-generated and what made it (XMP by default, C2PA on request, a watermark on
request), the ledger records what each carries, and `fluxbatch verify --provenance` reads it back.

The driver tests render with the stand-in renderer (its images go through the real ImageWriter, so the marks are
the real ones); the watermark's read-back uses the real tiny pipeline's images.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import c2pa
import pytest
from PIL import Image

from flux_worker.provenance import embedded_xmp, xmp_fields
from pipeline import render
from schemas.provenance import TRAINED_ALGORITHMIC_MEDIA
from tests.conftest import write_manifest
from tests.helpers import make_job, metadata
from tests.signing_certs import make_signer
from tests.test_cli import call_cli

pytestmark = pytest.mark.usefixtures("ray_cluster", "stand_in_renderer")

FORMATS = ["png", "jpeg", "webp"]
ROWS = [{"id": f"r-{fmt}", "prompt": f"a confidential {fmt} prompt", "width": 64, "height": 64, "steps": 2,
         "output_format": fmt} for fmt in FORMATS]


def _images(output: Path) -> dict[str, tuple[bytes, dict]]:
    """Each committed image's bytes and its ledger row, by the row's output format."""
    return {row["output_format"]: (Path(row["image_uri"].removeprefix("file://")).read_bytes(), row)
            for row in metadata(str(output)).to_pylist()}


def _xmp(data: bytes) -> dict[str, str]:
    return xmp_fields(embedded_xmp(Image.open(io.BytesIO(data))) or b"")


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    return write_manifest(tmp_path_factory.mktemp("provenance") / "m.parquet", ROWS)


@pytest.fixture(scope="module")
def marked(manifest, tiny_model) -> Path:
    """An OUTPUT rendered with the default marks, one image per metadata part; tests change copies of it."""
    out = manifest.parent / "marked"
    render(make_job(str(manifest), str(out), str(tiny_model), commit_seconds=0, batch_size=1), progress=False)
    return out


def _copy(marked: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(marked, tmp_path / "out"))


@pytest.fixture(scope="module")
def signer(tmp_path_factory):
    return make_signer(tmp_path_factory.mktemp("certificates"))


def test_every_image_carries_xmp_saying_ai_generated_by_which_model_and_same_bytes_again(manifest, tiny_model,
                                                                                       marked, tmp_path):
    summary = render(make_job(str(manifest), str(tmp_path / "second"), str(tiny_model)), progress=False)
    assert summary.images_rendered == 3
    first, second = _images(marked), _images(tmp_path / "second")
    for fmt in FORMATS:
        data, row = first[fmt]
        fields = _xmp(data)  # read back with Pillow from the PNG iTXt, the JPEG APP1, the WebP XMP chunk
        assert fields["Iptc4xmpExt:DigitalSourceType"] == TRAINED_ALGORITHMIC_MEDIA, fmt
        assert fields["Iptc4xmpExt:AISystemUsed"] == row["model_id"]
        assert fields["xmp:CreatorTool"].startswith("fluxbatch ")
        assert "Iptc4xmpExt:AIPromptInformation" not in fields and b"confidential" not in data  # not asked
        assert row["provenance"] == "xmp"
        assert second[fmt][0] == data, f"{fmt}: XMP must keep the same row's bytes the same"


def test_the_prompt_goes_into_the_xmp_only_when_the_job_asks(manifest, tiny_model, tmp_path):
    render(make_job(str(manifest), str(tmp_path / "out"), str(tiny_model), provenance={"include_prompt": True}),
           progress=False)
    for fmt, (data, row) in _images(tmp_path / "out").items():
        assert _xmp(data)["Iptc4xmpExt:AIPromptInformation"] == row["prompt"], fmt


def test_no_provenance_writes_bare_images_and_verify_provenance_names_each(manifest, tiny_model, tmp_path, capsys):
    out = tmp_path / "bare"
    result = call_cli(capsys, "render", str(manifest), str(out), "--model", str(tiny_model), "--no-provenance",
                      "--no-progress")
    assert result.returncode == 0, result.stderr
    for fmt, (data, row) in _images(out).items():
        assert _xmp(data) == {} and row["provenance"] == "", fmt
    assert call_cli(capsys, "verify", str(out)).returncode == 0  # the ledger and the images agree
    checked = call_cli(capsys, "verify", str(out), "--provenance")
    assert checked.returncode == 1
    assert "image lacking provenance: 3" in checked.stdout
    for row in metadata(str(out)).to_pylist():
        assert f"{row['key']}: {row['image_uri']}: no provenance marks: rendered with --no-provenance" in checked.stdout
    assert "3 images as written lack provenance marks: neither --repair nor a re-run marks" in checked.stdout
    assert "provenance: the marks of 3 images read back" in checked.stdout
    bare = call_cli(capsys, "provenance", metadata(str(out)).column("image_uri")[0].as_py())
    assert bare.returncode == 1
    assert "NOT marked as AI-generated" in bare.stdout and "xmp: no DigitalSourceType" in bare.stdout


def test_c2pa_signed_images_validate_name_the_model_and_a_tampered_one_is_named(manifest, tiny_model, signer, tmp_path,
                                                                               capsys):
    out = tmp_path / "signed"
    result = call_cli(capsys, "render", str(manifest), str(out), "--model", str(tiny_model), "--no-progress",
                      "--c2pa-certificate", str(signer.certificate), "--c2pa-key", str(signer.key))
    assert result.returncode == 0, result.stderr
    images = _images(out)
    for fmt, (data, row) in images.items():
        assert row["provenance"] == "xmp+c2pa"
        with c2pa.Reader(f"image/{fmt}", io.BytesIO(data)) as reader:
            assert reader.get_validation_state() == "Valid", (fmt, reader.get_validation_results())
            manifest_json = reader.get_active_manifest()
        actions = [a for assertion in manifest_json["assertions"] if assertion["label"].startswith("c2pa.actions")
                   for a in assertion["data"]["actions"]]
        assert actions[0]["action"] == "c2pa.created"
        assert actions[0]["digitalSourceType"] == TRAINED_ALGORITHMIC_MEDIA
        assert actions[0]["softwareAgent"]["name"] == "fluxbatch"
        assert [i["title"] for i in manifest_json["ingredients"]] == [row["model_id"]]
        assert manifest_json["ingredients"][0]["relationship"] == "inputTo"
        assert _xmp(data)["Iptc4xmpExt:DigitalSourceType"] == TRAINED_ALGORITHMIC_MEDIA  # XMP survives signing
    assert call_cli(capsys, "verify", str(out), "--provenance").stdout.strip().endswith(": clean")
    shown = call_cli(capsys, "provenance", *[row["image_uri"] for _, row in images.values()])
    assert shown.returncode == 0
    assert shown.stdout.count("marked as AI-generated") == 3
    assert shown.stdout.count("c2pa: valid manifest, created as trainedAlgorithmicMedia") == 3
    assert shown.stdout.count("xmp: trainedAlgorithmicMedia, by fluxbatch") == 3

    data, row = images["png"]
    tampered = bytearray(data)
    tampered[len(tampered) // 2] ^= 0xFF  # one byte of the image data changed after signing
    Path(row["image_uri"].removeprefix("file://")).write_bytes(bytes(tampered))
    checked = call_cli(capsys, "verify", str(out), "--provenance")
    assert checked.returncode == 1
    assert f"{row['key']}: {row['image_uri']}: C2PA manifest invalid (" in checked.stdout, checked.stdout
    assert "altered image: 1" in checked.stdout  # plain verify's finding too: its sha256 differs
    assert "as written lack" not in checked.stdout  # altered: --repair and a re-run render it again, marked
    shown = call_cli(capsys, "provenance", row["image_uri"])
    assert "c2pa: C2PA manifest invalid (" in shown.stdout
    assert "marked as AI-generated, and changed since its C2PA manifest was signed" in shown.stdout
    assert shown.returncode == 1


@pytest.mark.parametrize("mistake", ["expired", "other key", "not PEM", "missing", "no key", "PEM text as URL"])
def test_a_bad_signing_certificate_is_one_line_before_anything_is_written(mistake, manifest, tiny_model, signer,
                                                                         tmp_path, capsys):
    old = make_signer(tmp_path / "old", days=-3)
    certificate, key = {"expired": (old.certificate, old.key), "other key": (signer.certificate, old.key),
                        "not PEM": (manifest, signer.key), "missing": (tmp_path / "none.pem", signer.key),
                        "no key": (signer.certificate, None),
                        "PEM text as URL": (signer.certificate, signer.key.read_text())}[mistake]
    out = tmp_path / "out"
    args = ["render", str(manifest), str(out), "--model", str(tiny_model), "--no-progress",
            "--c2pa-certificate", str(certificate)] + (["--c2pa-key", str(key)] if key else [])
    result = call_cli(capsys, *args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert {"expired": "the certificate expired on", "other key": "is not the key of", "missing": "no such file",
            "not PEM": "not a PEM certificate chain",
            "no key": "c2pa_certificate (--c2pa-certificate) needs c2pa_key (--c2pa-key URL) too",
            "PEM text as URL": "--c2pa-key: takes the URL of a PEM file (a path, s3://...), not the PEM text itself",
            }[mistake] in lines[0]
    assert not out.exists()
    assert signer.key_body not in result.stderr and old.key_body not in result.stderr


def test_changing_the_marks_is_another_job_and_an_output_made_before_marks_goes_on(manifest, tiny_model, marked,
                                                                                  tmp_path, capsys):
    out = _copy(marked, tmp_path)
    refused = call_cli(capsys, "render", str(manifest), str(out), "--model", str(tiny_model), "--no-progress",
                       "--watermark", "fb")
    assert refused.returncode == 2
    assert "provenance.marks was 'xmp', now 'xmp+watermark'" in refused.stderr

    # An OUTPUT whose _job.json was written before fluxbatch marked images: a re-run goes on in it.
    job_file = out / "_job.json"
    document = json.loads(job_file.read_text())
    del document["identity"]["provenance"]
    job_file.write_text(json.dumps(document))
    write_manifest(manifest.parent / "more" / "m.parquet", ROWS + [dict(ROWS[0], id="new")])
    again = render(make_job(str(manifest.parent / "more" / "m.parquet"), str(out), str(tiny_model)), progress=False)
    assert (again.images_rendered, again.images_already_done) == (1, 3)
    # That run recorded its marks: from now on they are this OUTPUT's, as for one made with them.
    assert json.loads(job_file.read_text())["identity"]["provenance"]["marks"] == "xmp"
    assert call_cli(capsys, "render", str(manifest), str(out), "--model", str(tiny_model), "--no-progress",
                    "--no-provenance").returncode == 2


def test_a_watermark_refuses_rows_smaller_than_256x256_by_row_and_field(manifest, tiny_model, capsys):
    result = call_cli(capsys, "validate", str(manifest), "--model", str(tiny_model), "--watermark", "fb")
    assert result.returncode == 1
    assert f"{manifest} row 0 (id 'r-png'): field 'width': width must be between 256 and" in result.stdout


def test_a_watermark_reads_back_from_an_image_the_real_pipeline_rendered(tmp_path, tiny_model):
    """The tiny pipeline's own 512x512 image (a Renderer in this process, no Ray), watermarked as the job asks.
    Bit accuracy after a JPEG re-encode at quality 80 is printed, not asserted: random weights render texture that
    such a re-encode wipes out (about 0.5, chance); smooth images keep about 0.8 (benchmarks/README.md)."""
    import hashlib

    import pyarrow as pa

    from flux_worker.renderer import Renderer
    from flux_worker.watermark import bit_accuracy
    from schemas import PLAN_SCHEMA, RenderOptions
    from schemas.provenance import ProvenanceSpec

    text = "fb-2026"
    renderer = Renderer({"name": str(tiny_model)}, RenderOptions(
        output_uri=str(tmp_path / "out"), provenance=ProvenanceSpec(watermark=text)))
    row = {"key": hashlib.blake2b(b"w", digest_size=16).hexdigest(), "request_id": "w", "variant": 0,
           "prompt": "a lighthouse", "width": 512, "height": 512, "steps": 2, "guidance": 3.5, "seed": 7,
           "max_sequence_length": 32, "adapters": [], "output_format": "png", "source": "m.parquet", "row": 0}
    result = renderer(pa.Table.from_pylist([row], schema=PLAN_SCHEMA)).to_pylist()[0]
    assert (result["error"], result["provenance"]) == (None, "xmp+watermark")
    image = Image.open(result["image_uri"])
    recompressed = io.BytesIO()
    image.convert("RGB").save(recompressed, format="JPEG", quality=80)
    as_rendered, after_jpeg = bit_accuracy(image, text), bit_accuracy(Image.open(recompressed), text)
    print(f"watermark bit accuracy: as rendered {as_rendered:.3f}, after JPEG q80 {after_jpeg:.3f}")
    assert as_rendered == 1.0
    assert bit_accuracy(image, "other!") < 0.8  # another text is not found in it


def test_an_image_whose_picture_cannot_hold_the_watermark_is_recorded_without_it_and_named(tmp_path, tiny_model,
                                                                                         capsys):
    """Noise (as random weights render) written as JPEG at quality 95 loses dwtDct's bits; as PNG it keeps them.
    The writer reads each watermark back from the bytes it wrote, so the ledger never claims one a file lacks."""
    rows = [{"id": f"w-{fmt}", "prompt": "noise", "width": 256, "height": 256, "steps": 2, "output_format": fmt}
            for fmt in ("png", "jpeg")]
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    out = tmp_path / "out"
    result = call_cli(capsys, "render", str(manifest), str(out), "--model", str(tiny_model), "--no-progress",
                      "--watermark", "fb")
    assert result.returncode == 0  # every image is there, and the run says which could not hold the watermark
    assert (f"1 image could not hold the watermark (flat colour, fine texture, a small image; JPEG and WebP lose "
            "more of it than PNG): written without "
            f"it; `fluxbatch verify {out} --provenance` names them") in result.stdout
    report = (out / "report.html").read_text()
    assert "marks <code>xmp+watermark</code>" in report
    assert "<td>rendered without the watermark (the picture could not hold it)</td><td>1</td>" in report.replace(
        "\n", "")
    assert json.loads((out / "summary.json").read_text())["marks"] == "xmp+watermark"
    images = _images(out)
    assert images["png"][1]["provenance"] == "xmp+watermark"
    assert images["jpeg"][1]["provenance"] == "xmp"
    checked = call_cli(capsys, "verify", str(out), "--provenance")
    assert checked.returncode == 1
    assert f"{images['jpeg'][1]['key']}: {images['jpeg'][1]['image_uri']}: no watermark 'fb': the picture could " \
           "not hold it" in checked.stdout
    assert "image lacking provenance: 1" in checked.stdout


def test_verify_provenance_reports_beside_an_unreadable_part_and_a_truncated_image(marked, tmp_path, capsys):
    import pyarrow.parquet as pq

    out = _copy(marked, tmp_path)
    # (a truncated PNG's header and XMP still read; a truncated JPEG, WebP or C2PA check names what it cannot read)
    parts = sorted((out / "metadata").glob("*.parquet"))
    assert len(parts) >= 2
    name = Path(pq.read_table(parts[-1]).column("image_uri")[0].as_py()).name  # the copy's: found by name
    truncated = next(out.glob(f"images/*/{name}"))
    truncated.write_bytes(truncated.read_bytes()[:100])
    parts[0].write_bytes(b"")  # an emptied part
    checked = call_cli(capsys, "verify", str(out), "--provenance")
    assert checked.returncode == 1, checked.stderr
    assert "unreadable part: 1" in checked.stdout and "altered image: 1" in checked.stdout
    assert str(truncated) in checked.stdout and not checked.stderr  # named, and no traceback


def test_a_signature_whose_certificate_expired_since_is_not_called_tampering(tmp_path):
    import time

    from pipeline.signing import check_credentials
    from pipeline.store.provenance_check import c2pa_findings, image_marks
    from schemas import OutputFormat

    short = make_signer(tmp_path, days=3 / 86400)  # valid for 2-3 more seconds (X.509 keeps whole seconds)
    credentials = check_credentials(short.certificate.read_bytes(), short.key.read_bytes(), "cert", "key")
    image = io.BytesIO()
    Image.new("RGB", (64, 64), "teal").save(image, format="PNG")
    from flux_worker.provenance import Signer, c2pa_manifest

    signed = Signer(credentials).sign(image.getvalue(), OutputFormat.png, c2pa_manifest({"model_id": "m"}, "x.png"))
    assert c2pa_findings(signed, OutputFormat.png) == []
    time.sleep(4.5)
    findings = c2pa_findings(signed, OutputFormat.png)
    assert [tampered for _, tampered in findings] == [False], findings
    assert "signingCredential.expired" in findings[0][0] and "the image is as signed" in findings[0][0]
    lines, marked, tampered = image_marks(signed, None)
    assert not tampered
    assert marked, lines
    tampered = bytearray(signed)
    tampered[len(tampered) // 2] ^= 0xFF
    assert [t for _, t in c2pa_findings(bytes(tampered), OutputFormat.png)] == [True]


def test_marks_of_reads_only_fluxbatchs_mark_names():
    from schemas.provenance import marks_of

    assert marks_of("xmp+c2pa+watermark") == {"xmp", "c2pa", "watermark"}
    assert marks_of("") == set()
    assert marks_of(None) is None
    assert marks_of("licensed-stock") is None  # a manifest's own `provenance` column, kept by an older fluxbatch


def test_packed_shards_made_before_the_provenance_column_are_packed_again_with_it(tmp_path, tiny_model):
    import datasets
    import pyarrow.parquet as pq

    rows = [{"id": f"p{i}", "prompt": f"a bowl {i}", "width": 64, "height": 64, "steps": 2} for i in range(4)]
    out = tmp_path / "out"
    first = write_manifest(tmp_path / "first" / "m.parquet", rows[:2])
    from schemas import JobSpec

    def job(manifest: Path) -> JobSpec:
        return JobSpec.model_validate({"manifest": str(manifest), "model": {"name": str(tiny_model)},
                                       "output": {"uri": str(out), "layout": "hf-parquet", "shard_size": 2}})

    render(job(first), progress=False)
    # As an older fluxbatch left it: parts and the full first shard without the column.
    for path in list((out / "metadata").glob("*.parquet")) + list((out / "hf").glob("*.parquet")):
        table = pq.read_table(path)
        pq.write_table(table.drop_columns(["provenance"]), path)
    from pipeline.store.pack import pack_images

    pack_images(job(first), set(metadata(str(out)).column("key").to_pylist()))
    assert "provenance" not in pq.read_schema(out / "hf" / "00000.parquet").names
    second = write_manifest(tmp_path / "second" / "m.parquet", rows)
    render(job(second), progress=False)
    shards = sorted(str(p) for p in (out / "hf").glob("*.parquet"))
    assert len(shards) == 2
    assert all("provenance" in pq.read_schema(shard).names for shard in shards)
    assert datasets.load_dataset("parquet", data_files=shards, split="train").num_rows == 4
