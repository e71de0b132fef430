"""What each provenance mark costs per image on CPU, and what the watermark survives.

    .venv/bin/python benchmarks/bench_provenance.py [--sizes 512 1024] [--repeats 5]

Cost: the seconds the image writer spends per image (flux_worker/image_writer.py: watermark, encode with XMP, the
watermark read back from the encoded bytes, C2PA signature) for each format and each option, against the bare
encode, median of `--repeats`, one thread (as one writer thread works). The C2PA signer is a test certificate made
here (tests/signing_certs.py), ES256.

Survival: the watermark's bit accuracy (1.0 all bits right, about 0.5 chance) as written in each format, and after
a JPEG re-encode at quality 80, for two kinds of picture: smooth (blurred colour noise, as photographs and most
renders are) and texture (the random-weight tiny pipeline's look: fine noise). No model is loaded.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flux_worker.encode import encode_image  # noqa: E402
from flux_worker.provenance import ImageMarks  # noqa: E402
from flux_worker.watermark import bit_accuracy  # noqa: E402
from pipeline.signing import check_credentials  # noqa: E402
from schemas import OutputFormat  # noqa: E402
from schemas.provenance import ProvenanceSpec  # noqa: E402
from tests.signing_certs import make_signer  # noqa: E402

TEXT = "fb-2026"
IDENTITY = {"model_id": "black-forest-labs/FLUX.1-dev", "model_revision": "0123456789abcdef", "dtype": "bf16"}
ROW = {"prompt": "a lighthouse on a cliff at dawn, film photograph"}


def pictures(size: int) -> dict[str, Image.Image]:
    rng = np.random.default_rng(0)
    smooth = Image.fromarray(rng.integers(0, 255, (size // 16, size // 16, 3), dtype=np.uint8)).resize(
        (size, size), Image.BICUBIC).filter(ImageFilter.GaussianBlur(2))
    texture = Image.fromarray(rng.integers(0, 255, (size // 2, size // 2, 3), dtype=np.uint8)).resize(
        (size, size), Image.BICUBIC)
    return {"smooth": smooth, "texture": texture}


def write_seconds(marks: ImageMarks, image: Image.Image, fmt: OutputFormat, repeats: int) -> float:
    """Median seconds of what the writer does per image with `marks`."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        data = encode_image(marks.pixels(image), fmt, jpeg_quality=95, webp_quality=95, xmp=marks.xmp(ROW))
        marks.recorded(data, "bench")  # the watermark read back from the written bytes
        marks.sign(data, fmt, title="bench")
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    import cv2

    cv2.setNumThreads(1)
    with tempfile.TemporaryDirectory() as folder:
        signer = make_signer(Path(folder))
        signing = check_credentials(signer.certificate.read_bytes(), signer.key.read_bytes(), "cert", "key")
    options = {
        "bare": ProvenanceSpec(enabled=False),
        "xmp (default)": ProvenanceSpec(),
        "xmp + prompt": ProvenanceSpec(include_prompt=True),
        "xmp + c2pa": ProvenanceSpec(c2pa_certificate="cert", c2pa_key="key"),
        "xmp + watermark": ProvenanceSpec(watermark=TEXT),
        "all three": ProvenanceSpec(c2pa_certificate="cert", c2pa_key="key", watermark=TEXT),
    }
    marks = {name: ImageMarks(spec, IDENTITY, signing) for name, spec in options.items()}
    for name in marks:  # first calls load OpenCV and the C2PA library: not what an image costs
        write_seconds(marks[name], pictures(256)["smooth"], OutputFormat.png, 1)

    print("| size | format | " + " | ".join(options) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in options) + " |")
    for size in args.sizes:
        image = pictures(size)["smooth"]
        for fmt in OutputFormat:
            bare = write_seconds(marks["bare"], image, fmt, args.repeats)
            cells = [f"{bare * 1000:.0f} ms"] + [
                f"+{(write_seconds(m, image, fmt, args.repeats) - bare) * 1000:.0f} ms"
                for name, m in marks.items() if name != "bare"]
            print(f"| {size}² | {fmt.value} | " + " | ".join(cells) + " |")

    print()
    print("| size | picture | png as written | jpeg q95 as written | webp q95 as written | png, then JPEG q80 |")
    print("| --- | --- | --- | --- | --- | --- |")
    for size in args.sizes:
        for kind, image in pictures(size).items():
            marked = marks["xmp + watermark"].pixels(image)
            cells = []
            for fmt in OutputFormat:
                data = encode_image(marked, fmt, jpeg_quality=95, webp_quality=95)
                cells.append(f"{bit_accuracy(Image.open(io.BytesIO(data)), TEXT):.2f}")
            recompressed = io.BytesIO()
            marked.convert("RGB").save(recompressed, format="JPEG", quality=80)
            cells.append(f"{bit_accuracy(Image.open(recompressed), TEXT):.2f}")
            print(f"| {size}² | {kind} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
