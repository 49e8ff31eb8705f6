# Sourced by the distributed benchmarks: starts nats-server (JetStream) and a
# single-node Garage on free loopback ports in $WORK, stops them on exit.
# Sets NATS_URL, QUIRE_S3_ENDPOINT, BUCKET and the AWS_* variables.
eval "$("$ROOT/scripts/install-services.sh")"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 200); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.1; done; echo "port $1 never opened" >&2; exit 1; }
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
np=$(free_port)
"$QUIRE_NATS_SERVER" -js -a 127.0.0.1 -p "$np" -sd "$WORK/nats" >"$WORK/nats.log" 2>&1 &
PIDS+=($!)
wait_port "$np"
export NATS_URL="nats://127.0.0.1:$np"
export AWS_ACCESS_KEY_ID=GKbench0123456789abcdef0123 AWS_SECRET_ACCESS_KEY=0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef
export AWS_REGION=garage AWS_EC2_METADATA_DISABLED=true BUCKET=bench
sp=$(free_port); rp=$(free_port)
mkdir -p "$WORK/garage"
cat >"$WORK/garage/garage.toml" <<TOML
metadata_dir = "$WORK/garage/meta"
data_dir = "$WORK/garage/data"
db_engine = "lmdb"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:$rp"
rpc_public_addr = "127.0.0.1:$rp"
rpc_secret = "$AWS_SECRET_ACCESS_KEY"
[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:$sp"
root_domain = ".s3.garage.localhost"
TOML
GARAGE_DEFAULT_ACCESS_KEY=$AWS_ACCESS_KEY_ID GARAGE_DEFAULT_SECRET_KEY=$AWS_SECRET_ACCESS_KEY GARAGE_DEFAULT_BUCKET=$BUCKET \
  RUST_LOG=garage=warn "$QUIRE_GARAGE" -c "$WORK/garage/garage.toml" server --single-node --default-bucket >"$WORK/garage.log" 2>&1 &
PIDS+=($!)
wait_port "$sp"
export QUIRE_S3_ENDPOINT="http://127.0.0.1:$sp" QUIRE_S3_PATH_STYLE=true
# Garage answers before its bucket exists: wait until a put goes through.
for _ in $(seq 100); do "$S3PUT" "s3://$BUCKET/ready" "$WORK/garage/garage.toml" 2>/dev/null && break; sleep 0.2; done
