#!/usr/bin/env bash
# One short GPU check of the Triton kernels: environment, the kernels' oracle tests on CUDA tensors, GPU timings.
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh
#
# Needs python3 with torch, triton, numpy and pytest (no venv, no pytest plugins, nothing downloaded).
# Writes six flat files into $OUT, as it goes:
#   env.txt           nvidia-smi, python / torch / triton / CUDA versions, the device
#   kernel_tests.log  pytest -v of tests/kernels + tests/fp8/test_fp8_kernels.py and the library oracle tests that
#                     take the `device` fixture, with MOEPLUG_TEST_DEVICE=cuda (five pytest processes in
#                     parallel, so Triton compiles on several cores; logs appended in turn)
#   kernel_gpu.log    stdout of benchmarks/kernel_gpu.py; kernel_gpu.json, kernel_gpu.md: its results
#   summary.txt       the pytest result lines and exit codes of every step
# Every step runs under `timeout` (tests 170 s, benchmark 120 s) and a failing step never stops the next,
# so the script ends within ~5 minutes; expected ~2-3 minutes on an H100 with a cold Triton cache.
# Without a GPU, or with MOEPLUG_TEST_DEVICE=cpu, the tests run in Triton's interpreter and the
# benchmark in its --smoke form (a check of this script, not a measurement).
set -u
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:?set OUT to the output directory}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
# A writable compile cache whatever $HOME is, shared by the tests and the benchmark.
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-${TMPDIR:-/tmp}/gpu_check_triton_cache}
if [ -z "${MOEPLUG_TEST_DEVICE:-}" ]; then
    if "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
        MOEPLUG_TEST_DEVICE=cuda
    else
        MOEPLUG_TEST_DEVICE=cpu
    fi
fi
export MOEPLUG_TEST_DEVICE
start=$SECONDS
log() { echo "[gpu_check +$((SECONDS - start))s] $*" | tee -a "$OUT/summary.txt"; }
log "device for the tests: $MOEPLUG_TEST_DEVICE; output: $OUT"

# 1. Environment.
{
    date -u; uname -srm; timeout 30 nvidia-smi || echo "nvidia-smi: not available"
    timeout 60 "$PY" - <<'EOF'
import sys
from importlib import metadata
import torch, triton
print("python", sys.version.split()[0], "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| triton", triton.__version__)
if torch.cuda.is_available():
    print("device:", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability(),
          f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
for name in ("numpy", "pytest", "pytest-timeout", "transformers", "peft"):  # versions only, nothing imported
    try:
        print(name, metadata.version(name))
    except metadata.PackageNotFoundError:
        print(name, "not installed")
EOF
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# 2. Kernel oracle tests. -o addopts="" drops pyproject's options (they name no plugin, but a device may
# lack some); importlib mode is re-added because tests/kernels must not shadow the kernels package.
# pyproject's `timeout` option only warns without pytest-timeout; `timeout` below bounds each process.
PYTEST=("$PY" -m pytest -p no:cacheprovider -o addopts="" --import-mode=importlib -v -ra --durations=8)
groups=(
    "tests/kernels/test_grouped_gemm.py"
    "tests/kernels/test_gated_mlp.py tests/kernels/test_kernels_backend.py tests/kernels/test_aot.py"
    "tests/kernels/test_lora_kernels.py"
    "tests/fp8/test_fp8_kernels.py"
    # the kernels inside the libraries: patched HF MoE models, the mixed-batch engine vs PEFT, FP8AdamW vs AdamW
    "tests/moeplug/test_hf_patch.py::test_patched_matches_transformers tests/lora_serve/test_engine_oracle.py::test_mixed_batch_matches_peft_per_adapter tests/fp8/test_fp8_optim.py::test_50_steps_track_torch_adamw_with_resync"
)
log "kernel tests: ${#groups[@]} pytest processes, 170 s limit"
pids=()
for i in "${!groups[@]}"; do
    # shellcheck disable=SC2086  # the group is a list of paths
    timeout -k 10 170 "${PYTEST[@]}" ${groups[$i]} > "$OUT/kernel_tests.part$i.log" 2>&1 &
    pids+=($!)
done
: > "$OUT/kernel_tests.log"
for i in "${!groups[@]}"; do
    wait "${pids[$i]}"; rc=$?
    part="$OUT/kernel_tests.part$i.log"
    { echo "===== ${groups[$i]} (exit $rc$([ $rc = 124 ] && echo ': TIMED OUT'))"; cat "$part"; } >> "$OUT/kernel_tests.log"
    result=$(grep -E '^=+ .*(passed|failed|error).* in ' "$part" | tail -1)
    log "tests ${groups[$i]}: exit $rc; ${result:-$(tail -1 "$part")}"
    rm -f "$part"
done

# 3. Timings (kernel_gpu.json / .md are rewritten after every row, so a timeout keeps what ran).
if [ "$MOEPLUG_TEST_DEVICE" = cuda ]; then bench_args=(); else bench_args=(--smoke); fi
log "benchmark: benchmarks/kernel_gpu.py ${bench_args[*]}, 120 s limit"
timeout -k 10 120 "$PY" benchmarks/kernel_gpu.py --out "$OUT" "${bench_args[@]}" > "$OUT/kernel_gpu.log" 2>&1
rc=$?
log "benchmark: exit $rc$([ $rc = 124 ] && echo ': TIMED OUT'); $(tail -1 "$OUT/kernel_gpu.log")"
[ -f "$OUT/kernel_gpu.md" ] && cat "$OUT/kernel_gpu.md"
grep -E "^(FAILED|ERROR)" "$OUT/kernel_tests.log" | head -40
log "done; files: $(cd "$OUT" && ls | tr '\n' ' ')"
