#!/usr/bin/env bash
# Benchmark quire-vlm against transformers on a random-weight SmolVLM-256M-sized checkpoint,
# or with FAMILY=idefics2 on one with Idefics2-8B's widths and cut depths (make_ckpt_idefics2.py).
# CPU, same thread count for both; f32, or with DTYPE=bf16 quire's --dtype bf16 against
# transformers in torch.bfloat16. Not a test: prints figures and ratios.
#   DTYPE=bf16 FAMILY=idefics2 NEW=16 PY=~/.cache/quire-tools/venv-ref/bin/python benches/vlm/bench.sh
#   THREADS=2 NEW=64 PY=/root/venv-ref/bin/python PROFILE=release benches/vlm/bench.sh
#   FAMILY=idefics2 THREADS=2 NEW=16 PY=~/.cache/quire-tools/venv-ref/bin/python benches/vlm/bench.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-/root/venv-ref/bin/python}
THREADS=${THREADS:-$(nproc)}
NEW=${NEW:-64}
PROFILE=${PROFILE:-release}
FAMILY=${FAMILY:-idefics3}
DTYPE=${DTYPE:-f32}
case "$DTYPE" in f32|bf16) ;; *) echo "DTYPE must be f32 or bf16, not $DTYPE" >&2; exit 2;; esac
if [ "$FAMILY" = idefics2 ]; then
  WORK=${WORK:-/tmp/quire-vlm-bench-idefics2}
  mkdir -p "$WORK"
  [ -f "$WORK/ckpt/config.json" ] || "$PY" benches/vlm/make_ckpt_idefics2.py "$WORK/ckpt"
else
  WORK=${WORK:-/tmp/quire-vlm-bench}
  mkdir -p "$WORK"
  [ -f "$WORK/ckpt/config.json" ] || "$PY" benches/vlm/make_ckpt.py "$WORK/ckpt"
fi
"$PY" - "$WORK/page.png" <<'PYEOF'
import sys, numpy as np
from PIL import Image
rng = np.random.RandomState(0)
a = (rng.rand(480, 360, 3) * 255).astype(np.uint8)
Image.fromarray(a).save(sys.argv[1])
PYEOF
export RAYON_NUM_THREADS=$THREADS OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS
cargo build -q -p quire-vlm --example bench --profile "$PROFILE"
BIN=${CARGO_TARGET_DIR:-target}/$([ "$PROFILE" = dev ] && echo debug || echo "$PROFILE")/examples/bench
Q=$("$BIN" "$WORK/ckpt" "$WORK/page.png" "$NEW" --dtype "$DTYPE")
H=$("$PY" benches/vlm/hf_bench.py "$WORK/ckpt" "$WORK/page.png" "$THREADS" "$NEW" "$DTYPE" 2>/dev/null | tail -1)
echo "$Q"
echo "$H"
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg) on $(nproc --all) CPUs (figures are noisy on a shared machine)"
"$PY" - "$Q" "$H" "$THREADS" "$DTYPE" <<'PYEOF'
import json, sys
q, h = json.loads(sys.argv[1]), json.loads(sys.argv[2])
print(f"threads={sys.argv[3]} dtype={sys.argv[4]} tokens_in={q['tokens_in']} (hf {h['tokens_in']})")
print(f"prefill ms/image: quire {q['prefill_ms']:.0f}  transformers {h['prefill_ms']:.0f}  speedup {h['prefill_ms']/q['prefill_ms']:.2f}x")
print(f"decode tok/s:     quire {q['decode_tok_s']:.1f}  transformers {h['decode_tok_s']:.1f}  speedup {q['decode_tok_s']/h['decode_tok_s']:.2f}x")
print(f"peak RSS MB:      quire {q['peak_rss_mb']:.0f}  transformers {h['peak_rss_mb']:.0f}")
PYEOF
