"""Near-duplicates: a perceptual hash per image (flux_worker/perceptual_hash.py) and the groups of images whose hashes
are a few bits apart (pipeline/store/near_duplicates.py). Pure functions: no Ray, no model."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from flux_worker.perceptual_hash import distance, phash
from pipeline.store.near_duplicates import duplicate_summary, near_duplicate_groups
from schemas.quality import DEFAULT_DUPLICATE_DISTANCE


def picture(side: int, seed: int) -> Image.Image:
    """A rendered-looking random image: colour noise at 1/8 of the side, smoothly enlarged."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (side // 8, side // 8, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((side, side), Image.Resampling.BICUBIC)


def with_one_pixel_changed(image: Image.Image) -> Image.Image:
    pixels = np.array(image)
    y, x = image.height // 3, image.width // 2
    pixels[y, x] = 255 - pixels[y, x]
    return Image.fromarray(pixels)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def hexes(values: np.ndarray) -> list[str]:
    return [f"{value:016x}" for value in values.tolist()]


@pytest.mark.parametrize("side", [64, 512])
def test_the_same_image_hashes_the_same(side: int) -> None:
    image = picture(side, seed=0)
    assert phash(image) == phash(image) == phash(image.copy())
    assert len(phash(image)) == 16 and int(phash(image), 16) >= 0


def test_the_hash_is_imagehash_bit_order_on_a_ramp_worked_by_hand() -> None:
    # A 32x32 picture is hashed as it is (no resize). A linear ramp falling from left to right is constant down
    # each column, so its DCT along axis 0 is zero but for frequency 0; along axis 1 a ramp symmetric about its
    # middle has zero even frequencies and, falling, positive odd ones. So of the 8x8 low frequencies only the
    # first row's 0, 1, 3, 5 and 7 are positive, the other 59 zero, the median 0: bits 11010101 then 56 zeros.
    ramp = (255 - 8 * np.arange(32)).astype(np.uint8)
    assert phash(Image.fromarray(np.tile(ramp, (32, 1)))) == "d500000000000000"
    # The same ramp falling from top to bottom: the first column instead, one bit per row (row-major order).
    assert phash(Image.fromarray(np.tile(ramp[:, None], (1, 32)))) == "8080008000800080"


def test_flat_pictures_hash_the_same_on_every_machine() -> None:
    # Their 63 other frequencies are exactly 0, as floating point gets them only up to rounding noise.
    assert phash(Image.new("RGB", (100, 60), (90, 120, 200))) == "8000000000000000"
    assert phash(Image.new("L", (64, 64), 0)) == "0000000000000000"


def dct2(pixels: np.ndarray, axis: int) -> np.ndarray:
    """scipy.fftpack.dct type 2 along `axis`, by the FFT of the mirrored signal (as scipy computes it)."""
    signal = np.moveaxis(pixels, axis, -1)
    size = signal.shape[-1]
    spectrum = np.fft.fft(np.concatenate([signal, signal[..., ::-1]], axis=-1))[..., :size]
    return np.moveaxis(np.real(np.exp(-1j * np.pi * np.arange(size) / (2 * size)) * spectrum), -1, axis)


def test_the_hash_matches_the_dct_computed_another_way() -> None:
    rng = np.random.default_rng(7)
    for _ in range(50):
        image = Image.fromarray(rng.integers(0, 256, (48, 80, 3), dtype=np.uint8))
        pixels = np.asarray(image.convert("L").resize((32, 32), Image.Resampling.LANCZOS), dtype=np.float64)
        low = dct2(dct2(pixels, 0), 1)[:8, :8]
        assert phash(image) == np.packbits((low > np.median(low)).ravel()).tobytes().hex()


def test_any_mode_hashes_and_alpha_is_ignored() -> None:
    image = picture(64, seed=3)
    rgba = image.copy()
    rgba.putalpha(128)
    assert phash(rgba) == phash(image) == phash(image.convert("L"))
    assert len(phash(image.convert("P"))) == 16


def test_distance_counts_the_bits_that_differ() -> None:
    assert distance("0000000000000000", "ffffffffffffffff") == 64
    assert distance("8000000000000001", "0000000000000000") == 2
    assert distance("d500000000000000", "d500000000000000") == 0


def test_byte_identical_images_under_two_ids_are_grouped() -> None:
    data = png_bytes(picture(64, seed=1))
    hashes = [phash(Image.open(io.BytesIO(data))) for _ in range(2)] + [phash(picture(64, seed=2))]
    assert near_duplicate_groups(["b", "a", "c"], hashes) == [["a", "b"]]
    assert near_duplicate_groups(["b", "a", "c"], hashes, max_distance=0) == [["a", "b"]]


@pytest.mark.parametrize("side", [64, 512])
def test_one_pixel_changed_is_grouped_with_the_original(side: int) -> None:
    for seed in range(5):
        image = picture(side, seed)
        hashes = [phash(image), phash(with_one_pixel_changed(image))]
        assert near_duplicate_groups(["original", "edited"], hashes) == [["edited", "original"]]


