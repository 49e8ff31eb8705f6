#!/usr/bin/env bash
# Bytes a distributed job fetches from S3 to read one WebDataset shard, against the shard's
# size. Not a test: prints figures.
#
# One worker (captions of 1 token by the tests' tiny random-weight checkpoint: every image is
# read, decoded and run through the model, on the CPU) and a waiting coordinator over a real
# nats-server, the shard in Garage on loopback (benches/dist/).
# The shard is N 256x192 JPEGs in img2dataset's layout (tests/gen_archives.py --bench), as
# a plain .tar and as a .tar.gz, each one job of --images-per-task PER (default 256) samples
# a task. The worker's quire_input_fetched_bytes_total and quire_input_requests_total (ranged
# reads and whole downloads) give what the split (the scan) and the tasks fetched.
#
#   benches/archives/s3_reads.sh
#   N=2000 PER=100 PROFILE=dev benches/archives/s3_reads.sh
#   REF_QUIRE=/path/to/older/quire benches/archives/s3_reads.sh   # the same jobs with another
#                                                                 # build first, as reference
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
N="${N:-10000}"
PER="${PER:-256}"
DATA="${BENCH_DIR:-/tmp/quire-archives-bench}"
source "$ROOT/benches/dist/build.sh"
export QUIRE_PDFIUM="${QUIRE_PDFIUM:-$("$ROOT/scripts/setup-pdfium.sh" "$HOME/.cache/quire-tools/pdfium")}"
VENV="$HOME/.cache/quire-tools/wds-venv"
[ -x "$VENV/bin/python" ] || { python3 -m venv "$VENV" && "$VENV/bin/pip" install -q webdataset==1.0.2 pillow==13.0.0; }
if [ ! -f "$DATA/n$N/shard.tar" ]; then
  rm -rf "$DATA/n$N"
  "$VENV/bin/python" "$ROOT/tests/gen_archives.py" --bench "$DATA/n$N" "$N"
fi
WORK="$(mktemp -d /tmp/quire-s3-reads.XXXX)"
source "$ROOT/benches/dist/services.sh"
cp "$DATA/n$N/shard.tar" "$WORK/shard.tar"
gzip -1 -c "$WORK/shard.tar" >"$WORK/shard.tar.gz"
"$S3PUT" "s3://$BUCKET/in" "$WORK/shard.tar" "$WORK/shard.tar.gz" 2>/dev/null

# name=value of the worker's counters, e.g. "bytes=123 requests=4"
counters() {
  python3 - "$1" <<'PY'
import sys, urllib.request
text = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics").read().decode()
def get(name, how):
    for l in text.splitlines():
        if l.startswith(f'{name}{{how="{how}"}} '):
            return int(float(l.split()[-1]))
    return 0
print(*(get(f"quire_input_{what}_total", how) for how in ("ranged", "download") for what in ("fetched_bytes", "requests")))
PY
}

run_build() {
  local label=$1 bin=$2 port
  port=$(free_port)
  "$bin" worker --nats "$NATS_URL" --workers 2 --model "$ROOT/tests/fixtures/idefics3/split_sf2_gqa" --metrics-addr "127.0.0.1:$port" >"$WORK/worker-$label.log" 2>&1 &
  local wpid=$!
  wait_port "$port"
  for name in shard.tar shard.tar.gz; do
    local size before after t0 t1
    size=$(stat -c %s "$WORK/$name")
    read -r -a before < <(counters "$port")
    t0=$(date +%s.%N)
    "$bin" coordinator --nats "$NATS_URL" --input "s3://$BUCKET/in/$name" --out "s3://$BUCKET/out-$label" \
      --job "$label-${name//./-}" --task caption --model "$ROOT/tests/fixtures/idefics3/split_sf2_gqa" \
      --max-new-tokens 1 --images-per-task "$PER" --wait >"$WORK/$label-$name.json" 2>"$WORK/$label-$name.log"
    t1=$(date +%s.%N)
    read -r -a after < <(counters "$port")
    python3 - "$label" "$name" "$size" "${before[@]}" "${after[@]}" "$t0" "$t1" <<'PY'
import json, sys
label, name, size = sys.argv[1:4]
before, after = [int(x) for x in sys.argv[4:8]], [int(x) for x in sys.argv[8:12]]
t0, t1 = float(sys.argv[12]), float(sys.argv[13])
rb, rr, db, dr = (a - b for a, b in zip(after, before))
size, fetched = int(size), rb + db
print(f"{label:>9} {name:<13} {size / 1e6:6.1f} MB: fetched {fetched / 1e6:7.1f} MB = {fetched / size:5.2f} x the shard"
      f" (ranged {rb / 1e6:.1f} MB in {rr} requests, downloads {db / 1e6:.1f} MB in {dr}), {t1 - t0:5.1f} s")
PY
    echo "            $(grep -E 'tasks \(' "$WORK/$label-$name.log" | tail -1)"
  done
  kill "$wpid" 2>/dev/null || true
  wait "$wpid" 2>/dev/null || true
}

echo "shard: $N images, $PER samples a task; load average $(cut -d' ' -f1-3 /proc/loadavg)"
if [ -n "${REF_QUIRE:-}" ]; then
  run_build reference "$REF_QUIRE"
fi
run_build this "$QUIRE"
