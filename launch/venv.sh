#!/usr/bin/env bash
# Create or reuse the project's virtual environment at ./.venv and install rsc_dist into it
# (editable, with the test and deepspeed extras: the DeepSpeed tests run on CPU ranks in CI),
# pinned by constraints.txt. Idempotent: a stamp holding the hash of pyproject.toml and
# constraints.txt skips the install when nothing changed.
# Usage (from anywhere): bash launch/venv.sh [extra]
# DeepSpeed compiles a small shared-memory communication op with the system C++ compiler (g++,
# Python headers) the first time a DeepSpeed run starts, about 45 s, once per environment: it is
# cached in .venv/torch_extensions (the trainer sets TORCH_EXTENSIONS_DIR there unless it is set;
# activating the environment sets it too), so several checkouts' environments on one machine
# never rebuild each other's builds, as they did in the shared ~/.cache/torch_extensions.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
python_bin=${PYTHON:-python3}
extras="test,deepspeed${1:+,$1}"
if [ ! -x .venv/bin/python ]; then
  echo "[venv] creating .venv with $($python_bin --version)" >&2
  "$python_bin" -m venv .venv
fi
stamp=.venv/.rsc_dist-installed
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)-$extras
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[venv] installing rsc_dist[$extras] (torch is a large CUDA build: first time takes minutes)" >&2
  .venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[$extras]"
  echo "$want" > "$stamp"
fi
if ! grep -q TORCH_EXTENSIONS_DIR .venv/bin/activate; then
  # DeepSpeed tools run in the activated environment (ds_report, ...) share the trainer's builds.
  # A folder the user chose is kept; one an earlier activation set is replaced.
  cat >> .venv/bin/activate <<'ACTIVATE'

# rsc_dist (launch/venv.sh): JIT-built ops of this environment only
if [ -z "${TORCH_EXTENSIONS_DIR:-}" ] || [ "${TORCH_EXTENSIONS_DIR}" = "${_RSC_DIST_EXTENSIONS:-}" ]; then
    _RSC_DIST_EXTENSIONS="$VIRTUAL_ENV/torch_extensions"
    export TORCH_EXTENSIONS_DIR="$_RSC_DIST_EXTENSIONS" _RSC_DIST_EXTENSIONS
fi
ACTIVATE
fi
