#!/usr/bin/env bash
# The GPU checks, on any machine with a CUDA GPU and a Python environment that holds lmlab's dependencies
# (`make install`, or `pip install -e ".[test]"`; PYTHON names its interpreter, default .venv/bin/python where it
# exists, else python3). The tree this script sits in is the lmlab that runs.
#     bash scripts/gpu_check.sh [bench] [cli] [paper]        (no argument: bench and cli)
# bench: scripts/bench_gpu.py at GPT-2-small shape: lmlab, Hugging Face and the lean GPT-2, eager and compiled
#        (tokens/s, MFU, peak memory; every comparison is a ratio within this one run);
# cli:   the CLI on the GPU: the default job with trainer=gpu (bf16 autocast, fused AdamW, clipping), then with
#        compile=true and activation checkpointing, then every other model for a few steps.
# paper: a short version of the reproduction's gpu profile (scripts/reproduce_paper.py --profile gpu): a generated
#        PCFG of the paper's shape (--grammar generated; its rule file is not in the repository), 2 seeds, 2 sizes, 2,000
#        steps; its dry run first (the full profile's sentences, head sizes and schedule), then the sweeps and
#        the report (the wall time per sweep says how long the full profile takes).
# Each step has its own time limit (the `step` lines below), so each part ends within about 8 minutes.
# Everything goes to $OUT/gpu_check.log (OUT defaults to ./gpu_check_out); runs and data go to a fresh temporary
# folder (WORK). Each step's exit status is printed; a failing step does not stop the later ones.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
PY=$PYTHON
WORK=${WORK:-$(mktemp -d -t lmlab-gpu-check.XXXXXX)}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 LMLAB_CACHE=${LMLAB_CACHE:-$WORK/cache}
echo "runs and data under $WORK"
step() {  # step NAME SECONDS COMMAND...: run with a time limit, report the exit status and the wall time
  local name=$1 limit=$2; shift 2
  echo "=== $name ($(date +%T))"
  local t0=$SECONDS
  timeout "$limit" "$@"
  echo "=== $name: exit $? after $((SECONDS - t0)) s"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
"$PY" -c "import torch, lightning, transformers, datasets, hydra; print('torch', torch.__version__, 'lightning',
lightning.__version__, 'transformers', transformers.__version__, 'datasets', datasets.__version__, 'cuda',
torch.cuda.is_available())" || { echo "$PY lacks lmlab's dependencies: run make install, or set PYTHON"; exit 1; }
PARTS=${*:-bench cli}
if [[ $PARTS == *bench* ]]; then
  step "bench_gpu (batch 16)" 360 "$PY" scripts/bench_gpu.py
fi
if [[ $PARTS == *cli* ]]; then
  LM=("$PY" -m lmlab train "out_dir=$WORK/runs" logger=csv)
  step "default job, trainer=gpu" 90 "${LM[@]}" trainer=gpu
  step "trainer=gpu compile=true, activation checkpointing" 120 "${LM[@]}" trainer=gpu compile=true \
    model.activation_checkpointing=true max_steps=300 "eval=[perplexity]"
  step "every model, trainer=gpu, 50 steps" 150 "${LM[@]}" -m trainer=gpu \
    model=mamba,mamba2,mom,hyena,transnormer,moe,lstm max_steps=50 val_every=25 "eval=[perplexity]"
  for f in $(find "$WORK/runs" -name metrics.csv 2>/dev/null | head -3); do echo "--- $f"; tail -3 "$f"; done
fi
if [[ $PARTS == *paper* ]]; then
  step "reproduce-paper gpu profile, dry run" 120 "$PY" scripts/reproduce_paper.py --profile gpu \
    --grammar generated --dry-run
  step "reproduce-paper gpu profile, short" 360 "$PY" scripts/reproduce_paper.py --profile gpu --seeds 0-1 \
    --grammar generated --out "$WORK/paper" --set max_steps=2000 --set data.train_size=100000 \
    --set model.d_model=128,256 --set eval.flatness.embed_width=256
  head -40 "$WORK/paper/report.md"
fi
