#!/usr/bin/env bash
# What the second night of a standing job costs against the first: a folder of N objects
# (default 100,000 tiny PNGs in 100 subfolders), night 1 plans and does them all, then 1% new
# objects arrive and night 2 runs. Not a test: prints figures.
#
# Both nights are `quire run --engine text-layer` (images get a `needs_model` record: no model
# time, so what is measured is listing, planning, the store and the finish). Printed per night:
# the planning time quire logs ("planned in ...s"), the whole run's wall time, the input files
# quire opened and the output store operations (files created, renamed or read under --out,
# counted with strace), and night 2 / night 1 as ratios. The floor is the listing: a `find`
# over the same folder, timed in the same run.
#
#   benches/incremental/bench.sh
#   N=20000 NEW_PCT=1 REPEAT=3 PROFILE=dev benches/incremental/bench.sh
#   QUIRE=target/release/quire N=10000 benches/incremental/bench.sh
#   MODE=distributed benches/incremental/bench.sh   the same over a Garage prefix with the
#                                                   coordinator (benches/incremental/distributed.sh)
set -euo pipefail
if [ "${MODE:-folder}" = distributed ]; then
  exec bash "$(dirname "$0")/distributed.sh" "$@"
fi
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
N="${N:-100000}"
NEW_PCT="${NEW_PCT:-1}"
REPEAT="${REPEAT:-3}"
PER="${PER:-256}"
if [ -z "${QUIRE:-}" ]; then   # QUIRE=/path/to/quire uses that binary instead of building one
  export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
  PROFILE="${PROFILE:-release}"
  cargo build -q --profile "$PROFILE" -p quire
  QUIRE="$CARGO_TARGET_DIR/$([ "$PROFILE" = dev ] && echo debug || echo "$PROFILE")/quire"
fi
export QUIRE_PDFIUM="${QUIRE_PDFIUM:-$("$ROOT/scripts/setup-pdfium.sh" "$HOME/.cache/quire-tools/pdfium")}"
command -v strace >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq strace >/dev/null; }
WORK="$(mktemp -d /tmp/quire-incremental.XXXX)"
trap 'rm -rf "$WORK"' EXIT
SEED="$ROOT/tests/fixtures/docs/gray.png"

# N objects, 100 folders; night 2 adds NEW_PCT% more, spread over the folders.
python3 - "$WORK/in" "$N" "$SEED" <<'PY'
import os, shutil, sys
root, n, seed = sys.argv[1], int(sys.argv[2]), sys.argv[3]
data = open(seed, "rb").read()
for i in range(n):
    d = os.path.join(root, f"d{i % 100:03d}")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"img-{i:07d}.png"), "wb") as f:
        f.write(data)
PY

# One night: wall seconds, planning seconds, input opens, output operations.
night() {
  local run="$1" t0 t1 log="$WORK/$1.log" trace="$WORK/$1.trace"
  t0=$(date +%s.%N)
  strace -f -qq -e trace=openat,rename,renameat,renameat2,unlink,unlinkat -o "$trace" \
    "$QUIRE" run "$WORK/in" --out "$WORK/out" --job bench --run "$run" --engine text-layer \
    --task caption --images-per-task "$PER" --dataset none -q 2>"$log" || [ $? = 3 ]
  t1=$(date +%s.%N)
  local plan opens outs
  plan=$(sed -n 's/.*planned in \([0-9.]*\)s.*/\1/p' "$log" | tail -1)
  opens=$(grep -c "openat(.*\"$WORK/in/" "$trace" || true)
  outs=$(grep -E "openat\(.*\"$WORK/out/|rename|unlink" "$trace" | grep -c "$WORK/out/" || true)
  echo "$(echo "$t1 - $t0" | bc) ${plan:-0} $opens $outs"
}

ratio() { python3 -c "import sys; a, b = float(sys.argv[1]), float(sys.argv[2]); print(f'{a / b:.4f}' if b else 'n/a')" "$1" "$2"; }
spread() { python3 -c "import sys, statistics as s; v = [float(x) for x in sys.argv[1:]]; print(f'median {s.median(v):.3f} (min {min(v):.3f}, max {max(v):.3f}, n={len(v)})')" "$@"; }

echo "N=$N objects, $NEW_PCT% new on night 2, groups of $PER, $REPEAT repeats ($(nproc) cores)"
declare -a L W1 P1 W2 P2
for r in $(seq 1 "$REPEAT"); do
  rm -rf "$WORK/out" "$WORK/in"/*/new-*
  sync
  t0=$(date +%s.%N); find "$WORK/in" -type f | wc -l >/dev/null; t1=$(date +%s.%N)
  L+=("$(echo "$t1 - $t0" | bc)")
  read -r w1 p1 o1 s1 < <(night "n1-$r")
  python3 - "$WORK/in" "$N" "$NEW_PCT" "$SEED" <<'PY'
import os, sys
root, n, pct, seed = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
data = open(seed, "rb").read()
for i in range(int(n * pct / 100)):
    with open(os.path.join(root, f"d{i % 100:03d}", f"new-{i:07d}.png"), "wb") as f:
        f.write(data)
PY
  read -r w2 p2 o2 s2 < <(night "n2-$r")
  W1+=("$w1"); P1+=("$p1"); W2+=("$w2"); P2+=("$p2")
  echo "repeat $r: listing (find) ${L[-1]}s | night 1: wall ${w1}s, planning ${p1}s, $o1 input opens, $s1 output ops | night 2: wall ${w2}s, planning ${p2}s, $o2 input opens, $s2 output ops"
  echo "          night 2 / night 1: wall $(ratio "$w2" "$w1"), planning $(ratio "$p2" "$p1"), input opens $(ratio "$o2" "$o1"), output ops $(ratio "$s2" "$s1")"
  grep -h "objects (" "$WORK/n2-$r.log" | sed 's/^/          /'
done
echo "listing (find):     $(spread "${L[@]}")"
echo "night 1 planning:   $(spread "${P1[@]}")"
echo "night 2 planning:   $(spread "${P2[@]}")"
echo "night 1 wall:       $(spread "${W1[@]}")"
echo "night 2 wall:       $(spread "${W2[@]}")"
