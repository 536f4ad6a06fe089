#!/usr/bin/env bash
# The prepared device check for issues 4 and 6: one call on one H100/H200, inside a fixed time budget.
#
#   OUT=/tmp/out bash scripts/gpu_check.sh            # all stages, stops starting work after $BUDGET s
#   STAGES="op tests" bash scripts/gpu_check.sh       # a subset: op tests bench trainer train profile bench_cl
#
# Results are written under $RES and packed after every stage into $OUT/gpu_check.tgz (plus
# $OUT/progress.log), so a run cut short still returns the stages it finished in two files. Each stage's
# timeout is capped by what is left of $BUDGET, so the last pack always happens inside the call.
#
# Stages, in order:
#   op       one depthwise conv + GELU per block shape (1536 x 32 x 32 9x9; 768 x 32 x 32 7x7; batch 64), fwd
#            and fwd+bwd: PyTorch NCHW, channels_last, the direct and the tensor-core Triton kernels
#   tests    tests/test_depthwise_kernel.py with the compiled kernels at full ConvMixer shapes (xdist workers)
#            -> the later stages use the tensor-core kernels only if these pass and the op stage found them
#               faster at 1536/9x9; otherwise CONVMIXER_DW_KERNEL=direct (logged)
#   bench    scripts/benchmark.py, the three ImageNet variants, NCHW, train (batch 64) and infer (256)
#   trainer  issue 4's check: scripts/train.py under torchrun (NCCL, one rank), bf16, generated data; the
#            default path (Triton kernels; --compile, which traces plain PyTorch blocks, ran in the first check)
#   train    scripts/check_fast_training.py: 50 steps fast vs plain from one initialisation
#   profile  the CUDA kernels of one fast 1536/20 training step, by time
#   bench_cl 768/32 in channels_last (timm's best layout for it; our fast path falls back there)
set -u
OUT=${OUT:-/tmp/gpu_check_out}
RES=${RES:-/tmp/gpu_check_results}
STAGES=${STAGES:-"op tests bench trainer train profile bench_cl"}
BUDGET=${BUDGET:-420}
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$OUT" "$RES"
log() { echo "[$(date -u +%T) +${SECONDS}s] $*" | tee -a "$RES/progress.log"; }
pack() { tar czf "$OUT/gpu_check.tgz" -C "$RES" . && cp "$RES/progress.log" "$OUT/"; }
# stage NAME WANT: run stage NAME if selected and at least 30 s are left; LIMIT = min(WANT, what is left - 10).
stage() {
  case " $STAGES " in *" $1 "*) ;; *) return 1 ;; esac
  local left=$((BUDGET - SECONDS - 10))
  if [ "$left" -lt 30 ]; then log "skip $1: ${left}s left"; return 1; fi
  LIMIT=$(( $2 < left ? $2 : left ))
  log "$1 (limit ${LIMIT}s)"
}
BENCH="--device cuda --steps 5 --repeats 3 --warmup 2"
TRAIN="--config configs/convmixer_1536_20.yaml --dataset synthetic --synthetic-train-size 1280
  --synthetic-val-size 256 --device cuda --amp bf16 --epochs 2 --workers 12 --no-progress"

{ nvidia-smi; $PY -c "import torch, triton, timm; print('torch', torch.__version__, 'triton', triton.__version__,
'timm', timm.__version__, torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).multi_processor_count, 'SMs')"
} > "$RES/env.txt" 2>&1
tail -1 "$RES/env.txt"
$PY -c "import sys, torch; sys.exit(not torch.cuda.is_available())" || { log "no CUDA device: nothing run"; pack; exit 2; }

