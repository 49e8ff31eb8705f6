#!/usr/bin/env bash
# What planning the second night of a standing job costs against the first, in distributed
# mode: a bucket prefix of N objects (default 100,000 tiny PNGs in 100 "folders") on a local
# Garage, a local nats-server, `quire coordinator` and two `quire worker`s. Night 1 plans and
# does them all; then NEW_PCT% new objects arrive and night 2 runs. Not a test: prints figures.
#
# Each night is two coordinator calls of the same run: the first without --wait is what is
# measured (list, plan, publish: its "planned in" time, its wall time, and the S3 requests
# Garage answered meanwhile, by kind; no worker runs then); the second, with --wait and the
# workers started,
# joins the run once the workers are done and closes it (run manifest, job manifest), as a
# nightly CronJob's coordinator does in one call. Garage (built without metrics here) logs
# every request it answers; they are counted from its log. The floor is the listing: a
# ListObjectsV2 walk of the same prefix (N/1000 requests; its time, with boto3, is no floor
# for quire's planning time, only its request count is).
#
#   benches/incremental/distributed.sh
#   N=20000 REPEAT=2 benches/incremental/distributed.sh
#   QUIRE=target/release/quire N=10000 benches/incremental/distributed.sh
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
N="${N:-100000}"
NEW_PCT="${NEW_PCT:-1}"
REPEAT="${REPEAT:-1}"
PER="${PER:-256}"
if [ -z "${QUIRE:-}" ]; then
  export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
  cargo build -q --release -p quire
  QUIRE="$CARGO_TARGET_DIR/release/quire"
fi
export QUIRE_PDFIUM="${QUIRE_PDFIUM:-$("$ROOT/scripts/setup-pdfium.sh" "$HOME/.cache/quire-tools/pdfium")}"
eval "$("$ROOT/scripts/install-services.sh")"
TOOLS="${QUIRE_TOOLS:-$HOME/.cache/quire-tools}"
VENV="$TOOLS/bench-venv"
[ -x "$VENV/bin/python" ] || { python3 -m venv "$VENV" && "$VENV/bin/pip" install -q boto3==1.42.4; }
PY="$VENV/bin/python"

WORK="$(mktemp -d /tmp/quire-incr-dist.XXXX)"
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; [ -n "${KEEP:-}" ] && echo "kept $WORK" || rm -rf "$WORK"; }
trap cleanup EXIT
port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
NATS_PORT=$(port); S3_PORT=$(port); RPC_PORT=$(port); ADMIN_PORT=$(port)
export AWS_ACCESS_KEY_ID=GKbench0123456789abcdef01 AWS_SECRET_ACCESS_KEY=0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef
export AWS_REGION=garage AWS_EC2_METADATA_DISABLED=true QUIRE_S3_ENDPOINT="http://127.0.0.1:$S3_PORT" QUIRE_S3_PATH_STYLE=true
BUCKET=bench
mkdir -p "$WORK/garage" "$WORK/nats"
cat >"$WORK/garage/garage.toml" <<EOF
metadata_dir = "$WORK/garage/meta"
data_dir = "$WORK/garage/data"
db_engine = "lmdb"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:$RPC_PORT"
rpc_public_addr = "127.0.0.1:$RPC_PORT"
rpc_secret = "$AWS_SECRET_ACCESS_KEY"
[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:$S3_PORT"
root_domain = ".s3.garage.localhost"
[admin]
api_bind_addr = "127.0.0.1:$ADMIN_PORT"
EOF
GARAGE_DEFAULT_ACCESS_KEY=$AWS_ACCESS_KEY_ID GARAGE_DEFAULT_SECRET_KEY=$AWS_SECRET_ACCESS_KEY GARAGE_DEFAULT_BUCKET=$BUCKET \
  RUST_LOG=garage=warn,garage_api_common=info "$QUIRE_GARAGE" -c "$WORK/garage/garage.toml" server --single-node --default-bucket >"$WORK/garage.log" 2>&1 &
PIDS+=($!)
"$QUIRE_NATS_SERVER" -a 127.0.0.1 -p "$NATS_PORT" -js -sd "$WORK/nats" >"$WORK/nats.log" 2>&1 &
PIDS+=($!)
NATS="nats://127.0.0.1:$NATS_PORT"

# Garage logs every S3 request it answers (garage_api_common at info): a mark is the log's
# line count; `delta MARK1 MARK2` prints the requests in between, in all and by kind.
requests() { wc -l <"$WORK/garage.log"; }
delta() {
  sed -n "$(($1 + 1)),$2p" "$WORK/garage.log" | python3 -c '
import re, sys, collections
c = collections.Counter()
for line in sys.stdin:
    m = re.search(r"generic_server\S*\s+\S+ (?:\(key \S+\) )?(GET|PUT|HEAD|POST|DELETE) (\S+)$", line.strip())
    if not m:
        continue
    method, path = m.groups()
    if method == "GET" and ("list-type" in path or "?" in path and path.split("?")[0].count("/") == 1):
        c["List"] += 1
    else:
        c[method.capitalize()] += 1
print(sum(c.values()), " ".join(f"{k}={v}" for k, v in sorted(c.items())))'
}

"$PY" - "$N" "$ROOT/tests/fixtures/docs/gray.png" <<'PY'
import os, sys, time, boto3, concurrent.futures as cf
from botocore.config import Config
n, seed = int(sys.argv[1]), open(sys.argv[2], "rb").read()
s3 = boto3.client("s3", endpoint_url=os.environ["QUIRE_S3_ENDPOINT"], region_name="garage",
                  config=Config(s3={"addressing_style": "path"}, max_pool_connections=32))
t0 = time.time()
while True:
    try:
        s3.head_bucket(Bucket="bench"); break
    except Exception:
        if time.time() - t0 > 60: raise
        time.sleep(0.3)
with cf.ThreadPoolExecutor(32) as ex:
    list(ex.map(lambda i: s3.put_object(Bucket="bench", Key=f"in/d{i % 100:03d}/img-{i:07d}.png", Body=seed), range(n)))
print(f"uploaded {n} objects in {time.time() - t0:.1f}s", file=sys.stderr)
PY

# Workers run only between a night's planning and its close, so that the requests counted
# while the coordinator plans are its own.
WORKERS=()
start_workers() {
  for i in 0 1; do
    "$QUIRE" worker --nats "$NATS" --workers 4 --grace-s 2 >>"$WORK/worker$i.log" 2>&1 &
    WORKERS+=($!); PIDS+=($!)
  done
}
stop_workers() { kill "${WORKERS[@]}" 2>/dev/null || true; wait "${WORKERS[@]}" 2>/dev/null || true; WORKERS=(); }

coord() {  # run [--wait]
  "$QUIRE" coordinator --nats "$NATS" --input "s3://$BUCKET/in" --out "s3://$BUCKET/out" --job bench --run "$1" \
    --engine text-layer --task caption --images-per-task "$PER" --dataset none "${@:2}" || [ $? = 3 ]
}

# One night: planning (measured), then the wait that closes the run.
night() {
  local run="$1" t0 t1 before after log="$WORK/$1.log"
  before=$(requests)
  t0=$(date +%s.%N)
  coord "$run" >/dev/null 2>"$log"
  t1=$(date +%s.%N)
  after=$(requests)
  local plan
  plan=$(sed -n 's/.*planned in \([0-9.]*\)s.*/\1/p' "$log" | tail -1)
  start_workers
  coord "$run" --wait --poll-ms 2000 >/dev/null 2>"$WORK/$1-wait.log"
  stop_workers
  echo "$(echo "$t1 - $t0" | bc) ${plan:-0} $(delta "$before" "$after")"
}

ratio() { python3 -c "import sys; a, b = float(sys.argv[1]), float(sys.argv[2]); print(f'{a / b:.3f}' if b else 'n/a')" "$1" "$2"; }

echo "N=$N objects on Garage, $NEW_PCT% new on night 2, groups of $PER, $REPEAT repeats ($(nproc) cores)"
for r in $(seq 1 "$REPEAT"); do
  # Start from nothing: the job's output and the new objects of the last repeat go.
  "$PY" - <<'PY'
import os, boto3
from botocore.config import Config
s3 = boto3.client("s3", endpoint_url=os.environ["QUIRE_S3_ENDPOINT"], region_name="garage", config=Config(s3={"addressing_style": "path"}))
for prefix in ("out/", "in/"):
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket="bench", Prefix=prefix):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", []) if prefix == "out/" or "/new-" in o["Key"]]
        if keys:
            s3.delete_objects(Bucket="bench", Delete={"Objects": keys})
