#!/usr/bin/env bash
# The chart on a real single-node Kubernetes, built here from package
# registries, and the checks of what an operator does with it
# (scripts/cluster/proofs.sh): helm install + helm test; the chart's standing
# job over three nights: one triggered by hand with workers killed mid-run and
# a second Job joining it, one of another date that does only the new objects,
# one fired by the CronJob on its own schedule after a helm upgrade to a new image;
# then KEDA scaling the workers 0 -> N -> 0 around a fourth (skipped loudly
# when --build has not cached KEDA: a plain run does not build it). With
# kube-router cached (--build, likewise), NetworkPolicies are enforced and the
# bundled NATS's policy is shown to refuse a Pod that is not quire's.
#
#   scripts/test-cluster.sh            build what is missing, bring the cluster up, run the checks, tear down
#   scripts/test-cluster.sh --build    only build and cache the binaries (Kubernetes, CoreDNS, KEDA, kube-router, Garage)
#   scripts/test-cluster.sh --cached   exit 0 when the cached binaries a run needs exist (scripts/test.sh asks)
#   QUIRE_CLUSTER_KEEP=1 scripts/test-cluster.sh   on failure, wait for Enter before tearing down
#                                                  (KUBECONFIG is printed) to look around
#   QUIRE_CLUSTER_NETPOL_DROP=1 scripts/test-cluster.sh   connections a NetworkPolicy denies are dropped
#                                                  (time out), as Calico and Cilium do, instead of refused
#                                                  at once as kube-router (and so k3s) does (the default); see below
#
# Needs root, cgroup v1 or v2 with cgroupfs, Go (1.24+), the CPU image and
# Debian base of scripts/test-deploy.sh (it runs first in scripts/test.sh),
# and nats-server + Garage from scripts/install-services.sh.
#
# What runs, all on this machine: etcd (Debian), kube-apiserver,
# kube-controller-manager, kube-scheduler, kubelet and kube-proxy v1.34 (from
# the Go module k8s.io/kubernetes, scripts/cluster/build-k8s.sh), containerd
# and runc (Debian) with the CNI bridge plugin, CoreDNS (its Go module) on the
# host answering for cluster.local; with KEDA, its operator and metrics adapter
# v2.19 (the Go module github.com/kedacore/keda/v2, scripts/cluster/build-keda.sh)
# in the namespace keda, behind the API server's aggregation layer; with
# kube-router, its NetworkPolicy controller only (--run-firewall; v2.1.0 from
# the Go module github.com/cloudnativelabs/kube-router/v2,
# scripts/cluster/build-kube-router.sh) as a host process, with Debian's ipset:
# the filter table's rules and ipsets it keeps enforce every NetworkPolicy on
# the bridged Pod traffic (br_netfilter). Pods live on a bridge this script makes
# (quire-br0, 10.244.0.0/24); the API server, kubelet and CoreDNS listen on
# its address, etcd on loopback. Nothing is routed off the machine: a routing
# rule refuses what would leave the bridge (at the routing decision, so a
# Pod fails at once and no FORWARD rule, kube-router's ACCEPTs included, can
# let it through), the mangle table's FORWARD drops what would enter it from
# elsewhere (and what would leave it), and nothing is masqueraded outward.
# No registry is reachable, so every image is built here with buildah
# (scripts/cluster/images.sh) and imported with `ctr images import`.
#
# Everything is torn down on exit, failed or not: the processes it started (by
# PID), the pods' containers, network namespaces and mounts, the bridge, the
# routing rule and table, the iptables chains and rules it, kube-proxy or
# kube-router made, kube-router's ipsets, the cgroups, the sysctls it
# changed (restored), and its state folder.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

tools="${QUIRE_TOOLS:-$HOME/.cache/quire-tools}"
k8s_version="${QUIRE_K8S_VERSION:-v1.34.4}"
coredns_version="${QUIRE_COREDNS_VERSION:-v1.12.4}"
keda_version="${QUIRE_KEDA_VERSION:-v2.19.0}"
kube_router_version="${QUIRE_KUBE_ROUTER_VERSION:-v2.1.0}"
cache="$tools/k8s"
kbin="$cache/bin-$k8s_version"
coredns="$cache/coredns-$coredns_version/coredns"
kedabin="$cache/keda-$keda_version"
krbin="$cache/kube-router-$kube_router_version"
k8s_src="$(go env GOMODCACHE 2>/dev/null || echo "$HOME/go/pkg/mod")/k8s.io/kubernetes@$k8s_version"

