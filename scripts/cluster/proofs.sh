# What the cluster test proves; sourced by scripts/test-cluster.sh once the
# node is Ready (it sets KUBECTL, HELM_PY, STATE, IMAGES and the helpers
# step, wait_for). `proofs` runs, in this order:
#
#   1. helm install of helm/quire with the bundled NATS, an in-cluster Garage
#      bucket and the CPU image, with the values a user sets; every Pod Ready;
#      helm test (quire check from a quire Pod) passes
#   2. a run triggered as the README says (kubectl create job --from=cronjob):
#      the coordinator Job completes (exit 0); the born-digital examples (text
#      layer) and a scanned PDF (the tests' tiny random-weight Idefics3
#      checkpoint, fetched by the workers from the bucket) are in the bucket:
#      manifest, results with one record per page, Markdown per document
#   6. the CronJob fires by itself on a schedule set a minute or two ahead
#   3. a worker Pod killed (deleted with no grace) in the middle of a run:
#      the run completes within the lease plus a margin, every page once
#   4. helm upgrade to another image (same quire, another image id) with
#      changed values; the next run's coordinator and the workers run it
ns=quire
release=quire
bucket=quire
out_prefix=out

k() { "$KUBECTL" "$@"; }
kq() { "$KUBECTL" -n "$ns" "$@"; }
helm_() { "$HELM_PY" scripts/cluster/helm.py "$@"; }
s3_() { "$HELM_PY" scripts/cluster/s3.py "$@"; }

# In-cluster S3: Garage, single node, its bucket and key made at start.
deploy_garage() {
  BUCKET=$bucket
  AWS_ACCESS_KEY_ID="GK$(openssl rand -hex 12)"
  AWS_SECRET_ACCESS_KEY="$(openssl rand -hex 32)"
  export BUCKET AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY
  k create namespace quire-s3 >/dev/null
  k -n quire-s3 create secret generic garage \
    --from-literal=GARAGE_DEFAULT_ACCESS_KEY="$AWS_ACCESS_KEY_ID" \
    --from-literal=GARAGE_DEFAULT_SECRET_KEY="$AWS_SECRET_ACCESS_KEY" \
    --from-literal=GARAGE_DEFAULT_BUCKET="$bucket" \
    --from-literal=GARAGE_RPC_SECRET="$(openssl rand -hex 32)" >/dev/null
  k -n quire-s3 apply -f - >/dev/null <<'YAML'
apiVersion: v1
kind: ConfigMap
metadata: {name: garage}
data:
  garage.toml: |
    metadata_dir = "/var/lib/garage/meta"
    data_dir = "/var/lib/garage/data"
    db_engine = "lmdb"
    replication_factor = 1
    rpc_bind_addr = "127.0.0.1:3901"
    rpc_public_addr = "127.0.0.1:3901"
    [s3_api]
    s3_region = "garage"
    api_bind_addr = "0.0.0.0:3900"
    root_domain = ".s3.garage.localhost"
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: garage}
spec:
  replicas: 1
  selector: {matchLabels: {app: garage}}
  template:
    metadata: {labels: {app: garage}}
    spec:
      automountServiceAccountToken: false
      securityContext: {runAsNonRoot: true, runAsUser: 1000, fsGroup: 1000, seccompProfile: {type: RuntimeDefault}}
      containers:
        - name: garage
          image: localhost/quire-cluster/garage:local
          imagePullPolicy: Never
          args: [-c, /etc/garage/garage.toml, server, --single-node, --default-bucket]
          envFrom: [{secretRef: {name: garage}}]
          env: [{name: RUST_LOG, value: garage=warn}]
          ports: [{name: s3, containerPort: 3900}]
          readinessProbe: {tcpSocket: {port: s3}, periodSeconds: 2}
          securityContext: {allowPrivilegeEscalation: false, readOnlyRootFilesystem: true, capabilities: {drop: [ALL]}}
          volumeMounts:
            - {name: config, mountPath: /etc/garage}
            - {name: data, mountPath: /var/lib/garage}
      volumes:
        - {name: config, configMap: {name: garage}}
        - {name: data, emptyDir: {}}
