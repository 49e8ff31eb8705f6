#!/usr/bin/env bash
# Archive inputs, two figures. Not a test.
#
# 1. Images per second from one WebDataset tar shard of N images (default 10,000, 256x192
#    JPEGs in img2dataset's layout, made by tests/gen_archives.py --bench) against the same
#    images as loose files, captioned by the tiny random-weight Idefics3 checkpoint of the
#    tests (tests/fixtures/idefics3/split_sf2_gqa) on the CPU, REPS runs each, alternating.
#    The rate is N / wall seconds of the whole `quire run` (planning and model load
#    included). The shard must not be slower.
# 2. Peak RSS of `quire run --engine text-layer` (every image read and decoded, no model) on
#    shards of BIG_GB/10 and BIG_GB gigabytes (default 2) of ~1 MB JPEGs: it must stay flat.
#
#   benches/archives/bench.sh [REPS]                # default 3
#   N=2000 BIG_GB=1 PROFILE=dev benches/archives/bench.sh 2
#   RSS_ONLY=1 benches/archives/bench.sh          # only the peak-RSS part
#
# Data goes to BENCH_DIR (default /tmp/quire-archives-bench, ~2.5 GB at the defaults).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
reps="${1:-3}"
N="${N:-10000}"
BIG_GB="${BIG_GB:-2}"
WORK="${BENCH_DIR:-/tmp/quire-archives-bench}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
PROFILE="${PROFILE:-release}"
cargo build -q --profile "$PROFILE" -p quire
QUIRE="$CARGO_TARGET_DIR/$([ "$PROFILE" = dev ] && echo debug || echo "$PROFILE")/quire"
export QUIRE_PDFIUM="${QUIRE_PDFIUM:-$("$ROOT/scripts/setup-pdfium.sh" "$HOME/.cache/quire-tools/pdfium")}"
VENV="$HOME/.cache/quire-tools/wds-venv"
[ -x "$VENV/bin/python" ] || { python3 -m venv "$VENV" && "$VENV/bin/pip" install -q webdataset==1.0.2 pillow==13.0.0; }
MODEL="$ROOT/tests/fixtures/idefics3/split_sf2_gqa"
mkdir -p "$WORK"
if [ ! -f "$WORK/n$N/shard.tar" ]; then
  rm -rf "$WORK/n$N"
  "$VENV/bin/python" "$ROOT/tests/gen_archives.py" --bench "$WORK/n$N" "$N"
fi
echo "shard: $(du -h "$WORK/n$N/shard.tar" | cut -f1), $N images; loose: $(ls "$WORK/n$N/loose" | wc -l) files"

# seconds and peak RSS (KiB) of one command
# (the last line: GNU time puts "Command exited with non-zero status N" before it)
measure() { /usr/bin/time -f "%e %M" -o "$WORK/time.txt" "$@" >/dev/null 2>"$WORK/last.log" || true; tail -1 "$WORK/time.txt"; }

tar_rates=(); loose_rates=()
[ -n "${RSS_ONLY:-}" ] && reps=0
for r in $(seq "$reps"); do
  for what in tar loose; do
    input="$WORK/n$N/shard.tar"; [ "$what" = loose ] && input="$WORK/n$N/loose"
    read -r secs rss < <(measure "$QUIRE" run "$input" --out "$WORK/out" --job "$what" --force --quiet \
      --task caption --model "$MODEL" --max-new-tokens 4)
    done_n=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['counts']['pages_ok'])" "$WORK/out/$what/manifest.json")
    rate=$(python3 -c "print(f'{$N/$secs:.1f}')")
    echo "run $r $what: $secs s, $done_n images captioned, $rate images/s, peak RSS $((rss / 1024)) MiB"
    [ "$done_n" = "$N" ] || { echo "expected $N captions"; tail -5 "$WORK/last.log"; exit 1; }
    if [ "$what" = tar ]; then tar_rates+=("$rate"); else loose_rates+=("$rate"); fi
  done
done
[ "$reps" -gt 0 ] && python3 - "${tar_rates[*]}" "${loose_rates[*]}" <<'PY'
import statistics, sys
t = [float(x) for x in sys.argv[1].split()]; l = [float(x) for x in sys.argv[2].split()]
print(f"images/s  tar: median {statistics.median(t):.1f} (min {min(t):.1f}, max {max(t):.1f})"
      f"  loose: median {statistics.median(l):.1f} (min {min(l):.1f}, max {max(l):.1f})"
      f"  tar/loose {statistics.median(t) / statistics.median(l):.2f}")
PY

# Big shards of ~1 MB noise JPEGs, written as a stream (64 distinct pictures under new keys).
for gb in "$(python3 -c "print($BIG_GB/10)")" "$BIG_GB"; do
  big="$WORK/big-$gb.tar"
  if [ ! -f "$big" ]; then
    "$VENV/bin/python" - "$big" "$gb" <<'PY'
import io, os, sys, tarfile
from PIL import Image
path, gb = sys.argv[1], float(sys.argv[2])
pics = []
for i in range(64):
    b = io.BytesIO()
    Image.frombytes("RGB", (640, 640), os.urandom(640 * 640 * 3)).save(b, format="JPEG", quality=95)
    pics.append(b.getvalue())
total, i = 0, 0
with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as t:
    while total < gb * (1 << 30):
        data = pics[i % len(pics)]
        for name, body in ((f"{i:09d}.jpg", data), (f"{i:09d}.txt", b"a caption")):
            ti = tarfile.TarInfo(name); ti.size = len(body); ti.mtime = 1_700_000_000
            t.addfile(ti, io.BytesIO(body))
        total += len(data); i += 1
print(f"{path}: {i} images")
PY
  fi
  # 64 samples a task, tasks on the default workers: what the tasks in flight hold is the same
  # for both sizes, so peak RSS must not grow with the shard.
  read -r secs rss < <(measure "$QUIRE" run "$big" --out "$WORK/out" --job "big" --force --quiet \
    --engine text-layer --images-per-task 64)
  echo "text-layer read of $(du -h "$big" | cut -f1) shard: $secs s, peak RSS $((rss / 1024)) MiB"
done
