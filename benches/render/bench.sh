#!/usr/bin/env bash
# Render throughput: quire-render (pdfium) vs poppler's pdftoppm (what olmOCR uses), rendering
# every page of real multi-page PDFs to RGB at long side 1288 px, in the same run.
#
#   benches/render/bench.sh [PROCS]          # PROCS: parallel processes for the N-way rows (default: nproc)
#
# Env: BENCH_DIR (downloads, default /root/bench-pdfs), LONG_SIDE (1288), QUIRE_PDFIUM
# (default: scripts/setup-pdfium.sh into $BENCH_DIR/pdfium), CARGO_TARGET_DIR.
#
# The PDFs are real documents shipped by Debian doc packages (LaTeX manuals with text, tables,
# plots and vector figures). They are fetched with `apt-get download` and unpacked with
# `dpkg-deb -x` into BENCH_DIR (nothing is installed, nothing is committed).
# pdftoppm writes PPM files to a tmpfs (/dev/shm), so its disk cost is a memcpy; quire keeps
# the RGB buffer in memory and drops it (the example's --keep holds them all instead).
# Both anti-alias text, vectors and images (pdftoppm defaults; pdfium-render defaults).
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
procs="${1:-$(nproc)}"
long="${LONG_SIDE:-1288}"
bench="${BENCH_DIR:-/root/bench-pdfs}"
target="${CARGO_TARGET_DIR:-$root/target}"
shm="/dev/shm/quire-render-bench.$$"
mkdir -p "$bench/deb" "$shm"
trap 'rm -rf "$shm"' EXIT

# 1. Real PDFs from Debian.
pkgs=(r-doc-pdf gnuplot-doc asymptote-doc)
for p in "${pkgs[@]}"; do
  if ! ls "$bench/deb/${p}"_*.deb >/dev/null 2>&1; then
    (cd "$bench/deb" && apt-get download "$p" >/dev/null 2>&1)
  fi
  dpkg-deb -x "$bench/deb/${p}"_*.deb "$bench/x"
done
files=(
  "$bench/x/usr/share/R/doc/manual/R-intro.pdf"      # 113 pages, LaTeX text + code
  "$bench/x/usr/share/R/doc/manual/R-data.pdf"       # 41 pages
  "$bench/x/usr/share/doc/gnuplot/gnuplot.pdf"       # 311 pages, text + plots
  "$bench/x/usr/share/doc/asymptote/asymptote.pdf"   # 196 pages, text + vector figures
)
pages=0
for f in "${files[@]}"; do pages=$((pages + $(pdfinfo "$f" | awk '/^Pages:/{print $2}'))); done

# 2. libpdfium and the bench binary.
export QUIRE_PDFIUM="${QUIRE_PDFIUM:-$("$root/scripts/setup-pdfium.sh" "$bench/pdfium")}"
(cd "$root" && cargo build --release -q -p quire-render --example render_bench)
bin="$target/release/examples/render_bench"

echo "# $(date -u +%FT%TZ) $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "# ${#files[@]} files, $pages pages, long side $long px; poppler $(pdftoppm -v 2>&1 | head -1 | awk '{print $3}'), pdfium $(basename "$QUIRE_PDFIUM")"

rss_of() { awk '/Maximum resident set size/{print int($6/1024)}' "$1"; }

# 3. poppler, one process, one pdftoppm per file (all its pages in one run).
poppler_1() {
  for f in "${files[@]}"; do
    pdftoppm -scale-to "$long" "$f" "$shm/p"
    rm -f "$shm"/p*
  done
}
# poppler, PROCS processes: each file split into PROCS page ranges, run side by side.
poppler_n() {
  for f in "${files[@]}"; do
    n=$(pdfinfo "$f" | awk '/^Pages:/{print $2}')
    for k in $(seq 0 $((procs - 1))); do
      first=$((k * n / procs + 1)); last=$(((k + 1) * n / procs))
      [ "$first" -le "$last" ] && echo "$first $last"
    done | xargs -P "$procs" -n 2 sh -c 'pdftoppm -f "$0" -l "$1" -scale-to '"$long"' "'"$f"'" "'"$shm"'/p$0"'
    rm -f "$shm"/p*
  done
}

row() { # name pages secs rss cpu_secs
  awk -v n="$1" -v p="$2" -v s="$3" -v r="$4" -v c="$5" 'BEGIN{printf "%-40s pages=%d secs=%6.2f pages_per_s=%6.1f cpu_secs=%6.2f pages_per_cpu_s=%6.1f peak_rss_mb=%s\n", n, p, s, p/s, c, p/c, r}'
}
cpu_of() { awk '/User time/{u=$4} /System time/{s=$4} END{print u+s}' "$1"; }

t0=$(date +%s.%N); /usr/bin/time -v -o "$shm/t1" bash -c "$(declare -p files shm long); $(declare -f poppler_1); poppler_1"; t1=$(date +%s.%N)
pop1=$(echo "$t1 - $t0" | bc -l); row "pdftoppm x1" "$pages" "$pop1" "$(rss_of "$shm/t1")" "$(cpu_of "$shm/t1")"
export -f poppler_n 2>/dev/null || true
t0=$(date +%s.%N); /usr/bin/time -v -o "$shm/tn" bash -c "$(declare -p files shm long procs); $(declare -f poppler_n); poppler_n"; t1=$(date +%s.%N)
popn=$(echo "$t1 - $t0" | bc -l); row "pdftoppm x$procs (page ranges)" "$pages" "$popn" "$(rss_of "$shm/tn") (largest)" "$(cpu_of "$shm/tn")"

last_secs=0
run_quire() { # label args...
  local label="$1"; shift
  "$bin" "$@" "${files[@]}" > "$shm/q.out"
  local line; line="$(tail -1 "$shm/q.out")"
  last_secs="$(sed -E 's/^pages=[0-9]+ secs=([0-9.]+).*/\1/' <<<"$line")"
  row "$label" "$pages" "$last_secs" "$(sed -E 's/.*peak_rss_mb=([0-9]+).*/\1/' <<<"$line") (sum)" "$(sed -E 's/.*cpu_secs=([0-9.]+).*/\1/' <<<"$line")"
}
run_quire "quire-render x1 (+text)" --long-side "$long"; q1=$last_secs
run_quire "quire-render x1 (no text)" --long-side "$long" --no-text
run_quire "quire-render x$procs procs (+text)" --long-side "$long" --procs "$procs"; qn=$last_secs
run_quire "quire-render x$procs procs (+text, --keep)" --long-side "$long" --procs "$procs" --keep

ratio() { echo "scale=2; $1 / $2" | bc -l; }
echo "# load average during the run: $(cut -d' ' -f1-3 /proc/loadavg) (other work on the machine slows every row)"
echo "# speed-up vs pdftoppm x1: quire x1 $(ratio "$pop1" "$q1")x, quire x$procs $(ratio "$pop1" "$qn")x;" \
     "vs pdftoppm x$procs: quire x$procs $(ratio "$popn" "$qn")x"
