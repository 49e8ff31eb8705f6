#!/usr/bin/env bash
# Builds KEDA's operator and metrics adapter from the Go module
# github.com/kedacore/keda/v2 for scripts/test-cluster.sh, and caches them.
#
#   scripts/cluster/build-keda.sh DEST
#
# KEDA's go.mod replaces some of its dependencies (Kubernetes modules pinned
# to one patch release, licences); a module that depends on KEDA does not
# inherit those, so the replace block is copied from KEDA's own go.mod into a
# small build module here. v2.19 pins the Kubernetes 1.34 libraries (its
# replace block: k8s.io/client-go v0.34.3), the minor of the test cluster,
# and builds with Go 1.25 or later. DEST/.version records what was built.
# Measured on the shared 2-core machine: 17 min with an empty Go build cache
# (2.6 GB of it), 0.26 GB kept.
set -euo pipefail
dest="${1:?usage: build-keda.sh DEST}"
version="${QUIRE_KEDA_VERSION:-v2.19.0}"
cmds=(operator adapter)
if [ "$(cat "$dest/.version" 2>/dev/null)" = "$version" ]; then
  exit 0
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$work"
export CGO_ENABLED=0 GOFLAGS="${GOFLAGS:--p=2} -mod=mod -buildvcs=false"
kmod="$(go mod download -json "github.com/kedacore/keda/v2@$version" | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')"
{
  echo "module quire.local/keda-build"
  echo
  echo "go $(awk '$1 == "go" {print $2; exit}' "$kmod")"
  echo
  echo "require github.com/kedacore/keda/v2 $version"
  echo
  # The replace block and single-line replaces, without local paths.
  awk '/^replace \($/ {inblock = 1; next} inblock && /^\)/ {inblock = 0; next}
       inblock && /=>/ && $0 !~ /=> *\.\.?\// {print "replace " $0}
       /^replace [^(]/ && $0 !~ /=> *\.\.?\// {print}' "$kmod"
} > go.mod
{
  echo "//go:build tools"
  echo
  echo "// Package tools only names the commands this module builds."
  echo "package tools"
  echo
  echo "import ("
  for c in "${cmds[@]}"; do echo "	_ \"github.com/kedacore/keda/v2/cmd/$c\""; done
  echo ")"
} > tools.go
go mod tidy >&2
mkdir -p "$dest.tmp"
for c in "${cmds[@]}"; do
  t=$SECONDS
  go build -trimpath -ldflags "-s -w -X github.com/kedacore/keda/v2/version.Version=$version" \
    -o "$dest.tmp/keda-$c" "github.com/kedacore/keda/v2/cmd/$c"
  echo "build-keda.sh: keda-$c built in $((SECONDS - t)) s" >&2
done
echo "$version" > "$dest.tmp/.version"
rm -rf "$dest"
mv "$dest.tmp" "$dest"