mode=run
case "${1:-}" in
  --build) mode=build ;;
  --cached) mode=cached ;;
  "") ;;
  *) echo "usage: scripts/test-cluster.sh [--build|--cached]" >&2; exit 2 ;;
esac
if [ "$mode" = cached ]; then
  [ -x "$kbin/kubelet" ] && [ -x "$coredns" ] && [ -f "$k8s_src/build/pause/linux/pause.c" ]
  exit
fi
[ "$(id -u)" = 0 ] || { echo "scripts/test-cluster.sh: needs root (it runs a kubelet, containerd and iptables)" >&2; exit 2; }

t_start=$SECONDS
step() { echo "cluster: $* ($((SECONDS - t_start)) s)" >&2; }

# --- tools -----------------------------------------------------------------
debs=(containerd runc containernetworking-plugins etcd-server iptables ipset conntrack buildah gcc libc6-dev poppler-utils)
missing=()
for p in "${debs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq
  # Installing must not start Debian's own containerd or etcd services.
  DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
scripts/cluster/build-k8s.sh "$kbin"
# KEDA is built by --build only: a run without it skips the KEDA check (loudly)
# rather than spending a cold machine's minutes on it.
if [ "$mode" = build ]; then
  step "building KEDA $keda_version (operator, metrics adapter)"
  QUIRE_KEDA_VERSION="$keda_version" scripts/cluster/build-keda.sh "$kedabin"
  step "building kube-router $kube_router_version (its NetworkPolicy controller)"
  QUIRE_KUBE_ROUTER_VERSION="$kube_router_version" scripts/cluster/build-kube-router.sh "$krbin"
fi
# kube-router likewise: without it NetworkPolicies are not enforced and their check is skipped (loudly).
kube_router="" kube_router_note="kube-router not built: NetworkPolicies not enforced"
if [ "$(cat "$krbin/.version" 2>/dev/null)" = "$kube_router_version" ] && [ -x "$krbin/kube-router" ]; then
  kube_router="$krbin/kube-router" kube_router_note="kube-router $kube_router_version"
fi
keda="" keda_note="KEDA not built"
keda_src="$(go env GOMODCACHE 2>/dev/null || echo "$HOME/go/pkg/mod")/github.com/kedacore/keda/v2@$keda_version"
if [ "$(cat "$kedabin/.version" 2>/dev/null)" = "$keda_version" ] && [ -x "$kedabin/keda-operator" ] && [ -x "$kedabin/keda-adapter" ]; then
  keda="$kedabin" keda_note="KEDA $keda_version"
  # Its CRDs are applied from the module.
  [ -d "$keda_src/config/crd/bases" ] || GOFLAGS=-mod=mod go mod download "github.com/kedacore/keda/v2@$keda_version"
fi
if [ ! -x "$coredns" ]; then
  step "building CoreDNS $coredns_version"
  GOBIN="$(dirname "$coredns")" CGO_ENABLED=0 GOFLAGS="${GOFLAGS:--p=2} -buildvcs=false" \
    go install -trimpath -ldflags "-s -w" "github.com/coredns/coredns@$coredns_version"
fi
# The pause image is compiled from the module's source; go build leaves it in the module cache.
[ -f "$k8s_src/build/pause/linux/pause.c" ] || GOFLAGS=-mod=mod go mod download "k8s.io/kubernetes@$k8s_version"
venv="$cache/venv"
pyreqs="helm-python-sdk==0.2.2 PyYAML==6.0.3 boto3==1.42.4"
if [ "$(cat "$venv/.reqs" 2>/dev/null)" != "$pyreqs" ]; then
  rm -rf "$venv"
  python3 -m venv "$venv"
  # shellcheck disable=SC2086
  "$venv/bin/pip" install -q --disable-pip-version-check $pyreqs
  echo "$pyreqs" > "$venv/.reqs"
fi
eval "$(scripts/install-services.sh)"
step "binaries ready (Kubernetes $k8s_version, CoreDNS $coredns_version, $keda_note, $kube_router_note)"
[ "$mode" = build ] && exit 0
images="$cache/images"
scripts/cluster/images.sh "$images" "$k8s_src" "$QUIRE_NATS_SERVER" "$QUIRE_GARAGE" $keda
step "images ready"

