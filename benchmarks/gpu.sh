#!/usr/bin/env bash
# Everything worth measuring on a CUDA machine, in one command; JSON + markdown in one folder.
#
#   benchmarks/gpu.sh [OUT]             on a CUDA machine (default OUT: runs/gpu)
#   benchmarks/gpu.sh --dry-run [OUT]   anywhere: the same steps, tiny, on the CPU (the tests run this)
#   PYTHON=python3 benchmarks/gpu.sh    on a machine whose python3 has torch, without installing mtt_lab
#
# Sized for a short GPU lease: the engine table starts no point after ENGINE_SECONDS (default 240;
# the points it did not reach read "time"), and everything else takes a minute or two on one GPU.
#
# 1. engine table: 28x28 and 32x32x3, IPC 10 and 50, N 10/20/40/80, every mode and the reference,
#    K = 1/4/8 unrolls per iteration (bench_distill.py); K = 1/4/8 as a loop vs stacked (bench_batched.py)
# 2. gradient error of bfloat16 and TF32 against float32, and the synchronisations inside one outer
#    iteration counted by torch.cuda.set_sync_debug_mode (bench_precision.py)
# 3. expert throughput: mtt-lab experts, images per second over the training
# 4. with two GPUs: 2-rank torchrun experts and K = 2 distillation against one process
# Result: OUT/gpu.md (all tables) and OUT/*.json.
set -euo pipefail
cd "$(dirname "$0")/.."

DRY=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY=1; shift; fi
OUT="${1:-runs/gpu}"
PY="${PYTHON:-.venv/bin/python}"
mkdir -p "$OUT"
GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())")

if [[ $DRY == 1 ]]; then
  DEVICE=cpu
  DISTILL=(--inputs mnist --ipc 1 --steps 2 --trajectories 1 2 --width 16 --reps 1 --in-process)  # in one process, as on CUDA
  PRECISION=(--width 16 --ipc 1 --steps 2 --seeds 1)
  BATCHED=(--width 16 --ipc 1 --steps 2 --trajectories 2 --modes exact --reps 1)
  EXPERTS=(--model ConvNetW16 --experts 2 --epochs 1)
  export OMP_NUM_THREADS=1
else
  if [[ $GPUS -lt 1 ]]; then echo "gpu.sh: no CUDA device here; use --dry-run to check the script on a CPU" >&2; exit 2; fi
  DEVICE=cuda
  DISTILL=(--inputs mnist cifar --ipc 10 50 --steps 10 20 40 80 --trajectories 1 4 8 --reps 2
           --max-seconds "${ENGINE_SECONDS:-240}")
  PRECISION=(--inputs cifar --width 128 --ipc 10 --steps 20 --seeds 3 --sync-check)
  BATCHED=(--inputs cifar --width 128 --ipc 10 --steps 20 --trajectories 1 4 8 --modes exact checkpoint constant)
  EXPERTS=(--model ConvNetW128 --experts 4 --epochs 2)
fi

{
  echo "# benchmarks/gpu.sh $( [[ $DRY == 1 ]] && echo '(dry run on the CPU)' )"
  echo
  "$PY" -c "import torch; print(f'torch {torch.__version__}, CUDA devices: ' + ', '.join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())) if torch.cuda.is_available() else f'torch {torch.__version__}, no CUDA device')"
} > "$OUT/gpu.md"

echo "1/4 engine table (at ${SECONDS} s)" >&2
"$PY" benchmarks/bench_distill.py --device "$DEVICE" "${DISTILL[@]}" --json "$OUT/distill.json" >> "$OUT/gpu.md"

"$PY" benchmarks/bench_batched.py --device "$DEVICE" "${BATCHED[@]}" --json "$OUT/batched.json" >> "$OUT/gpu.md"

echo "2/4 precision and synchronisations (at ${SECONDS} s)" >&2
"$PY" benchmarks/bench_precision.py --device "$DEVICE" "${PRECISION[@]}" --json "$OUT/precision.json" >> "$OUT/gpu.md"

echo "3/4 expert throughput (at ${SECONDS} s)" >&2
rm -rf "$OUT/experts"
"$PY" -m mtt_lab.cli experts "${EXPERTS[@]}" --device "$DEVICE" --out "$OUT/experts" > /dev/null
"$PY" - "$OUT" >> "$OUT/gpu.md" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
m = json.loads((out / "experts" / "manifest.json").read_text())
seconds = sum(e["seconds"] for e in m["experts"])
images = 8000 * m["epochs"] * len(m["experts"])
print(f"\n### Expert training ({m['model']['name']} {m['model']['kwargs']}, {len(m['experts'])} experts x {m['epochs']} epochs)\n")
print(f"{images / seconds:.0f} images per second over {seconds:.1f} s of training")
(out / "experts.json").write_text(json.dumps({"images_per_s": images / seconds, "seconds": seconds}))
EOF

if [[ $GPUS -ge 2 || $DRY == 1 ]]; then
  echo "4/4 two ranks against one process (at ${SECONDS} s)" >&2
  rm -rf "$OUT/two" "$OUT/one" "$OUT/experts2"
  RUN=("$PY" -m torch.distributed.run --standalone --nproc_per_node 2 -m mtt_lab.cli)
  "${RUN[@]}" experts "${EXPERTS[@]}" --device "$DEVICE" --out "$OUT/experts2" > /dev/null
  ARGS=(--experts "$OUT/experts" --trajectories 2 --syn-steps 5 --expert-epochs 1 --max-start-epoch 1 --iterations 3 --device "$DEVICE")
  "${RUN[@]}" distill "${ARGS[@]}" --out "$OUT/two" > /dev/null
  "$PY" -m mtt_lab.cli distill "${ARGS[@]}" --out "$OUT/one" > /dev/null
  "$PY" - "$OUT" >> "$OUT/gpu.md" <<'EOF'
import json, sys
from pathlib import Path
import torch
out = Path(sys.argv[1])
same = all((out / "experts" / f.name).read_bytes() == f.read_bytes() for f in (out / "experts2").glob("expert_*.pt"))
a, b = (torch.load(out / run / "images.pt", weights_only=True) for run in ("two", "one"))
rel = float((a["images"] - b["images"]).norm() / b["images"].norm())
print("\n### Two ranks against one process\n")
print(f"expert files identical: {same}; K = 2 distillation after 3 iterations: images {rel:.2e} relative apart, "
      f"alpha {a['syn_lr']:.6g} vs {b['syn_lr']:.6g}")
(out / "two_ranks.json").write_text(json.dumps({"experts_identical": same, "images_rel": rel}))
EOF
else
  echo "4/4 skipped: one GPU" >&2
  printf '\n### Two ranks against one process\n\nskipped: this machine has one GPU\n' >> "$OUT/gpu.md"
fi
echo "gpu.sh: tables in $OUT/gpu.md (${SECONDS} s)" >&2
