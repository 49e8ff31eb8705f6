#!/usr/bin/env bash
# Benchmark quire-vlm against llama.cpp (llama-mtmd-cli) on the CPU, on bench.sh's random-weight
# SmolVLM-256M-sized checkpoint and 480x360 page, same prompt, greedy, NEW tokens forced, THREADS
# threads for both. Not a test: prints prefill ms, decode tokens/s and peak RSS (median and range
# over REPEAT runs) for llama.cpp at f32/f16/bf16/q8_0/q4_0 and quire at f32/bf16/q8_0/q4_0
# (quire's q8_0: --dtype bf16 --quantize q8, the text model's weights in int8 blocks of 32 with
# f16 scales as llama.cpp's q8_0, the vision encoder in bf16; quire's q4_0: --dtype bf16
# --quantize q4, the text model's weights in 4-bit blocks of 32 with an f16 scale (15 levels,
# +-7), decode products on activations quantized to int8 per block of 32 (AVX512-VNNI), as
# llama.cpp's q4_0 x q8_0 dot, the vision encoder in bf16), and the ratios at matching precisions.
#   benches/vlm/llamacpp.sh
#   THREADS=2 NEW=64 REPEAT=3 PY=~/.cache/quire-tools/venv-ref/bin/python benches/vlm/llamacpp.sh
#   LLAMA_TYPES="f32 q8_0" QUIRE_DTYPES=f32 REPEAT=1 benches/vlm/llamacpp.sh
# From nothing (Rust, Python 3 with torch/transformers/numpy/Pillow in PY, apt) it:
#   1. downloads the source distribution of the PyPI package llama-cpp-python (it vendors
#      llama.cpp and its convert_hf_to_gguf.py), builds llama-mtmd-cli and llama-quantize (CPU,
#      -march=native, Release; either one missing is built in the existing build tree) and makes
#      a venv for the converter with the gguf package (the writer) installed from the sdist's own
#      gguf-py, all under TOOLS (default ~/.cache/quire-tools/llamacpp; reused). Not PyPI's
#      gguf: its newest release (0.19.0, the same version number) predates this converter, which
#      stops at "module 'gguf' has no attribute 'LazyChunkedTensor'";
#   2. writes the checkpoint (make_ckpt.py) and page like bench.sh (under the lock: WORK is
#      shared with bench.sh), and converts it to GGUF, text model and mmproj, at each LLAMA_TYPES
#      type (into WORK/gguf; reused while newer than the checkpoint). Two things in the random
#      checkpoint stop the converter, both worked around without touching llama.cpp's files:
#      - its text_config has no "architectures" (the real SmolVLM's says VLlama3ForCausalLM), so
#        the text model stops at "Model Idefics3ForConditionalGeneration is not supported": the
#        converter reads a copy of config.json with that key added (weights, tokenizer: symlinks);
#      - its tokenizer is quire's small test one, unknown to the converter ("BPE pre-tokenizer was
#        not recognized"): benches/vlm/llamacpp_convert.py runs the converter with "gpt-2" as the
#        pre-tokenizer for an unknown hash (what that byte-level BPE tokenizer does);
#      q4_0, which the converter cannot write: the text model is llama-quantize --pure'd from an
#      f32 GGUF (text-f32.gguf, or a temporary one when f32 is not in LLAMA_TYPES), so every
#      weight matrix is q4_0, lm_head included as in quire's q4 (without --pure llama-quantize
#      makes output.weight q6_K), as the converter's q8_0 is all q8_0 (token_embd is q4_0/q8_0
#      there, a row lookup). Its mmproj is q8_0's (mmproj-q8_0.gguf: the vision encoder's and
#      connector's weight matrices in q8_0, the rest f32), so llama.cpp's vision side is q8_0 in
#      both rows, quire's bf16 in both, and q8_0 -> q4_0 changes only the text model, both sides;
#   3. under flock /tmp/quire-bench.lock, runs both, REPEAT rounds, each configuration once per
#      round, and prints the table.
# q8_0 runs with --no-repack: with it, ggml moves q8_0 weights to its AMX buffer type and
# llama-mtmd-cli dies of SIGILL on this machine (AMX tile use not granted to the process).
# q4_0 runs with repacking (llama.cpp's default): its weights go to the CPU_REPACK buffer (the
# interleaved q4_0 layout), not AMX, and it runs; with --no-repack it runs too, decoding ~15%
# slower (113 vs 94 tokens/s, one run each, NEW=16, on a loaded machine).
# llama.cpp's figures are its own timers, printed at verbosity 4 (-lv 4, "trace"): in this
# llama.cpp, common_log_default_callback (common/log.cpp) files every GGML_LOG_LEVEL_INFO message
# from the libraries (libllama, libmtmd) at LOG_LEVEL_TRACE = 4, above the default threshold of
# 3 (LOG_LEVEL_INFO), so llama_perf_context_print's lines, which llama-mtmd-cli does call at exit,
# and mtmd's "image decoded ... in N ms" were dropped at the default and at -lv 3 (--perf only
# decides whether the timers run; they are on by default). Parsed from the run's log:
#   - prefill: "prompt eval time". libllama's timer runs from the first prompt batch handed to
#     the context to the first synchronisation (the first sampling), and llama-mtmd-cli does not
#     synchronise in between, so for this prompt (text, overview image, text, slice image, text)
#     it spans both encoder passes, the image-embedding decodes and the text chunks: the log's
#     timestamps agree (first "encoding mtmd batch" to the end of the prompt), so the encoder ms
#     are not added again (the script checks prompt eval >= encode + image decode, and adds the
#     encoder time only if a build ever times less). Not in it: loading and slicing the image
#     and the first text chunk's decode, shown apart as "pre" (log timestamps, from the CLI's
#     last line before the prompt to the first "encoding mtmd batch"; tens of ms), while quire's
#     prefill includes preprocessing;
#   - decode: "eval time" tokens per second (63 single-token evals for 64 new tokens: the last
#     token's eval is never synchronised, so not counted);
#   - peak RSS: /usr/bin/time -v's maximum resident set size;
#   each a single run per round in a fresh process (after llama.cpp's own warm-up), the median
#   and range over REPEAT rounds. quire's figures come from crates/quire-vlm/examples/bench.rs
#   (prefill = the best of three warm 1-token generate calls, image preprocessing included;
#   decode = NEW-1 steps over their own time, from its step timers, as llama.cpp's eval time
#   counts its steps (earlier: the NEW-token call less the prefill, which swung with the
#   prefill's noise); run with --gemm none: its GEMM microbenchmark is not used here), the
#   median and range over the same rounds.
# Run it on a quiet machine (the lock keeps the other benches out, not compiles): llama.cpp's
# thread pool busy-waits between graph nodes (--poll, default 50), so with other work on the
# cores it collapses far more than quire does. With two compiles beside it (1-min load 4-6 on 2
# CPUs) llama.cpp f32 gave 17-29 s prefill and 1.0-1.3 tokens/s decode against 3.8 s and
# 30 tokens/s quiet (load < 0.7), quire f32 2.9 s and 14.7 tokens/s; such rows say nothing about
# the engines. The script prints the 1-min load average seen before each run.
# llama.cpp always adds a 512x512 "overview" image in front of the slices for Idefics3/SmolVLM,
# so this one-tile page is 2 encoder passes and 128 image tokens there, 1 and 64 in quire (and in
# transformers); the table shows both counts and a llama.cpp prefill scaled to quire's work:
# one encoder pass + the rest of the prompt eval scaled by quire's prompt tokens / llama.cpp's.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
PY=${PY:-$HOME/.cache/quire-tools/venv-ref/bin/python}
THREADS=${THREADS:-2}
NEW=${NEW:-64}
REPEAT=${REPEAT:-3}
CTX=${CTX:-1024}
LLAMA_TYPES=${LLAMA_TYPES:-f32 f16 bf16 q8_0 q4_0}
QUIRE_DTYPES=${QUIRE_DTYPES:-f32 bf16 q8_0 q4_0}
TOOLS=${TOOLS:-$HOME/.cache/quire-tools/llamacpp}
LLAMA_CPP_PYTHON=${LLAMA_CPP_PYTHON:-0.3.36}   # the version this script was written against
WORK=${WORK:-/tmp/quire-vlm-bench}
LOCK=${LOCK:-/tmp/quire-bench.lock}
PROMPT="Convert this page to docling."

