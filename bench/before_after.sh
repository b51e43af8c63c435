#!/usr/bin/env bash
# Interleaved before/after: ROUNDS rounds, each running bench/before_after.py train then decode on BEFORE then AFTER
# (two checkouts, e.g. `git worktree add /tmp/before COMMIT`); prints each figure's best per side.
#   BEFORE=/tmp/before AFTER=. ROUNDS=3 bench/before_after.sh
set -euo pipefail
script="$(cd "$(dirname "$0")" && pwd)/before_after.py"
out=$(mktemp -d)
for round in $(seq "${ROUNDS:-3}"); do
  for mode in train decode; do
    for side in before after; do
      tree=$(cd "$([ $side = before ] && echo "$BEFORE" || echo "${AFTER:-.}")" && pwd)
      (cd "$tree" && PYTHONPATH="$tree" python "$script" $mode "$out/${mode}_${side}_$round.json" > /dev/null 2>&1)
    done
  done
done
python - "$out" <<'PY'
import glob, json, sys
best = {}
for path in sorted(glob.glob(f"{sys.argv[1]}/*.json")):
  side = path.rsplit("/", 1)[1].split("_")[1]
  for key, value in json.load(open(path)).items():
    if key != "tree":
      best.setdefault(key, {}).setdefault(side, []).append(value)
for key, sides in best.items():
  b, a = max(sides["before"]), max(sides["after"])
  print(f"{key:20s} before {b:8.1f}  after {a:8.1f}  ({a / b - 1:+.1%})")
PY