MMA_FASTER=unknown
if stage op 80; then
  for cfg in "1536 9" "768 7"; do
    set -- $cfg
    timeout "$LIMIT" $PY scripts/benchmark.py --device cuda --depthwise-op --batch-size 64 --dim "$1" --size 32 \
      --kernel "$2" --json "$RES/op_$1_$2.json" >> "$RES/op.log" 2>&1
    log "op $1 k$2 exit $?"
  done
  MMA_FASTER=$($PY -c "import json; r = {x['impl']: x['fwd_bwd_ms'] for x in json.load(open('$RES/op_1536_9.json'))}
print('yes' if r['triton_mma'] < r['triton_direct'] else 'no')" 2>/dev/null || echo unknown)
  pack
fi
TESTS_OK=unknown
if stage tests 120; then
  timeout "$LIMIT" $PY -m pytest tests/test_depthwise_kernel.py -q -p no:cacheprovider -n 8 \
    -k "not compile_for_hopper" --junitxml="$RES/kernel_tests.xml" > "$RES/kernel_tests.log" 2>&1
  rc=$?
  log "tests exit $rc: $(tail -1 "$RES/kernel_tests.log")"
  TESTS_OK=$([ $rc -eq 0 ] && echo yes || echo no)
  pack
fi
if [ "$MMA_FASTER" = yes ] && [ "$TESTS_OK" != no ]; then
  export CONVMIXER_DW_KERNEL=mma
else
  export CONVMIXER_DW_KERNEL=direct
fi
log "kernel set for the model stages: $CONVMIXER_DW_KERNEL (mma faster: $MMA_FASTER, kernel tests pass: $TESTS_OK)"
if stage bench 150; then
  timeout "$LIMIT" $PY scripts/benchmark.py --model convmixer_1536_20 convmixer_768_32 convmixer_1024_20 $BENCH \
    --json "$RES/bench_nchw.json" > "$RES/bench.log" 2>&1
  log "bench exit $?"
  pack
fi
if stage trainer 100; then
  timeout "$LIMIT" $PY -m torch.distributed.run --standalone --nproc_per_node 1 scripts/train.py $TRAIN \
    --output /tmp/gpu_check_trainer > "$RES/trainer.log" 2>&1
  log "trainer exit $?: $(tail -1 "$RES/trainer.log")"
  cp /tmp/gpu_check_trainer/summary.csv "$RES/trainer_summary.csv" 2>/dev/null
  cp /tmp/gpu_check_trainer/args.yaml "$RES/trainer_args.yaml" 2>/dev/null
  pack
fi
if stage train 90; then
  timeout "$LIMIT" $PY scripts/check_fast_training.py --model convmixer_1536_20 --steps 50 --batch-size 32 \
    --json "$RES/train_equivalence.json" > "$RES/train_equivalence.log" 2>&1
  log "train exit $?: $(tail -1 "$RES/train_equivalence.log")"
  pack
fi
if stage profile 45; then
  timeout "$LIMIT" $PY - > "$RES/profile.log" 2>&1 <<'PYEOF'
import torch
from torch.profiler import ProfilerActivity, profile
from convmixer_pt import create_model
model = create_model("convmixer_1536_20").cuda()
opt = torch.optim.AdamW(model.parameters())
x, y = torch.randn(64, 3, 224, 224, device="cuda"), torch.randint(0, 1000, (64,), device="cuda")
def step():
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = torch.nn.functional.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
for _ in range(3):
    step()
torch.cuda.synchronize()
with profile(activities=[ProfilerActivity.CUDA]) as prof:
    step()
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70))
PYEOF
  log "profile exit $?"
  pack
fi
if stage bench_cl 60; then
  timeout "$LIMIT" $PY scripts/benchmark.py --model convmixer_768_32 $BENCH --channels-last \
    --json "$RES/bench_cl.json" > "$RES/bench_cl.log" 2>&1
  log "bench_cl exit $?"
fi
log "done"
pack
grep -hE "triton|torch_" "$RES/op.log" 2>/dev/null
cat "$RES/bench.log" "$RES/bench_cl.log" 2>/dev/null | grep -E "^ *(model|convmixer_)" | grep -v " bs="
tail -3 "$RES/trainer.log" 2>/dev/null