# --- the cluster -------------------------------------------------------------
bridge=quire-br0
node_ip="${QUIRE_CLUSTER_NODE_IP:-10.244.0.1}"
pod_cidr="${QUIRE_CLUSTER_POD_CIDR:-10.244.0.0/24}"
svc_cidr="${QUIRE_CLUSTER_SERVICE_CIDR:-10.96.0.0/24}"
node=quire-node
chain=QUIRE-CLUSTER
# The routing table (and rule priority) for what comes in on the bridge.
rt_table="${QUIRE_CLUSTER_ROUTE_TABLE:-2440}"
cg=quire-cluster
# One cluster at a time on a machine: the lock is held until this process
# has exited, teardown included.
exec 9>"${TMPDIR:-/tmp}/quire-cluster.lock"
flock -n 9 || { echo "scripts/test-cluster.sh: another cluster test is running on this machine" >&2; exit 1; }
if ip link show "$bridge" >/dev/null 2>&1; then
  echo "scripts/test-cluster.sh: $bridge exists, left by a cluster test that was killed without cleanup: ip link del $bridge" >&2
  exit 1
fi
if [ -n "$(ip rule show pref "$rt_table")" ] || [ -n "$(ip route show table "$rt_table" 2>/dev/null)" ]; then
  echo "scripts/test-cluster.sh: routing table or rule $rt_table is in use (left by a cluster test killed without cleanup?" \
    "ip rule del pref $rt_table; ip route flush table $rt_table), or set QUIRE_CLUSTER_ROUTE_TABLE" >&2
  exit 1
fi
state="$(mktemp -d "${TMPDIR:-/tmp}/quire-cluster.XXXXXX")"
chmod 0755 "$state"
export KUBECONFIG="$state/pki/admin.kubeconfig"
pids=()
sysctls=()
netns_before="$(ls /run/netns 2>/dev/null || true)"
ipsets_before="$(ipset list -n 2>/dev/null || true)"
rt_rule=0
netpol_drop_rule=()
# containerd's shims put their sockets under /run/containerd/s whatever its state folder.
run_containerd_existed=0
[ -e /run/containerd ] && run_containerd_existed=1

# start NAME CMD...: runs CMD in the background, its output in $state/logs/NAME.log.
start() {
  local name="$1"; shift
  "$@" >"$state/logs/$name.log" 2>&1 &
  pids+=("$!")
  echo "$! $name" >>"$state/pids"
}
# set_sysctl KEY VALUE: sets it, remembering the value to restore.
set_sysctl() {
  local f="/proc/sys/${1//.//}"
  sysctls+=("$1=$(cat "$f")")
  echo "$2" >"$f"
}
ctr_() { ctr --address "$state/containerd/containerd.sock" -n k8s.io "$@"; }
ipt_all() { local t; for t in iptables ip6tables; do command -v "$t" >/dev/null 2>&1 && "$t" "$@"; done; }