# ---- 1. tools (not under the lock) ----
missing=()
command -v cmake >/dev/null || missing+=(cmake)
command -v g++ >/dev/null || missing+=(build-essential)
[ -x /usr/bin/time ] || missing+=(time)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing ${missing[*]}" >&2
  SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
mkdir -p "$TOOLS"
SRC=$TOOLS/llama_cpp_python-$LLAMA_CPP_PYTHON
LLAMA=$SRC/vendor/llama.cpp
if [ ! -f "$LLAMA/convert_hf_to_gguf.py" ]; then
  "$PY" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$LLAMA_CPP_PYTHON" -d "$TOOLS/dl"
  tar xzf "$TOOLS/dl/llama_cpp_python-$LLAMA_CPP_PYTHON.tar.gz" -C "$TOOLS"
fi
CLI=$TOOLS/build/bin/llama-mtmd-cli
QUANTIZE=$TOOLS/build/bin/llama-quantize   # q4_0 (the converter cannot write it)
if [ ! -x "$CLI" ] || [ ! -x "$QUANTIZE" ]; then
  [ -x "$CLI" ] || cmake -S "$LLAMA" -B "$TOOLS/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
    -DLLAMA_BUILD_APP=OFF -DLLAMA_USE_PREBUILT_UI=OFF >"$TOOLS/cmake.log"
  cmake --build "$TOOLS/build" --target llama-mtmd-cli llama-quantize -j2 >"$TOOLS/build.log"
