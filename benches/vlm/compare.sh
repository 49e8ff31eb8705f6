#!/usr/bin/env bash
# quire-vlm's CPU engine at another revision against this checkout, on the same machine in the
# same run: the `bench` example built at REF (any git revision) and here, run in turns for
# ROUNDS rounds on bench.sh's random SmolVLM-256M-sized checkpoint (FAMILY=idefics2: the
# Idefics2-8B-width one). Prints prefill ms and decode tok/s per round, and the median ratio
# (this checkout / REF) with its range. For changes that must not change speed (refactors).
# Not a test. Needs the reference python of bench.sh only to write the checkpoint once.
#   REF=30d661a ROUNDS=5 THREADS=2 NEW=32 benches/vlm/compare.sh   (BUILD_ONLY=1: build both, run nothing)
set -euo pipefail
cd "$(dirname "$0")/../.."
REF=${REF:?set REF to a git revision to compare with}
ROUNDS=${ROUNDS:-5}
THREADS=${THREADS:-$(nproc)}
NEW=${NEW:-32}
FAMILY=${FAMILY:-idefics3}
PY=${PY:-$HOME/.cache/quire-tools/venv-ref/bin/python}
WORK=${WORK:-/tmp/quire-vlm-compare}
# Release builds of both revisions share one target folder for the dependencies; the
# workspace's own crates are cleaned between the two (cargo names them by their path inside
# the workspace, so the two checkouts would otherwise take each other's builds for fresh).
T=${BENCH_TARGET:-$HOME/.cache/quire-bench-target}
mkdir -p "$WORK"
if [ "$FAMILY" = idefics2 ]; then
  CKPT=$WORK/ckpt-idefics2
  [ -f "$CKPT/config.json" ] || "$PY" benches/vlm/make_ckpt_idefics2.py "$CKPT"
else
  CKPT=$WORK/ckpt
  [ -f "$CKPT/config.json" ] || "$PY" benches/vlm/make_ckpt.py "$CKPT"
fi
"$PY" benches/vlm/make_page.py "$WORK/page.png"

build() { # build REV_DIR OUT
  (cd "$1" && CARGO_TARGET_DIR=$T cargo clean -q --release -p quire-vlm 2>/dev/null || true
   cd "$1" && CARGO_TARGET_DIR=$T CARGO_INCREMENTAL=0 cargo build -q --release -p quire-vlm --example bench)
  cp "$T/release/examples/bench" "$2"
}
ref_rev=$(git rev-parse "$REF")
if [ ! -x "$WORK/bench-$ref_rev" ]; then
  rm -rf "$WORK/ref"
  git worktree add -q --detach "$WORK/ref" "$ref_rev"
  trap 'git worktree remove --force "$WORK/ref" 2>/dev/null || true' EXIT
  build "$WORK/ref" "$WORK/bench-$ref_rev"
  git worktree remove --force "$WORK/ref"
fi
build "$PWD" "$WORK/bench-here"
[ "${BUILD_ONLY:-0}" = 1 ] && exit 0

export RAYON_NUM_THREADS=$THREADS OMP_NUM_THREADS=$THREADS
results=$WORK/rounds.jsonl
: >"$results"
for r in $(seq 1 "$ROUNDS"); do
  # Turns alternate which build runs first, so a drift in the machine's load hits both.
  order=("$WORK/bench-$ref_rev" "$WORK/bench-here")
  [ $((r % 2)) = 0 ] && order=("$WORK/bench-here" "$WORK/bench-$ref_rev")
  for b in "${order[@]}"; do
    which=here; [ "$b" = "$WORK/bench-here" ] || which=ref
    printf '{"round":%d,"build":"%s","r":%s}\n' "$r" "$which" "$("$b" "$CKPT" "$WORK/page.png" "$NEW")" >>"$results"
  done
done
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg) on $(nproc --all) CPUs; REF=$REF ($ref_rev), FAMILY=$FAMILY THREADS=$THREADS NEW=$NEW"
python3 - "$results" <<'PYEOF'
import json, sys, statistics as st
rows = [json.loads(l) for l in open(sys.argv[1])]
by = {}
for x in rows:
    by.setdefault(x["round"], {})[x["build"]] = x["r"]
pre, dec = [], []
for r, b in sorted(by.items()):
    h, f = b["here"], b["ref"]
    pre.append(f["prefill_ms"] / h["prefill_ms"]); dec.append(h["decode_tok_s"] / f["decode_tok_s"])
    print(f"round {r}: prefill ms ref {f['prefill_ms']:.0f} here {h['prefill_ms']:.0f}; decode tok/s ref {f['decode_tok_s']:.1f} here {h['decode_tok_s']:.1f}; "
          f"peak RSS MB ref {f['peak_rss_mb']:.0f} here {h['peak_rss_mb']:.0f}")
print(f"prefill speed here/ref: median {st.median(pre):.3f} (range {min(pre):.3f}-{max(pre):.3f})")
print(f"decode speed here/ref:  median {st.median(dec):.3f} (range {min(dec):.3f}-{max(dec):.3f})")
PYEOF