teardown() {
  local rc=$?
  trap - EXIT INT TERM
  set +e
  if [ "$rc" != 0 ] && [ "${QUIRE_CLUSTER_KEEP:-0}" = 1 ]; then
    echo "cluster: failed; kept up for a look: KUBECONFIG=$KUBECONFIG, logs in $state/logs. Press Enter to tear down." >&2
    read -r _ || true
  fi
  if [ "$rc" != 0 ] && [ -d "$state/logs" ]; then
    # Failures are read from the logs; keep a copy past the teardown.
    rm -rf "${TMPDIR:-/tmp}/quire-cluster-failed-logs"
    cp -r "$state/logs" "${TMPDIR:-/tmp}/quire-cluster-failed-logs"
    echo "cluster: logs kept in ${TMPDIR:-/tmp}/quire-cluster-failed-logs" >&2
  fi
  step "tearing down"
  # The kubelet first, so it restarts nothing; then every container and sandbox.
  local i p
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
    p="${pids[$i]}"
    if [ "$(awk -v p="$p" '$1 == p {print $2}' "$state/pids" 2>/dev/null)" = kubelet ]; then
      kill "$p" 2>/dev/null; wait "$p" 2>/dev/null
    fi
  done
  if [ -S "$state/containerd/containerd.sock" ]; then
    for c in $(ctr_ tasks ls -q 2>/dev/null); do ctr_ tasks kill -s SIGKILL "$c" >/dev/null 2>&1; done
    for _ in $(seq 50); do [ -z "$(ctr_ tasks ls -q 2>/dev/null | head -n1)" ] && break; sleep 0.1; done
    for c in $(ctr_ tasks ls -q 2>/dev/null); do ctr_ tasks delete -f "$c" >/dev/null 2>&1; done
    for c in $(ctr_ containers ls -q 2>/dev/null); do ctr_ tasks delete -f "$c" >/dev/null 2>&1; ctr_ containers delete "$c" >/dev/null 2>&1; done
  fi
  # kube-proxy's rules, while its binary is at hand (it knows all of them).
  if [ -x "$kbin/kube-proxy" ] && [ -f "$state/kube-proxy.yaml" ]; then
    "$kbin/kube-proxy" --cleanup >>"$state/logs/kube-proxy-cleanup.log" 2>&1
  fi
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
    p="${pids[$i]}"
    kill "$p" 2>/dev/null
    for _ in $(seq 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$p" 2>/dev/null
    wait "$p" 2>/dev/null
  done
  # Pod network namespaces made while we ran (their veths go with them).
  local ns
  for ns in $(ls /run/netns 2>/dev/null); do
    grep -qxF "$ns" <<<"$netns_before" || ip netns delete "$ns" 2>/dev/null
  done
  # Mounts the kubelet and containerd left under the state folder, deepest first.
  awk -v s="$state/" 'index($2, s) == 1 {print $2}' /proc/self/mounts | sort -r | while read -r m; do umount -l "$m"; done
  # Rules left by the kubelet or kube-proxy (KUBE-*) and ours, in every table.
  local t tbl
  for t in iptables ip6tables; do
    command -v "$t" >/dev/null 2>&1 || continue
    for tbl in filter nat mangle; do
      "$t" -t "$tbl" -S 2>/dev/null | grep -E -- "-j (KUBE-[A-Z0-9-]+|$chain)( |$)" | grep -E '^-A (INPUT|OUTPUT|FORWARD|PREROUTING|POSTROUTING) ' |
        while read -r _ rule; do eval "$t -t $tbl -D $rule" 2>/dev/null; done
      for c in $("$t" -t "$tbl" -S 2>/dev/null | awk -v ours="$chain" '$1 == "-N" && ($2 ~ /^KUBE-/ || $2 == ours) {print $2}'); do
        "$t" -t "$tbl" -F "$c" 2>/dev/null
      done
      for c in $("$t" -t "$tbl" -S 2>/dev/null | awk -v ours="$chain" '$1 == "-N" && ($2 ~ /^KUBE-/ || $2 == ours) {print $2}'); do
        "$t" -t "$tbl" -X "$c" 2>/dev/null
      done
    done
  done
  [ ${#netpol_drop_rule[@]} = 0 ] || iptables -t mangle -D OUTPUT "${netpol_drop_rule[@]}" 2>/dev/null
  # kube-router's ipsets (KUBE-SRC-*, KUBE-DST-*), once no rule refers to them.
  local set
  for set in $(ipset list -n 2>/dev/null); do
    case "$set" in KUBE-*|inet6:KUBE-*) grep -qxF "$set" <<<"$ipsets_before" || ipset destroy "$set" 2>/dev/null ;; esac
  done
  if [ "$rt_rule" = 1 ]; then
    ip rule del pref "$rt_table" 2>/dev/null
    ip route flush table "$rt_table" 2>/dev/null
  fi
  ip link del "$bridge" 2>/dev/null
  [ "$run_containerd_existed" = 1 ] || rm -rf /run/containerd
  # Connections tracked for the pods' addresses would outlive them.
  command -v conntrack >/dev/null 2>&1 && conntrack -D -s "$pod_cidr" >/dev/null 2>&1
  # cgroups: the pods' (under our root) and containerd's, deepest first.
  local d
  for d in /sys/fs/cgroup/*/"$cg" /sys/fs/cgroup/"$cg"; do
    [ -d "$d" ] && find "$d" -depth -type d -exec rmdir {} \; 2>/dev/null
  done
  local kv
  for ((i = ${#sysctls[@]} - 1; i >= 0; i--)); do
    kv="${sysctls[$i]}"
    echo "${kv#*=}" >"/proc/sys/$(tr . / <<<"${kv%%=*}")" 2>/dev/null
  done
  rm -rf "$state"
  step "torn down"
  exit "$rc"
}
trap teardown EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

mkdir -p "$state"/{logs,pki,etcd,cni/net.d,cni/ipam,containerd,kubelet,pod-logs,pv/nats-0,coredns}

# Certificates: one CA; the API server's serving certificate; clients for the
# control plane (system:masters) and the kubelet (system:node:NODE); the
# service-account signing key.
pki="$state/pki"
openssl_q() { openssl "$@" 2>/dev/null; }
openssl_q ecparam -name prime256v1 -genkey -noout -out "$pki/ca.key"
openssl_q req -x509 -new -key "$pki/ca.key" -subj /CN=quire-cluster-ca -days 2 -out "$pki/ca.crt"
cert() { # NAME SUBJECT [SAN]   (signed by $ca, default: ca)
  local ca="${ca:-ca}"
  openssl_q ecparam -name prime256v1 -genkey -noout -out "$pki/$1.key"
  openssl_q req -new -key "$pki/$1.key" -subj "$2" -out "$pki/$1.csr"
  local ext="$pki/$1.ext"
  if [ -n "${3:-}" ]; then
    printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth,clientAuth\n' "$3" >"$ext"
  else
    printf 'extendedKeyUsage=clientAuth\n' >"$ext"
  fi
  openssl_q x509 -req -in "$pki/$1.csr" -CA "$pki/$ca.crt" -CAkey "$pki/$ca.key" -CAcreateserial -days 2 -extfile "$ext" -out "$pki/$1.crt"
}
svc_ip="$(python3 -c "import ipaddress,sys; print(ipaddress.ip_network(sys.argv[1])[1])" "$svc_cidr")"
dns_ip="$node_ip"
cert apiserver /CN=kube-apiserver "IP:$node_ip,IP:$svc_ip,IP:127.0.0.1,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
cert admin "/O=system:masters/CN=quire-cluster-admin"
cert kubelet "/O=system:nodes/CN=system:node:$node"
# The aggregation layer (KEDA's metrics adapter serves external.metrics.k8s.io
# behind the API server): a CA of its own for the API server's proxy client,
# whose name the extension API servers accept in the request headers.
openssl_q ecparam -name prime256v1 -genkey -noout -out "$pki/front-proxy-ca.key"
openssl_q req -x509 -new -key "$pki/front-proxy-ca.key" -subj /CN=quire-cluster-front-proxy-ca -days 2 -out "$pki/front-proxy-ca.crt"
ca=front-proxy-ca cert front-proxy-client /CN=front-proxy-client
# KEDA's operator and metrics adapter: one pair for the adapter's HTTPS and
# the gRPC both speak (mutual TLS), named for both Services.
keda_sans=""
for s in keda-operator keda-metrics-apiserver; do
  keda_sans+="${keda_sans:+,}DNS:$s,DNS:$s.keda,DNS:$s.keda.svc,DNS:$s.keda.svc.cluster.local"
done
cert keda /CN=keda "$keda_sans"
openssl_q genrsa -out "$pki/sa.key" 2048
openssl_q rsa -in "$pki/sa.key" -pubout -out "$pki/sa.pub"
kubeconfig() { # NAME CERT
  cat >"$pki/$1.kubeconfig" <<YAML
apiVersion: v1
kind: Config
clusters:
- name: quire
  cluster: {server: "https://$node_ip:6443", certificate-authority: "$pki/ca.crt"}
users:
- name: $2
  user: {client-certificate: "$pki/$2.crt", client-key: "$pki/$2.key"}
contexts:
- name: quire
  context: {cluster: quire, user: $2}
current-context: quire
YAML
}
kubeconfig admin admin
kubeconfig kubelet kubelet

# Network: the bridge with the node's address, forwarding on, and nothing
# forwarded off the bridge or onto it from elsewhere.
ip link add "$bridge" type bridge
ip addr add "$node_ip/${pod_cidr#*/}" dev "$bridge"
ip link set "$bridge" up
set_sysctl net.ipv4.ip_forward 1
set_sysctl net.bridge.bridge-nf-call-iptables 1
set_sysctl net.bridge.bridge-nf-call-ip6tables 1
# The kubelet sets these (a node's defaults); they are restored afterwards.
for k in vm.overcommit_memory vm.panic_on_oom kernel.panic kernel.panic_on_oops kernel.keys.root_maxkeys kernel.keys.root_maxbytes; do
  set_sysctl "$k" "$(cat "/proc/sys/${k//.//}")"
done
# What comes in on the bridge is routed by a table of its own that knows only
# the bridge (addresses of this machine come first, from the local table):
# anything else is refused at the routing decision, so a Pod trying to leave
# fails at once instead of timing out. It is refused there rather than in the
# filter table's FORWARD because a NetworkPolicy controller (kube-router)
# keeps its own chain first there and ACCEPTs the Pod traffic that the
# policies allow, wherever it goes.
rt_rule=1
ip route add "$pod_cidr" dev "$bridge" table "$rt_table"
ip route add prohibit default table "$rt_table"
ip rule add iif "$bridge" lookup "$rt_table" pref "$rt_table"
# And the mangle table's FORWARD, which comes before the filter table's,
# drops what would still leave the bridge or enter it from elsewhere.
iptables -t mangle -N "$chain"
iptables -t mangle -A "$chain" -i "$bridge" ! -o "$bridge" -j DROP
iptables -t mangle -A "$chain" -o "$bridge" ! -i "$bridge" -j DROP
iptables -t mangle -I FORWARD 1 -j "$chain"

# cgroups: the kubelet's root (--cgroup-root /$cg) in every v1 hierarchy; a
# cpuset child starts with no CPUs, so it gets its parent's.
for d in /sys/fs/cgroup/*/; do
  case "$d" in */unified/) continue ;; esac
  mkdir -p "$d$cg"
done
if [ -d /sys/fs/cgroup/cpuset/$cg ]; then
  cat /sys/fs/cgroup/cpuset/cpuset.cpus >/sys/fs/cgroup/cpuset/$cg/cpuset.cpus
  cat /sys/fs/cgroup/cpuset/cpuset.mems >/sys/fs/cgroup/cpuset/$cg/cpuset.mems
fi

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_for() { # WHAT SECONDS CMD...
  local what="$1" secs="$2"; shift 2
  local deadline=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || { echo "cluster: $what not ready after $secs s" >&2; return 1; }
    sleep 0.5
  done
}

etcd_port="$(free_port)"; etcd_peer="$(free_port)"
start etcd etcd --name quire --data-dir "$state/etcd" \
  --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
  --listen-peer-urls "http://127.0.0.1:$etcd_peer" --initial-advertise-peer-urls "http://127.0.0.1:$etcd_peer" \
  --initial-cluster "quire=http://127.0.0.1:$etcd_peer" --log-level warn
wait_for etcd 30 curl -sf "http://127.0.0.1:$etcd_port/health"

start kube-apiserver "$kbin/kube-apiserver" --etcd-servers "http://127.0.0.1:$etcd_port" \
  --bind-address "$node_ip" --advertise-address "$node_ip" --secure-port 6443 \
  --service-cluster-ip-range "$svc_cidr" \
  --tls-cert-file "$pki/apiserver.crt" --tls-private-key-file "$pki/apiserver.key" \
  --client-ca-file "$pki/ca.crt" \
  --kubelet-client-certificate "$pki/admin.crt" --kubelet-client-key "$pki/admin.key" \
  --service-account-issuer https://kubernetes.default.svc.cluster.local \
  --service-account-key-file "$pki/sa.pub" --service-account-signing-key-file "$pki/sa.key" \
  --kubelet-preferred-address-types InternalIP \
  --requestheader-client-ca-file "$pki/front-proxy-ca.crt" --requestheader-allowed-names front-proxy-client \
  --requestheader-username-headers X-Remote-User --requestheader-group-headers X-Remote-Group \
  --requestheader-extra-headers-prefix X-Remote-Extra- \
  --proxy-client-cert-file "$pki/front-proxy-client.crt" --proxy-client-key-file "$pki/front-proxy-client.key" \
  --enable-aggregator-routing=true \
  --authorization-mode Node,RBAC --allow-privileged=false --profiling=false
wait_for kube-apiserver 120 "$kbin/kubectl" get --raw /readyz
step "control plane: etcd and kube-apiserver ready"
start kube-controller-manager "$kbin/kube-controller-manager" --kubeconfig "$KUBECONFIG" \
  --authentication-kubeconfig "$KUBECONFIG" --authorization-kubeconfig "$KUBECONFIG" \
  --bind-address "$node_ip" --leader-elect=false \
  --service-account-private-key-file "$pki/sa.key" --root-ca-file "$pki/ca.crt" \
  --service-cluster-ip-range "$svc_cidr" --profiling=false
start kube-scheduler "$kbin/kube-scheduler" --kubeconfig "$KUBECONFIG" \
  --authentication-kubeconfig "$KUBECONFIG" --authorization-kubeconfig "$KUBECONFIG" \
  --bind-address "$node_ip" --leader-elect=false --profiling=false

# containerd, its own root, state, socket and runc root; the CRI with the
# probe's findings: restrict_oom_score_adj (no CAP_SYS_RESOURCE here), our
# pause image, cgroupfs.
cat >"$state/containerd/config.toml" <<TOML
version = 2
root = "$state/containerd/root"
state = "$state/containerd/state"
[grpc]
  address = "$state/containerd/containerd.sock"
[ttrpc]
  address = "$state/containerd/containerd.sock.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "$state/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "localhost/quire-cluster/pause:3.10.1"
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  enable_selinux = false
  disable_apparmor = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "$state/containerd/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$state/cni/net.d"
TOML
cat >"$state/cni/net.d/10-quire.conflist" <<JSON
{"cniVersion": "0.4.0", "name": "quire-cluster", "plugins": [
  {"type": "bridge", "bridge": "$bridge", "isGateway": true, "isDefaultGateway": true, "ipMasq": false, "hairpinMode": true,
   "ipam": {"type": "host-local", "dataDir": "$state/cni/ipam",
            "ranges": [[{"subnet": "$pod_cidr", "gateway": "$node_ip"}]]}}
]}
JSON
start containerd containerd --config "$state/containerd/config.toml"
wait_for containerd 30 ctr_ version
for img in pause nats garage quire quire-next ${keda:+keda-operator keda-adapter}; do
  ctr_ images import "$images/$img.tar" >/dev/null
done
step "containerd ready, $(ctr_ images ls -q | grep -c '^localhost/') images imported"

: >"$state/resolv.conf"
cat >"$state/kubelet.yaml" <<YAML
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: "$node_ip"
port: 10250
readOnlyPort: 0
healthzPort: 0
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: "$pki/ca.crt"}
authorization: {mode: Webhook}
cgroupDriver: cgroupfs
cgroupRoot: /$cg
containerRuntimeEndpoint: "unix://$state/containerd/containerd.sock"
clusterDNS: ["$dns_ip"]
clusterDomain: cluster.local
resolvConf: "$state/resolv.conf"
podLogsDir: "$state/pod-logs"
failSwapOn: false
serializeImagePulls: false
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: 100Mi, nodefs.available: 1%, imagefs.available: 1%}
maxPods: 50
YAML
start kubelet "$kbin/kubelet" --config "$state/kubelet.yaml" --kubeconfig "$pki/kubelet.kubeconfig" \
  --root-dir "$state/kubelet" --cert-dir "$state/kubelet/pki" --hostname-override "$node" --node-ip "$node_ip"
