#!/usr/bin/env bash
# Benchmark quire-vlm against transformers on a random-weight SmolVLM-256M-sized checkpoint,
# or with FAMILY=idefics2 on one with Idefics2-8B's widths and cut depths (make_ckpt_idefics2.py).
# CPU, same thread count for both; f32, or with DTYPE=bf16 quire's --dtype bf16 against
# transformers in torch.bfloat16. Not a test: prints figures and ratios.
#   DTYPE=bf16 FAMILY=idefics2 NEW=16 PY=~/.cache/quire-tools/venv-ref/bin/python benches/vlm/bench.sh
#   THREADS=2 NEW=64 PY=/root/venv-ref/bin/python PROFILE=release benches/vlm/bench.sh
#   FAMILY=idefics2 THREADS=2 NEW=16 PY=~/.cache/quire-tools/venv-ref/bin/python benches/vlm/bench.sh
#   REPEAT=5 DTYPE=bf16 benches/vlm/bench.sh   (5 alternating rounds: median and range of each ratio)
#   QUANTIZE=q8 DTYPE=bf16 benches/vlm/bench.sh   (quire --quantize q8: text weights in int8;
#                                                  transformers stays in DTYPE; GEMM rows add q8)
#   QUANTIZE=q4 DTYPE=bf16 benches/vlm/bench.sh   (the same in 4 bits; GEMM rows add q8 and q4)
# Decode tok/s on both sides is timed on the decode steps themselves (quire: its step timers;
# transformers: generate's streamer timestamps, first new token to last), not as the full run
# less the best prefill, which swung by 2x with Idefics2's 2 s prefill against 15 short steps.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-/root/venv-ref/bin/python}
THREADS=${THREADS:-$(nproc)}
NEW=${NEW:-64}
PROFILE=${PROFILE:-release}
FAMILY=${FAMILY:-idefics3}
DTYPE=${DTYPE:-f32}
case "$DTYPE" in f32|bf16) ;; *) echo "DTYPE must be f32 or bf16, not $DTYPE" >&2; exit 2;; esac
QUANTIZE=${QUANTIZE:-none}
case "$QUANTIZE" in none|q8|q4) ;; *) echo "QUANTIZE must be none, q8 or q4, not $QUANTIZE" >&2; exit 2;; esac
if [ "$FAMILY" = idefics2 ]; then
  WORK=${WORK:-/tmp/quire-vlm-bench-idefics2}
  mkdir -p "$WORK"
  [ -f "$WORK/ckpt/config.json" ] || "$PY" benches/vlm/make_ckpt_idefics2.py "$WORK/ckpt"
else
  WORK=${WORK:-/tmp/quire-vlm-bench}
  mkdir -p "$WORK"
  [ -f "$WORK/ckpt/config.json" ] || "$PY" benches/vlm/make_ckpt.py "$WORK/ckpt"
fi
"$PY" benches/vlm/make_page.py "$WORK/page.png"
export RAYON_NUM_THREADS=$THREADS OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS
cargo build -q -p quire-vlm --example bench --profile "$PROFILE"
BIN=${CARGO_TARGET_DIR:-target}/$([ "$PROFILE" = dev ] && echo debug || echo "$PROFILE")/examples/bench
# REPEAT rounds, quire then transformers in each (the machine's speed drifts: alternating keeps
# both sides under the same drift); the roofline and phase lines come from the first round,
# whose quire run alone runs the GEMM microbenchmark; a last line gives each ratio's median
# and range over the rounds.
REPEAT=${REPEAT:-1}
QS=()
HS=()
for i in $(seq 1 "$REPEAT"); do
  GEMM=()
  [ "$QUANTIZE" = q8 ] && GEMM=(--gemm f32,bf16,q8)
  [ "$QUANTIZE" = q4 ] && GEMM=(--gemm f32,bf16,q8,q4)
  [ "$i" = 1 ] || GEMM=(--gemm none)
  QS+=("$("$BIN" "$WORK/ckpt" "$WORK/page.png" "$NEW" --dtype "$DTYPE" --quantize "$QUANTIZE" "${GEMM[@]}")")
  HS+=("$("$PY" benches/vlm/hf_bench.py "$WORK/ckpt" "$WORK/page.png" "$THREADS" "$NEW" "$DTYPE" 2>/dev/null | tail -1)")
