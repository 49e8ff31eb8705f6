#!/usr/bin/env bash
# Continuous batching against static batches and against one page at a time, on the CPU,
# same process, same model, modes taking turns in every round. Not a test: prints figures.
# The checkpoint has SmolVLM-256M's dimensions and random weights (make_ckpt.py; its EOS
# is never produced, so each request decodes exactly its --new length).
#   THREADS=2 ROUNDS=3 PY=~/.cache/quire-tools/venv-ref/bin/python benches/vlm/batching.sh
# Workload: REQUESTS one-tile images (two different ones) with output lengths cycling
# through NEW; static batches and the continuous engine hold BATCH at most.
# PAGES=1: SmolVLM's processor sizes (make_ckpt.py --page): a 1536x2048 page and the two small
# images taking turns. That processor scales every image to a longest edge of 2048 first, so
# the small ones become 13 and 12+1 tiles as well: a mix of full-size pages that differ in
# shape and output length. PREFILL_TOKENS and PREP_THREADS set the continuous engine's chunked
# prefill and preparation threads (default: the pipeline's CPU settings, 512 and 1).
# DTYPE=bf16 runs the model in bf16 (default f32); QUANTIZE=q8 (q4) its text weights in int8 (4 bits)
# (--quantize q8, q4). DECODE_NEW (default 128; 0: off) adds the
# decode rate: new tokens/s in the decode steps alone with 1 and with BATCH sequences in flight.
#   NEW=64,128,256,96,192,160 REQUESTS=16 BATCH=8 DTYPE=bf16 benches/vlm/batching.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-$HOME/.cache/quire-tools/venv-ref/bin/python}
THREADS=${THREADS:-$(nproc)}
PROFILE=${PROFILE:-release}
NEW=${NEW:-8,64,24,96,16,48}
REQUESTS=${REQUESTS:-24}
BATCH=${BATCH:-8}
ROUNDS=${ROUNDS:-3}
PAGES=${PAGES:-0}
PREFILL_TOKENS=${PREFILL_TOKENS:-512}
PREP_THREADS=${PREP_THREADS:-1}
DTYPE=${DTYPE:-f32}
QUANTIZE=${QUANTIZE:-none}
DECODE_NEW=${DECODE_NEW:-128}
if [ "$PAGES" = 1 ]; then
  WORK=${WORK:-/tmp/quire-vlm-bench-pages}
  mkdir -p "$WORK"
  [ -f "$WORK/ckpt/config.json" ] || "$PY" benches/vlm/make_ckpt.py "$WORK/ckpt" --page
  IMAGES=("$WORK/ckpt/page.png" "$WORK/a.png" "$WORK/b.png")
else
  WORK=${WORK:-/tmp/quire-vlm-bench}
  mkdir -p "$WORK"
  [ -f "$WORK/ckpt/config.json" ] || "$PY" benches/vlm/make_ckpt.py "$WORK/ckpt"
  IMAGES=("$WORK/a.png" "$WORK/b.png")
fi
"$PY" - "$WORK/a.png" "$WORK/b.png" <<'PYEOF'
import sys, numpy as np
from PIL import Image
rng = np.random.RandomState(0)
Image.fromarray((rng.rand(480, 360, 3) * 255).astype(np.uint8)).save(sys.argv[1])
Image.fromarray((rng.rand(300, 520, 3) * 255).astype(np.uint8)).save(sys.argv[2])
PYEOF
export RAYON_NUM_THREADS=$THREADS
cargo build -q -p quire-vlm --example batching --profile "$PROFILE"
BIN=${CARGO_TARGET_DIR:-target}/$([ "$PROFILE" = dev ] && echo debug || echo "$PROFILE")/examples/batching
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg) on $(nproc --all) CPUs (figures are noisy on a shared machine)"
"$BIN" "$WORK/ckpt" "${IMAGES[@]}" --new "$NEW" --requests "$REQUESTS" --batch "$BATCH" --rounds "$ROUNDS" \
  --prefill-tokens "$PREFILL_TOKENS" --prep-threads "$PREP_THREADS" --dtype "$DTYPE" --quantize "$QUANTIZE" --decode-new "$DECODE_NEW"
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
