#!/usr/bin/env bash
# Every GPU measurement of docs/benchmarks.md in one call, within a time budget (< 8 min):
#   1. sampling: ours vs diffusers' StableDiffusionPipeline, sd-base U-Net at 512x512, bf16,
#      50 DDIM steps + CFG, batch 1 and 16, with the sampling levers and xformers (bench/sample_speed.py);
#   2. training: sd-base at 256 and 512, diffusers' loop vs ours with the levers, images/s, MFU
#      over the measured bf16 matmul peak, peak GPU memory, and the largest batch at 512 with and
#      without gradient checkpointing (bench/train_speed.py).
# JSON and logs go to $OUT (the device tool's folder; default out/gpu).
#
# On the GPU machine (no registry): first, here, `bash bench/fetch_wheels.sh`, then call the
# device tool with  command="bash bench/gpu_all.sh"  carry=[".whl"]  timeout_s=540.
# CPU smoke test of this very script, at tiny size:  TINY=1 bash bench/gpu_all.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
if [ -d .whl ] && ! "$PY" -c "import diffusers, open_clip, omegaconf, webdataset" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TQDM_DISABLE=1 HF_HUB_OFFLINE=1
start=$(date +%s)
if [ -n "${TINY:-}" ]; then  # the same calls, shrunk to seconds on a CPU
  SAMPLE="--tiny --steps 3 --batch-sizes 1,2 --repeats 1"
  SAMPLE_VARIANTS=diffusers,ours,ours+fused_qkv+channels_last,ours+compile,ours+reduce-overhead,ours+xformers
  TRAIN="--tiny --steps 2 --warmup 1 --repeats 1 --timeout 300"
  T_SAMPLE=900 T_256=900 T_512=900
else
  SAMPLE="--steps 50 --batch-sizes 1,16 --repeats 1"
  SAMPLE_VARIANTS=diffusers,ours,ours+fused_qkv+channels_last,ours+xformers,ours+reduce-overhead
  TRAIN="--steps 10 --warmup 5 --repeats 1 --timeout 150"
  # Seconds per part (about 8 minutes in all with the install); override from the environment.
  T_SAMPLE=${T_SAMPLE:-200} T_256=${T_256:-170} T_512=${T_512:-90}
fi
{ nvidia-smi 2>&1 || echo "no nvidia-smi"; "$PY" -c "import torch; print('torch', torch.__version__, torch.version.cuda)"; } > "$OUT/machine.txt"
# Each part has its own limit and writes its JSON as it goes, so a slow part costs only its own figures.
timeout "$T_SAMPLE" "$PY" bench/sample_speed.py --configs sd512 --variants "$SAMPLE_VARIANTS" $SAMPLE \
  --json "$OUT/sample_speed.json" 2>&1 | grep --line-buffered -v "should be kept in float32" | tee "$OUT/sample_speed.log"
echo "sampling done after $(( $(date +%s) - start )) s"
# 256x256: the 2x and MFU targets; diffusers' loop in bf16 vs ours (cache, fused AdamW, foreach EMA, bf16), then + channels_last + compile.
timeout "$T_256" "$PY" bench/train_speed.py --configs sd256 --variants baseline-bf16,+bf16,all $TRAIN --budget $((T_256 - 40)) \
  --workdir /tmp/train-speed --json "$OUT/train_speed_256.json" 2>&1 | grep --line-buffered -v "ldm-cache:" | tee "$OUT/train_speed_256.log"
# 512x512: the same two loops, and the largest batch with and without gradient checkpointing.
timeout "$T_512" "$PY" bench/train_speed.py --configs sd512 --variants baseline-bf16,+bf16 $TRAIN --max-batch --budget $((T_512 - 45)) \
  --workdir /tmp/train-speed --json "$OUT/train_speed_512.json" 2>&1 | grep --line-buffered -v "ldm-cache:" | tee "$OUT/train_speed_512.log"
echo "all done after $(( $(date +%s) - start )) s"