done
Q=${QS[0]}
H=${HS[0]}
echo "$Q"
echo "$H"
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg) on $(nproc --all) CPUs (figures are noisy on a shared machine)"
"$PY" - "$Q" "$H" "$THREADS" "$DTYPE" "$QUANTIZE" <<'PYEOF'
import json, sys
q, h = json.loads(sys.argv[1]), json.loads(sys.argv[2])
quant = f" (quire --quantize {sys.argv[5]})" if sys.argv[5] != "none" else ""
print(f"threads={sys.argv[3]} dtype={sys.argv[4]}{quant} tokens_in={q['tokens_in']} (hf {h['tokens_in']})")
print(f"prefill ms/image: quire {q['prefill_ms']:.0f}  transformers {h['prefill_ms']:.0f}  speedup {h['prefill_ms']/q['prefill_ms']:.2f}x")
print(f"decode tok/s:     quire {q['decode_tok_s']:.1f}  transformers {h['decode_tok_s']:.1f}  speedup {q['decode_tok_s']/h['decode_tok_s']:.2f}x"
      "  (the steps' own time; full run less prefill: quire {:.1f}, transformers {:.1f})".format(
          q.get('decode_tok_s_wall', q['decode_tok_s']), h.get('decode_tok_s_wall', h['decode_tok_s'])))
print(f"peak RSS MB:      quire {q['peak_rss_mb']:.0f}  transformers {h['peak_rss_mb']:.0f}")
m = q.get("machine")
if m:
    line = f"machine: {m['threads']} threads, {m.get('cpu')}, cpuinfo {m.get('cpuinfo_mhz') or 0:.0f} MHz"
    if "clock_ghz" in m:
        line += (f"; clock {m['clock_ghz']:.2f} GHz (dependent FMA); FMA loop {m['fma_gflops_1_thread']:.0f} GFLOP/s on 1 thread"
                 f" ({m['flop_per_cycle_1_thread']:.0f} FLOP/cycle), {m['fma_gflops']:.0f} on {m['threads']};"
                 f" theoretical {m['threads']} x {m['clock_ghz']:.2f} GHz x 64 = {m['theoretical_gflops']:.0f} GFLOP/s")
    if "amx_theoretical_gflops" in m:
        line += f"; AMX bf16 theoretical {m['amx_theoretical_gflops']:.0f} GFLOP/s"
    if "stream_gb_s" in m:
        line += f"; memory read {m['stream_gb_s']:.1f} GB/s on {m['threads']} threads (1 GiB)"
    print(line)
rows = q.get("gemm", [])
ok = [r for r in rows if "gflop_s" in r and r["dtype"] == "f32"]
# The phases are measured against the best product of the run's own dtype (bf16: AMX products).
dt = sys.argv[4]
gemm_peak = max((r["gflop_s"] for r in rows if "gflop_s" in r and r["dtype"] == dt and r["m"] > 1), default=0)
# What bounds a decode step, which streams every weight once: the memory read rate (measured
# beside the FMA peak), or else the fastest matrix-vector row (their weights stream from memory too).
mv_peak = (m or {}).get("stream_gb_s") or max((r["gb_s"] for r in ok if r["m"] == 1), default=0)
if rows:
    print("GEMM microbenchmark, the engine's kernels on this run's shapes (best of >= 3 calls; GB/s: weights read, one-row products over 1 GiB of copies so that they stream from memory):")
    print(f"  {'product':17} {'m x k -> n':>20} {'kernel':20} {'dtype':5} {'ms':>8} {'GFLOP/s':>8} {'GB/s':>6}")
    for r in rows:
        shape = f"{r['m']} x {r['k']} -> {r['n']}"
        if "error" in r:
            print(f"  {r['shape']:17} {shape:>20} {r['kernel']:20} {r['dtype']:5} runs not: {r['error'][:90]}")
        else:
            gbs = f"{r['gb_s']:6.1f}" if r["m"] == 1 else ""
            print(f"  {r['shape']:17} {shape:>20} {r['kernel']:20} {r['dtype']:5} {r['ms']:8.3f} {r['gflop_s']:8.1f} {gbs}")
    print(f"measured GEMM peak (best {dt} product above): {gemm_peak:.0f} GFLOP/s; memory: {mv_peak:.1f} GB/s")
