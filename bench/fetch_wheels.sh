#!/usr/bin/env bash
# Download, on a machine with registry access, the wheels bench/gpu_all.sh installs on the GPU
# machine (which has no registry and lacks these packages; /work/.library/device/README.md).
# Python 3.12 x86-64 wheels, no dependencies resolved: each needed one is named here.
#   bash bench/fetch_wheels.sh        # -> .whl/ (ignored by git; carry it: carry=[".whl"])
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d .whl \
  diffusers==0.42.1 importlib_metadata==8.7.0 open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 \
  omegaconf==2.4.0 webdataset==1.0.2 braceexpand==0.1.7 xformers==0.0.35
ls -la .whl
du -sh .whl
