# What the cluster test proves; sourced by scripts/test-cluster.sh once the
# node is Ready (it sets KUBECTL, HELM_PY, STATE, IMAGES, KEDA, KEDA_VERSION,
# KEDA_SRC, NETPOL and the helpers step, wait_for). The chart's standing job (`nightly`, one run per UTC day,
# `--run {date}`) is run over three nights; `proofs` runs, in this order:
#
#   1. helm install of helm/quire with the bundled NATS, an in-cluster Garage
#      bucket and the CPU image, with the values a user sets; every Pod Ready;
#      helm test (quire check from a quire Pod) passes
#   1b. (when scripts/test-cluster.sh --build cached kube-router, which then
#      enforces NetworkPolicies; skipped loudly otherwise) the bundled NATS's
#      NetworkPolicy: a Pod in the release's namespace without quire's labels
#      reaches Garage but cannot open a TCP connection to the NATS Service's
#      client port; the same probe from a Pod with the labels the policy
#      admits (quire's) opens it, and from that Pod the monitoring port
#      stays shut (it is the KEDA operator's, which step 5 shows reading it).
#      Every later step runs with the policies enforced.
#   2. night 1, triggered as the README says (kubectl create job
#      --from=cronjob): the born-digital examples (text layer), a scanned PDF
#      and 40 scanned 16-page PDFs (the tests' tiny random-weight Idefics3
#      checkpoint, fetched by the workers from the bucket); the coordinator
#      Job completes (exit 0); manifest, run manifest, results with one
#      record per page, Markdown per document are in the bucket
#   3. in the middle of night 1 a worker holding tasks crashes (SIGKILL)
#      and the other worker's Pod, holding tasks too, is deleted (no grace):
#      the run ends after the crashed one's lease ran out and within the
#      lease plus a margin, nothing lost, nothing twice; a second Job made by hand then (the same day, while
#      the first holds the job's lease) waits for it, joins the run and
#      queues nothing
#      night 2 (a Job made from the CronJob with QUIRE_JOB_TIME the next day,
#      as the chart's README says), after 5 scans arrived: its run manifest
#      counts exactly the 5 as new and the 43 of night 1 as unchanged, and
#      only the new objects' 5 tasks ran
#   4. helm upgrade to another image (same quire, another image id) with
#      changed values: the workers roll onto it; then
#   6. the CronJob fires by itself on a schedule set a minute or two ahead:
#      its coordinator runs the new image and processes the one object added
#      since (only its task)
#   5. (when scripts/test-cluster.sh --build cached KEDA; skipped loudly
#      otherwise) helm upgrade with keda.enabled=true on KEDA's operator and
#      metrics adapter built here: the idle workers go to 0 replicas; night 3
#      (6 new objects) scales them up (the HPA KEDA makes reads the backlog
#      through the API server), completes, and they go back to 0 after the
#      cooldown
ns=quire
release=quire
bucket=quire
out_prefix=out
job=nightly   # the chart's default job.name

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
  # A collection worth a night: 40 scanned PDFs of 16 pages (one task each).
  mkdir -p "$STATE/big"
  pdfunite $(for _ in $(seq 16); do echo tests/fixtures/docs/scanned.pdf; done) "$STATE/scan16.pdf"
  for i in $(seq -w 1 40); do cp "$STATE/scan16.pdf" "$STATE/big/scan-$i.pdf"; done
  s3_ put "$STATE/big" in/big
  objects=43
  pages=$((3 + 3 + 1 + 40 * 16))
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
  inputs: ["s3://$bucket/in/"]
  out: "s3://$bucket/$out_prefix"
  model: "s3://$bucket/models/tiny-idefics3"
  ackWaitSeconds: 60
  # 200 tokens (under the loop detector's 256) so that night 1 lasts long enough to kill a worker in it.
  extraArgs: ["--max-new-tokens", "200"]
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
  resources: {requests: {cpu: 200m, memory: 256Mi}, limits: {cpu: 500m, memory: 3Gi}}
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

# job_from_cron NAME [JOB_TIME]: a Job made from the CronJob, as the README says; with
# JOB_TIME (RFC 3339) the run of that time's day (QUIRE_JOB_TIME, as the chart's README shows).
job_from_cron() {
  if [ -z "${2:-}" ]; then
    kq create job --from="cronjob/$release-nightly" "$1" >/dev/null
  else
    kq create job --from="cronjob/$release-nightly" "$1" --dry-run=client -o yaml |
      k set env --local -f - "QUIRE_JOB_TIME=$2" -o yaml | kq apply -f - >/dev/null
  fi
}

# The coordinator's line saying what it queued: "job J run R: N objects (...): P tasks published, ...".
published() { kq logs "job/$1" | sed -n 's/^job .* run .*: \([0-9]*\) tasks published.*/\1/p' | tail -n1; }

proof_install() {
  helm_ install "$release" helm/quire "$ns" "$STATE/values.yaml"
  kq wait --for=condition=Ready pod --all --timeout=300s >/dev/null
  step "1. helm install: $(kq get pods --no-headers | wc -l) Pods Ready: $(kq get pods --no-headers -o custom-columns=N:.metadata.name | tr '\n' ' ')"
  helm_ test "$release" "$ns" || { kq logs "pod/$release-test-check" >&2; return 1; }
  step "1. helm test passed"
}

