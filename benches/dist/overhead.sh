#!/usr/bin/env bash
# The same text-layer job embedded (`quire run`) and distributed (1
# coordinator + 2 workers over a real nats-server, inputs and results in
# Garage S3 on loopback), on this machine, in the same run. Not a test.
#
#   benches/dist/overhead.sh [REPS]          # default 3 repetitions, alternating
#   COPIES=5 WORKER_SLOTS=2 PROFILE=dev benches/dist/overhead.sh 5
#   STORE=local ... benches/dist/overhead.sh   # inputs and results in local folders, no S3
#
# Corpus: the real Debian manuals of benches/render/bench.sh (661 pages),
# fetched into BENCH_DIR (default /root/bench-pdfs). Same parallelism on both
# sides: `quire run` renders with 2 pdfium processes; each worker has 1
# render process and WORKER_SLOTS task slots (default 1). The distributed wall time runs from submission to
# the manifest written by `coordinator --wait` (planning, worker-side splits,
# downloads, uploads, Markdown included); workers are started beforehand.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
reps="${1:-3}"
bench="${BENCH_DIR:-/root/bench-pdfs}"
for p in r-doc-pdf gnuplot-doc asymptote-doc; do
  ls "$bench/deb/${p}"_*.deb >/dev/null 2>&1 || (mkdir -p "$bench/deb" && cd "$bench/deb" && apt-get download "$p" >/dev/null 2>&1)
  dpkg-deb -x "$bench/deb/${p}"_*.deb "$bench/x"
done
files=("$bench/x/usr/share/R/doc/manual/R-intro.pdf" "$bench/x/usr/share/R/doc/manual/R-data.pdf"
       "$bench/x/usr/share/doc/gnuplot/gnuplot.pdf" "$bench/x/usr/share/doc/asymptote/asymptote.pdf")
source "$ROOT/benches/dist/build.sh"
export QUIRE_PDFIUM="${QUIRE_PDFIUM:-$("$ROOT/scripts/setup-pdfium.sh" "$HOME/.cache/quire-tools/pdfium")}"
WORK="$(mktemp -d /tmp/quire-overhead-bench.XXXX)"
source "$ROOT/benches/dist/services.sh"
# COPIES > 1: each manual several times under other names (a bigger job).
mkdir -p "$WORK/in"
for c in $(seq "${COPIES:-1}"); do
  for f in "${files[@]}"; do cp "$f" "$WORK/in/c$c-$(basename "$f")"; done
done
"$S3PUT" "s3://$BUCKET/in" "$WORK"/in/*.pdf 2>/dev/null
for i in 1 2; do
  "$QUIRE" --render-procs 1 worker --nats "$NATS_URL" --workers "${WORKER_SLOTS:-1}" >"$WORK/worker$i.log" 2>&1 &
  PIDS+=($!)
done
sleep 1
# CPU seconds (user+sys) used so far by each service and worker process,
# its live descendants (a worker's render processes) included.
cpu_all() {
  python3 - "${PIDS[@]}" <<'PY'
import os, sys
tick = os.sysconf("SC_CLK_TCK")
stat = {}
for d in os.listdir("/proc"):
    if d.isdigit():
        try:
            f = open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        stat[int(d)] = (int(f[1]), sum(int(x) for x in f[11:15]) / tick)
def tree(p):
    return stat.get(p, (0, 0))[1] + sum(tree(c) for c, (pp, _) in stat.items() if pp == p)
print(" ".join(f"{tree(int(p)):.2f}" for p in sys.argv[1:]))
PY
}
emb=(); dist=()
for r in $(seq "$reps"); do
  t0=$(date +%s.%N)
  /usr/bin/time -f '%U %S' -o "$WORK/emb$r.time" "$QUIRE" --render-procs 2 run "$WORK/in" --out "$WORK/emb" --job "e$r" --engine text-layer --quiet >/dev/null 2>"$WORK/emb$r.log"
  t1=$(date +%s.%N)
  before=($(cpu_all))
  if [ "${STORE:-s3}" = local ]; then din="$WORK/in" dout="$WORK/dist"; else din="s3://$BUCKET/in" dout="s3://$BUCKET/out"; fi
  /usr/bin/time -f '%U %S' -o "$WORK/coord$r.time" "$QUIRE" coordinator --nats "$NATS_URL" --input "$din" --out "$dout" --job "d$r" \
    --engine text-layer --wait >"$WORK/dist$r.json" 2>"$WORK/dist$r.log"
  t2=$(date +%s.%N)
  after=($(cpu_all))
  emb+=("$(echo "$t1 - $t0" | bc)"); dist+=("$(echo "$t2 - $t1" | bc)")
  echo "rep $r: embedded ${emb[-1]} s, distributed ${dist[-1]} s"
  printf '  CPU s: embedded %s (render processes included); distributed: coordinator %s, nats/garage/worker1/worker2 (renderers included)' \
    "$(awk '{print $1+$2}' "$WORK/emb$r.time")" "$(awk '{print $1+$2}' "$WORK/coord$r.time")"
  for i in "${!PIDS[@]}"; do printf ' %.2f' "$(echo "${after[$i]} - ${before[$i]}" | bc)"; done; echo
done
python3 - "$WORK" "${emb[*]}" "${dist[*]}" <<'PY'
import json, statistics, sys
work, e, d = sys.argv[1], [float(x) for x in sys.argv[2].split()], [float(x) for x in sys.argv[3].split()]
pages = json.load(open(f"{work}/emb/e1/manifest.json"))["counts"]["records"]
me, md = statistics.median(e), statistics.median(d)
print(f"pages {pages}; median embedded {me:.2f} s ({pages/me:.0f} pages/s), distributed {md:.2f} s ({pages/md:.0f} pages/s)")
print(f"distributed / embedded wall time: {md/me:.3f} (overhead {100*(md/me-1):+.1f}%)")
PY
echo "CPU time of the services and workers over all distributed runs (they idle during the embedded ones):"
ps -o comm=,cputime= -p "$(IFS=,; echo "${PIDS[*]}")" | sed 's/^/  /'
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg) on $(nproc) CPUs"