cat >"$state/kube-proxy.yaml" <<YAML
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: "$KUBECONFIG"}
hostnameOverride: $node
mode: iptables
clusterCIDR: "$pod_cidr"
bindAddress: "$node_ip"
healthzBindAddress: "$node_ip:10256"
metricsBindAddress: "$node_ip:10249"
# Leave the machine's conntrack settings alone.
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
iptables: {localhostNodePorts: false}
YAML
start kube-proxy "$kbin/kube-proxy" --config "$state/kube-proxy.yaml"
cat >"$state/coredns/Corefile" <<COREFILE
.:53 {
  bind $dns_ip
  errors
  kubernetes cluster.local in-addr.arpa ip6.arpa {
    kubeconfig $KUBECONFIG quire
    pods insecure
  }
}
COREFILE
start coredns "$coredns" -conf "$state/coredns/Corefile"
wait_for "node $node" 120 "$kbin/kubectl" get node "$node"
"$kbin/kubectl" wait --for=condition=Ready "node/$node" --timeout=120s >/dev/null
step "node $node Ready (Kubernetes $("$kbin/kubectl" get node "$node" -o jsonpath='{.status.nodeInfo.kubeletVersion}'))"

# NetworkPolicies: kube-router's controller only (no routing, no service
# proxy: kube-proxy stays), on the host like kube-proxy. It finds the node by
# name (it needs the Node object) and keeps, in the filter table, a chain per
# local Pod reached from INPUT, FORWARD and OUTPUT (bridged traffic too,
# through br_netfilter) that REJECTs what no policy admits, with ipsets of
# the Pods each policy selects. Traffic from this machine's own addresses
# (the kubelet's probes, the API server, the checks' curl) is always admitted.
if [ -n "$kube_router" ]; then
  kr_health="$(free_port)"
  start kube-router "$kube_router" --run-firewall=true --run-router=false --run-service-proxy=false \
    --kubeconfig "$KUBECONFIG" --hostname-override "$node" --service-cluster-ip-range "$svc_cidr" \
    --enable-ipv6=false --health-port "$kr_health" --metrics-port 0 --v=2
  kr_ready() {
    [[ "$(iptables -S FORWARD 2>/dev/null)" == *"-j KUBE-ROUTER-FORWARD"* ]] && curl -sf "http://127.0.0.1:$kr_health/healthz"
  }
  wait_for "kube-router (NetworkPolicy controller)" 120 kr_ready || { tail -n 30 "$state/logs/kube-router.log" >&2; exit 1; }
  # kube-router learns a new Pod's address from the Pod's status, which the
  # kubelet reports after the Pod's containers have started: until then (0.1
  # to 0.3 s here) a connection from the new Pod to a peer behind a policy
  # is denied, and kube-router denies with REJECT, so it fails at once.
  # quire's coordinator and `quire check` connect to NATS as they start; they
  # keep trying for --nats-connect-wait (60 s) through such refusals, which
  # this test leaves as kube-router (k3s's NetworkPolicy controller) makes
  # them. QUIRE_CLUSTER_NETPOL_DROP=1 drops them instead (ICMP port
  # unreachable to the Pods), as controllers that DROP denied packets behave
  # (Calico, Cilium): the SYN is sent again a second later and gets through.
  denied="refused, as kube-router does"
  if [ "${QUIRE_CLUSTER_NETPOL_DROP:-0}" = 1 ]; then
    netpol_drop_rule=(-d "$pod_cidr" -p icmp --icmp-type port-unreachable -m comment --comment "quire-cluster: denied, not refused" -j DROP)
    iptables -t mangle -A OUTPUT "${netpol_drop_rule[@]}"
    denied="dropped, not refused (QUIRE_CLUSTER_NETPOL_DROP=1)"
  fi
  step "NetworkPolicies enforced by kube-router $kube_router_version (firewall only; denied connections $denied)"