# probe POD HOST PORT: "open" when a TCP connection from the Pod to HOST:PORT
# opens within 3 s, "closed" when it does not; anything else (kubectl exec
# failing) is neither, so that a broken probe cannot pass for a refused one.
probe() {
  kq exec "$1" -- bash -c "if timeout 3 bash -c 'exec 3<>/dev/tcp/$2/$3' 2>/dev/null; then echo open; else echo closed; fi" 2>&1 || true
}

# probe_pod NAME LABELS: the manifest of a Pod on the Garage image (Debian,
# with bash) that only sleeps, labelled with LABELS (YAML flow mapping entries).
probe_pod() {
  cat <<YAML
apiVersion: v1
kind: Pod
metadata: {name: $1, labels: {$2}}
spec:
  automountServiceAccountToken: false
  terminationGracePeriodSeconds: 0
  securityContext: {runAsNonRoot: true, runAsUser: 1000, seccompProfile: {type: RuntimeDefault}}
  containers:
    - name: probe
      image: localhost/quire-cluster/garage:local
      imagePullPolicy: Never
      command: [bash, -c, "exec sleep infinity"]
      resources: {requests: {cpu: 10m, memory: 16Mi}, limits: {memory: 64Mi}}
      securityContext: {allowPrivilegeEscalation: false, readOnlyRootFilesystem: true, capabilities: {drop: [ALL]}}
YAML
}

