# Sourced by the distributed benchmarks: builds `quire` and the `s3_put`
# helper and sets QUIRE and S3PUT. PROFILE=dev reuses a test build (the
# workspace's dev profile is optimised); default release.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
PROFILE="${PROFILE:-release}"
cargo build -q --profile "$PROFILE" -p quire
cargo build -q --profile "$PROFILE" -p quire-store --features s3 --example s3_put
bin="$CARGO_TARGET_DIR/$([ "$PROFILE" = dev ] && echo debug || echo "$PROFILE")"
QUIRE="$bin/quire"
S3PUT="$bin/examples/s3_put"
