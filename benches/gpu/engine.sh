#!/usr/bin/env bash
# Continuous batching against static batches on a GPU machine, and transformers `generate` in
# the same run: one prepared script for one device call (binaries from benches/gpu/build.sh).
#
#   1. machine, binaries, CUDA libraries (lib.sh)
#   2. continuous-batching parity on the device: the f32 continuous tests (token-exact against
#      transformers' references) and the low-precision test
#   3. checkpoint: make_ckpt.py --page --min-new MAXNEW (SmolVLM-256M dimensions, 13 tiles,
#      884 tokens in; the EOS id is never produced, so every request decodes its length)
#   4. quire `batching`: REQUESTS pages with lengths cycling through NEW, static batches of BATCH
#      then continuous batching with up to SEQS in flight, same process, GPU busy sampled
#   5. transformers `generate` at batch HF_BATCH on pages of MAXNEW tokens (hf_bench.py)
#   6. captions (CAPTION=1): a checkpoint with one 512 px tile per image (make_ckpt.py without
#      --page: 64 image tokens), CAP_REQUESTS images of CAP_NEW new tokens, quire continuous
#      with up to CAP_SEQS in flight, then transformers at batch CAP_HF_BATCH: images/s
#   7. summary: pages/s, new tokens/s, GPU busy fraction and peak memory per phase
#
# Env: OUT (/tmp/quire-gpu-engine), BIN_DIR (.gpu), DEVICE (cuda; cpu to try it here), DTYPE
# (bf16), NEW (128,512,256,384), MAXNEW (512), REQUESTS (192), BATCH (64), SEQS (192),
# HF_BATCH (64), HF (1; 0 skips transformers), CAPTION (1), CAP_REQUESTS (1024), CAP_NEW (64),
# CAP_SEQS (512), CAP_HF_BATCH (256), PREFILL_TOKENS (8192) and PREP_THREADS (8): the engine's
# chunked prefill and preparation threads (the pipeline's GPU settings), TOTAL_S (330), PY
# (python3).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
. benches/gpu/lib.sh
T0=$(date +%s)
OUT=${OUT:-/tmp/quire-gpu-engine}
BIN_DIR=${BIN_DIR:-$ROOT/.gpu}
DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-bf16}
NEW=${NEW:-128,512,256,384}
MAXNEW=${MAXNEW:-512}
REQUESTS=${REQUESTS:-192}
BATCH=${BATCH:-64}
SEQS=${SEQS:-192}
HF_BATCH=${HF_BATCH:-64}
HF=${HF:-1}
TOTAL_S=${TOTAL_S:-330}
PY=${PY:-python3}
SMALL=${SMALL:-0}
CAPTION=${CAPTION:-1}
CAP_REQUESTS=${CAP_REQUESTS:-1024}
CAP_NEW=${CAP_NEW:-64}
CAP_SEQS=${CAP_SEQS:-512}
CAP_HF_BATCH=${CAP_HF_BATCH:-256}
PREFILL_TOKENS=${PREFILL_TOKENS:-8192}
PREP_THREADS=${PREP_THREADS:-8}
WORK=${WORK:-$(mktemp -d /tmp/quire-gpu.XXXXXX)}
BINARIES="parity batching"
mkdir -p "$OUT" "$WORK/bin"
exec > >(tee -a "$OUT/engine.log") 2>&1
say() { echo "== [$(($(date +%s) - T0))s] $*"; }
left() { echo $((T0 + TOTAL_S - $(date +%s) - 15)); }
cap() { local l; l=$(left); echo $(($1 < l ? $1 : l)); }

say "1. machine and binaries"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true; nproc; git -C "$ROOT" log --oneline -1 2>/dev/null || true; } 2>&1
unpack_and_find_libs
: >"$WORK/phases.txt"

say "2. continuous-batching parity on $DEVICE"
rc=0
QUIRE_TEST_DEVICE=$DEVICE QUIRE_FIXTURES="$ROOT/tests/fixtures/idefics3" RUST_BACKTRACE=1 \
  "${RUNENV[@]}" timeout "$(cap 60)" "$WORK/bin/parity" continuous --test-threads=1 >"$OUT/parity.log" 2>&1 || rc=$?
grep -E '^test |test result' "$OUT/parity.log" || true
grep -E -A4 'panicked' "$OUT/parity.log" | head -20 || true
say "parity exit $rc"

