#!/usr/bin/env bash
# The CUDA checks the speed issue asks for when a GPU is lent (the library's device tool), prepared as one run:
# IQL and Cal-QL update throughput at AntMaze sizes (TF32, IEEE fp32, bf16; torch.compile for IQL), one EDIS retrain by
# part (retrain_profile.py, TF32 and bf16), and the LLM scripts' CUDA paths (bf16 over fp32 master weights, and
# fp32). Nothing here is a claim until its output is committed (benchmarks/results/gpu_check.jsonl).
#
#   bash benchmarks/gpu_check.sh fetch      # here, once (the package index is reachable): .whl/ and .gpu/ (ignored)
#   bash benchmarks/gpu_check.sh run        # on the GPU machine: device tool `run`, carry [".whl", ".gpu"], ~7 min
#   DEVICE=cpu SHORT=1 bash benchmarks/gpu_check.sh run     # a dry run of the same steps on this CPU (~10 min)
#
# The GPU machine has torch, transformers and tensorboard but not this project's other packages, and no network:
# `fetch` downloads their wheels for its Python (3.12, ~14 MB) and builds the built-in LLM once. Results go to $OUT
# (the device tool's folder that comes back) or benchmarks/runs/gpu_check.
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS="tyro==1.0.17 docstring-parser==0.18.0 typeguard==4.6.1 gymnasium==1.4.0 farama-notifications==0.0.6
mujoco==4.0.1 mujoco-core==4.0.1 glfw==2.11.0 pyopengl==3.1.10 math-verify==0.9.0 latex2sympy2-extended==1.11.0
antlr4-python3-runtime==4.13.2"  # what the steps below import (no environment is made: no gymnasium-robotics, minari)

if [ "${1:-}" = fetch ]; then
    grep -qx '/.whl/' .git/info/exclude || echo /.whl/ >> .git/info/exclude
    grep -qx '/.gpu/' .git/info/exclude || echo /.gpu/ >> .git/info/exclude
    for w in $WHEELS; do
        python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
            --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$w" || { echo "error: $w"; exit 1; }
    done
    python -c "from utils.llm_task import ensure_builtin_model as e; import shutil; \
shutil.copytree(e(), '.gpu/model', dirs_exist_ok=True)" || exit 1
    du -sh .whl .gpu
    exit 0
fi
[ "${1:-}" = run ] || { echo "usage: bash benchmarks/gpu_check.sh fetch|run" >&2; exit 2; }

PY=python3; command -v python3 >/dev/null || PY=python
if [ -d .whl ] && [ "${DEVICE:-cuda}" = cuda ]; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site
fi
DEV=${DEVICE:-cuda}
OUTDIR=${OUT:-benchmarks/runs/gpu_check}
mkdir -p "$OUTDIR"
J=$OUTDIR/gpu_check.jsonl
LOG=$OUTDIR/gpu_check.log
RUNS=$(mktemp -d)  # the LLM runs' folders: not in $OUTDIR (the device tool returns at most 8 files)
: > "$J"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 MUJOCO_GL=egl
MODEL=.gpu/model
[ -d $MODEL ] || MODEL=$($PY -c "from utils.llm_task import ensure_builtin_model as e; print(e())")
if [ -n "${SHORT:-}" ]; then N_IQL=20; N_CQL=3; PAIRS=1; ROUNDS=2; else N_IQL=2000; N_CQL=300; PAIRS=2; ROUNDS=8; fi

step() {  # name, command...: the command's output to the log, its last line (a JSON object) to the jsonl
    local name=$1; shift
    echo "== $name: $*" | tee -a "$LOG"
    local t0=$SECONDS out
    out=$("$@" 2>>"$LOG" | tee -a "$LOG" | tail -n 1)
    [ "${out:0:1}" = "{" ] || out=$($PY -c 'import json, sys; print(json.dumps(sys.argv[1]))' "$out")  # a failure
    printf '{"step": "%s", "wall_s": %d, "result": %s}\n' "$name" $((SECONDS - t0)) "$out" >> "$J"
}

{ nvidia-smi -L 2>/dev/null; $PY -c "import torch, transformers; print(torch.__version__, transformers.__version__, \
torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA')"; } | tee -a "$LOG"

# 1. update throughput, configurations alternating within each pair; torch.compile of the IQL update (eager and
#    compiled alternating, compile_check.py: warm-up and compilation untimed)
for pair in $(seq "$PAIRS"); do
    for algo in iql calql; do
        n=$N_IQL; [ $algo = calql ] && n=$N_CQL
        for flags in "" "--no-tf32" "--bf16"; do
            # shellcheck disable=SC2086
            step "throughput $algo [$flags] pair $pair" $PY benchmarks/update_throughput.py --device "$DEV" \
                --algo $algo --threads 4 --updates "$n" --warmup $((n / 10 + 3)) $flags
        done
    done
done
step "compile check" $PY benchmarks/compile_check.py --device "$DEV" --pairs "$PAIRS" \
    --out "$OUTDIR/compile_check_$DEV.json"

# 2. one EDIS retrain by part at the CPU preset's sizes (TF32 matmuls, then bf16 autocast)
step "retrain profile tf32" $PY benchmarks/retrain_profile.py --device "$DEV" --out "$OUTDIR"
step "retrain profile bf16" $PY benchmarks/retrain_profile.py --device "$DEV" --bf16 --out "$OUTDIR"

# 3. the LLM scripts on the device: bf16 by default on a bf16 GPU over fp32 master weights; then fp32
LLM="--model $MODEL --total-rounds $ROUNDS --prompts-per-round 16 --group-size 8 --max-new-tokens 48
     --micro-batch-size 32 --eval-every 100000 --eval-prompts 8 --eval-samples 0 --checkpoint-every 100000"
summary() { $PY - "$1" <<'PYEOF'
import json, statistics, sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
d = sys.argv[1]
s, c = (json.load(open(f"{d}/{f}.json")) for f in ("summary", "config"))
acc = EventAccumulator(d)
acc.Reload()
med = {t: statistics.median(e.value for e in acc.Scalars(t)[1:])
       for t in acc.Tags()["scalars"] if t.startswith("time/")}
print(json.dumps({**{k: s.get(k) for k in ("rounds", "updates", "wall_time_s", "world_size")},
                  **{k: c.get(k) for k in ("device_used", "bf16", "fsdp")}, "median_after_round_1": med}))
PYEOF
}
for script in grpo_llm.py reval_llm.py; do
    d=$RUNS/${script%.py}
    # shellcheck disable=SC2086
    $PY $script $LLM --device "$DEV" --output-dir "$d" >> "$LOG" 2>&1
    step "$script $DEV" summary "$d"
done
d=$RUNS/grpo_fp32  # the same without autocast: fp32 (TF32 matmuls); FSDP2 needs 2 ranks (tested on CPU, gloo)
# shellcheck disable=SC2086
$PY grpo_llm.py $LLM --device "$DEV" --no-bf16 --output-dir "$d" >> "$LOG" 2>&1
step "grpo_llm.py $DEV --no-bf16" summary "$d"
echo "results: $J" | tee -a "$LOG"
