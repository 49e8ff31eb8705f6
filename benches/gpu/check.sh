#!/usr/bin/env bash
# One-shot check of quire-vlm's CUDA path on a GPU machine (root, no network, no Rust;
# python3 with torch + transformers). Run from the repository root; the binaries built on the
# CPU machine (see benches/gpu/build.sh) lie in $BIN_DIR, xz-compressed or not.
#
#   1. nvidia-smi and versions          4. random SmolVLM-256M-sized checkpoint (make_ckpt.py --page)
#   2. CUDA libraries for the binaries  5. quire `bench --batch B` per batch size, one process each
#   3. parity tests on CUDA             6. transformers `generate` per batch size (hf_bench.py)
#                                       7. table of pages/s and new tokens/s with quire/transformers
#
# Each step is guarded: a failing step is logged and the next one runs. The whole run keeps
# to $TOTAL_S seconds: steps are capped by what is left; the two benches share what is left
# after the checkpoint, each batch size taking what remains of its side's share (a batch size
# that times out is reported as such, and the later ones of that side are skipped). Logs go to $OUT (at most 8 files).
#
# Env: OUT (default /tmp/quire-gpu-check), BIN_DIR (.gpu), DEVICE (cuda; cpu is for trying the
# script on a CPU machine with CPU-built binaries), DTYPE (bf16), BATCHES ("1 8 32 64"), NEW (512),
# SMALL (1: one-tile checkpoint and a small image, for CPU tries), TOTAL_S (420), PY (python3),
# LIBCUDA (the driver's libcuda.so.1; looked up with ldconfig, then find, when unset).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
. benches/gpu/lib.sh
T0=$(date +%s)
OUT=${OUT:-/tmp/quire-gpu-check}
BIN_DIR=${BIN_DIR:-$ROOT/.gpu}
DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-bf16}
BATCHES=${BATCHES:-1 8 32 64}
NEW=${NEW:-512}
SMALL=${SMALL:-0}
TOTAL_S=${TOTAL_S:-420}
PY=${PY:-python3}
WORK=${WORK:-$(mktemp -d /tmp/quire-gpu.XXXXXX)}
mkdir -p "$OUT" "$WORK/bin"
exec > >(tee -a "$OUT/check.log") 2>&1

say() { echo "== [$(($(date +%s) - T0))s] $*"; }
# seconds a step may take: its own cap, or what is left of TOTAL_S less a reserve for the table
cap() {
  local left=$((T0 + TOTAL_S - $(date +%s) - 20))
  echo $(($1 < left ? $1 : left))
}

say "1. machine"
{
  nvidia-smi || echo "nvidia-smi: not available"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
  uname -a; nproc; free -g | head -2
  "$PY" -c 'import sys, torch, transformers; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__, "gpu", torch.cuda.is_available() and torch.cuda.get_device_name(0))' 2>&1 || true
  git -C "$ROOT" log --oneline -1 2>/dev/null || true
  ls -la "$BIN_DIR" || true
} 2>&1

say "2. binaries and CUDA libraries"
unpack_and_find_libs

say "3. parity tests on $DEVICE (f32 token-exact, bf16/f16 bounded)"
rc=0
QUIRE_TEST_DEVICE=$DEVICE QUIRE_FIXTURES="$ROOT/tests/fixtures/idefics3" RUST_BACKTRACE=1 \
  "${RUNENV[@]}" timeout "$(cap 150)" "$WORK/bin/parity" --test-threads=1 --nocapture >"$OUT/parity.log" 2>&1 || rc=$?
grep -E '^test |test result|max \|' "$OUT/parity.log" | head -80 || true
grep -E -A3 'panicked' "$OUT/parity.log" | head -60 || true
say "parity exit $rc$([ $rc = 124 ] && echo ' (timed out)')"

say "4. bench checkpoint"
CK="$WORK/ckpt"
rc=0
if [ "$SMALL" = 1 ]; then
  timeout "$(cap 120)" "$PY" benches/vlm/make_ckpt.py "$CK" --min-new "$NEW" >"$OUT/ckpt.log" 2>&1 || rc=$?
else
  timeout "$(cap 120)" "$PY" benches/vlm/make_ckpt.py "$CK" --page --min-new "$NEW" >"$OUT/ckpt.log" 2>&1 || rc=$?
fi
tail -2 "$OUT/ckpt.log"
say "checkpoint exit $rc"
ls -la "$CK" 2>/dev/null || true

