#!/usr/bin/env bash
# Builds the Kubernetes node and control-plane binaries that scripts/test-cluster.sh
# runs (kube-apiserver, kube-controller-manager, kube-scheduler, kubelet,
# kube-proxy, kubectl) from the Go module k8s.io/kubernetes, and caches them.
#
#   scripts/cluster/build-k8s.sh DEST
#
# k8s.io/kubernetes requires its staging modules (k8s.io/api, ...) at v0.0.0 and
# replaces them with folders of its own repository, which a module that depends
# on it does not see; a small go.mod here points each of them at the published
# version of the same minor instead. 1.34 is used because it is the newest minor
# that runs on both Debian's containerd 1.6 and cgroup v1 without opting out of
# deprecation guards. Built without cgo, with the version stamped in (Helm
# compares the server's version with the chart's kubeVersion). DEST/.version
# records what was built; a DEST holding the same version is left as it is.
set -euo pipefail
dest="${1:?usage: build-k8s.sh DEST}"
k8s_version="${QUIRE_K8S_VERSION:-v1.34.4}"
staging_version="v0${k8s_version#v1}"
cmds=(kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl)

if [ "$(cat "$dest/.version" 2>/dev/null)" = "$k8s_version" ]; then
  exit 0
fi
command -v go >/dev/null 2>&1 || { echo "build-k8s.sh: go is missing (Go 1.24 or newer builds Kubernetes 1.34)" >&2; exit 1; }

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
staging=(api apiextensions-apiserver apimachinery apiserver cli-runtime client-go cloud-provider
  cluster-bootstrap code-generator component-base component-helpers controller-manager cri-api
  cri-client csi-translation-lib dynamic-resource-allocation endpointslice externaljwt kms
  kube-aggregator kube-controller-manager kube-proxy kube-scheduler kubectl kubelet metrics
  mount-utils pod-security-admission sample-apiserver)
{
  echo "module quire.local/k8s-build"
  echo
  echo "go 1.24"
  echo
  echo "require k8s.io/kubernetes $k8s_version"
  echo
  echo "replace ("
  for m in "${staging[@]}"; do echo "	k8s.io/$m => k8s.io/$m $staging_version"; done
  echo ")"
} > "$work/go.mod"
{
  echo "//go:build tools"
  echo
  echo "// Package tools only names the commands this module builds."
  echo "package tools"
  echo
  echo "import ("
  for c in "${cmds[@]}"; do echo "	_ \"k8s.io/kubernetes/cmd/$c\""; done
  echo ")"
} > "$work/tools.go"

cd "$work"
export CGO_ENABLED=0 GOFLAGS="${GOFLAGS:--p=2} -mod=mod -buildvcs=false"
go mod tidy >&2
minor="${k8s_version#v1.}"; minor="${minor%%.*}"
ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ldflags+=" -X $pkg.gitVersion=$k8s_version -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
  ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
done
mkdir -p "$dest.tmp"
for c in "${cmds[@]}"; do
  t=$SECONDS
  go build -trimpath -ldflags "$ldflags" -o "$dest.tmp/$c" "k8s.io/kubernetes/cmd/$c"
  echo "build-k8s.sh: $c built in $((SECONDS - t)) s" >&2
done
echo "$k8s_version" > "$dest.tmp/.version"
rm -rf "$dest"
mv "$dest.tmp" "$dest"