fi
VENV=$TOOLS/venv
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import gguf, sentencepiece, torch, transformers; gguf.LazyChunkedTensor' 2>/dev/null; then
  # The converter needs torch/transformers/numpy: PY's packages are visible through a .pth file.
  "$PY" -m venv "$VENV"
  "$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' \
    >"$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/quire-ref.pth"
  "$VENV/bin/pip" install -q "$LLAMA/gguf-py" sentencepiece
fi
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target}
cargo build -q -p quire-vlm --example bench --release
QBIN=$CARGO_TARGET_DIR/release/examples/bench

# ---- 2. checkpoint, page (under the lock), GGUF ----
prepare() {
  mkdir -p "$WORK"
  [ -f "$WORK/ckpt/config.json" ] || "$PY" benches/vlm/make_ckpt.py "$WORK/ckpt"
  "$PY" benches/vlm/make_page.py "$WORK/page.png"
}
export -f prepare
export PY WORK
[ -f "$WORK/ckpt/config.json" ] && [ -f "$WORK/page.png" ] || flock "$LOCK" bash -c 'set -euo pipefail; prepare'
convert() {
  mkdir -p "$WORK/gguf"
  local in=$WORK/gguf/src
  rm -rf "$in" && mkdir -p "$in"
  for f in "$WORK"/ckpt/*; do [ "$(basename "$f")" = config.json ] || ln -s "$f" "$in/"; done
  "$PY" - "$WORK/ckpt/config.json" "$in/config.json" <<'PYEOF'
import json, sys
c = json.load(open(sys.argv[1]))
c["text_config"].setdefault("architectures", ["VLlama3ForCausalLM"])
json.dump(c, open(sys.argv[2], "w"), indent=2)
PYEOF
  # fresh GGUF FILE of PART at TYPE, converted from the checkpoint unless it is already there
  gguf_at() {
    local part=$1 t=$2 out=$3
    [ -f "$out" ] && [ "$out" -nt "$WORK/ckpt/model.safetensors" ] && return 0
    echo "converting $part to $t" >&2
    NO_LOCAL_GGUF=1 "$VENV/bin/python" benches/vlm/llamacpp_convert.py "$LLAMA" "$in" --outtype "$t" \
      --outfile "$out.tmp" $([ "$part" = mmproj ] && echo --mmproj) >"$WORK/gguf/convert-$part-$t.log" 2>&1 \
      || { echo "conversion of $part to $t failed; tail of $WORK/gguf/convert-$part-$t.log:" >&2;
           tail -20 "$WORK/gguf/convert-$part-$t.log" >&2; exit 1; }
    mv "$out.tmp" "$out"
  }
  local t out src
  for t in $LLAMA_TYPES; do
    gguf_at mmproj "$(mmproj_type "$t")" "$WORK/gguf/mmproj-$(mmproj_type "$t").gguf"
    out=$WORK/gguf/text-$t.gguf
    if [ "$t" != q4_0 ]; then gguf_at text "$t" "$out"; continue; fi
    [ -f "$out" ] && [ "$out" -nt "$WORK/ckpt/model.safetensors" ] && continue
    # q4_0: llama-quantize --pure from the f32 GGUF (text-f32.gguf, or a temporary one)
    src=$WORK/gguf/text-f32.gguf
    case " $LLAMA_TYPES " in *" f32 "*) ;; *) src=$WORK/gguf/text-f32-for-q4_0.tmp.gguf ;; esac
    gguf_at text f32 "$src"
    echo "quantizing text to q4_0" >&2
    "$QUANTIZE" --pure "$src" "$out.tmp" q4_0 >"$WORK/gguf/quantize-text-q4_0.log" 2>&1 \
      || { echo "llama-quantize to q4_0 failed; tail of $WORK/gguf/quantize-text-q4_0.log:" >&2;
           tail -20 "$WORK/gguf/quantize-text-q4_0.log" >&2; exit 1; }
    mv "$out.tmp" "$out"
    case $src in *.tmp.gguf) rm -f "$src" ;; esac
  done
}
# The mmproj (vision encoder + connector) each type runs with: its own, but q4_0 runs q8_0's (see
# the header: quire keeps its vision encoder in bf16 at q4_0 as at q8_0).
mmproj_type() { if [ "$1" = q4_0 ]; then echo q8_0; else echo "$1"; fi; }

# ---- 3. measure ----
# One llama-mtmd-cli run -> one JSON line.
run_llama() {
  local t=$1 log
  log=$(mktemp)
  /usr/bin/time -v "$CLI" -m "$WORK/gguf/text-$t.gguf" --mmproj "$WORK/gguf/mmproj-$(mmproj_type "$t").gguf" \
    --image "$WORK/page.png" -p "$PROMPT" -n "$NEW" --ignore-eos --temp 0 --top-k 1 --seed 0 \
    -t "$THREADS" -tb "$THREADS" -c "$CTX" --perf -lv 4 $([ "$t" = q8_0 ] && echo --no-repack) >"$log" 2>&1 </dev/null \
    || { echo "llama-mtmd-cli ($t) failed:" >&2; tail -30 "$log" >&2; exit 1; }
  cp "$log" "$WORK/gguf/last-run-$t.log"
  "$PY" - "$log" "$t" <<'PYEOF'
import json, re, sys
s = open(sys.argv[1]).read()
enc = [int(x) for x in re.findall(r"mtmd batch encoding done in (\d+) ms", s)]
n_enc = sum(int(x) for x in re.findall(r"encoding mtmd batch, n_chunks = (\d+)", s))
img_tok = [int(x) for x in re.findall(r"decoding image batch \d+/\d+, n_tokens_batch = (\d+)", s)]
img_dec = [int(x) for x in re.findall(r"image decoded \(batch \d+/\d+\) in (\d+) ms", s)]
pe = re.search(r"prompt eval time =\s*([\d.]+) ms /\s*(\d+) tokens", s)
ev = re.search(r"\beval time =\s*([\d.]+) ms /\s*(\d+) runs.*?([\d.]+) tokens per second", s)
rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", s)
# log timestamps (common_init turns them on): "M.SS.mmm.uuu" at the start of each line
ts = lambda m: (lambda p: int(p[0]) * 60 + int(p[1]) + int(p[2]) / 1e3 + int(p[3]) / 1e6)(m.split("."))
before = re.findall(r"^(\d+\.\d+\.\d+\.\d+) W +For normal use cases", s, re.M)
first = re.search(r"^(\d+\.\d+\.\d+\.\d+) I encoding mtmd batch", s, re.M)
if not (enc and img_dec and pe and ev and rss and before and first):
    print("could not parse llama-mtmd-cli output:\n" + s[-3000:], file=sys.stderr)
    sys.exit(0)
pe_ms = float(pe[1])
spans = pe_ms >= sum(enc) + sum(img_dec)  # the prompt-eval timer covers the encoder passes
print(json.dumps({"impl": "llama.cpp", "dtype": sys.argv[2], "encode_ms": sum(enc), "n_encodes": n_enc,
                  "image_decode_ms": sum(img_dec), "prompt_eval_ms": pe_ms, "prompt_tokens": int(pe[2]),
                  "image_tokens": sum(img_tok), "prefill_ms": pe_ms if spans else sum(enc) + pe_ms,
                  "prompt_eval_spans_encode": spans, "pre_ms": (ts(first[1]) - ts(before[-1])) * 1e3,
                  "decode_runs": int(ev[2]), "decode_tok_s": float(ev[3]), "peak_rss_mb": int(rss[1]) / 1024}))
PYEOF
  rm -f "$log"
}

run_quire() {
  local d=$1 args
  # q8_0 (q4_0): the text model's weights in int8 (4-bit) blocks of 32 (--quantize q8, q4), the
  # rest in bf16.
  case $d in
    q8_0) args=(--dtype bf16 --quantize q8) ;;
    q4_0) args=(--dtype bf16 --quantize q4) ;;
    *) args=(--dtype "$d") ;;
  esac
  "$QBIN" "$WORK/ckpt" "$WORK/page.png" "$NEW" "${args[@]}" --gemm none | tail -1 \
    | "$PY" -c 'import json,sys; j=json.loads(sys.stdin.read()); j["dtype"]=sys.argv[1]; print(json.dumps(j))' "$d"
}

convert

measure() {
  export RAYON_NUM_THREADS=$THREADS OMP_NUM_THREADS=$THREADS
  for r in $(seq "$REPEAT"); do
    echo "round $r/$REPEAT" >&2
    for t in $LLAMA_TYPES; do cut -d' ' -f1 /proc/loadavg >>"$WORK/llamacpp-load.txt"; run_llama "$t"; done
    for d in $QUIRE_DTYPES; do cut -d' ' -f1 /proc/loadavg >>"$WORK/llamacpp-load.txt"; run_quire "$d"; done
  done >"$WORK/llamacpp-results.jsonl"
}

export -f measure run_llama run_quire mmproj_type
export PY THREADS NEW REPEAT CTX LLAMA_TYPES QUIRE_DTYPES WORK LLAMA VENV CLI QBIN PROMPT
echo "load average before taking the lock: $(cut -d' ' -f1-3 /proc/loadavg)"
: >"$WORK/llamacpp-load.txt"
flock "$LOCK" bash -c 'set -euo pipefail; measure'   # one JSON line per run, written as they come
# 1-minute load average sampled before each run (it includes this bench's own THREADS threads)
echo "load average: 1-min before each run $(sort -n "$WORK/llamacpp-load.txt" | sed -n '1p;$p' | paste -sd-)," \
  "at the end $(cut -d' ' -f1-3 /proc/loadavg) on $(nproc --all) CPUs (figures are noisy on a shared machine)"
"$PY" - "$WORK/llamacpp-results.jsonl" "$THREADS" "$NEW" "$REPEAT" <<'PYEOF'
import json, statistics as st, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
by = {}
for r in rows:
    by.setdefault((r["impl"], r["dtype"]), []).append(r)
def med(rs, k): return st.median(r[k] for r in rs)
def fmt(rs, k, f="{:.0f}"):
    v = [r[k] for r in rs]
    return f"{f.format(st.median(v))} [{f.format(min(v))}-{f.format(max(v))}]"
q = [rs for (i, _), rs in by.items() if i == "quire"]
l = [rs for (i, _), rs in by.items() if i == "llama.cpp"]
print(f"threads={sys.argv[2]} new={sys.argv[3]} repeat={sys.argv[4]}  (median [min-max])")
if q and l:
    a, b = l[0][0], q[0][0]
    print(f"tokens in: quire {b['tokens_in']} (64 per tile, 1 tile)  llama.cpp {a['prompt_tokens']} "
          f"({a['image_tokens']} image tokens in {a['n_encodes']} encoder passes: overview + slices)")
print(f"{'':10} {'dtype':5} {'prefill ms':>18} {'(enc+rest) (pre)':>16} {'1-tile est. ms':>15} {'decode tok/s':>20} {'peak RSS MB':>18}")
qtok = q[0][0]["tokens_in"] if q else None
for (impl, d), rs in by.items():
    if impl == "llama.cpp":
        # scale to quire's work: one encoder pass, and the prompt eval at quire's token count
        est = [r["encode_ms"] / r["n_encodes"]
               + (r["prefill_ms"] - r["encode_ms"]) * (qtok or r["prompt_tokens"]) / r["prompt_tokens"] for r in rs]
        for r, e in zip(rs, est): r["prefill_1tile_ms"] = e
        parts = f"{med(rs, 'encode_ms'):.0f}+{med(rs, 'prefill_ms') - med(rs, 'encode_ms'):.0f} ({med(rs, 'pre_ms'):.0f})"
        print(f"{impl:10} {d:5} {fmt(rs, 'prefill_ms'):>18} {parts:>16} {fmt(rs, 'prefill_1tile_ms'):>15} "
              f"{fmt(rs, 'decode_tok_s', '{:.1f}'):>20} {fmt(rs, 'peak_rss_mb'):>18}")
    else:
        print(f"{impl:10} {d:5} {fmt(rs, 'prefill_ms'):>18} {'':>16} {'':>15} "
              f"{fmt(rs, 'decode_tok_s', '{:.1f}'):>20} {fmt(rs, 'peak_rss_mb'):>18}")
print("quire / llama.cpp at the same precision (>1: quire faster; prefill vs llama.cpp's own, and vs its 1-tile estimate):")
for (impl, d), rs in by.items():
    if impl != "quire" or ("llama.cpp", d) not in by:
        continue
    ls = by[("llama.cpp", d)]
    print(f"  {d:5} prefill {med(ls, 'prefill_ms') / med(rs, 'prefill_ms'):.2f}x "
          f"(1-tile est. {med(ls, 'prefill_1tile_ms') / med(rs, 'prefill_ms'):.2f}x)  "
          f"decode {med(rs, 'decode_tok_s') / med(ls, 'decode_tok_s'):.2f}x  "
          f"peak RSS {med(rs, 'peak_rss_mb') / med(ls, 'peak_rss_mb'):.2f}x of llama.cpp's")
PYEOF
