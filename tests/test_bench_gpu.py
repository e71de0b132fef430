"""bench_gpu.py runs on CPU in its tiny smoke configuration, and its FLOP count matches Flux.1's layers."""

from __future__ import annotations

import re

import pytest
import torch

from benchmarks.bench_gpu import FLUX1, main, transformer_flops


def test_flux1_step_at_1024_is_about_74_tflop_split_as_the_design_page_says():
    flops = transformer_flops(FLUX1, image_tokens=4096, text_tokens=512)

    assert flops["total"] / 1e12 == pytest.approx(74.4, abs=0.1)
    assert flops["linear"] / 1e12 == pytest.approx(59.5, abs=0.1)
    assert flops["attention"] / 1e12 == pytest.approx(14.9, abs=0.1)


def test_the_per_token_count_matches_the_linear_layers_of_the_real_transformer_blocks():
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        transformer = FluxTransformer2DModel()  # diffusers' defaults are Flux.1's dimensions
    blocks = list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks)
    weights = sum(m.in_features * m.out_features for block in blocks for name, m in block.named_modules()
                  if isinstance(m, torch.nn.Linear) and not name.startswith(("norm", "norm1")))
    d = FLUX1.hidden
    # A double block holds two streams of 12 d^2 each; a single block one stream of 12 d^2 over all tokens.
    assert weights == FLUX1.double_blocks * 2 * 12 * d * d + FLUX1.single_blocks * 12 * d * d


def test_smoke_run_on_cpu_prints_a_row_per_option_and_refuses_fp8_here(capsys):
    main(["--device", "cpu", "--size", "tiny", "--models", "schnell", "--side", "64", "--steps", "1",
          "--batches", "1", "--repeats", "1", "--options", "eager", "first-block", "fp8+compile"])

    lines = capsys.readouterr().out.splitlines()
    rows = {line.split(" | ")[3]: line for line in lines if line.startswith("| schnell")}
    assert set(rows) == {"eager", "first-block", "fp8+compile"}
    assert float(rows["eager"].split(" | ")[4]) > 0
    assert "refused: model.quantize='fp8' needs a GPU" in rows["fp8+compile"]


def test_rows_run_in_the_order_given_and_a_mistyped_row_is_named(capsys):
    main(["--device", "cpu", "--size", "tiny", "--side", "64", "--steps", "1", "--repeats", "1", "--warmups", "1",
          "--rows", "schnell:eager:1,2", "dev:first-block:1"])

    cells = [line.split(" | ") for line in capsys.readouterr().out.splitlines() if line.startswith("| dev")
             or line.startswith("| schnell")]
    assert [(row[0].strip("| "), row[2], row[3]) for row in cells] == [
        ("schnell", "1", "eager"), ("schnell", "2", "eager"), ("dev", "1", "first-block")]
    with pytest.raises(SystemExit, match=re.escape("--rows 'dev:turbo:1': want dev|schnell:OPTION:BATCH")):
        main(["--device", "cpu", "--size", "tiny", "--rows", "dev:turbo:1"])