proof_netpol() {
  if [ -z "${NETPOL:-}" ]; then
    echo "=================================================================================" >&2
    echo "cluster: SKIPPED 1b. NetworkPolicy: kube-router is not cached under ${NETPOL_DIR:-the tools cache}," >&2
    echo "so nothing enforces NetworkPolicies in this cluster." >&2
    echo "Build it once with: scripts/test-cluster.sh --build   (then rerun)" >&2
    echo "=================================================================================" >&2
    return 0
  fi
  local np policy labels client monitor host s3host got i
  np="$(kq get networkpolicy -l app.kubernetes.io/component=nats -o jsonpath='{.items[0].metadata.name}')"
  [ -n "$np" ] || { echo "cluster: the chart made no NetworkPolicy for the bundled NATS" >&2; return 1; }
  # What the policy admits on which port, read from it: the peers of the rule
  # for the client port (the first), the port of the rule for the monitoring port.
  policy="$(kq get networkpolicy "$np" -o json)"
  read -r labels client monitor <<<"$(python3 -c '
import json, sys
rules = json.load(sys.stdin)["spec"]["ingress"]
client = rules[0]
sel = client["from"][0]["podSelector"]["matchLabels"]
monitor = [r for r in rules[1:] if "ports" in r]
print(",".join(f"{k}={v}" for k, v in sel.items()), client["ports"][0]["port"], monitor[0]["ports"][0]["port"] if monitor else "-")' <<<"$policy")"
  # The Service quire's Pods use (the chart's NATS URL names it as the policy).
  host="$np.$ns.svc.cluster.local"
  kq get svc "$np" >/dev/null
  s3host="garage.quire-s3.svc.cluster.local"
  # Two Pods alike but for their labels, on the Garage image (Debian, bash):
  # one labelled as nothing of quire's, one with the labels the policy admits.
  local lq="" kv
  for kv in ${labels//,/ }; do lq+="${kv%%=*}: \"${kv#*=}\", "; done
  probe_pod netpol-stranger "app: netpol-probe" | kq apply -f - >/dev/null
  probe_pod netpol-quire "${lq}app.kubernetes.io/component: netpol-probe" | kq apply -f - >/dev/null
  kq wait --for=condition=Ready pod/netpol-stranger pod/netpol-quire --timeout=120s >/dev/null
  # The stranger's network works: Garage (no policy) answers it.
  got="$(probe netpol-stranger "$s3host" 3900)"
  [ "$got" = open ] || { echo "cluster: 1b. the unlabelled probe Pod cannot reach Garage ($got): the probe is broken, not the policy" >&2; return 1; }
  # quire's labels open the client port; the controller may take a moment to
  # put a new Pod's address in the policy's set.
  local deadline=$((SECONDS + 30))
  until got="$(probe netpol-quire "$host" "$client")" && [ "$got" = open ]; do
    [ $SECONDS -lt $deadline ] || { echo "cluster: 1b. a Pod with the labels $labels cannot reach $host:$client ($got)" >&2; tail -n 20 "$STATE/logs/kube-router.log" >&2; return 1; }
    sleep 1
  done
  # Without them, the same probe fails, every time.
  for i in 1 2 3; do
    got="$(probe netpol-stranger "$host" "$client")"
    [ "$got" = closed ] || {
      echo "cluster: 1b. a Pod without quire's labels reached NATS at $host:$client ($got): NetworkPolicy $np is not enforced or admits it" >&2
      kq get networkpolicy "$np" -o yaml >&2; tail -n 20 "$STATE/logs/kube-router.log" >&2; return 1
    }
    sleep 1
  done
  # The monitoring port is for its own peers (KEDA's operator), not quire's Pods.
  local shut=""
  if [ "$monitor" != - ]; then
    got="$(probe netpol-quire "$host" "$monitor")"
    [ "$got" = closed ] || { echo "cluster: 1b. a quire Pod reached NATS's monitoring port $host:$monitor ($got)" >&2; return 1; }
    shut="; its monitoring port $monitor stays shut to quire's Pods"
  fi
  kq delete pod netpol-stranger netpol-quire --grace-period=0 --force >/dev/null 2>&1
  step "1b. NetworkPolicy $np enforced ($NETPOL_NOTE): a Pod without quire's labels cannot connect to $host:$client (it reaches Garage), one with $labels can$shut"
}

# holding_worker SECONDS [EXCEPT]: a worker Pod (not EXCEPT) whose metrics say it holds tasks now.
holding_worker() {
  local deadline=$((SECONDS + $1)) pod ip
  while [ $SECONDS -lt $deadline ]; do
    for pod in $(kq get pods -l app.kubernetes.io/component=worker --field-selector=status.phase=Running -o jsonpath='{.items[*].metadata.name}'); do
      [ "$pod" != "${2:-}" ] || continue
      ip="$(kq get pod "$pod" -o jsonpath='{.status.podIP}')"
      if curl -sf --max-time 2 "http://$ip:9100/metrics" | awk '$1 == "quire_tasks_in_flight" && $2 > 0 {found = 1} END {exit !found}'; then
        echo "$pod"
        return 0
      fi
    done
    sleep 0.2
  done
  return 1
}

proof_night1() {
  local today t0 t_kill crashed victim lease took
  today="$(date -u +%F)"
  t0=$SECONDS
  job_from_cron night1
  # Once some results are stored, delete a worker Pod that holds tasks, with no grace: its
  # tasks come back when their lease (job.ackWaitSeconds) runs out, or when it hands them back.
  local deadline=$((SECONDS + 300))
  until [ "$(s3_ results "$out_prefix" "$job")" -ge 3 ]; do
    [ $SECONDS -lt $deadline ] || { echo "cluster: no results of night 1 after 300 s" >&2; kq logs job/night1 >&2; return 1; }
    sleep 1
  done
  # A worker that crashes (its process killed: OOM, a lost node) cannot hand its tasks back:
  # they come back when their lease runs out.
  crashed="$(holding_worker 60)" || { echo "cluster: no worker held a task in night 1" >&2; kq logs job/night1 >&2; return 1; }
  ctr_ tasks kill -s SIGKILL "$(kq get pod "$crashed" -o jsonpath='{.status.containerStatuses[0].containerID}' | sed 's|^containerd://||')"
  t_kill=$SECONDS
  step "3. worker $crashed killed (SIGKILL) while holding tasks, $((SECONDS - t0)) s into night 1"
  # The other one's Pod deleted with no grace, as an operator would.
  victim="$(holding_worker 60 "$crashed")" || { echo "cluster: no other worker held a task in night 1" >&2; kq logs job/night1 >&2; return 1; }
  kq delete pod "$victim" --grace-period=0 --force >/dev/null 2>&1
  step "3. worker Pod $victim deleted while holding tasks, $((SECONDS - t0)) s into night 1 ($(s3_ results "$out_prefix" "$job") results stored)"
  # A second Job by hand the same day while the first coordinator holds the job: it must wait
  # for it, then join the run and find nothing left to queue.
  job_from_cron night1-again
  lease="$(kq get cronjob "$release-nightly" -o yaml | grep -A1 -- '- --ack-wait-s' | tail -n1 | tr -dc 0-9)"
  wait_job night1 $((lease + 180))
  took=$((SECONDS - t_kill))
  # The crashed worker's tasks were renewed at most a third of the lease before it died.
  [ "$took" -ge $((lease / 2)) ] || { echo "cluster: night 1 ended $took s after a worker holding tasks crashed, before their lease (${lease} s) could run out" >&2; return 1; }
  wait_job night1-again 300
  # Read whole, then matched: `kq logs | grep -q` fails under pipefail when grep stops
  # reading at the first match while kubectl still writes (a coordinator that waited long
  # says so more than once).
  local again_log
  again_log="$(kq logs job/night1-again)"
  [[ "$again_log" == *"is running; waiting for it to end"* ]] ||
    { echo "cluster: the second coordinator of night 1 did not wait for the first:" >&2; echo "$again_log" >&2; return 1; }
  [ "$(published night1-again)" = 0 ] || { echo "cluster: the second coordinator of night 1 queued $(published night1-again) tasks" >&2; return 1; }
  [ "$(published night1)" = "$objects" ] || { echo "cluster: night 1 queued $(published night1) tasks, not $objects" >&2; return 1; }
  s3_ check-job "$out_prefix" "$job" "$pages"
  # The joining coordinator closed the run again: the night's manifest still counts the night's work.
  s3_ check-run "$out_prefix" "$job" "$today" objects=$objects objects_new=$objects objects_changed=0 objects_unchanged=0 objects_removed=0 \
    tasks_done=$objects pages_ok=$pages pages_failed=0 tasks_dead_lettered=0
  night1_tasks=$objects night1_pages=$pages
  coordinator_image_id="$(kq get pods -l job-name=night1 -o jsonpath='{.items[0].status.containerStatuses[0].imageID}')"
  step "2. night 1 ($today) by kubectl create job --from=cronjob/$release-nightly: exit 0, $objects objects, $pages pages once"
  step "3. night 1 done ${took} s after the crash (lease ${lease} s), nothing lost or twice; the Job made by hand meanwhile waited, joined, queued nothing"
}

proof_night2() {
  local extra=5 tomorrow
  tomorrow="$(date -u -d tomorrow +%F)"
  # 5 scans arrive in the input prefix.
  mkdir -p "$STATE/more"
  for i in $(seq 1 $extra); do cp tests/fixtures/docs/scanned.pdf "$STATE/more/scan-$i.pdf"; done
  s3_ put "$STATE/more" in/more
  job_from_cron night2 "${tomorrow}T02:00:00Z"
  wait_job night2 600
  s3_ check-job "$out_prefix" "$job" $((pages + extra))
  s3_ check-run "$out_prefix" "$job" "$tomorrow" objects=$((objects + extra)) objects_new=$extra objects_changed=0 \
    objects_unchanged=$objects objects_removed=0 tasks_done=$extra tasks_dead_lettered=0 pages_ok=$extra pages_failed=0 --new-under in/more/
  pages=$((pages + extra)) objects=$((objects + extra))
  step "night 2 ($tomorrow, QUIRE_JOB_TIME): $extra new objects and only their $extra tasks, the rest unchanged, $pages pages once"
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

proof_upgrade() {
  cat >"$STATE/upgrade.yaml" <<YAML
image: {tag: ci-next}
job: {pagesPerTask: 8}
worker: {slots: 1}
YAML
  helm_ upgrade "$release" helm/quire "$ns" "$STATE/upgrade.yaml"
  kq rollout status "deploy/$(kq get deploy -l app.kubernetes.io/component=worker -o jsonpath='{.items[0].metadata.name}')" --timeout=300s >/dev/null
  local workers; workers="$(kq get pods -l app.kubernetes.io/component=worker -o jsonpath='{range .items[*]}{.spec.containers[0].image}{"\n"}{end}' | sort -u)"
  [ "$workers" = localhost/quire:ci-next ] || { echo "cluster: workers after the upgrade run: $workers" >&2; return 1; }
  local args; args="$(kq get cronjob "$release-nightly" -o jsonpath='{.spec.jobTemplate.spec.template.spec.containers[0].args}')"
  grep -q '"--pages-per-task","8"' <<<"$args" || { echo "cluster: the CronJob after the upgrade: $args" >&2; return 1; }
  step "4. helm upgrade to localhost/quire:ci-next, pagesPerTask 8, 1 slot: workers rolled onto it"
}

proof_schedule() {
  local at minute hour name today pod image id
  today="$(date -u +%F)"
  # One more object arrives; the CronJob's own run takes it.
  s3_ put examples/report.pdf in/late/report.pdf
  # A minute at least 60 s away, so the upgrade lands before it.
  at=$(( ($(date -u +%s) + 120) / 60 * 60 ))
  minute="$(date -u -d "@$at" +%-M)"; hour="$(date -u -d "@$at" +%-H)"
  cat >"$STATE/schedule.yaml" <<YAML
coordinator: {schedule: "$minute $hour * * *"}
YAML
  helm_ upgrade "$release" helm/quire "$ns" "$STATE/schedule.yaml"
  local deadline=$((SECONDS + at - $(date -u +%s) + 90))
  until name="$(scheduled_job)" && [ -n "$name" ]; do
    [ $SECONDS -lt $deadline ] || { echo "cluster: the CronJob made no Job by $(date -u -d "@$at" +%H:%M) + 90 s" >&2; kq describe cronjob >&2; return 1; }
    sleep 2
  done
  wait_job "$name" 600
  pod="$(kq get pods -l job-name="$name" -o jsonpath='{.items[0].metadata.name}')"
  image="$(kq get pod "$pod" -o jsonpath='{.status.containerStatuses[0].image}')"
  id="$(kq get pod "$pod" -o jsonpath='{.status.containerStatuses[0].imageID}')"
  [ "$image" = localhost/quire:ci-next ] || { echo "cluster: the coordinator after the upgrade ran $image" >&2; return 1; }
  [ "$id" != "$coordinator_image_id" ] || { echo "cluster: the coordinator after the upgrade ran the old image id $id" >&2; return 1; }
  pages=$((pages + 3)) objects=$((objects + 1))
  s3_ check-job "$out_prefix" "$job" "$pages"
  # Today's run again (night 1's name): the coordinator queued only the new object's one task; the
  # run's counts are night 1's work and that task's.
  [ "$(published "$name")" = 1 ] || { echo "cluster: the scheduled run queued $(published "$name") tasks, not 1" >&2; kq logs "job/$name" >&2; return 1; }
  s3_ check-run "$out_prefix" "$job" "$today" tasks_done=$((night1_tasks + 1)) pages_ok=$((night1_pages + 3)) pages_failed=0
  local finished; finished="$(s3_ finished "$out_prefix" "$job" "$today")"
  [ "$(date -u -d "$finished" +%s)" -ge "$at" ] || { echo "cluster: run $today finished at $finished, before the schedule" >&2; return 1; }
  step "6. the CronJob fired at $(date -u -d "@$at" +%H:%M) UTC by itself ($name) on localhost/quire:ci-next: the new object's task only, $pages pages once"
}

# KEDA (issue 19, point 5): its operator and metrics adapter built from the
# Go module github.com/kedacore/keda/v2 (scripts/cluster/build-keda.sh), on
# images of their own binaries, in the namespace keda; its CRDs applied from
# the module. Only what these two need: the operator reads the scalers'
# targets and scales them, the adapter serves external.metrics.k8s.io through
# the API server's aggregation layer (the requestheader flags in
# scripts/test-cluster.sh), and both talk gRPC over mutual TLS with the pair
# scripts/test-cluster.sh signs with the cluster's CA (no cert rotation, no
# admission webhooks). Started early, waited for in proof_keda.
deploy_keda() {
  local crd
  for crd in "$KEDA_SRC"/config/crd/bases/*.yaml; do
    # Too large for the last-applied annotation of kubectl apply.
    k create -f "$crd" >/dev/null
  done
  k create namespace keda >/dev/null
  k -n keda create secret generic kedaorg-certs --from-file=ca.crt="$STATE/pki/ca.crt" \
    --from-file=tls.crt="$STATE/pki/keda.crt" --from-file=tls.key="$STATE/pki/keda.key" >/dev/null
  k apply -f - >/dev/null <<YAML
apiVersion: v1
kind: ServiceAccount
metadata: {name: keda-operator, namespace: keda}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: keda-metrics-apiserver, namespace: keda}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: quire-test-keda-operator}
rules:
  # Its own objects and their status.
  - apiGroups: [keda.sh]
    resources: [scaledobjects, scaledobjects/status, scaledobjects/finalizers, scaledjobs, scaledjobs/status,
                scaledjobs/finalizers, triggerauthentications, triggerauthentications/status,
                clustertriggerauthentications, clustertriggerauthentications/status]
    verbs: [get, list, watch, update, patch]
  - apiGroups: [eventing.keda.sh]
    resources: [cloudeventsources, cloudeventsources/status, clustercloudeventsources, clustercloudeventsources/status]
    verbs: [get, list, watch, update, patch]
  # The HPA it makes for each ScaledObject, the scale it sets from and to zero.
  - apiGroups: [autoscaling]
    resources: [horizontalpodautoscalers]
    verbs: [get, list, watch, create, update, patch, delete]
  - apiGroups: [apps]
    resources: [deployments, statefulsets, deployments/scale, statefulsets/scale]
    verbs: [get, list, watch, update, patch]
  # ScaledJobs' Jobs (its controller watches them even when there are none).
  - apiGroups: [batch]
    resources: [jobs]
    verbs: [get, list, watch, create, update, patch, delete]
  # The scale targets' Pods and the environment their containers read.
  - apiGroups: [""]
    resources: [pods, configmaps, secrets, services, serviceaccounts, limitranges]
    verbs: [get, list, watch]
  - apiGroups: ["", events.k8s.io]
    resources: [events]
    verbs: [create, patch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: quire-test-keda-operator}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: quire-test-keda-operator}
subjects: [{kind: ServiceAccount, name: keda-operator, namespace: keda}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: quire-test-keda-metrics-apiserver}
rules:
  - apiGroups: [keda.sh]
    resources: [scaledobjects]
    verbs: [get, list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: quire-test-keda-metrics-apiserver}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: quire-test-keda-metrics-apiserver}
subjects: [{kind: ServiceAccount, name: keda-metrics-apiserver, namespace: keda}]
---
# An extension API server checks its callers with the API server (token and
# access reviews) and reads the front proxy's CA from kube-system.
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: quire-test-keda-metrics-apiserver-auth-delegator}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "system:auth-delegator"}
subjects: [{kind: ServiceAccount, name: keda-metrics-apiserver, namespace: keda}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: quire-test-keda-metrics-apiserver-auth-reader, namespace: kube-system}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: extension-apiserver-authentication-reader}
subjects: [{kind: ServiceAccount, name: keda-metrics-apiserver, namespace: keda}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: keda-operator, namespace: keda}
spec:
  replicas: 1
  selector: {matchLabels: {app: keda-operator}}
  template:
    # app=keda-operator: the label KEDA's chart gives it, which the quire chart's NATS NetworkPolicy admits.
    metadata: {labels: {app: keda-operator}}
    spec:
      serviceAccountName: keda-operator
      securityContext: {runAsNonRoot: true, runAsUser: 1000, seccompProfile: {type: RuntimeDefault}}
      containers:
        - name: operator
          image: localhost/quire-cluster/keda-operator:$KEDA_VERSION
          imagePullPolicy: Never
          args: [--leader-elect=false, --zap-encoder=console, --cert-dir=/certs, --enable-cert-rotation=false,
                 --metrics-bind-address=:8080, --health-probe-bind-address=:8081]
          env:
            - {name: WATCH_NAMESPACE, value: ""}
            - {name: POD_NAMESPACE, valueFrom: {fieldRef: {fieldPath: metadata.namespace}}}
            - {name: POD_NAME, valueFrom: {fieldRef: {fieldPath: metadata.name}}}
          ports: [{name: grpc, containerPort: 9666}, {name: health, containerPort: 8081}]
          readinessProbe: {httpGet: {path: /readyz, port: health}, periodSeconds: 2}
          resources: {requests: {cpu: 50m, memory: 64Mi}, limits: {memory: 1Gi}}
          securityContext: {allowPrivilegeEscalation: false, readOnlyRootFilesystem: true, capabilities: {drop: [ALL]}}
          volumeMounts: [{name: certs, mountPath: /certs, readOnly: true}, {name: tmp, mountPath: /tmp}]
      volumes:
        - {name: certs, secret: {secretName: kedaorg-certs}}
        - {name: tmp, emptyDir: {}}
---
apiVersion: v1
kind: Service
metadata: {name: keda-operator, namespace: keda}
spec:
  selector: {app: keda-operator}
  ports: [{name: grpc, port: 9666, targetPort: grpc}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: keda-metrics-apiserver, namespace: keda}
spec:
  replicas: 1
  selector: {matchLabels: {app: keda-metrics-apiserver}}
  template:
    metadata: {labels: {app: keda-metrics-apiserver}}
    spec:
      serviceAccountName: keda-metrics-apiserver
      securityContext: {runAsNonRoot: true, runAsUser: 1000, seccompProfile: {type: RuntimeDefault}}
      containers:
        - name: adapter
          image: localhost/quire-cluster/keda-adapter:$KEDA_VERSION
          imagePullPolicy: Never
          args: [--secure-port=6443, --cert-dir=/certs, --tls-cert-file=/certs/tls.crt, --tls-private-key-file=/certs/tls.key,
                 --metrics-service-address=keda-operator.keda.svc.cluster.local:9666, --port=8080, --zap-encoder=console]
          env:
            - {name: WATCH_NAMESPACE, value: ""}
            - {name: POD_NAMESPACE, valueFrom: {fieldRef: {fieldPath: metadata.namespace}}}
          ports: [{name: https, containerPort: 6443}]
          readinessProbe: {httpGet: {path: /readyz, port: https, scheme: HTTPS}, periodSeconds: 2}
          resources: {requests: {cpu: 50m, memory: 64Mi}, limits: {memory: 1Gi}}
          securityContext: {allowPrivilegeEscalation: false, readOnlyRootFilesystem: true, capabilities: {drop: [ALL]}}
          volumeMounts: [{name: certs, mountPath: /certs, readOnly: true}, {name: tmp, mountPath: /tmp}]
      volumes:
        - {name: certs, secret: {secretName: kedaorg-certs}}
        - {name: tmp, emptyDir: {}}
---
apiVersion: v1
kind: Service
metadata: {name: keda-metrics-apiserver, namespace: keda}
spec:
  selector: {app: keda-metrics-apiserver}
  ports: [{name: https, port: 443, targetPort: https}]
---
apiVersion: apiregistration.k8s.io/v1
kind: APIService
metadata: {name: v1beta1.external.metrics.k8s.io}
spec:
  group: external.metrics.k8s.io
  version: v1beta1
  groupPriorityMinimum: 100
  versionPriority: 100
  service: {name: keda-metrics-apiserver, namespace: keda, port: 443}
  caBundle: $(base64 -w0 <"$STATE/pki/ca.crt")
YAML
}

# worker_state: "SPEC READY PODS" of the worker Deployment: its replicas, those
# ready, and the worker Pods that exist (terminating ones included).
worker_state() {
  local d pods
  d="$(kq get deploy "$release-worker" -o jsonpath='{.spec.replicas} {.status.readyReplicas}')"
  pods="$(kq get pods -l app.kubernetes.io/component=worker --no-headers 2>/dev/null | grep -c . || true)"
  set -- $d
  echo "${1:-?} ${2:-0} $pods"
}

# external_metric NAME SCALEDOBJECT: the value KEDA's adapter serves for it
# through the API server (what the HPA reads), as a number.
external_metric() {
  k get --raw "/apis/external.metrics.k8s.io/v1beta1/namespaces/$ns/$1?labelSelector=scaledobject.keda.sh%2Fname%3D$2" |
    python3 -c '
import json, sys
v = json.load(sys.stdin)["items"][0]["value"]
print(int(v[:-1]) / 1000 if v.endswith("m") else float(v.rstrip("k")) * (1000 if v.endswith("k") else 1))'
}

proof_keda() {
  if [ -z "${KEDA:-}" ]; then
    echo "=================================================================================" >&2
    echo "cluster: SKIPPED 5. KEDA: its binaries are not cached under ${KEDA_DIR:-the tools cache}." >&2
    echo "Build them once with: scripts/test-cluster.sh --build   (then rerun)" >&2
    echo "=================================================================================" >&2
    return 0
  fi
  local so="$release-worker" t0 st spec ready pods max_spec=0 max_ready=0 metric value max_value=0 t_up="" t_done
  k -n keda rollout status deploy/keda-operator --timeout=180s >/dev/null
  k -n keda rollout status deploy/keda-metrics-apiserver --timeout=180s >/dev/null
  k wait --for=condition=Available apiservice/v1beta1.external.metrics.k8s.io --timeout=120s >/dev/null
  # Seconds, so that the proof sees both edges within a few minutes; at most 2
  # workers, one per 2 queued tasks (so more than one needs the HPA, that is the adapter).
  cat >"$STATE/keda.yaml" <<YAML
keda: {enabled: true, pollingInterval: 2, cooldownPeriod: 15, lagThreshold: 2, maxReplicaCount: 2}
YAML
  t0=$SECONDS
  helm_ upgrade "$release" helm/quire "$ns" "$STATE/keda.yaml"
  kq wait --for=condition=Ready "scaledobject/$so" --timeout=120s >/dev/null ||
    { kq describe scaledobject "$so" >&2; k -n keda logs deploy/keda-operator --tail=50 >&2; return 1; }
  # Idle: the queue is empty, so KEDA takes the workers to zero.
  local deadline=$((SECONDS + 120))
  until [ "$(worker_state)" = "0 0 0" ]; do
    [ $SECONDS -lt $deadline ] || { echo "cluster: workers not at zero 120 s after KEDA took them over: $(worker_state)" >&2; kq describe scaledobject "$so" >&2; return 1; }
    sleep 1
  done
  metric="$(kq get hpa "keda-hpa-$so" -o jsonpath='{.spec.metrics[0].external.metric.name}')"
  value="$(external_metric "$metric" "$so")"
  [ "$value" = 0.0 ] || { echo "cluster: KEDA's metric $metric is $value with an empty queue" >&2; return 1; }
  step "5. helm upgrade keda.enabled=true: ScaledObject $so Ready, idle queue: worker Deployment at 0 replicas, no worker Pod ($((SECONDS - t0)) s); $metric = 0 through the API server"
  # A night with work: 40 scans of 16 pages arrive, enough to keep more than lagThreshold
  # tasks queued past the HPA's 15 s loop. The coordinator queues a task per document; the
  # worker that takes one splits it into two of 8 pages (pagesPerTask since the upgrade).
  local n=40 tasks=40 n_pages=640 day t_scaled="" t_two="" t_empty="" after_empty seen_up=0
  day="$(date -u -d '+2 days' +%F)"
  mkdir -p "$STATE/keda-in"
  for i in $(seq -w 1 $n); do cp "$STATE/scan16.pdf" "$STATE/keda-in/scan-$i.pdf"; done
  s3_ put "$STATE/keda-in" in/keda
  [ "$(worker_state)" = "0 0 0" ] || { echo "cluster: workers before night 3: $(worker_state)" >&2; return 1; }
  t0=$SECONDS
  job_from_cron night3 "${day}T02:00:00Z"
  deadline=$((SECONDS + 400))
  while :; do
    st="$(kq get job night3 -o jsonpath='{range .status.conditions[?(@.status=="True")]}{.type} {end}' 2>/dev/null || true)"
    read -r spec ready pods <<<"$(worker_state)"
    value="$(external_metric "$metric" "$so" 2>/dev/null || echo -1)"
    [ "$spec" = "?" ] || [ "$spec" -le "$max_spec" ] || max_spec=$spec
    [ "$ready" -le "$max_ready" ] || max_ready=$ready
    [ -n "$t_scaled" ] || [ "$spec" = "?" ] || [ "$spec" -lt 1 ] || t_scaled=$((SECONDS - t0))
    [ -n "$t_two" ] || [ "$spec" = "?" ] || [ "$spec" -lt 2 ] || t_two=$((SECONDS - t0))
    [ -n "$t_up" ] || [ "$ready" -lt 1 ] || t_up=$((SECONDS - t0))
    # Once a worker is up, KEDA must keep one until the tasks are done (acknowledged).
    if [ "$ready" -ge 1 ]; then seen_up=1; fi
    if [ "$seen_up" = 1 ] && [ -z "$t_empty" ] && [ "$spec" = 0 ]; then
      echo "cluster: KEDA took the workers to 0 while night 3 ran (its metric: $value)" >&2; kq logs job/night3 --tail=20 >&2; return 1
    fi
    if python3 -c 'import sys; sys.exit(not float(sys.argv[1]) > float(sys.argv[2]))' "$value" "$max_value"; then max_value=$value; fi
    # The backlog (pending + unacknowledged tasks) is gone: the cooldown starts.
    [ -n "$t_empty" ] || [ "$max_value" = 0 ] || [ "$value" != 0.0 ] || t_empty=$SECONDS
    case "$st" in *Complete*|*Failed*) break ;; esac
    [ $SECONDS -lt $deadline ] || break
    sleep 1
  done
  wait_job night3 5
  t_done=$((SECONDS - t0))
  [ -n "$t_up" ] || { echo "cluster: no worker became ready while night 3 ran (replicas at most $max_spec)" >&2; return 1; }
  [ "$max_value" != 0 ] || { echo "cluster: KEDA's metric $metric stayed 0 through night 3" >&2; return 1; }
  # KEDA itself only takes a target from 0 to 1; beyond that it is the HPA it made, reading
  # the metric through the API server's aggregation layer.
  [ "$max_spec" = 2 ] || { echo "cluster: the workers reached $max_spec replicas in night 3, not maxReplicaCount 2 (the HPA did not scale them)" >&2; kq describe hpa "keda-hpa-$so" >&2; return 1; }
  [ "$(published night3)" = "$tasks" ] || { echo "cluster: night 3 queued $(published night3) tasks, not $tasks" >&2; return 1; }
  pages=$((pages + n_pages)) objects=$((objects + n))
  s3_ check-job "$out_prefix" "$job" "$pages"
  s3_ check-run "$out_prefix" "$job" "$day" objects=$objects objects_new=$n objects_changed=0 \
    tasks_done=$((n * 2)) tasks_dead_lettered=0 pages_ok=$n_pages pages_failed=0 --new-under in/keda/
  step "5. night 3 ($day): KEDA scaled the workers 0 -> 1 ${t_scaled} s after the Job started (first ready at ${t_up} s), its HPA 1 -> 2 at ${t_two} s ($metric up to $max_value through the API server); the run completed at ${t_done} s: $tasks documents, $((n * 2)) tasks of 8 pages, $n_pages pages once"
  # And back to zero once the queue stayed empty for the cooldown, not before.
  [ -n "$t_empty" ] || t_empty=$SECONDS
  local zero_at="" last_active since_active
  deadline=$((SECONDS + 15 + 90))
  until st="$(worker_state)" && [ "$st" = "0 0 0" ]; do
    [ $SECONDS -lt $deadline ] || { echo "cluster: workers not back at zero $((15 + 90)) s after night 3: $st" >&2; kq describe scaledobject "$so" >&2; return 1; }
    [ -n "$zero_at" ] || [ "${st%% *}" != 0 ] || zero_at=$(date -u +%s)
    sleep 1
  done
  [ -n "$zero_at" ] || zero_at=$(date -u +%s)
  after_empty=$((SECONDS - t_empty))
  # Not before the cooldown: from KEDA's own record of the last time it saw a backlog to
  # the moment the Deployment was seen at 0 replicas.
  last_active="$(kq get scaledobject "$so" -o jsonpath='{.status.lastActiveTime}')"
  since_active=$((zero_at - $(date -u -d "$last_active" +%s)))
  [ "$since_active" -ge 14 ] || { echo "cluster: KEDA removed the workers ${since_active} s after it last saw a backlog ($last_active), before the cooldown (15 s)" >&2; return 1; }
  step "5. KEDA took the workers back to 0 replicas ${since_active} s after it last saw a backlog (cooldownPeriod 15 s, pollingInterval 2 s); no worker Pod left ${after_empty} s after the backlog was seen empty"
  # KEDA's last read of the queue succeeded (a failed one makes Ready Unknown).
  [ "$(kq get scaledobject "$so" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}')" = True ] ||
    { kq describe scaledobject "$so" >&2; return 1; }
  # The alert QuireKedaScalerErrors reads a counter KEDA's operator must export for this
  # ScaledObject (created at 0 by its first good read). On this loaded 2-core node a read
  # of NATS's monitoring port may time out now and then (KEDA's 3 s): counted, not refused;
  # the alert waits for 10 minutes of them.
  local series ip errs
  series="$(sed -n '/alert: QuireKedaScalerErrors/,/for:/s/.*(\(keda_[a-z_]*\){.*/\1/p' helm/quire/files/rules.yaml)"
  ip="$(k -n keda get pods -l app=keda-operator -o jsonpath='{.items[0].status.podIP}')"
  errs="$(curl -sf --max-time 5 "http://$ip:8080/metrics" | awk -v m="$series" -v so="scaledObject=\"$so\"" '
    index($0, m "{") == 1 && index($0, so) {found = 1; sum += $NF} END {if (found) print sum}')"
  [ -n "$errs" ] || { echo "cluster: KEDA's operator exports no $series for $so (the alert QuireKedaScalerErrors reads it)" >&2; return 1; }
  step "5. KEDA's operator exports $series for $so (what QuireKedaScalerErrors reads): $errs errors in the proof; ScaledObject Ready"
}

proofs() {
  deploy_garage
  if [ -n "${KEDA:-}" ]; then deploy_keda; fi
  upload_inputs
  step "Garage in the cluster, bucket $bucket filled ($S3_ENDPOINT)"
  # For a look with QUIRE_CLUSTER_KEEP=1: `source STATE/proofs.env` gives kubectl and s3.py their settings.
  declare -p KUBECONFIG KUBECTL HELM_PY STATE IMAGES BUCKET AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY S3_ENDPOINT |
    sed 's/^declare -[-x]* /export /' >"$STATE/proofs.env"
  values_file
  proof_install
  proof_netpol
  proof_night1
  proof_night2
  proof_upgrade
  proof_schedule
  proof_keda
}