---
apiVersion: v1
kind: Service
metadata: {name: garage}
spec:
  selector: {app: garage}
  ports: [{name: s3, port: 3900, targetPort: s3}]
YAML
  k -n quire-s3 rollout status deploy/garage --timeout=180s >/dev/null
  # The host reaches the Service's cluster IP through kube-proxy's rules, as a Pod would.
  export S3_ENDPOINT="http://$(k -n quire-s3 get svc garage -o jsonpath='{.spec.clusterIP}'):3900"
  s3_ wait
}

# The inputs: the two born-digital examples and a scanned PDF; the model: the
# tests' tiny random-weight Idefics3 checkpoint.
upload_inputs() {
  s3_ put examples/mixed.pdf in/examples/mixed.pdf
  s3_ put examples/report.pdf in/examples/report.pdf
  s3_ put tests/fixtures/docs/scanned.pdf in/scans/scanned.pdf
  local m="$STATE/model"
  mkdir -p "$m"
  cp tests/fixtures/idefics3/split_sf2_gqa/{config.json,generation_config.json,model.safetensors,processor_config.json,tokenizer.json,tokenizer_config.json,chat_template.jinja} "$m/"
  s3_ put "$m" models/tiny-idefics3
  pages=7   # mixed.pdf 3 + report.pdf 3 + scanned.pdf 1
}

values_file() {
  local nats_tag
  nats_tag="$(tar -xOf "$IMAGES/nats.tar" manifest.json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["RepoTags"][0].rsplit(":",1)[1])')"
  cat >"$STATE/values.yaml" <<YAML
# What a user sets on a small cluster with no registry: local images, the
# bundled NATS, the in-cluster S3, requests that fit a 2-core node.
image: {repository: localhost/quire, tag: ci, pullPolicy: Never}
nats:
  enabled: true
  container:
    image: {repository: localhost/quire-cluster/nats, tag: "$nats_tag", pullPolicy: Never}
  reloader: {enabled: false}
job:
  name: "cluster-{date}-{time}"
  inputs: ["s3://$bucket/in/"]
  out: "s3://$bucket/$out_prefix"
  model: "s3://$bucket/models/tiny-idefics3"
  ackWaitSeconds: 60
  extraArgs: ["--max-new-tokens", "8"]
s3:
  endpoint: "http://garage.quire-s3.svc.cluster.local:3900"
  region: garage
  pathStyle: true
  accessKeyId: "$AWS_ACCESS_KEY_ID"
  secretAccessKey: "$AWS_SECRET_ACCESS_KEY"
coordinator:
  resources: {requests: {cpu: 100m, memory: 128Mi}, limits: {memory: 1Gi}}
worker:
  replicas: 2
  slots: 2
  graceSeconds: 10
  terminationGracePeriodSeconds: 30
  resources: {requests: {cpu: 200m, memory: 256Mi}, limits: {memory: 3Gi}}
YAML
}

# wait_job NAME SECONDS: until the Job completes; fails with its logs when it fails or runs out of time.
wait_job() {
  local name="$1" secs="$2" deadline=$((SECONDS + $2)) st
  while :; do
    st="$(kq get job "$name" -o jsonpath='{range .status.conditions[?(@.status=="True")]}{.type} {end}' 2>/dev/null || true)"
    case "$st" in
      *Complete*) return 0 ;;
      *Failed*) break ;;
    esac
    [ $SECONDS -lt $deadline ] || { echo "cluster: job $name not complete after $secs s" >&2; break; }
    sleep 2
  done
  kq describe job "$name" >&2 || true
  kq logs "job/$name" --tail=50 >&2 || true
  return 1
}