phases = q.get("phases", [])
if phases:
    print(f"phases of the {q['tokens_out']}-token run (GFLOP/s; %: of the measured GEMM peak):")
    for p in phases:
        calls, ms = p["calls"], p["ms"]
        per = f" ({ms / calls:.2f} ms x {calls})" if p["stage"] == "decode" else ""
        rate = p["gflop"] / ms * 1e3 if ms > 0 else 0
        pct = f"{100 * rate / gemm_peak:5.1f}%" if gemm_peak and p["gflop"] else ""
        line = f"  {p['stage']:9} {ms:9.1f} ms{per}  {p['gflop']:8.2f} GFLOP {rate:7.1f} GFLOP/s {pct}"
        if "gbytes" in p and ms > 0:
            bw = p["gbytes"] / ms * 1e3
            line += f"  {bw:.1f} GB/s" + (f" ({100 * bw / mv_peak:.0f}% of the memory read rate)" if mv_peak else "")
        print(line)
        for name, v in p["parts"].items():
            prate = v["gflop"] / v["ms"] * 1e3 if v["ms"] > 0 and v["gflop"] else 0
            share = 100 * v["ms"] / ms if ms > 0 else 0
            ppct = f" {100 * prate / gemm_peak:5.1f}%" if gemm_peak and prate else ""
            tail = f" {v['gflop']:8.2f} GFLOP {prate:7.1f} GFLOP/s{ppct}" if v["gflop"] else ""
            print(f"    {name:9} {v['ms']:9.1f} ms {share:5.1f}%{tail}")
# The prefill phase by phase beside transformers' (its processor, and forward hooks on its
# vision model, connector and text model), each side's own single run: which part wins or loses.
hp = h.get("phases_ms", {})
if phases and hp:
    qp = {p["stage"]: p["ms"] for p in phases}
    print("prefill by phase, ms (quire: the profiled run; transformers: its fastest prefill):")
    print(f"  {'phase':10} {'quire':>8} {'transformers':>13} {'speedup':>8}")
    for name in ("prepare", "vision", "connector", "prefill"):
        if name in qp and name in hp and qp[name] > 0:
            print(f"  {name:10} {qp[name]:8.1f} {hp[name]:13.1f} {hp[name] / qp[name]:7.2f}x")
PYEOF
if [ "$REPEAT" -gt 1 ]; then
  "$PY" - "$REPEAT" "${QS[@]}" "${HS[@]}" <<'PYEOF'
import json, statistics, sys
n = int(sys.argv[1])
qs = [json.loads(a) for a in sys.argv[2:2 + n]]
hs = [json.loads(a) for a in sys.argv[2 + n:2 + 2 * n]]
def line(name, ratios):
    r = sorted(ratios)
    return f"{name} speedup over {n} rounds: median {statistics.median(r):.2f}x, range {r[0]:.2f}-{r[-1]:.2f}x ({', '.join(f'{x:.2f}' for x in ratios)})"
print(line("prefill", [h["prefill_ms"] / q["prefill_ms"] for q, h in zip(qs, hs)]))
print(line("decode ", [q["decode_tok_s"] / h["decode_tok_s"] for q, h in zip(qs, hs)]))
PYEOF
fi
