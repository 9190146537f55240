#!/usr/bin/env bash
# GPU check (issue 11 item 4), for a machine with a CUDA GPU; bounded to ~9 minutes.
#   1. the test suite's CUDA paths (tests/unit/test_cuda.py: AMP, pinned memory, device
#      placement, GPU preprocessing) plus the tensor-path and decode-pool tests; a skip of
#      test_cuda.py here means torch sees no GPU, and the check FAILS;
#   2. benchmarks/inference.py --device cuda;
#   3. a summary: each model's mixed-precision throughput as % of the bf16/fp16 matmul peak
#      measured in the same run, and the decode -> preprocess -> infer pipeline as % of
#      model-only (same precision).
# Results go to $OUT (the device runner's folder) if set, else benchmarks/results/gpu/.
# Usage: PYTHON=/path/to/venv/bin/python benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-benchmarks/results/gpu}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0

{ nvidia-smi || true; } > "$OUT_DIR/nvidia-smi.txt" 2>&1
"$PY" -c 'import torch; print("cuda", torch.cuda.is_available(), torch.__version__)' \
    | tee "$OUT_DIR/torch.txt" || status=1

timeout 240 "$PY" -m pytest -q -rs -p no:cacheprovider \
    tests/unit/test_cuda.py tests/unit/test_tensorprep.py tests/unit/test_decodepool.py \
    > "$OUT_DIR/pytest.txt" 2>&1
rc=$?
tail -n 5 "$OUT_DIR/pytest.txt"
if [ $rc -ne 0 ] || grep -q "SKIPPED.*test_cuda" "$OUT_DIR/pytest.txt"; then
    echo "FAIL: CUDA tests (rc=$rc, or skipped: no GPU seen)"; status=1
fi

timeout 300 "$PY" benchmarks/inference.py --device cuda --seconds 2 --dx-images 128 \
    --json "$OUT_DIR/inference_cuda.json" > "$OUT_DIR/inference_cuda.md" 2>&1
rc=$?
if [ $rc -ne 0 ]; then
    echo "FAIL: benchmark rc=$rc"; tail -n 20 "$OUT_DIR/inference_cuda.md"; status=1
else
    "$PY" - "$OUT_DIR/inference_cuda.json" <<'PYEOF' | tee "$OUT_DIR/summary.txt"
import json, sys
res = json.load(open(sys.argv[1]))
peaks = res["matmul_peak_gflops"]
print(f"GPU {res['machine']['gpu']}; matmul peak fp32 {peaks['fp32']:.0f} GFLOP/s, "
      f"mixed {peaks.get('bf16', float('nan')):.0f} GFLOP/s (same run)")
for m in res["models"]:
    mixed = next((k for k in m if k.startswith("mixed_bs") and k.endswith("_pct_peak")), None)
    fp32 = next(k for k in m if k.startswith("fp32_bs") and k != "fp32_bs1_pct_peak"
                and k.endswith("_pct_peak"))
    print(f"{m['model']}: fp32 {m[fp32]:.1f}% of fp32 peak"
          + (f", mixed {m[mixed]:.1f}% of mixed peak" if mixed else ""))
p = res["pipeline"]
print(f"pipeline ({p['precision']}, {p['decode_processes']} decode processes, "
      f"{p['images']} DX 2048²): {p['pipeline_processes_img_s']:.0f} img/s = "
      f"{100 * p['ratio_processes']:.0f}% of model-only {p['model_only_img_s']:.0f} img/s "
      f"(threads: {100 * p['ratio_threads']:.0f}%); target >= 80%")
PYEOF
fi
echo "gpu_check status=$status (results in $OUT_DIR)"
exit $status
