"""What the perceptual hash costs per image, and how long finding near-duplicate groups takes over a whole output.

    .venv/bin/python benchmarks/bench_near_duplicates.py [--images 1000000] [--max-distance 4] [--clusters 10 1000]

Hash: flux_worker/perceptual_hash.phash on a rendered-looking RGB picture (colour noise at 1/8 of the side,
smoothly enlarged), 512x512 and 1024x1024, median ms of `--repeats` on one thread, as one writer thread works.

Edits: the distance in bits between a picture's hash and the hash of it edited (one pixel inverted, JPEG
re-encodes, a 90% resize, +5% brightness, a 2% crop), and to an unrelated picture, over `--pictures` pictures.

Groups: pipeline/store/near_duplicates.near_duplicate_groups over `--images` hashes, as hex strings the way the
ledger holds them, with keys like the ledger's; the time includes parsing and building the groups.
- random: uniform random hashes (distinct pictures), with 1% of them planted again 1 to max-distance bits away
  and 1% planted again identical; the planted pairs must all be found.
- clusters: hashes drawn from `--clusters` centres, each up to 3 bits from its centre, as a template filled with one
  seed and many words makes (about one group per centre).
- one picture: every image the same hash (a run that rendered one picture over and over).
No model is loaded; one thread throughout (numpy runs these operations on one core).
"""

from __future__ import annotations

import argparse
import io
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flux_worker.perceptual_hash import distance, phash  # noqa: E402
from pipeline.store.near_duplicates import near_duplicate_groups  # noqa: E402
from schemas.quality import DEFAULT_DUPLICATE_DISTANCE  # noqa: E402

UNRELATED = "an unrelated picture (least / mean)"


