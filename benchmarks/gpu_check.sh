#!/usr/bin/env bash
# One command on one CUDA GPU, under 8 minutes: the CUDA tests, benchmarks/speed.py on the GPU, and train.py
# against timm's own train.py (benchmarks/vs_timm.py) when TIMM_TRAIN names timm's train.py.
#
#   TIMM_TRAIN=benchmarks/cache/timm/train.py bash benchmarks/gpu_check.sh
#   (the device tool: carry benchmarks/cache/timm, which git ignores)
#
# Writes to benchmarks/results/:
#   gpu_tests.txt                          python -m pytest -m cuda tests/test_cuda.py
#   gpu_<model>_<precision>[_compile].md   step time ratios, images/s, peak memory: resnet50 and
#                                          vit_small_patch16_224, 224x224, batch 128, bf16 and fp16, eager and compiled
#   gpu_efficient_<model>_bf16.md/.json    the cheaper G-Mix settings (interval, LookSAM reuse, MSAM) in bf16
#   vs_timm_gpu-resnet18.md/.json          train.py against timm's train.py, resnet18 32x32 batch 256 from an
#                                          image folder (the data pipeline decides), and
#   vs_timm_gpu-resnet50.md/.json          resnet50 224x224 batch 128 bf16, channels-last, timm's prefetcher
#   gpu_compile_vs_timm.md                 train.py --torchcompile (inductor) against timm's --torchcompile, with
#                                          the compile time of the first epoch apart
# (GPU_CHECK_RESULTS=DIR writes them there instead.) Every run gets what is left of a time budget (GPU_CHECK_BUDGET
# seconds, default 450); a run that fails or runs out of time writes the failure into its own file and the others
# still run. Compiled runs come last: inductor
# compiles each pass's graph during the warm-up steps, which takes most of their time.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=python3
if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; fi
if ! "$PY" -c 'import timm_gmix, pytest, accelerate' 2>/dev/null; then
    "$PY" -m pip install -q -e ".[test]"
fi

BUDGET=${GPU_CHECK_BUDGET:-450}
RESULTS=${GPU_CHECK_RESULTS:-benchmarks/results}
mkdir -p "$RESULTS"
LOG=$(mktemp)
trap 'rm -f "$LOG"' EXIT

# run OUT NEED CMD...: run CMD with what is left of the budget, its output in OUT if it writes none itself (pytest)
# or the failure in OUT if it fails; skipped (said in OUT) when less than NEED seconds are left.
run() {
    local out=$1 need=$2 left=$((BUDGET - SECONDS)) start=$SECONDS rc=0
    shift 2
    if ((left < need)); then
        echo "SKIPPED: ${left}s of the ${BUDGET}s budget left, this run needs about ${need}s: $*" | tee "$out"
        return
    fi
    echo "== $out (${left}s left): $*"
    timeout --kill-after=15 "$left" "$@" >"$LOG" 2>&1 || rc=$?
    if ((rc == 0)); then
        echo "   done in $((SECONDS - start))s"
        [[ -s "$out" ]] || cp "$LOG" "$out"
        tail -n 12 "$LOG"
    else
        local why="exit $rc"
        ((rc == 124 || rc == 137)) && why="out of the time budget"
        {
            echo "FAILED ($why) after $((SECONDS - start))s: $*"
            echo
            echo '```'
            tail -n 200 "$LOG"
            echo '```'
        } >"$out"
        echo "   FAILED ($why) after $((SECONDS - start))s, see $out"
    fi
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())' ||
    { echo "gpu_check: torch sees no CUDA GPU here, nothing to check" >&2; exit 1; }

rm -f "$RESULTS/gpu_tests.txt"
run "$RESULTS/gpu_tests.txt" 60 "$PY" -m pytest -m cuda tests/test_cuda.py -rA

SPEED=(--device cuda --img-size 224 -b 128)
EFFICIENT_MODES="sgd sgd_mixup sgd_mixup_guarded naive_sam sam g bg dg g:perturb=momentum g:interval=5 \
g:interval=5,reuse=0.7 g:interval=10,reuse=0.7 bg:interval=8,reuse=0.7 dg:perturb=momentum \
dg:interval=4,perturb=momentum dg:interval=8 dg:interval=8,reuse=0.7"
for model in resnet50 vit_small_patch16_224; do
    for precision in bf16 fp16; do
        out="$RESULTS/gpu_${model}_${precision}.md"
        rm -f "$out"
        run "$out" 30 "$PY" benchmarks/speed.py "${SPEED[@]}" --model "$model" --precision "$precision" \
            --rounds 5 --steps 3 --warmup 3 --out "$out"
    done
done

# The cheaper G-Mix settings (issue 10) against SGD + Mixup, bare and through gmix_step.
for model in resnet50 vit_small_patch16_224; do
    out="$RESULTS/gpu_efficient_${model}_bf16.md"
    rm -f "$out"
    run "$out" 60 "$PY" benchmarks/speed.py "${SPEED[@]}" --model "$model" --precision bf16 --rounds 5 --steps 10 \
        --warmup 3 --modes $EFFICIENT_MODES --out "$out" --json "${out%.md}.json"
done

if [[ -n "${TIMM_TRAIN:-}" ]]; then
    for preset in gpu-resnet18 gpu-resnet50; do
        out="$RESULTS/vs_timm_${preset}.md"
        rm -f "$out"
        run "$out" 120 "$PY" benchmarks/vs_timm.py --timm-train "$TIMM_TRAIN" --preset "$preset" --rounds 2 \
            --methods sgd_mixup g dg msam_g dg_every_8 --out "$out"
    done
    out="$RESULTS/gpu_compile_vs_timm.md"
    rm -f "$out"
    run "$out" 120 "$PY" benchmarks/vs_timm.py --timm-train "$TIMM_TRAIN" --preset gpu-resnet50 --rounds 1 \
        --methods sgd_mixup g dg --compile --out "$out"
else
    echo "TIMM_TRAIN is not set: the comparison with timm's train.py is skipped"
fi

# Compiled: the modes whose graphs differ (sam shares g's); 3 warm-up steps compile every pass of dg.
for model in resnet50 vit_small_patch16_224; do
    for precision in bf16 fp16; do
        out="$RESULTS/gpu_${model}_${precision}_compile.md"
        rm -f "$out"
        run "$out" 60 "$PY" benchmarks/speed.py "${SPEED[@]}" --model "$model" --precision "$precision" --compile \
            --modes sgd_mixup naive_sam g bg dg --rounds 3 --steps 3 --warmup 3 --out "$out"
    done
done

echo "gpu_check: ${SECONDS}s in all; results in $RESULTS/gpu_*"
