#!/usr/bin/env bash
# GPU end to end (issue 13): `fluxbatch render` on one GPU, full-size FLUX.1-schnell and -dev architectures with
# random weights (`fluxbatch model build --size full`, made on the GPU), 1024x1024, with the fast-path options,
# twice over a fresh compile cache: cold (empty model.compile_cache, empty inductor and Triton caches), then warm
# (the cache the cold pass saved; inductor and Triton caches empty again, as on a new node). Prints per pass:
# images/s end to end against the pipeline call alone (render_seconds, the same call bench_gpu.py times) and the
# actor's cold start by stage; then the weight-loading paths timed on the dev folder.
#
#   benchmarks/gpu_e2e.sh                       # about 8 minutes on one H100/H200
#   OPTIONS="--compile --quantize fp8" benchmarks/gpu_e2e.sh
#   MODELS=dev DEV_ROWS=64 benchmarks/gpu_e2e.sh  # the full 64-row dev manifest: ~4 min per pass more
#
# Budget (8 min on an H200): each model's folder is ~34 GB, written then deleted (the machine's disk holds one);
# schnell renders ROWS=64 rows per pass (~0.5 s per image); dev DEV_ROWS=16 rows per pass (~3 s per image
# with compile), since 64 dev rows twice would take the whole budget alone. Not run on the development machine
# (no GPU): written and checked by reading.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
FLUXBATCH=${FLUXBATCH:-.venv/bin/fluxbatch}
WORK=${WORK:-/tmp/fluxbatch-gpu-e2e}
MODELS=${MODELS:-schnell dev}
ROWS=${ROWS:-64}
DEV_ROWS=${DEV_ROWS:-16}
SIDE=${SIDE:-1024}
OPTIONS=${OPTIONS:---compile --fuse-qkv}
LOAD_BENCH=${LOAD_BENCH:-1}  # 0: skip timing the weight-loading paths

rm -rf "$WORK" && mkdir -p "$WORK"
began=$(date +%s)
"$PY" -c "import torch; assert torch.cuda.is_available(), 'gpu_e2e.sh needs a CUDA GPU'; \
print('GPU:', torch.cuda.get_device_name(0), '| torch', torch.__version__)"
echo "options: $OPTIONS | ${SIDE}x${SIDE} | schnell $ROWS rows, dev $DEV_ROWS rows per pass"

manifest() {  # manifest PATH ROWS: distinct prompts, so the embedding cache does not flatter the figures
  "$PY" - "$1" "$2" "$SIDE" <<'EOF'
import sys
import pyarrow as pa, pyarrow.parquet as pq
path, rows, side = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
subjects = ["a lighthouse at dusk", "a red fox in snow", "a bowl of ramen", "an old map", "a glass teapot",
            "a city street in rain", "a mountain lake", "a vintage car"]
pq.write_table(pa.table({"id": [f"r{i:03d}" for i in range(rows)],
                         "prompt": [f"{subjects[i % len(subjects)]}, study {i}" for i in range(rows)],
                         "width": [side] * rows, "height": [side] * rows}), path)
EOF
}

pass_row() {  # pass_row OUTPUT MODEL PASS: one Markdown row from the run's summary.json and metadata
  "$PY" - "$1" "$2" "$3" <<'EOF'
import json, sys

from flux_worker.storage import filesystem
from pipeline import ledger
out, model, label = sys.argv[1:4]
summary = json.load(open(f"{out}/summary.json"))
fs, root = filesystem(out)
table = ledger.read_table(fs, root, "metadata").to_pylist()
pipeline_only = sum(r["render_seconds"] for r in table) / len(table)  # the pipeline call, as bench_gpu.py times it
span = (max(r["finished_at"] for r in table) - min(r["started_at"] for r in table)).total_seconds()
steady = span / len(table)  # end to end per image, the actor warm: encode, write, ledger, Ray Data included
(actor,) = summary["actors"]
f = lambda v: "" if v is None else f"{v:.1f}"
hit = "hit" if actor.get("compile_cache_hit") else ("miss" if actor.get("compile") else "off")
print(f"| {model} | {label} | {len(table)} | {pipeline_only:.3f} | {steady:.3f} | {pipeline_only / steady:.3f} | "
      f"{summary['images_per_second']:.3f} | {f(actor['process_start'])} | {f(actor['model_load'])} | "
      f"{f(actor['warmup'])} | {f(actor['first_image'])} | {hit} | {summary['seconds']['total']:.0f} |")
EOF
}

TABLE="$WORK/table.md"
{
  echo "| model | pass | images | pipeline s/image | end-to-end s/image (steady) | ratio | img/s with start-up |" \
       "process start s | model load s | compile/warm-up s | first image s | compile cache | run s |"
  echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
} > "$TABLE"

for model in $MODELS; do
  folder="$WORK/flux1-$model"
  t0=$(date +%s)
  "$FLUXBATCH" model build "$folder" --size full --variant "$model"
  echo "built $folder in $(( $(date +%s) - t0 )) s"
  rows=$([ "$model" = dev ] && echo "$DEV_ROWS" || echo "$ROWS")
  manifest "$WORK/$model.parquet" "$rows"
  rm -rf "$WORK/compile-cache-$model"
  for pass in cold warm; do
    # Empty inductor and Triton caches on both passes: only model.compile_cache carries compiled code over,
    # as it would to an actor on another node.
    rm -rf "$WORK/inductor" "$WORK/triton"
    TORCHINDUCTOR_CACHE_DIR="$WORK/inductor" TRITON_CACHE_DIR="$WORK/triton" \
      "$FLUXBATCH" render "$WORK/$model.parquet" "$WORK/out-$model-$pass" --model "$folder" \
      --gpus-per-replica 1 --replicas 1 $OPTIONS --compile-cache "$WORK/compile-cache-$model" --no-progress \
      || echo "render $model $pass failed (exit $?)"
    pass_row "$WORK/out-$model-$pass" "$model" "$pass" >> "$TABLE" || echo "| $model | $pass | no summary |" >> "$TABLE"
    tail -n 1 "$TABLE"
  done
  if [ "$LOAD_BENCH" = 1 ] && [ "$model" = dev ]; then
    # Weight loading, each path in a fresh process (diffusers reads HF_ENABLE_PARALLEL_LOADING at import). The
    # files were just written, so all three read from the page cache: this times the copy to the GPU, not the disk.
    for path in "host-then-to" "device_map" "device_map+parallel"; do
      parallel=$([ "$path" = "device_map+parallel" ] && echo yes || echo no)
      HF_ENABLE_PARALLEL_LOADING=$parallel "$PY" - "$folder" "$path" <<'EOF'
import sys, time, torch
from diffusers import FluxPipeline
folder, path = sys.argv[1:3]
start = time.perf_counter()
extra = {} if path == "host-then-to" else {"device_map": "cuda"}
pipe = FluxPipeline.from_pretrained(folder, dtype=torch.bfloat16, use_safetensors=True, **extra).to("cuda")
torch.cuda.synchronize()
print(f"load {path}: {time.perf_counter() - start:.1f} s")
EOF
    done
  fi
  rm -rf "$folder"  # the disk holds one full model at a time
done

echo
echo "pipeline s/image: mean render_seconds (the pipeline call inside the actor); end-to-end: first image started"
echo "to last image finished over the images (goal: ratio >= 0.97); first image counts from the actor's process start."
cat "$TABLE"
echo "total $(( $(date +%s) - began )) s"
