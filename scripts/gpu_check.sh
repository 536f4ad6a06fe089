#!/usr/bin/env bash
# The prepared device check for issues 4 and 6: one call on one H100/H200.
#
#   OUT=/tmp/out bash scripts/gpu_check.sh          # ~9-10 minutes (estimate); stages write as they finish
#   STAGES="op tests" bash scripts/gpu_check.sh     # a subset: op trainer tests bench train bench_cl
#
# Results are written under $RES and packed after every stage into $OUT/gpu_check.tgz (plus
# $OUT/progress.log), so a run cut short still returns the stages it finished in two files.
#
# Stages, most informative first:
#   op       one depthwise 9x9/7x7 conv + GELU, fwd and fwd+bwd: PyTorch NCHW, channels_last, Triton
#   trainer  issue 4's check: scripts/train.py under torchrun (NCCL, one rank), bf16, --compile, generated data
#   tests    tests/test_depthwise_kernel.py with the compiled kernels at full ConvMixer shapes
#   bench    scripts/benchmark.py, the three ImageNet variants, NCHW, train (batch 64) and infer (256)
#   train    scripts/check_fast_training.py: 50 steps fast vs plain from one initialisation
#   bench_cl the same benchmark in channels_last (timm's best layout for 768/32; our fast path falls back)
set -u
OUT=${OUT:-/tmp/gpu_check_out}
RES=${RES:-/tmp/gpu_check_results}
STAGES=${STAGES:-"op trainer tests bench train bench_cl"}
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT" "$RES"
log() { echo "[$(date -u +%T)] $*" | tee -a "$RES/progress.log"; }
pack() { tar czf "$OUT/gpu_check.tgz" -C "$RES" . && cp "$RES/progress.log" "$OUT/"; }
stage() { case " $STAGES " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
BENCH="--device cuda --steps 5 --repeats 3 --warmup 2"

{ nvidia-smi; $PY -c "import torch, triton, timm; print('torch', torch.__version__, 'triton', triton.__version__,
'timm', timm.__version__, torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).multi_processor_count, 'SMs')"
} > "$RES/env.txt" 2>&1
tail -1 "$RES/env.txt"
$PY -c "import sys, torch; sys.exit(not torch.cuda.is_available())" || { log "no CUDA device: nothing run"; exit 2; }

if stage op; then
  log "op: depthwise conv + act, one block"
  for cfg in "1536 32 9" "768 32 7" "1024 16 9"; do
    set -- $cfg
    timeout 120 $PY scripts/benchmark.py --device cuda --depthwise-op --batch-size 64 --dim "$1" --size "$2" --kernel "$3" \
      --json "$RES/op_$1_$3.json" 2>&1 | tee -a "$RES/op.log"
  done
  pack
fi
if stage trainer; then
  log "trainer: torchrun, NCCL with one rank, bf16, compile, generated data"
  timeout 240 $PY -m torch.distributed.run --standalone --nproc_per_node 1 scripts/train.py \
    --config configs/convmixer_1536_20.yaml --dataset synthetic --synthetic-train-size 1920 \
    --synthetic-val-size 256 --device cuda --amp bf16 --compile --epochs 2 --workers 8 --no-progress \
    --output /tmp/gpu_check_trainer > "$RES/trainer.log" 2>&1
  log "trainer exit $?: $(tail -1 "$RES/trainer.log")"
  cp /tmp/gpu_check_trainer/summary.csv "$RES/trainer_summary.csv" 2>/dev/null
  pack
fi
if stage tests; then
  log "tests: compiled kernels at full shapes"
  timeout 300 $PY -m pytest tests/test_depthwise_kernel.py -q -x -p no:cacheprovider -k "not compile_for_hopper" \
    --junitxml="$RES/kernel_tests.xml" > "$RES/kernel_tests.log" 2>&1
  log "tests exit $?: $(tail -1 "$RES/kernel_tests.log")"
  pack
fi
if stage bench; then
  for m in convmixer_1536_20 convmixer_768_32 convmixer_1024_20; do
    log "bench NCHW $m"
    timeout 150 $PY scripts/benchmark.py --model "$m" $BENCH --json "$RES/bench_nchw_$m.json" \
      >> "$RES/bench.log" 2>&1 || log "bench $m failed or timed out"
  done
  pack
fi
if stage train; then
  log "train: fast vs plain, 50 steps"
  timeout 200 $PY scripts/check_fast_training.py --model convmixer_1536_20 --steps 50 --batch-size 32 \
    --json "$RES/train_equivalence.json" > "$RES/train_equivalence.log" 2>&1
  log "train exit $?: $(tail -1 "$RES/train_equivalence.log")"
  pack
fi
if stage bench_cl; then
  for m in convmixer_1536_20 convmixer_768_32 convmixer_1024_20; do
    log "bench channels_last $m"
    timeout 150 $PY scripts/benchmark.py --model "$m" $BENCH --channels-last --json "$RES/bench_cl_$m.json" \
      >> "$RES/bench.log" 2>&1 || log "bench_cl $m failed or timed out"
  done
fi
log "done"
pack
grep -h "fwd+bwd" "$RES/op.log" 2>/dev/null
grep -hE "^ *(model|convmixer_)" "$RES/bench.log" 2>/dev/null | grep -v " bs=" 
