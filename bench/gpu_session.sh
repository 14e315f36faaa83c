#!/usr/bin/env bash
# What a GPU session runs. The device machine has PyTorch and transformers but not gptlab's other
# dependencies: wheels for rustbpe/gguf (check: also llguidance, jsonschema, jsonschema-specifications, referencing,
# rpds-py) travel in .whl, gptlab runs from the tree (`python3 -m gptlab.cli`).
# Usage: bash bench/gpu_session.sh OUTDIR PARTS...
# PARTS: check (bench/check_gpu.py), train (bench_train_gpu.py), mfu (its variants), decode (bench_decode.py
# on CUDA), speedrun (the GPU preset), smoke (every stage of the GPU speedrun for a few steps, on a copy of
# runs/gpu's tokenizer + data). runs/gpu is made on the CPU machine, which has the mixture's packages:
# `gptlab speedrun --preset gpu --stages tokenizer,data --run-dir runs/gpu`, then carried.
set -uo pipefail
out=${1:?output dir}; shift
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
for part in "$@"; do
  echo "=== $part $(date +%T)"
  case $part in
  check) timeout 300 python3 bench/check_gpu.py 2>&1 | tee "$out/check_gpu.log" ;;
  train) timeout 200 python3 bench/bench_train_gpu.py --micro-batches 32 --steps 10 2>&1 | tee "$out/train_gpu.md" ;;
  mfu) # the MFU search: one process per variant (micro-batch 32, T 1024, vocab 50304), two of them profiled
    b="python3 bench/bench_train_gpu.py --sides gptlab --steps 8 --warmup 2"
    for variant in "--profile 2" "--attention cudnn" "--fused-projections" "--attention cudnn --fused-projections --profile 2" \
        "--attention cudnn --fused-projections --micro-batches 64" \
        "--attention cudnn --fused-projections --compile-mode max-autotune-no-cudagraphs"; do
      echo "--- $variant"; timeout 170 $b $variant 2>&1 | grep -v Warning
    done 2>&1 | tee -a "$out/mfu_gpu.md" ;;
  decode) timeout 160 python3 bench/bench_decode.py --device cuda --dtype bfloat16 --depths 12 --batches 1 32 \
            --reps 3 --compile 2>&1 | tee "$out/decode_gpu.md" ;;
  smoke)
    rm -rf /tmp/smoke && mkdir -p /tmp/smoke/runs && cp -r runs/gpu /tmp/smoke/runs/gpu
    (cd /tmp/smoke && timeout 280 python3 -m gptlab.cli speedrun --preset gpu --run-dir runs/gpu --pretrain-steps 4 --sft-steps 20 --rm-steps 20 --rl-steps 3 \
      --dpo-steps 10 --eval-per-task 5 --pref-prompts 300 --pref-val-prompts 100 --rl-gold-per-task 3) \
      > "$out/smoke.log" 2>&1; echo "smoke exit $?"; grep -v '%|' "$out/smoke.log" | tail -60
    cp /tmp/smoke/runs/gpu/report.md "$out/smoke_report.md" 2>/dev/null ;;
  speedrun)  # the GPU preset for real; rerun the same command to resume after a timeout
    timeout "${SPEEDRUN_TIMEOUT:-540}" python3 -m gptlab.cli speedrun --preset gpu --run-dir runs/gpu >> "$out/speedrun.log" 2>&1; echo "speedrun exit $?"
    grep -v '%|' "$out/speedrun.log" | cut -c1-300 | tail -70
    # does the 110M base recall the `facts` source (the CPU model does not)? docs/LOG.md, session 8
    timeout 120 python3 bench/knowledge_probe.py runs/gpu/pretrain/model 2>&1 | tee "$out/knowledge_probe.md"
    tar czf "$out/gpu_run.tgz" --exclude='*.safetensors' --exclude='*.bin' --exclude='*.pt' runs/gpu ;;
  esac
done
echo "=== end $(date +%T)"
