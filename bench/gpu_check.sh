#!/usr/bin/env bash
# GPU check: on a machine with a GPU, the tiny DAG (the tiny config of tests/test_pipeline.py, base + 1 round) with
# every model stage on CUDA; it fails unless the runs complete and the log of every model stage says "on device
# cuda". Two experiments, so every model stage runs: toy_apasi (generate, pope_answers, amber_answers, inject,
# reference_logps, dpo, merge), then toy_sentinel_symmpo on the same toy world and model_0 (sentinel,
# contrast_embeddings). A few minutes on a GPU; nothing is downloaded. Without a GPU it says so and runs the same DAG on the CPU, checking "cpu".
#
#   bench/gpu_check.sh [workdir]      # default: a new temporary folder; PYTHON=... to use another interpreter
#
# pretrain_base (the toy model_0) trains on the CPU whatever the machine: its bytes are pinned to the CPU kernels.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
SNAKEMAKE=$(dirname "$PYTHON")/snakemake
WORK=${1:-$(mktemp -d "${TMPDIR:-/tmp}/halludpo-gpu-check.XXXXXX")}
mkdir -p "$WORK"
TINY="data.splits.train=200,data.splits.unlabeled=16,data.splits.eval=60,data.world.image_size=32,\
data.world.min_glyph=8,data.world.max_glyph=12,data.world.max_objects=4,model.arch.vision_hidden=32,\
model.arch.vision_layers=1,model.arch.vision_heads=2,model.arch.text_hidden=48,model.arch.text_layers=2,\
model.arch.text_heads=2,model.pretrain.epochs=8,model.pretrain.batch_size=16,model.pretrain.lr=3e-3,rounds=1,\
train.batch_size=4,train.max_length=200,eval.chair.n_images=20,eval.chair.max_new_tokens=24,eval.pope.n_images=8,\
eval.amber.n_images=8,eval.amber.generative.max_new_tokens=24,eval.batch_size=16"
SENTINEL="method.sampling.max_new_tokens=24,method.sampling.n=8,method.sampling.max_steps=6,\
verifier.train.hyper.cnn.epochs=20,verifier.train.hyper.mlp.epochs=20"

fail() { echo "gpu_check: FAILED: $*" >&2; exit 1; }

if "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  DEVICE=cuda  # asked for, not auto: a stage that cannot see the GPU fails with one line instead of using the CPU
  GPU=$("$PYTHON" -c "import torch; print(torch.cuda.get_device_name(0), '| torch', torch.__version__)")
  echo "gpu_check: GPU: $GPU"
else
  DEVICE=cpu
  echo "gpu_check: no GPU (torch.cuda.is_available() is False): running the tiny DAG on the CPU; this checks the" \
       "script, not the GPU path"
fi
echo "gpu_check: workdir $WORK, model.device=$DEVICE"

run_experiment() {  # experiment, extra overrides
  local log="$WORK/snakemake_$1.log"
  echo "gpu_check: snakemake experiment=$1 (log: $log)"
  env -u MLFLOW_TRACKING_URI HF_HUB_OFFLINE=1 "$SNAKEMAKE" -s "$ROOT/Snakefile" --directory "$WORK" --cores 2 \
    --config "overrides=[experiment=$1,$TINY,model.device=$DEVICE$2]" > "$log" 2>&1 \
    || { tail -n 30 "$log" >&2 || true; fail "experiment $1 did not complete (see $log and $WORK/results/$1/logs/)"; }
}

check_logs() {  # experiment, rules whose stage loads a model
  local experiment=$1 rule log found
  shift
  for rule in "$@"; do
    found=0
    # a shard job's log (<rule>_[split_]<i>-of-<n>_r<k>.log) or a round's (<rule>_r<k>.log); not <rule>_pairs_r<k>
    for log in "$WORK/results/$experiment/logs/${rule}_"*[0-9]-of-[0-9]*_r[0-9]*.log \
               "$WORK/results/$experiment/logs/${rule}_r"[0-9]*.log; do
      [ -f "$log" ] || continue
      found=1
      grep -q "on device $DEVICE" "$log" || fail "$log does not report device $DEVICE"
      echo "  $experiment/$(basename "$log"): $(grep -o "on device [a-z0-9:]*" "$log" | sort -u | tr '\n' ' ')"
    done
    [ "$found" = 1 ] || fail "no log of rule $rule in $WORK/results/$experiment/logs"
  done
}

SECONDS=0
run_experiment toy_apasi ",method.generation.max_new_tokens=24"
check_logs toy_apasi generate pope_answers amber_answers inject reference_logps dpo merge
grep -q "training on device $DEVICE" "$WORK/results/toy_apasi/logs/dpo_r0.log" \
  || fail "the Trainer did not run on $DEVICE"
run_experiment toy_sentinel_symmpo ",$SENTINEL"
check_logs toy_sentinel_symmpo generate pope_answers amber_answers sentinel contrast_embeddings reference_logps dpo merge
echo "gpu_check: OK: every model stage ran on $DEVICE ($SECONDS s)"
