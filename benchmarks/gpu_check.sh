#!/usr/bin/env bash
# One command on one CUDA GPU, under 8 minutes: the CUDA tests, benchmarks/speed.py on the GPU, and train.py
# against timm's own train.py (benchmarks/vs_timm.py) when TIMM_TRAIN names timm's train.py.
#
#   TIMM_TRAIN=benchmarks/cache/timm/train.py bash benchmarks/gpu_check.sh
#   (the device tool: carry benchmarks/cache/timm, which git ignores)
#
# Writes to benchmarks/results/:
#   gpu_tests.txt                          python -m pytest -m cuda tests/test_cuda.py tests/test_timm_semantics.py
#   gpu_recipes.md                         train.py end to end with a common timm recipe's flags (--model-ema,
#                                          --amp fp16 and bf16, --channels-last, --workers 4 --pin-mem, DG-Mix;
#                                          once each lookahead_gmix_sam and --torchcompile): 2 epochs of resnet18 at
#                                          64x64 on 512 digit images in an image folder; whether each finished, its
#                                          time and its last lines
#   gpu_<model>_<precision>[_compile].md   step time ratios, images/s, peak memory: resnet50 and
#                                          vit_small_patch16_224, 224x224, batch 128, bf16 and fp16, eager and compiled
#   gpu_efficient_<model>_bf16.md/.json    the cheaper G-Mix settings (interval, LookSAM reuse, MSAM) in bf16
#   vs_timm_gpu-resnet18.md/.json          train.py against timm's train.py, resnet18 32x32 batch 256 from an
#                                          image folder (the data pipeline decides), and
#   vs_timm_gpu-resnet50.md/.json          resnet50 224x224 batch 128 bf16, channels-last, timm's prefetcher
#   vs_timm_gpu-resnet18-bf16.md/.json     --device-data against timm's workers and a bare loop (issue 25: 3x timm)
#   gpu_compile_vs_timm.md                 train.py --torchcompile (inductor) against timm's --torchcompile, with
#                                          the compile time of the first epoch apart
# (GPU_CHECK_RESULTS=DIR writes them there instead.) Every run gets what is left of a time budget (GPU_CHECK_BUDGET
# seconds, default 450); a run that fails or runs out of time writes the failure into its own file and the others
# still run. Compiled runs come last: inductor
# compiles each pass's graph during the warm-up steps, which takes most of their time. GPU_CHECK_PARTS picks the
# parts, in this order (default all): tests recipes speed efficient vs_timm compile; e.g.
# GPU_CHECK_PARTS="tests recipes" for the checks alone (estimated 4 minutes on one H100; not yet run on a GPU).
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
RECIPE_RUNS=$(mktemp -d)
trap 'rm -rf "$LOG" "$RECIPE_RUNS"' EXIT
PARTS=" ${GPU_CHECK_PARTS:-tests recipes speed efficient vs_timm compile} "
part() { [[ "$PARTS" == *" $1 "* ]]; }

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

if part tests; then
    rm -f "$RESULTS/gpu_tests.txt"
    run "$RESULTS/gpu_tests.txt" 60 "$PY" -m pytest -m cuda tests/test_cuda.py tests/test_timm_semantics.py -rA
fi

