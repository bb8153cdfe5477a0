#!/usr/bin/env bash
# The reports a checkout writes, for a byte-for-byte comparison of two versions (a refactor must not change them).
#
#   git worktree add /tmp/allmil-old <commit>
#   bench/same_outputs.sh /tmp/allmil-old /tmp/out-old && bench/same_outputs.sh . /tmp/out-new
#   for f in /tmp/out-old/*.csv; do cmp "$f" /tmp/out-new/"$(basename "$f")"; done
#   # JSON: equal once "created" and "weights_dir" are dropped (bench/same_outputs.sh prints the check to run)
#
# It runs `allmil diagnose` with --workers 1 and 2 on examples/patients and on 24 ALL-IDB1 fields (every fourth of
# ../shared/data/ALL-IDB1/im, six fields per patient folder), writing CSV, JSON and the journal to OUTDIR.
set -euo pipefail
src=$(cd "$1" && pwd); out=$2; mkdir -p "$out"; out=$(cd "$out" && pwd)
here=$(cd "$(dirname "$0")/.." && pwd)
data=${ALLMIL_DATA:-$here/../shared/data}
fields=$(mktemp -d); trap 'rm -rf "$fields"' EXIT
i=0
for f in $(ls "$data"/ALL-IDB1/im/*.jpg | awk 'NR%4==1' | head -24); do
  mkdir -p "$fields/p$((i / 6))"; ln -s "$(realpath "$f")" "$fields/p$((i / 6))/"; i=$((i + 1))
done
cd "$src"
for w in 1 2; do
  python -m allmil_cli diagnose "$here/examples/patients" --workers $w --out "$out/ex-w$w.csv" --json "$out/ex-w$w.json" --quiet
  python -m allmil_cli diagnose "$fields" --workers $w --out "$out/idb-w$w.csv" --json "$out/idb-w$w.json" --quiet
done
echo "compare JSON: python -c \"import json,sys; a,b=(json.load(open(p)) for p in sys.argv[1:]); [d.pop(k) for d in (a,b) for k in ('created','weights_dir')]; print(a==b)\" OLD.json NEW.json"