: >"$OUT/quire.jsonl"; : >"$OUT/hf.jsonl"; : >"$WORK/phases.txt"
if [ -f "$CK/model.safetensors" ] && [ -f "$CK/page.png" ]; then
  say "5. quire bench ($DEVICE, $DTYPE, $NEW new tokens, batches $BATCHES)"
  # quire gets up to half of what is left; transformers the rest
  qend=$(($(date +%s) + ($(cap 100000) / 2)))
  # each batch size (smallest first) gets what is left of quire's share
  for b in $BATCHES; do
    left=$((qend - $(date +%s)))
    if [ "$left" -lt 15 ]; then
      echo "{\"impl\": \"quire\", \"batch\": $b, \"skipped\": \"${left} s of quire's share left\"}" | tee -a "$OUT/quire.jsonl"
      continue
    fi
    s=$(date +%s); rc=0
    "${RUNENV[@]}" timeout "$left" "$WORK/bin/bench" "$CK" "$CK/page.png" "$NEW" --device "$DEVICE" --dtype "$DTYPE" --batch "$b" \
      >>"$OUT/quire.jsonl" 2>>"$OUT/quire.err" || rc=$?
    e=$(date +%s)
    echo "quire $b $s $e" >>"$WORK/phases.txt"
    if [ $rc != 0 ]; then
      echo "{\"impl\": \"quire\", \"batch\": $b, \"error\": \"exit $rc$([ $rc = 124 ] && echo ', timed out')\"}" | tee -a "$OUT/quire.jsonl"
      tail -5 "$OUT/quire.err"
      [ $rc = 124 ] && break
    else
      tail -1 "$OUT/quire.jsonl"
    fi
  done

  say "6. transformers bench"
  hf_phase hf "$CK" "$NEW" "$(echo $BATCHES | tr ' ' ,)"
else
  say "5-6. benches skipped: no checkpoint"
fi
[ -n "${SMI_PID:-}" ] && kill "$SMI_PID" 2>/dev/null || true

say "7. summary"
"$PY" - "$OUT/quire.jsonl" "$OUT/hf.jsonl" "$WORK/phases.txt" "$WORK/smi.csv" <<'PYEOF' 2>&1 | tee "$OUT/summary.txt" || true
import json, os, sys, datetime
def rows(p):
    out = {}
    for line in open(p):
        line = line.strip()
        if line.startswith("{"):
            try:
                r = json.loads(line)
                out[r.get("batch")] = r
            except ValueError:
                pass
    return out
q, h = rows(sys.argv[1]), rows(sys.argv[2])
smi = []
if os.path.exists(sys.argv[4]):
    for line in open(sys.argv[4]):
        try:
            ts, util, mem = [x.strip() for x in line.split(",")]
            smi.append((datetime.datetime.strptime(ts, "%Y/%m/%d %H:%M:%S.%f").timestamp(), float(util), float(mem)))
        except ValueError:
            pass
def gpu(name, b):
    for line in open(sys.argv[3]):
        n, bb, s, e = line.split()
        if n == name and (bb == str(b) or bb == "all"):
            xs = [x for x in smi if int(s) <= x[0] <= int(e)]
            if xs:
                return f"{sum(x[1] for x in xs) / len(xs):3.0f}% {max(x[2] for x in xs) / 1024:5.1f}G"
    return "    -      -"
def fmt(r, k, f):
    return format(r[k], f) if r and k in r else ("error" if r and "error" in r else ("skipped" if r and "skipped" in r else "-"))
print("batch | quire pages/s  tok/s  prefill_s | hf pages/s  tok/s  prefill_s | quire/hf | tokens_in q/hf | out_min q/hf | GPU util, mem: quire")
for b in sorted(set(q) | set(h), key=lambda x: x or 0):
    qr, hr = q.get(b), h.get(b)
    ratio = f"{qr['pages_s'] / hr['pages_s']:.2f}x" if qr and hr and "pages_s" in qr and "pages_s" in hr else "-"
    print(f"{b:5} | {fmt(qr,'pages_s','11.3f')} {fmt(qr,'new_tok_s','7.0f')} {fmt(qr,'prefill_s','9.2f')}"
          f" | {fmt(hr,'pages_s','8.3f')} {fmt(hr,'new_tok_s','7.0f')} {fmt(hr,'prefill_s','9.2f')} | {ratio:>8}"
          f" | {fmt(qr,'tokens_in','d')}/{fmt(hr,'tokens_in','d')} | {fmt(qr,'tokens_out_min','d')}/{fmt(hr,'tokens_out_min','d')}"
          f" | {gpu('quire', b)}")
    for r in (qr, hr):
        if r and ("error" in r or "skipped" in r):
            print(f"      {r['impl']}: {r.get('error') or r.get('skipped')}")
if smi:
    print("transformers phase GPU util, mem:", gpu("hf", "all"))
print("reference (GPU.md, transformers 5.17, H100): pages/s 0.08 / 0.58 / 2.74 / 5.07 at batch 1 / 8 / 32 / 64")
PYEOF
say "done in $(($(date +%s) - T0)) s; logs in $OUT"
