"""`fluxbatch demo`: build the offline model, write an example manifest, render it, say where it went.

Runs with no network and no GPU: the model is a random-weight Flux pipeline, so the images are
coloured noise, but every other part (Ray, planning, writing, the ledger) is the real thing.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pandas as pd

from flux_worker.presets import PRESET_FILE

DEMO_HOME = Path(os.environ.get("FLUXBATCH_HOME", ".fluxbatch"))

PROMPTS = [
    ("lamp-01", "a brass desk lamp on a walnut table, studio light", "lighting"),
    ("lamp-02", "a paper lantern glowing at dusk", "lighting"),
    ("chair-01", "a mid-century lounge chair in green velvet", "furniture"),
    ("chair-02", "a stack of white plastic garden chairs", "furniture"),
    ("mug-01", "a speckled ceramic mug with steam rising", "kitchen"),
    ("mug-02", "a glass espresso cup on a marble counter", "kitchen"),
    ("bike-01", "a red city bicycle leaning on a brick wall", "outdoor"),
    ("tent-01", "a small orange tent under a starry sky", "outdoor"),
    ("plant-01", "a monstera plant in a terracotta pot", "garden"),
    ("plant-02", "a bonsai tree on a wooden stand", "garden"),
]


def demo_manifest() -> pd.DataFrame:
    """Ten catalog-like prompts, some with two variants and other sizes or formats, and two bad rows."""
    rows = []
    for index, (row_id, prompt, category) in enumerate(PROMPTS):
        rows.append(
            {
                "id": row_id,
                "prompt": prompt,
                "width": 256 if index % 3 else 320,
                "height": 256 if index % 3 else 192,
                "steps": 4,
                "seed": None if index % 2 else 1000 + index,
                "num_images": 2 if index < 3 else 1,
                "output_format": ["png", "jpeg", "webp"][index % 3] if index % 4 == 0 else None,
                "category": category,
            }
        )
    # Two rows a validator must refuse: a size that is not a multiple of 16, and an empty prompt.
    rows.append({**rows[0], "id": "bad-size", "width": 250, "num_images": 1, "category": "invalid"})
    rows.append({**rows[1], "id": "bad-prompt", "prompt": "  ", "num_images": 1, "category": "invalid"})
    return pd.DataFrame(rows).astype({"seed": "Int64"})


def ensure_demo_model(size: str = "tiny") -> Path:
    """The offline model, built once into .fluxbatch/models/ (or $FLUXBATCH_HOME)."""
    from flux_worker.model_build import build_model

    folder = DEMO_HOME / "models" / f"offline-{size}"
    if not (folder / PRESET_FILE).is_file():
        print(f"fluxbatch: building the offline {size} model in {folder} ...", file=sys.stderr, flush=True)
        build_model(folder, size)
    return folder


def ensure_demo_scorers() -> dict[str, str]:
    """Random-weight CLIP and aesthetic scorers (docs/quality.md), built once beside the model: the demo's images
    get scores, and its report their distributions."""
    from flux_worker.scorer_build import build_scorer

    folders = {name: DEMO_HOME / "models" / f"scorer-{name}" for name in ("clip", "aesthetic")}
    for name, folder in folders.items():
        if not folder.is_dir():
            print(f"fluxbatch: building the offline {name} scorer in {folder} ...", file=sys.stderr, flush=True)
            build_scorer(folder, name, "tiny", seed=4 if name == "clip" else 0)  # seed 4: CLIP scores above 0
    return {name: str(folder) for name, folder in folders.items()}


def run_demo(output: str) -> int:
    from jobs.terminal import summary_lines
    from pipeline import render
    from schemas import JobSpec

    model = ensure_demo_model()
    manifest = DEMO_HOME / "demo" / "manifest.parquet"
    manifest.parent.mkdir(parents=True, exist_ok=True)
    demo_manifest().to_parquet(manifest, index=False)
    job = JobSpec.model_validate(
        {"manifest": str(manifest), "output": {"uri": output}, "model": {"name": str(model)}, "batch_size": 4,
         "quality": ensure_demo_scorers()}
    )
    summary = render(job)
    # A render's own summary (jobs/terminal.py), less its exit line: the demo's bad rows are there on purpose.
    print("\n".join(summary_lines(summary)[:-1]))
    print(f"manifest: {manifest.resolve()}")
    code = 0 if summary.complete else 1
    rest = "every other image is in OUTPUT" if code == 0 else "some images failed (`fluxbatch failures` lists them)"
    print(f"exit {code}: the demo's {summary.invalid_rows} bad rows are refused on purpose (`fluxbatch render` of "
          f"its manifest exits 1 for them); {rest}")
    return code
