#!/usr/bin/env bash
# Builds kube-router from the Go module github.com/cloudnativelabs/kube-router/v2
# for scripts/test-cluster.sh, which runs only its NetworkPolicy controller
# (--run-firewall) as a host process, and caches it.
#
#   scripts/cluster/build-kube-router.sh DEST
#
# The version is the newest v2 the Go module proxy serves here (v2.1.0; newer
# ones are not served). Its reported flaw (GHSA-phqm-jgc3-qf8g: the service
# proxy trusts Services' external and load-balancer IPs) is in the proxy
# module, which the test cluster does not run (--run-service-proxy=false).
# Built without cgo, with the version stamped in. DEST/.version records what
# was built; a DEST holding the same version is left as it is.
set -euo pipefail
dest="${1:?usage: build-kube-router.sh DEST}"
version="${QUIRE_KUBE_ROUTER_VERSION:-v2.1.0}"
if [ "$(cat "$dest/.version" 2>/dev/null)" = "$version" ] && [ -x "$dest/kube-router" ]; then
  exit 0
fi
command -v go >/dev/null 2>&1 || { echo "build-kube-router.sh: go is missing" >&2; exit 1; }
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$work"
export CGO_ENABLED=0 GOFLAGS="${GOFLAGS:--p=2} -mod=mod -buildvcs=false"
kmod="$(go mod download -json "github.com/cloudnativelabs/kube-router/v2@$version" | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')"
{
  echo "module quire.local/kube-router-build"
  echo
  echo "go $(awk '$1 == "go" {print $2; exit}' "$kmod")"
  echo
  echo "require github.com/cloudnativelabs/kube-router/v2 $version"
  # Packages that kube-router's docker client imports but no go.mod in the
  # graph names (docker v25 is +incompatible): pinned to the versions
  # `go mod tidy` found for them when this was written, or it would take
  # whatever is newest on each build.
  echo
  echo "require ("
  echo "	github.com/Azure/go-ansiterm v0.0.0-20261006220739-8c912ac31dd4"
  echo "	github.com/cenkalti/backoff/v4 v4.3.0"
  echo "	go.opentelemetry.io/otel/exporters/otlp/otlptrace v1.47.0"
  echo "	go.opentelemetry.io/proto/otlp v1.11.1"
  echo ")"
} > go.mod
{
  echo "//go:build tools"
  echo
  echo "// Package tools only names the command this module builds."
  echo "package tools"
  echo
  echo "import _ \"github.com/cloudnativelabs/kube-router/v2/cmd/kube-router\""
} > tools.go
go mod tidy >&2
mkdir -p "$dest.tmp"
t=$SECONDS
go build -trimpath \
  -ldflags "-s -w -X github.com/cloudnativelabs/kube-router/v2/pkg/version.Version=$version -X github.com/cloudnativelabs/kube-router/v2/pkg/version.BuildDate=1970-01-01T00:00:00Z" \
  -o "$dest.tmp/kube-router" github.com/cloudnativelabs/kube-router/v2/cmd/kube-router
echo "build-kube-router.sh: kube-router $version built in $((SECONDS - t)) s" >&2
echo "$version" > "$dest.tmp/.version"
rm -rf "$dest"
mv "$dest.tmp" "$dest"
