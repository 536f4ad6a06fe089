#!/usr/bin/env bash
# The prepared GPU check: kernel tests at full shapes, every fast-path configuration against timm, a short
# fast-vs-plain training comparison and a profile, in one call on one H100/H200 inside a fixed time budget.
#
#   OUT=/tmp/out bash scripts/gpu_check.sh            # all stages, stops starting work after $BUDGET s
#   STAGES="op tests" bash scripts/gpu_check.sh       # a subset of the stages below
#
# Results are written under $RES and packed after every stage into $OUT/gpu_check.tgz (plus
# $OUT/progress.log and, at the end, $OUT/summary.txt), so a run cut short still returns the stages it
# finished in at most three files. Each stage's timeout is capped by what is left of $BUDGET, so the last
# pack always happens inside the call.
#
# Stages, in order (default: all but trainer):
#   op        one depthwise conv + GELU per block shape (1536 x 32 x 32 9x9; 768 x 32 x 32 7x7; 1024 x 16 x 16
#             9x9; batch 64), fwd and fwd+bwd: PyTorch NCHW and channels_last, the Triton direct, tensor-core
#             and channels_last kernels
#   bench_cl  scripts/benchmark.py, the three ImageNet variants in channels_last with the channels_last kernels,
#             train (batch 64) and infer (256), timm in channels_last
#   bench_cl_bn  the same with the fused BatchNorm as well (in inference it fuses the pointwise branch's
#             activation and BatchNorm)
#   tests     the kernel, operator and fast-model tests with the compiled kernels at full ConvMixer shapes (xdist
#             workers) -> the NCHW model stages use the tensor-core kernels only if these pass and the op
#             stage found them faster at 1536/9x9; otherwise the direct ones (logged)
#   bench     the three variants in NCHW (our NCHW kernels, timm NCHW), train and infer
#   bench_bn  NCHW training with the fused BatchNorm
#   train_cl  scripts/check_fast_training.py --channels-last with the fused BatchNorm: 50 steps fast vs plain
#   profile   the CUDA kernels of one 1536/20 training step in channels_last with the fused BatchNorm
#   trainer   scripts/train.py under torchrun (NCCL, one rank), bf16, generated JPEGs through the full
#             augmentation (not run by default)
#   trainer_device  the same with --augment-on-device: resize, flip and RandAugment on the GPU (not run by
#             default; the tests stage checks its pixels on CUDA)
#   bench_compile  scripts/benchmark.py --compile for 1536/20: timm eager and compiled in NCHW and
#             channels_last as peers, our eager and compiled fast path (not run by default: compiling six
#             models takes minutes; STAGES=bench_compile BUDGET=540 alone fits one call)
# At the end summary.txt gives, per model and mode, the fastest configuration of ours and of timm and the
# ratio against the speed targets (1536/20 training 3x, the other training rows 1.5x, inference 2x).
set -u
OUT=${OUT:-/tmp/gpu_check_out}
RES=${RES:-/tmp/gpu_check_results}
STAGES=${STAGES:-"op bench_cl bench_cl_bn tests bench bench_bn train_cl profile"}
BUDGET=${BUDGET:-540}
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$OUT" "$RES"
log() { echo "[$(date -u +%T) +${SECONDS}s] $*" | tee -a "$RES/progress.log"; }
pack() { tar czf "$OUT/gpu_check.tgz" -C "$RES" . && cp "$RES/progress.log" "$OUT/" \
  && { [ ! -f "$RES/summary.txt" ] || cp "$RES/summary.txt" "$OUT/"; }; }
# stage NAME WANT: run stage NAME if selected and at least 30 s are left; LIMIT = min(WANT, what is left - 10).
stage() {
  case " $STAGES " in *" $1 "*) ;; *) return 1 ;; esac
  local left=$((BUDGET - SECONDS - 10))
  if [ "$left" -lt 30 ]; then log "skip $1: ${left}s left"; return 1; fi
  LIMIT=$(( $2 < left ? $2 : left ))
  log "$1 (limit ${LIMIT}s)"
}
BENCH="--device cuda --steps 5 --repeats 3 --warmup 2"
TRAIN="--config configs/convmixer_1536_20.yaml --dataset generated --synthetic-train-size 1280
  --synthetic-val-size 256 --device cuda --amp bf16 --epochs 2 --workers 12 --no-progress --overwrite"