# new_job BEFORE: the one job in the bucket not in BEFORE.
new_job() {
  local j
  j="$(comm -13 <(sort <<<"$1") <(s3_ jobs "$out_prefix" | sort))"
  [ "$(wc -w <<<"$j")" = 1 ] || { echo "cluster: expected one new job in the bucket, found: ${j:-none}" >&2; return 1; }
  echo "$j"
}

# Job names hold {time} (HHMM): a run starts in a minute none before it started in.
next_minute() {
  local now; now="$(date -u +%H%M)"
  if [ "$now" = "${last_minute:-}" ]; then sleep $((61 - $(date -u +%-S))); fi
  last_minute="$(date -u +%H%M)"
}

# run_by_hand NAME: `kubectl create job --from=cronjob/...`, as the README says; prints the job in the bucket.
run_by_hand() {
  local name="$1" before
  before="$(s3_ jobs "$out_prefix")"
  next_minute
  kq create job --from="cronjob/$release-nightly" "$name" >/dev/null
  wait_job "$name" 600
  new_job "$before"
}

proof_install() {
  helm_ install "$release" helm/quire "$ns" "$STATE/values.yaml"
  kq wait --for=condition=Ready pod --all --timeout=300s >/dev/null
  step "1. helm install: $(kq get pods --no-headers | wc -l) Pods Ready: $(kq get pods --no-headers -o custom-columns=N:.metadata.name | tr '\n' ' ')"
  helm_ test "$release" "$ns" || { kq logs "pod/$release-test-check" >&2; return 1; }
  step "1. helm test passed"
}

proof_run_by_hand() {
  local job
  job="$(run_by_hand by-hand-1)"
  s3_ check-run "$out_prefix" "$job" "$pages"
  coordinator_image_id="$(kq get pods -l job-name=by-hand-1 -o jsonpath='{.items[0].status.containerStatuses[0].imageID}')"
  step "2. kubectl create job --from=cronjob/$release-nightly: exit 0, job $job complete in the bucket"
}

# The Job the CronJob controller made on schedule (kubectl marks the ones it makes as manual).
scheduled_job() {
  kq get jobs -o json | python3 -c '
import json, sys
for j in json.load(sys.stdin)["items"]:
    m = j["metadata"]
    if any(o["kind"] == "CronJob" for o in m.get("ownerReferences", [])) \
            and m.get("annotations", {}).get("cronjob.kubernetes.io/instantiate") != "manual":
        print(m["name"])'
}

proof_schedule() {
  local before at minute hour name
  before="$(s3_ jobs "$out_prefix")"
  # A minute that is at least 60 s away, so the upgrade lands before it.
  at=$(( ($(date -u +%s) + 120) / 60 * 60 ))
  minute="$(date -u -d "@$at" +%-M)"; hour="$(date -u -d "@$at" +%-H)"
  cat >"$STATE/schedule.yaml" <<YAML
coordinator: {schedule: "$minute $hour * * *"}
YAML
  helm_ upgrade "$release" helm/quire "$ns" "$STATE/schedule.yaml"
  last_minute="$(date -u -d "@$at" +%H%M)"
  local deadline=$((SECONDS + at - $(date -u +%s) + 90))
  until name="$(scheduled_job)" && [ -n "$name" ]; do
    [ $SECONDS -lt $deadline ] || { echo "cluster: the CronJob made no Job by $(date -u -d "@$at" +%H:%M) + 90 s" >&2; kq describe cronjob >&2; return 1; }
    sleep 2
  done
  wait_job "$name" 600
  local job; job="$(new_job "$before")"
  s3_ check-run "$out_prefix" "$job" "$pages"
  step "6. the CronJob fired at $(date -u -d "@$at" +%H:%M) UTC by itself ($name), job $job complete"
}

