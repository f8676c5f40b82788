#!/usr/bin/env bash
# Fill ./.whl with the wheels an offline GPU machine needs beyond its PyTorch image (torch,
# torchvision, accelerate and transformers preinstalled, Python 3.12, no package index):
# webdataset, torchcodec, pytest, and DeepSpeed with its pure-Python dependencies. DeepSpeed is
# published as a source archive only; it is built here into a wheel without compiled ops.
# Run from the repository root with the project's venv active (it has torch, for the build):
#   . .venv/bin/activate && bash launch/gpu_wheels.sh
# launch/gpu_checks.sh installs whatever lies in .whl/ on the GPU machine (the device tool's
# `carry` brings the folder along). W&B stays behind: run there with WANDB_MODE=disabled.
set -euo pipefail
dest=.whl
mkdir -p "$dest"
target=(--only-binary=:all: --python-version 3.12 --implementation cp
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
python3 -m pip download -q --no-deps "${target[@]}" -d "$dest" \
  webdataset==1.0.2 braceexpand==0.1.7 torchcodec==0.17.0 \
  pytest==9.2.0 pytest-timeout==2.4.0 pluggy iniconfig \
  hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
  "typing_extensions==4.16.0"
build=$(mktemp -d)
trap 'rm -rf "$build"' EXIT
python3 -m pip download -q --no-deps --no-binary=:all: -d "$build" deepspeed==0.19.8
DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps --no-build-isolation -w "$dest" "$build"/deepspeed-0.19.8.tar.gz
ls -1 "$dest"