def picture(side: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (side // 8, side // 8, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((side, side), Image.Resampling.BICUBIC)


def hash_ms(side: int, repeats: int) -> float:
    """Median milliseconds of one phash of a `side`x`side` RGB picture."""
    image = picture(side, seed=0)
    phash(image)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        phash(image)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def edited(image: Image.Image) -> dict[str, Image.Image]:
    """What might make a near-duplicate of a render: small edits and re-encodes."""
    pixels = np.array(image)
    y, x = image.height // 3, image.width // 2
    pixels[y, x] = 255 - pixels[y, x]

    def jpeg(quality: int) -> Image.Image:
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=quality)
        return Image.open(io.BytesIO(buffer.getvalue()))

    side = image.width
    return {
        "one pixel inverted": Image.fromarray(pixels),
        "JPEG q95": jpeg(95),
        "JPEG q80": jpeg(80),
        "resized to 90%": image.resize((side * 9 // 10, side * 9 // 10), Image.Resampling.BICUBIC),
        "brightness +5%": ImageEnhance.Brightness(image).enhance(1.05),
        "2% cropped off the top left": image.crop((side // 50, side // 50, side, side)),
    }


def edit_distances(side: int, pictures: int) -> dict[str, list[int]]:
    """Per edit, the bits between each picture's hash and its edit's; and to an unrelated picture."""
    found: dict[str, list[int]] = {}
    for seed in range(pictures):
        image = picture(side, seed)
        original = phash(image)
        for edit, changed in edited(image).items():
            found.setdefault(edit, []).append(distance(original, phash(changed)))
        found.setdefault(UNRELATED, []).append(distance(original, phash(picture(side, seed + pictures))))
    return found


def flips(rng: np.random.Generator, count: int, most: int, least: int = 0) -> np.ndarray:
    """`count` masks of `least` to `most` distinct random bits each."""
    bits = rng.integers(least, most + 1, count)
    masks = []
    for start in range(0, count, 100_000):
        size = min(100_000, count - start)
        positions = rng.random((size, 64)).argsort(axis=1)[:, :most].astype(np.uint64)  # distinct bits per row
        chosen = np.arange(most) < bits[start : start + size, None]
        masks.append(np.bitwise_or.reduce(np.where(chosen, np.uint64(1) << positions, np.uint64(0)), axis=1))
    return np.concatenate(masks) if masks else np.zeros(0, dtype=np.uint64)


def random_hashes(rng: np.random.Generator, images: int, max_distance: int) -> tuple[np.ndarray, set[tuple[int, int]]]:
    """Random hashes with 1% planted near-duplicates and 1% planted identical copies, and the planted pairs."""
    planted = images // 100
    values = rng.integers(0, 2**64 - 1, images - 2 * planted, dtype=np.uint64, endpoint=True)
    originals = rng.choice(values.size, 2 * planted, replace=False)
    near = values[originals[:planted]] ^ flips(rng, planted, max(max_distance, 1), least=1)
    same = values[originals[planted:]]
    pairs = {(int(o), values.size + i) for i, o in enumerate(originals)}
    return np.concatenate([values, near, same]), pairs


def cluster_hashes(rng: np.random.Generator, images: int, clusters: int) -> np.ndarray:
    centres = rng.integers(0, 2**64 - 1, clusters, dtype=np.uint64, endpoint=True)
    return centres[rng.integers(0, clusters, images)] ^ flips(rng, images, 3)


def time_groups(values: np.ndarray, max_distance: int) -> tuple[list[list[str]], list[str], float]:
    keys = [f"r-{i:09d}:0" for i in range(values.size)]
    hashes = [f"{value:016x}" for value in values.tolist()]
    start = time.perf_counter()
    groups = near_duplicate_groups(keys, hashes, max_distance)
    return groups, keys, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1_000_000)
    parser.add_argument("--max-distance", type=int, default=DEFAULT_DUPLICATE_DISTANCE)
    parser.add_argument("--clusters", type=int, nargs="+", default=[10, 1000])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--pictures", type=int, default=50, help="pictures per size for the edits' distances")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print(f"Python {platform.python_version()}, numpy {np.__version__}, Pillow {Image.__version__}\n")

    print("| picture | phash ms per image (median) |\n| --- | --- |")
    for side in (512, 1024):
        print(f"| {side}x{side} RGB | {hash_ms(side, args.repeats):.2f} |")

    print(f"\nBits between a picture's hash and its edit's, over {args.pictures} pictures (most / mean):\n")
    print("| edit | 512x512 | 1024x1024 |\n| --- | --- | --- |")
    by_side = [edit_distances(side, args.pictures) for side in (512, 1024)]
    for edit in by_side[0]:
        least_or_most = min if edit == UNRELATED else max
        cells = [f"{least_or_most(found[edit])} / {statistics.mean(found[edit]):.1f}" for found in by_side]
        print(f"| {edit} | " + " | ".join(cells) + " |")

    print("\n| hashes | images | distinct hashes | max distance | groups | images in groups | seconds |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    values, planted = random_hashes(rng, args.images, args.max_distance)
    groups, keys, seconds = time_groups(values, args.max_distance)
    group_of = {key: n for n, group in enumerate(groups) for key in group}
    found = sum(group_of.get(keys[a], -1) == group_of.get(keys[b]) for a, b in planted)
    print(
        f"| random, {len(planted)} planted pairs ({found} found) | {values.size:,} | {np.unique(values).size:,} | "
        f"{args.max_distance} | {len(groups):,} | {sum(map(len, groups)):,} | {seconds:.2f} |"
    )
    for clusters in args.clusters:
        values = cluster_hashes(rng, args.images, clusters)
        groups, _, seconds = time_groups(values, args.max_distance)
        print(
            f"| {clusters} clusters, up to 3 bits from the centre | {values.size:,} | {np.unique(values).size:,} | "
            f"{args.max_distance} | {len(groups):,} | {sum(map(len, groups)):,} | {seconds:.2f} |"
        )
    values = np.full(args.images, 0x8000_0000_0000_0000, dtype=np.uint64)
    groups, _, seconds = time_groups(values, args.max_distance)
    print(
        f"| one picture {args.images:,} times | {values.size:,} | 1 | {args.max_distance} | {len(groups):,} | "
        f"{sum(map(len, groups)):,} | {seconds:.2f} |"
    )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"\npeak RSS of the whole process (hash strings and keys included): {peak:.2f} GiB")


if __name__ == "__main__":
    main()