def test_unrelated_images_are_not_grouped() -> None:
    hashes = [phash(picture(64, seed)) for seed in range(40)]
    assert near_duplicate_groups([f"img-{i}" for i in range(40)], hashes) == []


def test_grouping_is_transitive() -> None:
    # b is 4 bits from a and 4 from c; a and c are 8 apart.
    keys = ["a", "b", "c", "far"]
    hashes = ["0000000000000000", "000000000000000f", "00000000000000ff", "ffffffffffffffff"]
    assert distance(hashes[0], hashes[2]) > DEFAULT_DUPLICATE_DISTANCE
    assert near_duplicate_groups(keys, hashes, max_distance=4) == [["a", "b", "c"]]
    assert near_duplicate_groups(keys, hashes, max_distance=3) == []


def test_images_without_a_hash_are_skipped() -> None:
    keys = ["old-1", "old-2", "new-1", "new-2"]
    assert near_duplicate_groups(keys, [None, "", "00ff00ff00ff00ff", "00ff00ff00ff00ff"]) == [["new-1", "new-2"]]
    assert near_duplicate_groups(keys, [None, None, None, None]) == []
    assert near_duplicate_groups([], []) == []


def test_the_groups_do_not_depend_on_the_input_order() -> None:
    rng = np.random.default_rng(11)
    centers = rng.integers(0, 2**63, 30, dtype=np.uint64)
    values = centers[rng.integers(0, 30, 600)] ^ (np.uint64(1) << rng.integers(0, 64, 600).astype(np.uint64))
    keys, hashes = [f"img-{i:03d}" for i in range(600)], hexes(values)
    expected = near_duplicate_groups(keys, hashes)
    assert len(expected) == 30 and sum(map(len, expected)) == 600
    assert [len(group) for group in expected] == sorted((len(group) for group in expected), reverse=True)
    for _ in range(3):
        shuffled = rng.permutation(600)
        assert near_duplicate_groups([keys[i] for i in shuffled], [hashes[i] for i in shuffled]) == expected


def test_a_planted_pair_among_200k_random_hashes_is_the_only_group() -> None:
    values = np.random.default_rng(5).integers(0, 2**64 - 1, 200_000, dtype=np.uint64, endpoint=True)
    planted = int(values[1234]) ^ 0b1011 << 40  # 3 bits away
    keys = [f"img-{i:06d}" for i in range(values.size)] + ["planted"]
    assert near_duplicate_groups(keys, hexes(values) + [f"{planted:016x}"]) == [["img-001234", "planted"]]


def test_a_dense_cluster_is_one_group_and_a_hash_just_past_it_is_not_in_it() -> None:
    # Every one- and two-bit change of a centre (2080 hashes, all within 4 bits of each other, sharing most chunks),
    # one hash 6 bits from the centre (4 from the changes of two of its bits: in), and one 8 bits from it (6 from
    # every change: out) with a neighbour of its own.
    centre = 0x5A5A_F00F_1234_ABCD
    bits = [1 << bit for bit in range(64)]
    cluster = [centre ^ a for a in bits] + [centre ^ a ^ b for i, a in enumerate(bits) for b in bits[i + 1 :]]
    joined, apart = centre ^ 0b111111, centre ^ 0xFF << 20
    values = [*cluster, joined, apart, apart ^ 1 << 63]
    keys = [f"c-{i:04d}" for i in range(len(cluster))] + ["joined", "apart", "apart-neighbour"]
    groups = near_duplicate_groups(keys, [f"{value:016x}" for value in values])
    assert groups == [sorted(keys[: len(cluster)] + ["joined"]), ["apart", "apart-neighbour"]]


def test_many_copies_of_one_image_are_one_group() -> None:
    keys = [f"img-{i:06d}" for i in range(100_000)]
    hashes = ["8000000000000000"] * 99_999 + ["7fffffffffffffff"]
    assert near_duplicate_groups(keys, hashes) == [keys[:-1]]


@pytest.mark.parametrize("bad", [-1, 9, 2.5, True, None])
def test_a_bad_max_distance_is_one_clear_error(bad: object) -> None:
    with pytest.raises(ValueError, match=r"^max_distance is bits of 64, from 0 to 8: got "):
        near_duplicate_groups(["a"], ["0000000000000000"], max_distance=bad)  # type: ignore[arg-type]


def test_a_malformed_hash_is_named_with_its_key() -> None:
    with pytest.raises(ValueError, match="image 'b' has perceptual hash 'xyz'"):
        near_duplicate_groups(["a", "b"], ["0000000000000000", "xyz"])


def test_the_summary_counts_groups_and_images_and_lists_the_largest() -> None:
    groups = [["a", "b", "c"], ["d", "e"], ["f", "g"]]
    assert duplicate_summary(groups, max_distance=4, examples=2) == {
        "max_distance": 4,
        "groups": 3,
        "images": 7,
        "largest": [{"images": 3, "keys": ["a", "b"]}, {"images": 2, "keys": ["d", "e"]}],
    }