else
  echo "=================================================================================" >&2
  echo "cluster: NetworkPolicies NOT ENFORCED: kube-router is not cached under $krbin." >&2
  echo "Build it once with: scripts/test-cluster.sh --build   (then rerun)" >&2
  echo "=================================================================================" >&2
fi

# A default StorageClass with one volume on this node's disk, as a cluster
# with a provisioner would hand the bundled NATS.
chmod 0777 "$state/pv/nats-0"
"$kbin/kubectl" apply -f - >/dev/null <<YAML
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata:
  name: local
  annotations: {storageclass.kubernetes.io/is-default-class: "true"}
provisioner: kubernetes.io/no-provisioner
volumeBindingMode: WaitForFirstConsumer
---
apiVersion: v1
kind: PersistentVolume
metadata: {name: nats-0}
spec:
  storageClassName: local
  capacity: {storage: 50Gi}
  accessModes: [ReadWriteOnce]
  persistentVolumeReclaimPolicy: Retain
  hostPath: {path: "$state/pv/nats-0", type: Directory}
YAML
step "cluster up"

export KUBECTL="$kbin/kubectl" HELM_PY="$venv/bin/python" STATE="$state" IMAGES="$images" KEDA="$keda" KEDA_VERSION="$keda_version" KEDA_SRC="$keda_src" KEDA_DIR="$kedabin" \
  NETPOL="$kube_router" NETPOL_NOTE="$kube_router_note" NETPOL_DIR="$krbin"
# shellcheck source=cluster/proofs.sh
source scripts/cluster/proofs.sh
proofs
step "all checks passed"