proof_worker_killed() {
  local extra=40 before job victim t0 lease
  # More work, so that the run is still going when a worker dies.
  for i in $(seq -w 1 $extra); do cp tests/fixtures/docs/scanned.pdf "$STATE/bulk-$i.pdf"; done
  mkdir -p "$STATE/bulk" && mv "$STATE"/bulk-*.pdf "$STATE/bulk/"
  s3_ put "$STATE/bulk" in/bulk
  before="$(s3_ jobs "$out_prefix")"
  next_minute
  t0=$SECONDS
  kq create job --from="cronjob/$release-nightly" killed-1 >/dev/null
  # Once some results are stored, kill a worker that holds tasks: no grace, so its tasks come
  # back only when their lease (job.ackWaitSeconds) runs out.
  local deadline=$((SECONDS + 300))
  until s3_ progress "$out_prefix" | awk '$2 >= 3 {found = 1} END {exit !found}'; do
    [ $SECONDS -lt $deadline ] || { echo "cluster: no results of the run after 300 s" >&2; return 1; }
    sleep 1
  done
  victim="$(kq get pods -l app.kubernetes.io/component=worker -o jsonpath='{.items[0].metadata.name}')"
  kq delete pod "$victim" --grace-period=0 --force >/dev/null 2>&1
  step "3. worker $victim killed $((SECONDS - t0)) s into the run"
  lease="$(kq get cronjob "$release-nightly" -o yaml | grep -A1 -- '- --ack-wait-s' | tail -n1 | tr -dc 0-9)"
  wait_job killed-1 $((lease + 300))
  job="$(new_job "$before")"
  s3_ check-run "$out_prefix" "$job" $((pages + extra))
  step "3. run with a killed worker complete in $((SECONDS - t0)) s (lease ${lease}s): every page once, none lost"
  s3_ rm in/bulk/
}

proof_upgrade() {
  local job pod image id
  cat >"$STATE/upgrade.yaml" <<YAML
image: {tag: ci-next}
job: {pagesPerTask: 8, name: "upgraded-{date}-{time}"}
worker: {slots: 1}
YAML
  helm_ upgrade "$release" helm/quire "$ns" "$STATE/upgrade.yaml"
  kq rollout status "deploy/$(kq get deploy -l app.kubernetes.io/component=worker -o jsonpath='{.items[0].metadata.name}')" --timeout=300s >/dev/null
  job="$(run_by_hand upgraded-1)"
  s3_ check-run "$out_prefix" "$job" "$pages"
  case "$job" in upgraded-*) ;; *) echo "cluster: the run after the upgrade is $job, not upgraded-{date}-{time}" >&2; return 1 ;; esac
  pod="$(kq get pods -l job-name=upgraded-1 -o jsonpath='{.items[0].metadata.name}')"
  image="$(kq get pod "$pod" -o jsonpath='{.status.containerStatuses[0].image}')"
  id="$(kq get pod "$pod" -o jsonpath='{.status.containerStatuses[0].imageID}')"
  [ "$image" = localhost/quire:ci-next ] || { echo "cluster: the coordinator after the upgrade ran $image" >&2; return 1; }
  [ "$id" != "$coordinator_image_id" ] || { echo "cluster: the coordinator after the upgrade ran the old image id $id" >&2; return 1; }
  local workers; workers="$(kq get pods -l app.kubernetes.io/component=worker -o jsonpath='{range .items[*]}{.status.containerStatuses[0].image}{"\n"}{end}' | sort -u)"
  [ "$workers" = localhost/quire:ci-next ] || { echo "cluster: workers after the upgrade run: $workers" >&2; return 1; }
  step "4. helm upgrade to localhost/quire:ci-next with changed values: coordinator and workers on it, job $job complete"
}

proofs() {
  deploy_garage
  upload_inputs
  step "Garage in the cluster, bucket $bucket filled ($S3_ENDPOINT)"
  values_file
  proof_install
  proof_run_by_hand
  proof_schedule
  proof_worker_killed
  proof_upgrade
}
