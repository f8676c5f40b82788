#!/usr/bin/env bash
# The training loader before and after the global sample order, measured in one run on the
# same images: the rank-dependent streaming order of REF (default 3be0ecb, the last commit with
# it) against this checkout's global order, alternating, ROUNDS times each, same workers.
#   bash launch/bench_loader_compare.sh [REF] ; WORKERS=2 STEPS=60 ROUNDS=3 IMAGE_SIZE=128 ...
# Prints every measurement and the median ratio new / old.
set -euo pipefail
ref=${1:-3be0ecb}
workers=${WORKERS:-2}
steps=${STEPS:-60}
rounds=${ROUNDS:-3}
size=${IMAGE_SIZE:-128}
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-$root/.venv/bin/python}
work=$(mktemp -d)
cleanup() {
  git -C "$root" worktree remove --force "$work/old" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
git -C "$root" worktree add --detach -q "$work/old" "$ref"
export WANDB_MODE=disabled OMP_NUM_THREADS=1
# The same source images converted by each version (the old reader needs its manifest format).
(cd "$root" && "$python" -m data_prep synth --out "$work/src" --image-size "$size" --images-per-class 60 >/dev/null)
(cd "$work/old" && "$python" -m data_prep convert --format pacs --src "$work/src" --out "$work/old_shards" \
  --no-progress >/dev/null)
(cd "$root" && "$python" -m data_prep convert --format pacs --src "$work/src" --out "$work/new_shards" \
  --no-progress >/dev/null)
common=(--workers "$workers" --steps "$steps" --data.image_size="$size")
old_rates=() new_rates=()
for ((round = 1; round <= rounds; round++)); do
  old=$(cd "$work/old" && "$python" -m rsc_dist.bench_input --shards "$work/old_shards" "${common[@]}" \
    | awk -F'|' '/loader only/ {gsub(/ /, "", $3); print $3}')
  new=$(cd "$root" && "$python" -m rsc_dist.bench_input --loader-only --decode workers \
    --shards "$work/new_shards" "${common[@]}" | awk -F'|' '/loader only/ {gsub(/ /, "", $3); print $3}')
  echo "round $round: streaming order ($ref) $old img/s, global order $new img/s"
  old_rates+=("$old") new_rates+=("$new")
done
"$python" - "${old_rates[*]}" "${new_rates[*]}" <<'PY'
import statistics, sys
old = [float(v) for v in sys.argv[1].split()]
new = [float(v) for v in sys.argv[2].split()]
ratios = [n / o for n, o in zip(new, old)]
print(f"median: streaming {statistics.median(old):.1f} img/s, global order {statistics.median(new):.1f} img/s, "
      f"ratio {statistics.median(ratios):.3f} (per round: {', '.join(f'{r:.3f}' for r in ratios)})")
PY
