#!/usr/bin/env bash
# DeepSpeed's JIT-built shared-memory op in two environments, before and after the cache per
# environment (BENCHMARKS.md, "DeepSpeed's op, one cache per environment").
#
# Makes two environments under a scratch folder whose site-packages link every package of this
# checkout's .venv (each has its own torch and DeepSpeed paths, as a second checkout's install
# has; nothing is installed), then times deepspeed.comm.torch.build_shm_op() in
#   before: A, B, A  with one TORCH_EXTENSIONS_DIR for both (torch's default is one folder per user)
#   after:  A, B, A, B  with the trainer's rule (rsc_dist.trainer.build: <venv>/torch_extensions)
# Each line printed is one process: {"env", "mode", "folder", "seconds"}. Builds take about 45 s
# each on a quiet 2-core machine (5 builds in all). Usage: bash launch/bench_extension_cache.sh [SCRATCH]
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
scratch=${1:-$(mktemp -d)}
venv_site=$("$root/.venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
base_python=$("$root/.venv/bin/python" -c "import sys, os; print(os.path.join(sys.base_prefix, 'bin', 'python3'))")
for name in envA envB; do
  "$base_python" -m venv --without-pip "$scratch/$name"
  site=$("$scratch/$name/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  for entry in "$venv_site"/*; do
    case $(basename "$entry") in __editable__*) continue ;; esac  # rsc_dist comes from PYTHONPATH
    ln -s "$entry" "$site/"
  done
  cp "$root/.venv/bin/ninja" "$scratch/$name/bin/ninja"  # each environment's own ninja
done
measure='
import importlib, json, os, sys, time
mode = sys.argv[1]
if mode == "before":
    os.environ["TORCH_EXTENSIONS_DIR"] = sys.argv[2]
from rsc_dist.trainer import build
build.use_this_environments_ninja()
if mode == "after":
    build.use_this_environments_extension_cache()
shm = importlib.import_module("deepspeed.comm.torch")
start = time.perf_counter()
loaded = shm.build_shm_op() is not None
print(json.dumps({"env": sys.prefix, "mode": mode, "folder": os.environ["TORCH_EXTENSIONS_DIR"],
                  "seconds": round(time.perf_counter() - start, 1), "loaded": loaded}), flush=True)
'
for step in A:before B:before A:before A:after B:after A:after B:after; do
  env_name=${step%%:*} mode=${step##*:}
  PYTHONPATH=$root OMP_NUM_THREADS=1 "$scratch/env$env_name/bin/python" -c "$measure" "$mode" "$scratch/shared" \
    2>/dev/null | grep '^{'
done
echo "environments and builds left in $scratch" >&2