# train.py end to end with the flags of a common timm recipe, on an image folder the benchmark builds
# (benchmarks/vs_timm.py: 512 + 128 digit images at 64x64, in benchmarks/cache). Each run's log stays in a
# temporary folder; gpu_recipes.md gets whether it finished, its time and its last lines (progress bars left out).
if part recipes; then
    DATA=$("$PY" -c 'import sys; sys.path.insert(0, "benchmarks"); from vs_timm import image_folder
print(image_folder(64, 512, 128))') || DATA="(the image folder could not be built)"
    RECIPE=(train.py "$DATA" --model resnet18 --img-size 64 -b 64 --epochs 2 --lr 0.05 --warmup-epochs 0
            --opt gmix_sam --mixup 0.8 --mixup-mode dg --model-ema --channels-last --workers 4 --pin-mem
            --log-interval 4 --output "$RECIPE_RUNS")
    RECIPES=(fp16 bf16 lookahead compile)
    declare -A RECIPE_FLAGS=(
        [fp16]="--amp --amp-dtype float16"
        [bf16]="--amp --amp-dtype bfloat16"
        [lookahead]="--amp --amp-dtype bfloat16 --opt lookahead_gmix_sam"
        [compile]="--amp --amp-dtype bfloat16 --torchcompile"
    )
    declare -A RECIPE_TIME
    for name in "${RECIPES[@]}"; do
        start=$SECONDS
        need=45
        [[ $name == compile ]] && need=120  # inductor compiles the three passes of DG-Mix first
        # shellcheck disable=SC2086  # the flags are words
        run "$RECIPE_RUNS/$name.txt" "$need" "$PY" "${RECIPE[@]}" ${RECIPE_FLAGS[$name]} --experiment "$name"
        RECIPE_TIME[$name]=$((SECONDS - start))
    done
    {
        echo "# train.py with a common timm recipe's flags"
        echo
        "$PY" -c 'import torch; print("torch", torch.__version__, "on", torch.cuda.get_device_name())' || true
        echo
        echo "Every run: \`python ${RECIPE[*]/#$RECIPE_RUNS/TMP}\` plus its own flags."
        for name in "${RECIPES[@]}"; do
            out="$RECIPE_RUNS/$name.txt"
            echo
            if grep -q '^Validation top-1 accuracy' "$out"; then
                echo "## $name (${RECIPE_FLAGS[$name]}): finished in ${RECIPE_TIME[$name]}s"
            else
                echo "## $name (${RECIPE_FLAGS[$name]}): did not finish: $(head -n 1 "$out")"
            fi
            echo
            echo '```'
            tr '\r' '\n' <"$out" | grep -Ev '^epoch [0-9]+:|^[[:space:]]*$|^```' | tail -n 8 || true
            echo '```'
        done
    } >"$RESULTS/gpu_recipes.md"
    echo "   recipes: $(grep -c ': finished in' "$RESULTS/gpu_recipes.md") of ${#RECIPES[@]} finished, see $RESULTS/gpu_recipes.md"
fi

SPEED=(--device cuda --img-size 224 -b 128)
EFFICIENT_MODES="sgd sgd_mixup sgd_mixup_guarded naive_sam sam g bg dg g:perturb=momentum g:interval=5 \
g:interval=5,reuse=0.7 g:interval=10,reuse=0.7 bg:interval=8,reuse=0.7 dg:perturb=momentum \
dg:interval=4,perturb=momentum dg:interval=8 dg:interval=8,reuse=0.7"
for model in resnet50 vit_small_patch16_224; do
    part speed || break
    for precision in bf16 fp16; do
        out="$RESULTS/gpu_${model}_${precision}.md"
        rm -f "$out"
        run "$out" 30 "$PY" benchmarks/speed.py "${SPEED[@]}" --model "$model" --precision "$precision" \
            --rounds 5 --steps 3 --warmup 3 --out "$out"
    done
done

# The cheaper G-Mix settings (issue 10) against SGD + Mixup, bare and through gmix_step.
for model in resnet50 vit_small_patch16_224; do
    part efficient || break
    out="$RESULTS/gpu_efficient_${model}_bf16.md"
    rm -f "$out"
    run "$out" 60 "$PY" benchmarks/speed.py "${SPEED[@]}" --model "$model" --precision bf16 --rounds 5 --steps 10 \
        --warmup 3 --modes $EFFICIENT_MODES --out "$out" --json "${out%.md}.json"
done

if ! part vs_timm; then
    :
elif [[ -n "${TIMM_TRAIN:-}" ]]; then
    for preset in gpu-resnet18 gpu-resnet50; do
        out="$RESULTS/vs_timm_${preset}.md"
        rm -f "$out"
        run "$out" 120 "$PY" benchmarks/vs_timm.py --timm-train "$TIMM_TRAIN" --preset "$preset" --rounds 2 \
            --methods sgd_mixup g dg msam_g dg_every_8 --out "$out"
    done
    # issue 25: --device-data against timm's workers and a bare loop, resnet18 32x32 batch 256, bf16, channels-last
    out="$RESULTS/vs_timm_gpu-resnet18-bf16.md"
    rm -f "$out"
    run "$out" 120 "$PY" benchmarks/vs_timm.py --timm-train "$TIMM_TRAIN" --preset gpu-resnet18-bf16 --rounds 2 \
        --bare --methods sgd_mixup sgd_mixup_device g g_device --out "$out"
    out="$RESULTS/gpu_compile_vs_timm.md"
    rm -f "$out"
    run "$out" 120 "$PY" benchmarks/vs_timm.py --timm-train "$TIMM_TRAIN" --preset gpu-resnet50 --rounds 1 \
        --methods sgd_mixup g dg --compile --out "$out"
else
    echo "TIMM_TRAIN is not set: the comparison with timm's train.py is skipped"
fi

# Compiled: the modes whose graphs differ (sam shares g's); 3 warm-up steps compile every pass of dg.
for model in resnet50 vit_small_patch16_224; do
    part compile || break
    for precision in bf16 fp16; do
        out="$RESULTS/gpu_${model}_${precision}_compile.md"
        rm -f "$out"
        run "$out" 60 "$PY" benchmarks/speed.py "${SPEED[@]}" --model "$model" --precision "$precision" --compile \
            --modes sgd_mixup naive_sam g bg dg --rounds 3 --steps 3 --warmup 3 --out "$out"
    done
done

echo "gpu_check: ${SECONDS}s in all; results in $RESULTS/gpu_*"
