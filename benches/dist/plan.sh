#!/usr/bin/env bash
# Coordinator planning rate and peak memory for large synthetic corpora on S3
# (Garage on loopback) with a real nats-server. Not a test: prints figures.
#
#   benches/dist/plan.sh [N...]      # default: 10000 50000 100000
#
# For each N: N small objects under s3://bench/cN/ (100 "folders"), then
# `quire coordinator --input s3://bench/cN --out s3://bench/out` timed with
# /usr/bin/time (wall seconds, peak RSS). The coordinator lists, plans and
# publishes one whole-document task per object; it never downloads inputs.
# A second submission of the same job measures the resume path (every task
# already queued: all duplicates).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
sizes=("${@:-10000 50000 100000}")
read -r -a sizes <<<"${sizes[*]}"
source "$ROOT/benches/dist/build.sh"
WORK="$(mktemp -d /tmp/quire-plan-bench.XXXX)"
source "$ROOT/benches/dist/services.sh"
printf '%-8s %-10s %-12s %-10s %-10s\n' objects pass seconds objects/s peak_MB
for n in "${sizes[@]}"; do
  "$S3PUT" "s3://$BUCKET/c$n" --synthetic "$n" 2>>"$WORK/put.log"
  for pass in first again; do
    /usr/bin/time -f '%e %M' -o "$WORK/time" "$QUIRE" coordinator --nats "$NATS_URL" \
      --input "s3://$BUCKET/c$n" --out "s3://$BUCKET/out" --job "plan-$n" --engine text-layer \
      >"$WORK/sub-$n-$pass.json" 2>"$WORK/coord-$n-$pass.log"
    read -r secs kb <"$WORK/time"
    python3 - "$n" "$pass" "$secs" "$kb" "$WORK/sub-$n-$pass.json" <<'PY'
import json, sys
n, p, s, kb, f = int(sys.argv[1]), sys.argv[2], float(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
sub = json.load(open(f))
assert sub["documents"] == n, sub
print(f"{n:<8} {p:<10} {s:<12.2f} {n / s:<10.0f} {kb / 1024:<10.1f} published={sub['published']} duplicates={sub['duplicates']}")
PY
  done
done
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg) on $(nproc) CPUs"