say "3. checkpoint"
CK="$WORK/ckpt"
page=(--page)
[ "$SMALL" = 1 ] && page=()
timeout "$(cap 90)" "$PY" benches/vlm/make_ckpt.py "$CK" "${page[@]}" --min-new "$MAXNEW" >"$OUT/ckpt.log" 2>&1 || say "checkpoint failed: $(tail -2 "$OUT/ckpt.log")"

# quire's `batching` example: phase NAME on checkpoint CK, NEW lengths, REQUESTS requests, up to N at
# once, MODE; JSON lines to $OUT/NAME.jsonl.
quire_phase() {
  local name=$1 ck=$2 new=$3 requests=$4 n=$5 mode=$6 s rc=0
  s=$(date +%s)
  "${RUNENV[@]}" timeout "$(cap $(( $(left) / 2 )))" "$WORK/bin/batching" "$ck" "$ck/page.png" --device "$DEVICE" --dtype "$DTYPE" \
    --new "$new" --requests "$requests" --batch "$n" --rounds 1 --modes "$mode" \
    --prefill-tokens "$PREFILL_TOKENS" --prep-threads "$PREP_THREADS" >>"$OUT/$name.jsonl" 2>>"$OUT/$name.err" || rc=$?
  echo "$name-$mode all $s $(date +%s)" >>"$WORK/phases.txt"
  [ $rc = 0 ] || { say "quire $name $mode exit $rc$([ $rc = 124 ] && echo ' (timed out)')"; tail -3 "$OUT/$name.err"; }
  grep '"round"' "$OUT/$name.jsonl" | tail -1 || true
}

if [ -f "$CK/page.png" ]; then
  for mode in static continuous; do
    n=$([ $mode = static ] && echo "$BATCH" || echo "$SEQS")
    say "4. quire $mode (up to $n at once), $REQUESTS pages, lengths $NEW"
    quire_phase quire "$CK" "$NEW" "$REQUESTS" "$n" "$mode"
  done
  [ "$HF" = 1 ] || say "5. transformers skipped (HF=0)"
fi
if [ -f "$CK/page.png" ] && [ "$HF" = 1 ]; then
  say "5. transformers generate, batch $HF_BATCH, $MAXNEW new tokens"
  hf_phase hf "$CK" "$MAXNEW" "$HF_BATCH"
fi
if [ "$CAPTION" = 1 ]; then
  say "6. captions: $CAP_REQUESTS one-tile images, $CAP_NEW new tokens"
  CC="$WORK/ckpt-caption"
  timeout "$(cap 90)" "$PY" benches/vlm/make_ckpt.py "$CC" --min-new "$CAP_NEW" >"$OUT/ckpt-caption.log" 2>&1 || say "caption checkpoint failed: $(tail -2 "$OUT/ckpt-caption.log")"
  if [ -f "$CC/page.png" ]; then
    quire_phase caption "$CC" "$CAP_NEW" "$CAP_REQUESTS" "$CAP_SEQS" continuous
    if [ "$HF" = 1 ]; then hf_phase hf-caption "$CC" "$CAP_NEW" "$CAP_HF_BATCH"; fi
  fi
fi
[ -n "${SMI_PID:-}" ] && kill "$SMI_PID" 2>/dev/null || true

say "7. summary"
"$PY" - "$WORK/phases.txt" "$WORK/smi.csv" <<'PYEOF' 2>&1 | tee "$OUT/summary.txt" || true
import datetime, os, sys
smi = []
if os.path.exists(sys.argv[2]):
    for line in open(sys.argv[2]):
        try:
            ts, util, mem = [x.strip() for x in line.split(",")]
            smi.append((datetime.datetime.strptime(ts, "%Y/%m/%d %H:%M:%S.%f").timestamp(), float(util), float(mem)))
        except ValueError:
            pass
for line in open(sys.argv[1]):
    name, _, s, e = line.split()
    xs = [x for x in smi if int(s) <= x[0] <= int(e)]
    if xs:
        print(f"{name:10} GPU busy {sum(x[1] for x in xs) / len(xs):3.0f}% (nvidia-smi utilization, mean of {len(xs)} samples), peak memory {max(x[2] for x in xs) / 1024:5.1f} GiB")
PYEOF
cat "$OUT/quire.jsonl" "$OUT/caption.jsonl" 2>/dev/null || true
say "done in $(($(date +%s) - T0)) s; logs in $OUT"
