#!/usr/bin/env bash
# On a GPU machine: the whole `quire run --engine vlm --device cuda` path (pdfium rendering,
# the pipeline, the model on CUDA in f32) must give transformers' greedy text on the scanned-PDF
# fixture pages (tests/fixtures/idefics3/pdf_pages/reference.json), as tests/pipeline.rs checks
# on the CPU. A bf16 run follows, printed for the record (bf16 may pick other tokens).
#
#   QUIRE=.gpu/quire QUIRE_PDFIUM=.gpu/libpdfium.so benches/gpu/pipeline_check.sh
#
# QUIRE: a `quire` built with `--features cuda` (files ending in .xz are unpacked first);
# QUIRE_PDFIUM: libpdfium (same rule). Exit status 0 when every case matches.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-python3}
WORK=$(mktemp -d /tmp/quire-pipeline-check.XXXXXX)
unpack() {
  case "$1" in
    *.xz) "$PY" -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' "$1" "$WORK/$2"; chmod +x "$WORK/$2"; echo "$WORK/$2" ;;
    *) echo "$1" ;;
  esac
}
QUIRE=$(unpack "${QUIRE:-.gpu/quire.xz}" quire)
export QUIRE_PDFIUM=$(unpack "${QUIRE_PDFIUM:-.gpu/libpdfium.so.xz}" libpdfium.so)
DEVICE=${DEVICE:-cuda} # cpu: to try this script with a CPU build
if [ "$DEVICE" = cuda ]; then
  # CUDA libraries from the python packages torch uses, and the driver's folder (quire records
  # NEEDED libcuda.so.1: it links the stub of deploy/cuda-toolkit.sh).
  CUDA_LIB=$("$PY" -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13", "lib"))')
  LIBCUDA=${LIBCUDA:-$(ldconfig -p | awk '/libcuda.so.1 /{print $NF; exit}')}
  export LD_LIBRARY_PATH="$CUDA_LIB:$(dirname "$LIBCUDA")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
"$QUIRE" --version
REF=tests/fixtures/idefics3/pdf_pages/reference.json
fails=0
for dtype in f32 bf16; do
  while IFS=$'\t' read -r ckpt document; do
    out="$WORK/$dtype-$ckpt"
    "$QUIRE" run "tests/fixtures/docs/$document" --out "$out" --job pdf --engine vlm --device "$DEVICE" --dtype "$dtype" \
      --model "tests/fixtures/idefics3/$ckpt" --prompt "$("$PY" -c "import json; print(json.load(open('$REF'))['prompt'])")" \
      --max-new-tokens "$("$PY" -c "import json; print(json.load(open('$REF'))['max_new_tokens'])")" >/dev/null 2>"$out.log" \
      || { echo "$dtype $ckpt: quire run failed:"; tail -5 "$out.log"; }
    "$PY" - "$REF" "$ckpt" "$out/pdf/results" "$dtype" <<'PY' || fails=$((fails + 1))
import glob, json, sys
ref, ckpt, results, dtype = sys.argv[1:]
case = next(c for c in json.load(open(ref))["cases"] if c["checkpoint"] == ckpt)
recs = [json.loads(l) for f in glob.glob(results + "/*.jsonl") for l in open(f) if l.strip()]
r = next((r for r in recs if r["page"] == case["page"]), None)
if r is None:
    print(f"{dtype} {ckpt}: no record"); sys.exit(1)
same = (r["text"], r["width"], r["height"], r["tokens_out"]) == (case["text"], case["width"], case["height"], len(case["new_tokens"]))
print(f"{dtype} {ckpt}: {'SAME as transformers' if same else 'DIFFERENT'}: {r['width']}x{r['height']}, {r['tokens_out']} tokens, {r['finish_reason']}, text {r['text']!r}")
if not same:
    print(f"  transformers: {case['width']}x{case['height']}, {len(case['new_tokens'])} tokens, text {case['text']!r}")
sys.exit(0 if same or dtype != "f32" else 1)
PY
  done < <("$PY" -c "import json; [print(c['checkpoint'] + '\t' + c['document']) for c in json.load(open('$REF'))['cases']]")
done
echo "f32 cases that differ from transformers: $fails"
exit $((fails > 0))