{ nvidia-smi; $PY -c "import torch, triton, timm; print('torch', torch.__version__, 'triton', triton.__version__,
'timm', timm.__version__, torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).multi_processor_count, 'SMs')"
} > "$RES/env.txt" 2>&1
tail -1 "$RES/env.txt"
$PY -c "import sys, torch; sys.exit(not torch.cuda.is_available())" || { log "no CUDA device: nothing run"; pack; exit 2; }

MMA_FASTER=unknown
if stage op 80; then
  for cfg in "1536 32 9" "768 32 7" "1024 16 9"; do
    set -- $cfg
    timeout "$LIMIT" $PY scripts/benchmark.py --device cuda --depthwise-op --batch-size 64 --dim "$1" --size "$2" \
      --kernel "$3" --json "$RES/op_$1_$3.json" >> "$RES/op.log" 2>&1
    log "op $1 k$3 exit $?"
  done
  MMA_FASTER=$($PY -c "import json; r = {x['impl']: x['fwd_bwd_ms'] for x in json.load(open('$RES/op_1536_9.json'))}
print('yes' if r['triton_mma'] < r['triton_direct'] else 'no')" 2>/dev/null || echo unknown)
  pack
fi
if stage bench_cl 150; then
  timeout "$LIMIT" $PY scripts/benchmark.py --channels-last --channels-last-kernels --no-fused-bn \
    --model convmixer_1536_20 convmixer_768_32 convmixer_1024_20 $BENCH --json "$RES/bench_cl.json" \
    > "$RES/bench_cl.log" 2>&1
  log "bench_cl exit $?"
  pack
fi
if stage bench_cl_bn 150; then
  timeout "$LIMIT" $PY scripts/benchmark.py --channels-last --channels-last-kernels --fused-bn \
    --model convmixer_1536_20 convmixer_768_32 convmixer_1024_20 $BENCH \
    --json "$RES/bench_cl_bn.json" > "$RES/bench_cl_bn.log" 2>&1
  log "bench_cl_bn exit $?"
  pack
fi
TESTS_OK=unknown
if stage tests 200; then
  timeout "$LIMIT" $PY -m pytest tests/test_depthwise_kernel.py tests/test_batchnorm_kernel.py tests/test_fast_model.py \
    tests/test_ops.py tests/test_train_augment.py \
    -q -p no:cacheprovider -n 8 \
    -k "not compile_for_hopper" --junitxml="$RES/kernel_tests.xml" > "$RES/kernel_tests.log" 2>&1
  rc=$?
  log "tests exit $rc: $(tail -1 "$RES/kernel_tests.log")"
  TESTS_OK=$([ $rc -eq 0 ] && echo yes || echo no)
  pack
fi
if [ "$MMA_FASTER" = yes ] && [ "$TESTS_OK" != no ]; then
  KERNEL_SET=mma
else
  KERNEL_SET=direct
fi
log "kernel set for the NCHW model stages: $KERNEL_SET (mma faster: $MMA_FASTER, kernel tests pass: $TESTS_OK)"
if stage bench 150; then
  timeout "$LIMIT" $PY scripts/benchmark.py --model convmixer_1536_20 convmixer_768_32 convmixer_1024_20 $BENCH \
    --kernel-set $KERNEL_SET --no-fused-bn --json "$RES/bench_nchw.json" > "$RES/bench.log" 2>&1
  log "bench exit $?"
  pack
fi
if stage bench_bn 100; then
  timeout "$LIMIT" $PY scripts/benchmark.py --mode train --kernel-set $KERNEL_SET --fused-bn \
    --model convmixer_1536_20 convmixer_768_32 convmixer_1024_20 $BENCH --json "$RES/bench_bn.json" \
    > "$RES/bench_bn.log" 2>&1
  log "bench_bn exit $?"
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
if stage trainer_device 100; then
  timeout "$LIMIT" $PY -m torch.distributed.run --standalone --nproc_per_node 1 scripts/train.py $TRAIN \
    --augment-on-device --output /tmp/gpu_check_trainer_device > "$RES/trainer_device.log" 2>&1
  log "trainer_device exit $?: $(tail -1 "$RES/trainer_device.log")"
  cp /tmp/gpu_check_trainer_device/summary.csv "$RES/trainer_device_summary.csv" 2>/dev/null
  pack
fi
if stage bench_compile 480; then
  timeout "$LIMIT" $PY scripts/benchmark.py --model convmixer_1536_20 --compile --peer-layouts nchw channels_last \
    --kernel-set $KERNEL_SET --no-fused-bn $BENCH --json "$RES/bench_compile.json" > "$RES/bench_compile.log" 2>&1
  log "bench_compile exit $?"
  pack
fi
if stage train_cl 90; then
  timeout "$LIMIT" $PY scripts/check_fast_training.py --model convmixer_1536_20 --fused-bn \
    --steps 50 --batch-size 32 --channels-last --json "$RES/train_equivalence_cl.json" > "$RES/train_equivalence_cl.log" 2>&1
  log "train_cl exit $?: $(tail -1 "$RES/train_equivalence_cl.log")"
  pack
fi
if stage profile 45; then
  timeout "$LIMIT" $PY - > "$RES/profile.log" 2>&1 <<'PYEOF'
import torch
from torch.profiler import ProfilerActivity, profile
from convmixer_pt import create_model
from convmixer_pt.fast import FastOptions
fast = FastOptions(channels_last=True, fused_batchnorm=True)
model = create_model("convmixer_1536_20", fast=fast).cuda().to(memory_format=torch.channels_last)
opt = torch.optim.AdamW(model.parameters())
x = torch.randn(64, 3, 224, 224, device="cuda").contiguous(memory_format=torch.channels_last)
y = torch.randint(0, 1000, (64,), device="cuda")
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
$PY - > "$RES/summary.txt" 2>&1 <<PYEOF
import json, os
files = ("bench_nchw.json", "bench_bn.json", "bench_cl.json", "bench_cl_bn.json", "bench_compile.json")
rows = [r for f in files if os.path.exists(f"$RES/{f}") for r in json.load(open(f"$RES/{f}"))]
targets = {("convmixer_1536_20", "train"): 3.0}
for model in ("convmixer_1536_20", "convmixer_768_32", "convmixer_1024_20"):
    for mode in ("train", "infer"):
        best = {}
        for r in rows:
            if r["model"] == model and r["mode"] == mode and r["img_per_s"] > best.get(r["impl"], {}).get("img_per_s", 0):
                best[r["impl"]] = r
        if len(best) == 2:
            ours, timm = best["convmixer_pt"], best["timm"]
            need = targets.get((model, mode), 1.5 if mode == "train" else 2.0)
            ratio = ours["img_per_s"] / timm["img_per_s"]
            lay = lambda r: ("channels_last" if r["channels_last"] else "NCHW") + (", compiled" if r.get("compile") else "")
            print(f"{model} {mode}: ours {ours['img_per_s']:.1f} ({lay(ours)}, kernels {ours['dw_kernel']}, fused BN "
                  f"{ours['fused_bn']}, {ours['peak_mem_mib']:.0f} MiB) / timm {timm['img_per_s']:.1f} ({lay(timm)}, "
                  f"{timm['peak_mem_mib']:.0f} MiB) = {ratio:.2f}x, target {need}x: {'met' if ratio >= need else 'NOT met'}")
PYEOF
log "done"
pack
grep -hE "triton|torch_" "$RES/op.log" 2>/dev/null
for f in bench_cl bench_cl_bn bench bench_bn bench_compile; do
  grep -E "^ *(model|convmixer_)" "$RES/$f.log" 2>/dev/null | grep -v " bs=" | sed "s/^/$f /"
done
cat "$RES/summary.txt"
