#!/usr/bin/env bash
# Runaway generation: a corpus mixing pages whose greedy output loops with pages whose output
# does not, decoded with continuous batching under --on-loop off and stop, same process, same
# model, the modes taking turns in every round. Not a test: prints tokens generated and pages/s
# per round and mode, then medians with their range and the ratios against `off`.
# The checkpoint is the test fixture tests/fixtures/idefics2/nosplit_window_old (random weights,
# a 12-token sliding window): on the fixture images with the two prompts below, two of the eight
# (image, prompt) pairs loop (a period repeated from token 72 and 94 on, see its
# loops_reference.json) and the others end with EOS within 30 tokens. No Python is needed.
#   ROUNDS=5 MAX_NEW=2048 REQUESTS=16 BATCH=4 THREADS=2 benches/vlm/loops.sh
# MAX_NEW is the per-page budget (the DocTags models use 8,192; a looping page under `off`
# spends all of it). MIN_TOKENS is --loop-min-tokens (default quire's).
set -euo pipefail
cd "$(dirname "$0")/../.."
THREADS=${THREADS:-$(nproc)}
PROFILE=${PROFILE:-release}
ROUNDS=${ROUNDS:-3}
MAX_NEW=${MAX_NEW:-2048}
REQUESTS=${REQUESTS:-16}
BATCH=${BATCH:-4}
MODES=${MODES:-off,stop}
MIN_TOKENS=${MIN_TOKENS:-256}
FIX=tests/fixtures/idefics3
export RAYON_NUM_THREADS=$THREADS
cargo build -q -p quire-vlm --example loops --profile "$PROFILE"
BIN=${CARGO_TARGET_DIR:-target}/$([ "$PROFILE" = dev ] && echo debug || echo "$PROFILE")/examples/loops
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg) on $(nproc --all) CPUs (figures are noisy on a shared machine)"
"$BIN" tests/fixtures/idefics2/nosplit_window_old "$FIX"/images/{rgb_odd,small_rgb,tall_gray,wide_rgba}.png \
  --prompts "Describe this image in one sentence.|Convert this page to docling." \
  --requests "$REQUESTS" --max-new "$MAX_NEW" --batch "$BATCH" --rounds "$ROUNDS" --modes "$MODES" --min-tokens "$MIN_TOKENS"
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