PY
  # The floor: one walk of the listing.
  lb=$(requests); t0=$(date +%s.%N)
  "$PY" -c '
import os, boto3
from botocore.config import Config
s3 = boto3.client("s3", endpoint_url=os.environ["QUIRE_S3_ENDPOINT"], region_name="garage", config=Config(s3={"addressing_style": "path"}))
print(sum(len(p.get("Contents", [])) for p in s3.get_paginator("list_objects_v2").paginate(Bucket="bench", Prefix="in/")))' >/dev/null
  t1=$(date +%s.%N); la=$(requests)
  list_s=$(echo "$t1 - $t0" | bc); read -r list_req _ < <(delta "$lb" "$la")
  read -r w1 p1 q1 ops1 < <(night "n1-$r")
  "$PY" - "$N" "$NEW_PCT" "$ROOT/tests/fixtures/docs/gray.png" <<'PY'
import os, sys, boto3
from botocore.config import Config
n, pct, seed = int(sys.argv[1]), float(sys.argv[2]), open(sys.argv[3], "rb").read()
s3 = boto3.client("s3", endpoint_url=os.environ["QUIRE_S3_ENDPOINT"], region_name="garage", config=Config(s3={"addressing_style": "path"}))
for i in range(int(n * pct / 100)):
    s3.put_object(Bucket="bench", Key=f"in/d{i % 100:03d}/new-{i:07d}.png", Body=seed)
PY
  read -r w2 p2 q2 ops2 < <(night "n2-$r")
  echo "repeat $r: listing floor: $list_req requests (${list_s}s with boto3, which parses slower than quire: the request count is the floor)"
  echo "  night 1 planning: ${p1}s (coordinator wall ${w1}s), $q1 S3 requests: $ops1"
  echo "  night 2 planning: ${p2}s (coordinator wall ${w2}s), $q2 S3 requests: $ops2"
  echo "  night 2 / night 1: planning $(ratio "$p2" "$p1"), wall $(ratio "$w2" "$w1"), S3 requests $(ratio "$q2" "$q1"); night 2 / listing floor: requests $(ratio "$q2" "$list_req"), time $(ratio "$p2" "$list_s")"
  grep -h "^job .* run " "$WORK/n2-$r.log" | sed 's/^/  night 2: /'
done
