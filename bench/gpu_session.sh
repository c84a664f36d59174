#!/usr/bin/env bash
# What a lent GPU machine runs (stages sized to end inside the device tool's 10 minutes a call).
#
#   bash bench/gpu_session.sh STAGE...   # stages run in order:
#     tests    the environment; the GPU tests (kernels compiled for real, varlen attention in bf16, CPU offload;
#              the last builds the demo: carry easy-vqa's wheel too)
#     kernels  bench/kernels.py at Qwen2.5-VL-7B's head shape
#     1b       bench/throughput.py --preset 1b, one measured step, with the baselines
#     3b       bench/throughput.py --preset 3b: the base configuration + baselines
#     3b-ab    the same preset, packed vs padded and fused vs eager
#     qwen3vl-2b, qwen3vl-4b   as 3b, at Qwen3-VL-2B / 4B's shapes; the 4B's plan with the discriminator and the
#              reference (--beta 0.04) is 132 GiB before activations (H200 only), so its updates recompute each
#              layer in the backward (--rl-only: 83 GiB, if that still runs out of memory); the 2B's is 63 GiB (an
#              H100 wants BENCH_ARGS=--activation-checkpointing)
# The 3b and qwen3vl stages take 8 questions per step (16 did not fit a call on an H200 on 2026-11-22); BENCH_ARGS
# adds or overrides throughput.py options (the last of a repeated option wins).
#
# The machine's image has torch, triton and transformers but not liger-kernel; wheels in .whl/ (the
# versions scripts/setup.sh installs, fetched with `pip download --no-deps`) are installed first when
# present. Logs and CSVs go to $OUT (the device tool's return folder; /tmp/ril_gpu elsewhere).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/ril_gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site || exit 1
fi
# ril_fast as setup.py lays it out (kernels/ -> ril_fast.kernels) without pip, which would want to fetch
# setuptools for an isolated build; PYTHONSAFEPATH keeps the checkout's own ril_fast/ off sys.path.
rm -rf /tmp/pkg && mkdir -p /tmp/pkg && cp -r ril_fast /tmp/pkg/ && cp -r kernels /tmp/pkg/ril_fast/kernels
export PYTHONPATH=/tmp/pkg${PYTHONPATH:+:$PYTHONPATH} PYTHONSAFEPATH=1
WORK=/tmp/ril_bench

[ $# -gt 0 ] || { echo "usage: bash bench/gpu_session.sh STAGE... (tests, kernels, 1b, 3b, 3b-ab, qwen3vl-2b," \
    "qwen3vl-4b)" >&2; exit 2; }
for stage in "$@"; do
case "$stage" in
tests)
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
    python3 -c "import torch, triton, transformers, liger_kernel, importlib.util as u; print('torch', torch.__version__, \
'| triton', triton.__version__, '| transformers', transformers.__version__, '| flash_attn', bool(u.find_spec('flash_attn')))"
    timeout 240 python3 -m pytest -q -p no:cacheprovider tests/kernels tests/test_attention.py \
        "tests/test_models.py::test_varlen_flash_vs_sdpa_bf16_gpu" \
        "tests/test_activations.py::test_the_gpu_estimate_is_what_a_gpu_update_saves" \
        "tests/test_train.py::test_cpu_offload_keeps_the_trained_state_off_the_gpu" 2>&1 | tee "$OUT/gpu_tests.log" \
        | tail -15
    ;;
kernels)
    timeout 120 python3 bench/kernels.py --out "$OUT/kernels.csv" 2>&1 | tee "$OUT/kernels.log" | grep -v "^Load"
    ;;
1b)
    timeout 240 python3 bench/throughput.py --preset 1b --steps 1 --reps 1 --workdir $WORK/1b --out "$OUT/throughput.csv" \
        2>&1 | tee "$OUT/throughput_1b.log" | grep -v "it/s\]"
    ;;
3b)
    timeout 470 python3 bench/throughput.py --preset 3b --questions-per-step 8 --steps 1 --reps 1 ${BENCH_ARGS:-} \
        --workdir $WORK/3b --out "$OUT/throughput.csv" 2>&1 | tee "$OUT/throughput_3b.log" | grep -v "it/s\]"
    ;;
3b-ab)
    timeout 540 python3 bench/throughput.py --preset 3b --questions-per-step 8 --steps 1 --compare --no-baselines \
        ${BENCH_ARGS:-} --workdir $WORK/3b --out "$OUT/throughput.csv" 2>&1 | tee "$OUT/throughput_3b_ab.log" \
        | grep -v "it/s\]"
    ;;
qwen3vl-2b|qwen3vl-4b)
    ckpt=$([ "$stage" = qwen3vl-4b ] && echo --activation-checkpointing)
    timeout 470 python3 bench/throughput.py --preset "$stage" --questions-per-step 8 --steps 1 --reps 1 $ckpt \
        ${BENCH_ARGS:-} --workdir "$WORK/$stage" --out "$OUT/throughput.csv" 2>&1 | tee "$OUT/throughput_$stage.log" \
        | grep -v "it/s\]"
    ;;
*) echo "unknown stage $stage" >&2; exit 2 ;;
esac
done
