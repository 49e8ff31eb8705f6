#!/usr/bin/env python3
"""Checks of the quire Helm chart, offline (no cluster, no helm binary).

Run by scripts/test-deploy.sh in a venv with helm-python-sdk (Helm's Go SDK
through ctypes), kubernetes-validate and PyYAML:

    python helm/quire/tests/check_chart.py

For every ci/*-values.yaml scenario: `helm lint --strict`, render, validate
every manifest of a built-in kind with `kubernetes-validate --strict` against
the oldest and the newest Kubernetes version it ships in the chart's range
(>= 1.27), check the custom resources (KEDA ScaledObject, PodMonitor,
PrometheusRule) against their shapes, and assert what matters for operators.
Then values.schema.json must refuse bad values. Exits 1 on any failure.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

import helm_python as helm
import jsonschema
import kubernetes_validate
import yaml

CHART = Path(__file__).resolve().parents[1]
ROOT = CHART.parents[1]
SCENARIOS = sorted((CHART / "ci").glob("*-values.yaml"))
RELEASE, NAMESPACE = "quire", "batch"
CUSTOM_KINDS = {"ScaledObject", "PodMonitor", "PrometheusRule"}

failures: list[str] = []
passed = 0


def check(name: str, fn) -> None:
    """Runs one named check; an AssertionError or exception is a failure."""
    global passed
    try:
        fn()
        passed += 1
    except Exception as e:  # noqa: BLE001 - every failure is reported the same way
        detail = str(e) if isinstance(e, AssertionError) else traceback.format_exc(limit=3)
        failures.append(f"{name}: {detail}")
        print(f"FAIL {name}: {detail}", file=sys.stderr)


def render(values: dict, release: str = RELEASE) -> list[dict]:
    chart = helm.Chart.load(str(CHART))
    out = chart.render(values, name=release, namespace=NAMESPACE, is_install=True)
    docs = []
    for path, text in sorted(out.items()):
        if path.endswith("NOTES.txt"):
            continue
        for d in yaml.safe_load_all(text):
            if d:
                d.setdefault("metadata", {})
                d["_template"] = path
                docs.append(d)
    return docs


def notes_for(values: dict, release: str) -> str:
    chart = helm.Chart.load(str(CHART))
    out = chart.render(values, name=release, namespace=NAMESPACE, is_install=True)
    return next(t for p, t in out.items() if p.endswith("NOTES.txt"))


def notes(values: dict) -> str:
    return notes_for(values, RELEASE)


def strip(d: dict) -> dict:
    return {k: v for k, v in d.items() if k != "_template"}


def kinds(docs, kind):
    return [d for d in docs if d["kind"] == kind]


def one(docs, kind, name_suffix=""):
    found = [d for d in kinds(docs, kind) if d["metadata"]["name"].endswith(name_suffix)]
    assert len(found) == 1, f"expected one {kind} *{name_suffix}, found {[d['metadata']['name'] for d in found]}"
    return found[0]


def quire_docs(docs):
    """Manifests of this chart itself (not of the bundled NATS chart)."""
    return [d for d in docs if d["_template"].startswith("quire/templates/")]


def pod_specs(docs):
    """(owner, pod spec) of every workload quire renders."""
    for d in quire_docs(docs):
        k = d["kind"]
        if k in ("Deployment", "Job", "StatefulSet", "DaemonSet"):
            yield d, d["spec"]["template"]["spec"]
        elif k == "CronJob":
            yield d, d["spec"]["jobTemplate"]["spec"]["template"]["spec"]


def bundled_nats(values) -> bool:
    """Whether the values use the bundled NATS chart (on unless nats.enabled=false)."""
    return values.get("nats", {}).get("enabled", True)


def run_configured(values) -> bool:
    return bool(values.get("job", {}).get("inputs"))


def arg_after(args, flag):
    assert flag in args, f"{flag} missing from {args}"
    return args[args.index(flag) + 1]


def env_of(container):
    return {e["name"]: e for e in container.get("env", [])}


# ---------------------------------------------------------------------------
# Shapes of the custom resources (the fields quire uses, typed as the CRDs
# type them; unknown fields refused so that a typo cannot slip through).

STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
LABEL_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "properties": {"matchLabels": STR_MAP, "matchExpressions": {"type": "array"}},
}
METADATA = {
    "type": "object",
    "required": ["name"],
    "properties": {"name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", "maxLength": 253},
                   "labels": STR_MAP, "annotations": STR_MAP, "namespace": {"type": "string"}},
}
DURATION = {"type": "string", "pattern": "^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"}
SHAPES = {
    ("keda.sh/v1alpha1", "ScaledObject"): {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "metadata": METADATA,
            "spec": {
                "type": "object",
                "additionalProperties": False,
                "required": ["scaleTargetRef", "triggers"],
                "properties": {
                    "scaleTargetRef": {
                        "type": "object", "additionalProperties": False, "required": ["name"],
                        "properties": {"name": {"type": "string"}, "apiVersion": {"type": "string"},
                                       "kind": {"type": "string"}, "envSourceContainerName": {"type": "string"}},
                    },
                    "minReplicaCount": {"type": "integer", "minimum": 0},
                    "maxReplicaCount": {"type": "integer", "minimum": 1},
                    "idleReplicaCount": {"type": "integer", "minimum": 0},
                    "pollingInterval": {"type": "integer", "minimum": 1},
                    "cooldownPeriod": {"type": "integer", "minimum": 0},
                    "fallback": {"type": "object"},
                    "advanced": {"type": "object"},
                    "triggers": {
                        "type": "array", "minItems": 1,
                        "items": {
                            "type": "object", "additionalProperties": False, "required": ["type", "metadata"],
                            "properties": {"type": {"type": "string"}, "name": {"type": "string"},
                                           "metadata": STR_MAP, "authenticationRef": {"type": "object"},
                                           "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                                           "useCachedMetrics": {"type": "boolean"}},
                        },
                    },
                },
            },
        },
    },
    ("monitoring.coreos.com/v1", "PodMonitor"): {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "metadata": METADATA,
            "spec": {
                "type": "object", "additionalProperties": False, "required": ["selector"],
                "properties": {
                    "selector": LABEL_SELECTOR,
                    "namespaceSelector": {"type": "object"},
                    "jobLabel": {"type": "string"},
                    "podMetricsEndpoints": {
                        "type": "array",
                        "items": {"type": "object", "additionalProperties": False,
                                  "properties": {"port": {"type": "string"}, "path": {"type": "string"},
                                                 "interval": DURATION, "scrapeTimeout": DURATION,
                                                 "scheme": {"enum": ["http", "https"]},
                                                 "relabelings": {"type": "array"}, "metricRelabelings": {"type": "array"}}},
                    },
                },
            },
        },
    },
    ("monitoring.coreos.com/v1", "PrometheusRule"): {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "metadata": METADATA,
            "spec": {
                "type": "object", "additionalProperties": False,
                "properties": {"groups": {"type": "array", "items": {
                    "type": "object", "additionalProperties": False, "required": ["name", "rules"],
                    "properties": {
                        "name": {"type": "string", "minLength": 1}, "interval": DURATION,
                        "rules": {"type": "array", "items": {
                            "type": "object", "additionalProperties": False, "required": ["expr"],
                            "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
                            "properties": {"alert": {"type": "string"}, "record": {"type": "string"},
                                           "expr": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
                                           "for": DURATION, "keep_firing_for": DURATION,
                                           "labels": STR_MAP, "annotations": STR_MAP},
                        }},
                    },
                }}},
            },
        },
    },
}


# ---------------------------------------------------------------------------
# Facts from the rest of the repository the chart must agree with.

def consumer_name() -> str:
    src = (ROOT / "crates/quire-queue/src/jetstream.rs").read_text()
    m = re.search(r'consumer:\s*"([^"]+)"\.into\(\)', src)
    assert m, "durable consumer name not found in jetstream.rs"
    return m.group(1)


def stream_name() -> str:
    src = (ROOT / "crates/quire-queue/src/jetstream.rs").read_text()
    m = re.search(r'stream:\s*"([^"]+)"\.into\(\)', src)
    assert m, "stream name not found in jetstream.rs"
    return m.group(1)


def quire_env_names() -> set[str]:
    src = (ROOT / "crates/quire/src/cli.rs").read_text()
    return set(re.findall(r'env = "(QUIRE_[A-Z0-9_]+)"', src))


def metric_names() -> set[str]:
    """quire_* series the workers export (histograms with their suffixes)."""
    src = (ROOT / "crates/quire-pipeline/src/metrics.rs").read_text()
    names = set()
    for m in re.finditer(r'(Opts|HistogramOpts|IntCounter|IntGauge|Gauge)::(new|with_opts)\(\s*"([a-z_]+)"', src):
        names.add("quire_" + m.group(3))
    hist = set(re.findall(r'HistogramOpts::new\(\s*"([a-z_]+)"', src))
    for h in hist:
        for suffix in ("_bucket", "_sum", "_count"):
            names.add(f"quire_{h}{suffix}")
    assert "quire_tasks_total" in names and "quire_batch_size_bucket" in names, names
    return names


# ---------------------------------------------------------------------------

def supported_versions() -> list[str]:
    """The oldest and the newest Kubernetes that kubernetes-validate ships within
    the chart's kubeVersion (>= 1.27)."""
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["kubeVersion"].startswith(">= 1.27"), chart["kubeVersion"]
    ok = [v for v in kubernetes_validate.utils.all_versions()
          if tuple(int(x) for x in v.split(".")[:2]) >= (1, 27)]
    assert ok, "kubernetes-validate ships no version >= 1.27"
    return [ok[0], ok[-1]]


def lint(values: dict) -> None:
    report = helm.lint(str(CHART), values, strict=True, namespace=NAMESPACE)
    bad = [m for m in report.get("messages", []) if m.get("severity", 0) >= 2]
    assert not report.get("errors") and not bad, f"helm lint --strict: {report}"


def kube_validate(docs: list[dict], versions: list[str]) -> None:
    builtin = [strip(d) for d in docs if d["kind"] not in CUSTOM_KINDS]
    assert builtin, "nothing rendered"
    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for i, d in enumerate(builtin):
            p = Path(tmp) / f"{i:03d}-{d['kind']}.yaml"
            p.write_text(yaml.safe_dump(d))
            files.append(str(p))
        exe = Path(sys.executable).with_name("kubernetes-validate")
        for v in versions:
            r = subprocess.run([str(exe), "--strict", "--quiet", "-k", v, *files], capture_output=True, text=True)
            assert r.returncode == 0, f"kubernetes-validate --strict -k {v}:\n{r.stdout}{r.stderr}"


def custom_shapes(docs: list[dict]) -> None:
    for d in docs:
        if d["kind"] in CUSTOM_KINDS:
            shape = SHAPES.get((d["apiVersion"], d["kind"]))
            assert shape, f"no shape for {d['apiVersion']} {d['kind']}"
            jsonschema.validate(strip(d), shape)


def security_everywhere(docs: list[dict], values: dict) -> None:
    n = 0
    # 65532 (the images' user) unless the values drop it (OpenShift assigns one).
    uid = values.get("podSecurityContext", {}).get("runAsUser", 65532)
    for owner, spec in pod_specs(docs):
        name = f"{owner['kind']}/{owner['metadata']['name']}"
        psc = spec.get("securityContext", {})
        assert psc.get("runAsNonRoot") is True and psc.get("runAsUser") == uid, f"{name}: pod securityContext {psc}"
        assert psc.get("seccompProfile", {}).get("type") == "RuntimeDefault", f"{name}: seccomp {psc}"
        assert spec.get("automountServiceAccountToken") is False, f"{name}: service account token mounted"
        writable = {v["name"] for v in spec.get("volumes", []) if "emptyDir" in v or "persistentVolumeClaim" in v}
        for c in spec.get("containers", []) + spec.get("initContainers", []):
            sc = c.get("securityContext", {})
            assert sc.get("readOnlyRootFilesystem") is True, f"{name}/{c['name']}: root filesystem writable"
            assert sc.get("allowPrivilegeEscalation") is False, f"{name}/{c['name']}: privilege escalation"
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], f"{name}/{c['name']}: capabilities {sc}"
            assert sc.get("runAsNonRoot") is True and sc.get("privileged") is False, f"{name}/{c['name']}: {sc}"
            mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
            assert mounts.get("/tmp") in writable, f"{name}/{c['name']}: /tmp is not a writable volume ({mounts})"
            assert mounts.get("/cache") in writable, f"{name}/{c['name']}: no writable cache volume ({mounts})"
            n += 1
    assert n >= 1, "no quire container rendered"


def no_secret_values(docs: list[dict], values: dict) -> None:
    secrets = []
    for path in (("s3", "accessKeyId"), ("s3", "secretAccessKey"), ("huggingface", "token"),
                 ("queue", "auth", "password"), ("queue", "auth", "token"), ("queue", "auth", "creds")):
        v = values
        for k in path:
            v = (v or {}).get(k)
        if v:
            secrets.append(v)
    made = {d["metadata"]["name"] for d in quire_docs(docs) if d["kind"] == "Secret"}
    for d in docs:
        if d["kind"] == "Secret" and d["metadata"]["name"] in made:
            continue
        text = json.dumps(strip(d))
        for s in secrets:
            for form in (s, base64.b64encode(s.encode()).decode(), s.strip().splitlines()[0] if "\n" in s.strip() else s):
                assert form not in text, f"a secret value appears in {d['kind']}/{d['metadata']['name']}"
    # Nothing secret-named is passed as a plain value: only secretKeyRef or a path to a mounted file.
    for owner, spec in pod_specs(docs):
        for c in spec["containers"]:
            for e in c.get("env", []):
                if re.search(r"PASSWORD|TOKEN|SECRET|ACCESS_KEY|CREDS|NKEY|TLS_KEY", e["name"]):
                    if "valueFrom" in e:
                        assert "secretKeyRef" in e["valueFrom"], f"{e['name']} not from a Secret"
                    else:
                        assert e["value"].startswith("/var/run/secrets/"), f"{e['name']} given inline"


def worker(docs):
    return one(docs, "Deployment", "-worker")


def worker_container(docs):
    return worker(docs)["spec"]["template"]["spec"]["containers"][0]


def probes_on_metrics_port(docs) -> None:
    c = worker_container(docs)
    port = int(arg_after(c["args"], "--metrics-addr").rsplit(":", 1)[1])
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports.get("metrics") == port, f"metrics port {ports} vs --metrics-addr {port}"
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}, c["readinessProbe"]
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}, c["livenessProbe"]
    spec = worker(docs)["spec"]["template"]["spec"]
    grace = int(arg_after(c["args"], "--grace-s"))
    # After --grace-s quire takes up to 10 s to hand unfinished tasks back.
    assert spec["terminationGracePeriodSeconds"] > grace + 10, "terminationGracePeriodSeconds must exceed --grace-s + 10 s"
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert "/dev/shm" not in mounts, "quire uses no shared memory: no /dev/shm volume"


QUANTITY = re.compile(r"^([0-9.]+)([EPTGMK]i?|[kmu]?)$")
UNITS = {"": 1, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18, "m": 1e-3, "u": 1e-6,
         "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}


def quantity(q) -> float:
    m = QUANTITY.match(str(q))
    assert m, f"not a quantity: {q}"
    return float(m.group(1)) * UNITS[m.group(2)]


def ephemeral_storage(docs) -> None:
    """Every disk emptyDir has a sizeLimit, and each quire container requests
    ephemeral storage with a limit that covers them (so a full emptyDir is
    refused by its sizeLimit, not the Pod evicted)."""
    for owner, spec in pod_specs(docs):
        disk = [v for v in spec.get("volumes", []) if "emptyDir" in v and v["emptyDir"].get("medium") != "Memory"]
        for v in disk:
            assert v["emptyDir"].get("sizeLimit"), f"{owner['metadata']['name']}: emptyDir {v['name']} without sizeLimit"
        need = sum(quantity(v["emptyDir"]["sizeLimit"]) for v in disk)
        for c in spec["containers"]:
            res = c.get("resources", {})
            req = res.get("requests", {}).get("ephemeral-storage")
            lim = res.get("limits", {}).get("ephemeral-storage")
            assert req and lim, f"{owner['metadata']['name']}/{c['name']}: ephemeral-storage request and limit missing ({res})"
            assert quantity(lim) > need, f"{owner['metadata']['name']}: ephemeral-storage limit {lim} does not cover its emptyDirs"
            assert quantity(req) <= quantity(lim)


def rollout(docs, values) -> None:
    s = worker(docs)["spec"]["strategy"]
    want = values.get("worker", {}).get("strategy")
    if want is None:
        assert s == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}}, s
    else:
        assert s["type"] == want["type"], s
    gpu = int(values.get("worker", {}).get("gpu", 0))
    if gpu and s["type"] == "RollingUpdate":
        assert str(s["rollingUpdate"]["maxSurge"]) in ("0", "0%"), "a GPU rollout would need a spare GPU"


RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                      "projected", "secret"}


def all_pod_specs(docs):
    """(owner, pod spec) of every workload rendered, the bundled NATS chart's included."""
    for d in docs:
        k = d["kind"]
        if k in ("Deployment", "Job", "StatefulSet", "DaemonSet"):
            yield d, d["spec"]["template"]["spec"]
        elif k == "CronJob":
            yield d, d["spec"]["jobTemplate"]["spec"]["template"]["spec"]


def restricted_pss(docs) -> None:
    """Every Pod passes the restricted Pod Security Standard (what a namespace
    labelled pod-security.kubernetes.io/enforce=restricted admits)."""
    n = 0
    for owner, spec in all_pod_specs(docs):
        name = f"{owner['kind']}/{owner['metadata']['name']}"
        psc = spec.get("securityContext", {})
        for host in ("hostNetwork", "hostPID", "hostIPC"):
            assert not spec.get(host), f"{name}: {host}"
        for v in spec.get("volumes", []):
            kind = set(v) - {"name"}
            assert kind <= RESTRICTED_VOLUMES, f"{name}: volume {v['name']} of type {kind}"
        for c in spec.get("containers", []) + spec.get("initContainers", []):
            sc = c.get("securityContext", {})
            where = f"{name}/{c['name']}"
            assert sc.get("allowPrivilegeEscalation") is False, f"{where}: allowPrivilegeEscalation not false"
            assert not sc.get("privileged"), f"{where}: privileged"
            caps = sc.get("capabilities", {})
            assert "ALL" in caps.get("drop", []), f"{where}: capabilities not dropped ({caps})"
            assert set(caps.get("add", [])) <= {"NET_BIND_SERVICE"}, f"{where}: adds {caps['add']}"
            non_root = sc.get("runAsNonRoot", psc.get("runAsNonRoot"))
            assert non_root is True, f"{where}: runAsNonRoot not set"
            assert sc.get("runAsUser", psc.get("runAsUser")) != 0, f"{where}: runs as uid 0"
            seccomp = (sc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
            assert seccomp in ("RuntimeDefault", "Localhost"), f"{where}: seccompProfile {seccomp}"
            n += 1
    assert n >= 1, "no container rendered"


def pod_metadata(owner) -> dict:
    if owner["kind"] == "CronJob":
        return owner["spec"]["jobTemplate"]["spec"]["template"]["metadata"]
    return owner["spec"]["template"]["metadata"]


def conventions(docs, values) -> None:
    """commonLabels, image registry/digest, extra env/volumes/mounts and the
    checksum annotation, as the values ask."""
    common = values.get("commonLabels", {})
    for d in quire_docs(docs):
        assert common.items() <= (d["metadata"].get("labels") or {}).items(), f"{d['kind']} {d['metadata']['name']}: commonLabels missing"
        sel = ((d.get("spec") or {}).get("selector") or {}).get("matchLabels") or {}
        assert not (common.keys() & sel.keys()), f"{d['kind']}: commonLabels in a selector (immutable)"
    for owner, spec in pod_specs(docs):
        meta = pod_metadata(owner)
        assert common.items() <= meta["labels"].items(), f"{owner['metadata']['name']}: Pods without commonLabels"
        assert re.fullmatch(r"[0-9a-f]{64}", meta["annotations"]["checksum/secrets"]), meta.get("annotations")
        for c in spec["containers"]:
            img = values.get("image", {})
            reg = values.get("global", {}).get("imageRegistry") or img.get("registry")
            if reg or img.get("digest"):
                repo = f"{reg}/{img['repository']}" if reg else img["repository"]
                assert c["image"] == (f"{repo}@{img['digest']}" if img.get("digest") else f"{repo}:{img.get('tag')}"), c["image"]
            env = env_of(c)
            for e in values.get("extraEnv", []):
                assert env.get(e["name"]) == e, f"{owner['metadata']['name']}: extraEnv {e['name']} missing"
            for m in values.get("extraVolumeMounts", []):
                assert m in c.get("volumeMounts", []), f"{owner['metadata']['name']}: extraVolumeMounts {m} missing"
        for v in values.get("extraVolumes", []):
            assert v in spec.get("volumes", []), f"{owner['metadata']['name']}: extraVolumes {v} missing"


def labels_match(selector: dict, labels: dict) -> bool:
    return selector.items() <= labels.items()


def bundled_nats_locked(docs, values) -> None:
    """The bundled NATS requires a login that only the chart's Secret holds,
    and only quire's Pods (and the KEDA operator, on the monitoring port) reach it."""
    if not bundled_nats(values):
        assert not [d for d in quire_docs(docs) if d["metadata"]["name"].endswith("-nats-auth")]
        return
    secret = one(quire_docs(docs), "Secret", "-nats-auth")
    data = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    assert data["user"] and len(data["password"]) >= 32, "a short or empty generated password"
    name = secret["metadata"]["name"]
    sts = one(docs, "StatefulSet")
    pod = sts["spec"]["template"]
    nats_c = next(c for c in pod["spec"]["containers"] if c["name"] == "nats")
    env = env_of(nats_c)
    for k, key in (("QUIRE_NATS_USER", "user"), ("QUIRE_NATS_PASSWORD", "password")):
        assert env[k]["valueFrom"]["secretKeyRef"] == {"name": name, "key": key}, env.get(k)
    cm = next(d for d in docs if d["kind"] == "ConfigMap" and d["_template"].startswith("quire/charts/nats/"))
    conf = cm["data"]["nats.conf"]
    # NATS reads the variables from the container's environment (the Secret).
    assert re.search(r'"authorization":\s*\{\s*"password":\s*\$QUIRE_NATS_PASSWORD,\s*"user":\s*\$QUIRE_NATS_USER\s*\}', conf), conf
    for owner, spec in pod_specs(docs):
        for c in spec["containers"]:
            e = env_of(c)
            for k, key in (("QUIRE_NATS_USER", "user"), ("QUIRE_NATS_PASSWORD", "password")):
                assert e[k]["valueFrom"]["secretKeyRef"] == {"name": name, "key": key}, (owner["metadata"]["name"], e.get(k))
    np_ = one(quire_docs(docs), "NetworkPolicy", "-nats")
    spec = np_["spec"]
    assert spec["policyTypes"] == ["Ingress"]
    assert labels_match(spec["podSelector"]["matchLabels"], pod["metadata"]["labels"]), "policy misses the NATS Pods"
    rules = spec["ingress"]
    client = [r for r in rules if r.get("ports") == [{"port": 4222, "protocol": "TCP"}]]
    monitor = [r for r in rules if r.get("ports") == [{"port": 8222, "protocol": "TCP"}]]
    assert len(client) == 1 and len(monitor) == 1 and len(rules) == 3, rules
    peers = [r for r in rules if "ports" not in r]
    assert peers[0]["from"] == [{"podSelector": spec["podSelector"]}], "NATS servers must reach each other"
    allowed = client[0]["from"]
    quire_pods = [s for o, s in pod_specs(docs)]
    for o, s in pod_specs(docs):
        lab = (o["spec"]["template"] if o["kind"] != "CronJob" else o["spec"]["jobTemplate"]["spec"]["template"])["metadata"]["labels"]
        assert any(labels_match(p["podSelector"]["matchLabels"], lab) for p in allowed if "podSelector" in p), o["metadata"]["name"]
    assert all(set(p) == {"podSelector"} for p in allowed), f"the client port is open beyond this namespace: {allowed}"
    assert quire_pods and allowed[0]["podSelector"]["matchLabels"].get("app.kubernetes.io/name") == "quire"
    want = values.get("bundledNats", {}).get("networkPolicy", {}).get("monitorFrom")
    keda = monitor[0]["from"]
    if want is None:
        assert keda == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "keda"}},
                         "podSelector": {"matchLabels": {"app": "keda-operator"}}}], keda
    else:
        assert keda == want, keda


def cronjob_policy(docs, values) -> None:
    if not run_configured(values):
        assert not kinds(docs, "CronJob") and not kinds(docs, "Job"), "a run scheduled without job.inputs"
        text = notes(values)
        assert "Nothing is scheduled yet" in text and "job.inputs[0]=" in text and "job.out=" in text, text
        return
    cj = one(docs, "CronJob", "-nightly")
    s = cj["spec"]
    coord = values.get("coordinator", {})
    assert s["schedule"] == coord.get("schedule", "0 2 * * *"), s["schedule"]
    assert s["timeZone"] == coord.get("timeZone", "Etc/UTC"), s.get("timeZone")
    assert s["concurrencyPolicy"] == "Forbid", s["concurrencyPolicy"]
    assert s["startingDeadlineSeconds"] > 0 and s["successfulJobsHistoryLimit"] >= 1 and s["failedJobsHistoryLimit"] >= 1
    js = s["jobTemplate"]["spec"]
    assert js["ttlSecondsAfterFinished"] > 0 and js["activeDeadlineSeconds"] > 0, js
    pod = js["template"]["spec"]
    assert pod["restartPolicy"] == "Never", pod["restartPolicy"]
    # Exit 2 and 3 end the Job at once (a retry cannot help); node disruption spends no retry.
    rules = js["podFailurePolicy"]["rules"]
    fail = [r for r in rules if r["action"] == "FailJob"]
    assert len(fail) == 1 and fail[0]["onExitCodes"]["operator"] == "In", rules
    assert sorted(fail[0]["onExitCodes"]["values"]) == [2, 3], rules
    assert fail[0]["onExitCodes"]["containerName"] == pod["containers"][0]["name"], rules
    assert {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]} in rules, rules
    assert rules.index(fail[0]) == 0, "FailJob comes first: the first matching rule wins"
    args = pod["containers"][0]["args"]
    assert args[0] == "coordinator" and args[-1] == "--wait", args
    # A standing job and a run per day: quire expands {date} when the coordinator starts, so a
    # Job made by hand the same day joins that run; no {time}, so a retried Pod resumes it.
    job = values.get("job", {})
    assert arg_after(args, "--job") == job.get("name", "nightly"), args
    # Always a --run: without one quire names the run {date}T{time}, which a retried Pod expands anew.
    run = arg_after(args, "--run")
    assert run == job.get("run", "{date}"), args
    assert "{time}" not in run + arg_after(args, "--job"), args
    assert len(cj["metadata"]["name"]) <= 52, f"CronJob name {cj['metadata']['name']} over 52 characters"
    hooks = {d["metadata"].get("annotations", {}).get("helm.sh/hook") for d in docs if d} - {None}
    assert hooks <= {"test"}, f"hooks other than helm test's would run outside the schedule: {hooks}"
    assert not kinds(docs, "Job"), "a Job inside the release: every helm upgrade would recreate it"
    text = notes(values)
    assert f"create job --from=cronjob/{cj['metadata']['name']} " in text, text
    # Workers scaled to zero have no Pod to exec into: NOTES must not send anyone there.
    assert "exec deploy/" not in text, text
    for i in values["job"]["inputs"]:
        assert i in args, (i, args)
    assert arg_after(args, "--out") == values["job"]["out"]


def env_names_are_quires(docs) -> None:
    known = quire_env_names()
    for owner, spec in pod_specs(docs):
        for c in spec["containers"]:
            for n in env_of(c):
                if n.startswith("QUIRE_"):
                    assert n in known, f"{n} is not a variable quire reads ({sorted(known)})"


# ---------------------------------------------------------------------------

def scenario_checks(path: Path) -> None:
    name = path.stem.removesuffix("-values")
    values = yaml.safe_load(path.read_text()) or {}
    docs: list[dict] = []

    def do_render():
        docs.extend(render(values))
        assert docs

    check(f"{name}: helm lint --strict", lambda: lint(values))
    check(f"{name}: render", do_render)
    if not docs:
        return
    versions = supported_versions()
    check(f"{name}: kubernetes-validate --strict {versions}", lambda: kube_validate(docs, versions))
    check(f"{name}: custom resource shapes", lambda: custom_shapes(docs))
    check(f"{name}: securityContext on every quire pod", lambda: security_everywhere(docs, values))
    check(f"{name}: restricted Pod Security Standard on every Pod", lambda: restricted_pss(docs))
    check(f"{name}: ephemeral-storage requests and limits cover the emptyDirs", lambda: ephemeral_storage(docs))
    check(f"{name}: names within Kubernetes' limits", lambda: names_within_limits(docs))
    check(f"{name}: commonLabels, image, extra env/volumes, checksum annotation", lambda: conventions(docs, values))
    check(f"{name}: worker rollout needs no spare GPU", lambda: rollout(docs, values))
    check(f"{name}: bundled NATS: login from a generated Secret, NetworkPolicy", lambda: bundled_nats_locked(docs, values))
    check(f"{name}: no secret value outside its Secret", lambda: no_secret_values(docs, values))
    check(f"{name}: probes on the metrics port, grace", lambda: probes_on_metrics_port(docs))
    check(f"{name}: CronJob policy and schedule", lambda: cronjob_policy(docs, values))
    check(f"{name}: QUIRE_* variables are quire's", lambda: env_names_are_quires(docs))
    check(f"{name}: NOTES render", lambda: notes(values))

    gpu = int(values.get("worker", {}).get("gpu", 0))

    def gpu_limits():
        c = worker_container(docs)
        text = json.dumps([strip(d) for d in docs])
        if gpu:
            assert c["resources"]["limits"]["nvidia.com/gpu"] == gpu, c["resources"]
            assert c["image"].endswith("-cuda"), c["image"]
            assert arg_after(c["args"], "--device") == "cuda"
            # GPU Pods steered by the node labels GPU feature discovery sets (product, driver, capability).
            spec = worker(docs)["spec"]["template"]["spec"]
            for key in ("nodeSelector", "affinity"):
                if values["worker"].get(key):
                    assert spec[key] == values["worker"][key], (key, spec.get(key))
        else:
            assert "nvidia.com/gpu" not in json.dumps(c["resources"]), "GPU limits without worker.gpu"
            assert "nvidia.com/gpu\":" not in text.replace('"nvidia.com/gpu.product"', ""), "GPU resources without worker.gpu"
            assert arg_after(c["args"], "--device") == "cpu"
    check(f"{name}: GPU limits only when asked", gpu_limits)

    def engine_args():
        c = worker_container(docs)
        w = values.get("worker", {})
        assert arg_after(c["args"], "--batching") == w.get("batching", "continuous"), c["args"]
        for key, flag in (("kvCacheMb", "--kv-cache-mb"), ("maxSequences", "--max-sequences")):
            if w.get(key, 0):
                assert arg_after(c["args"], flag) == str(w[key]), (flag, c["args"])
            else:
                assert flag not in c["args"], f"{flag} without worker.{key}: the worker works it out"
        if w.get("quantize"):
            assert arg_after(c["args"], "--quantize") == w["quantize"], c["args"]
        else:
            assert "--quantize" not in c["args"], "--quantize without worker.quantize"
    check(f"{name}: batching flags follow the values", engine_args)

    keda = values.get("keda", {}).get("enabled", False)

    def scaling():
        dep = worker(docs)
        so = [d for d in docs if d["kind"] == "ScaledObject"]
        if not keda:
            assert not so and dep["spec"]["replicas"] == values.get("worker", {}).get("replicas", 1)
            return
        assert "replicas" not in dep["spec"], "KEDA owns the replica count"
        (so,) = so
        assert so["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"]
        assert so["spec"]["minReplicaCount"] == 0, "GPUs are released when the queue is empty"
        (t,) = so["spec"]["triggers"]
        m = t["metadata"]
        assert t["type"] == "nats-jetstream"
        assert m["stream"] == stream_name() and m["consumer"] == consumer_name(), m
        assert m["natsServerMonitoringEndpoint"].endswith(":8222"), m
        assert int(m["lagThreshold"]) >= 1
        if bundled_nats(values):
            host = m["natsServerMonitoringEndpoint"].split(".")[0]
            headless = [d for d in docs if d["kind"] == "Service" and d["spec"].get("clusterIP") == "None"]
            assert any(d["metadata"]["name"] == host and any(p["port"] == 8222 for p in d["spec"]["ports"])
                       for d in headless), f"{host} is no headless service with port 8222"
    check(f"{name}: KEDA ScaledObject or fixed replicas", scaling)

    def nats_wiring():
        c = worker_container(docs)
        url = env_of(c)["QUIRE_NATS"]["value"]
        if bundled_nats(values):
            sts = [d for d in docs if d["kind"] == "StatefulSet" and d["_template"].startswith("quire/charts/nats/")]
            assert len(sts) == 1, "the bundled NATS StatefulSet is missing"
            cm = next(d for d in docs if d["kind"] == "ConfigMap" and d["_template"].startswith("quire/charts/nats/"))
            conf = "".join(cm["data"].values())
            assert "jetstream" in conf and "store_dir" in conf, conf
            assert sts[0]["spec"]["volumeClaimTemplates"], "JetStream without file storage"
            svc = url.removeprefix("nats://").split(".")[0]
            assert any(d["kind"] == "Service" and d["metadata"]["name"] == svc for d in docs), (url, svc)
        else:
            assert url == values["queue"]["url"], url
            assert not any(d["_template"].startswith("quire/charts/nats/") for d in docs)
        auth = values.get("queue", {}).get("auth", {}).get("method", "none")
        env = env_of(c)
        if auth == "userPassword":
            assert env["QUIRE_NATS_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == values["queue"]["auth"].get("existingSecret", "quire-nats")
        if auth == "creds":
            path = env["QUIRE_NATS_CREDS"]["value"]
            mount = next(m for m in c["volumeMounts"] if path.startswith(m["mountPath"] + "/"))
            vol = next(v for v in worker(docs)["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"])
            assert "secret" in vol, vol
        tls = values.get("queue", {}).get("tls", {})
        if tls.get("enabled"):
            for k in ("QUIRE_NATS_TLS_CA", "QUIRE_NATS_TLS_CERT", "QUIRE_NATS_TLS_KEY"):
                assert env[k]["value"].startswith("/var/run/secrets/quire/nats-tls/"), env[k]
        if tls.get("enabled") and tls.get("requireTls", True):
            assert env["QUIRE_NATS_REQUIRE_TLS"]["value"] == "true", "queue.tls.requireTls not passed on"
        else:
            assert "QUIRE_NATS_REQUIRE_TLS" not in env, env.get("QUIRE_NATS_REQUIRE_TLS")
    check(f"{name}: NATS connection and credentials", nats_wiring)

    def s3_and_identity():
        c = worker_container(docs)
        env = env_of(c)
        s3 = values.get("s3", {})
        if s3.get("existingSecret") or s3.get("accessKeyId"):
            ref = env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]
            assert ref["name"] == (s3.get("existingSecret") or "quire-s3"), ref
        else:
            assert "AWS_SECRET_ACCESS_KEY" not in env and "AWS_ACCESS_KEY_ID" not in env
        if s3.get("endpoint"):
            assert env["QUIRE_S3_ENDPOINT"]["value"] == s3["endpoint"]
        if s3.get("pathStyle"):
            assert env["QUIRE_S3_PATH_STYLE"]["value"] == "true"
        sa = one(docs, "ServiceAccount")
        want = values.get("serviceAccount", {}).get("annotations", {})
        assert sa["metadata"].get("annotations", {}) == want, sa["metadata"]
        for owner, spec in pod_specs(docs):
            assert spec["serviceAccountName"] == sa["metadata"]["name"]
        if values.get("s3", {}).get("existingSecret") or values.get("queue", {}).get("auth", {}).get("existingSecret"):
            made = [d for d in quire_docs(docs) if d["kind"] == "Secret" and not d["metadata"]["name"].endswith("-nats-auth")]
            assert not made, "a Secret was made although existing ones were named"
    check(f"{name}: S3 credentials and workload identity", s3_and_identity)

    def monitoring():
        pm = [d for d in docs if d["kind"] == "PodMonitor"]
        pr = [d for d in docs if d["kind"] == "PrometheusRule"]
        cm = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-dashboard")]
        assert bool(pm) == values.get("podMonitor", {}).get("enabled", False)
        assert bool(pr) == values.get("prometheusRule", {}).get("enabled", False)
        assert bool(cm) == values.get("dashboard", {}).get("enabled", False)
        if pm:
            extra = values["podMonitor"].get("additionalLabels", {})
            assert extra.items() <= pm[0]["metadata"]["labels"].items()
            ep = pm[0]["spec"]["podMetricsEndpoints"][0]
            assert ep["port"] == "metrics" and ep["path"] == "/metrics"
            assert pm[0]["spec"]["selector"]["matchLabels"] == worker(docs)["spec"]["selector"]["matchLabels"]
        if pr:
            extra = values["prometheusRule"].get("additionalLabels", {})
            assert extra.items() <= pr[0]["metadata"]["labels"].items()
            want = yaml.safe_load((ROOT / "deploy/prometheus/rules.yaml").read_text())
            base = values["prometheusRule"].get("runbookBaseUrl", "").rstrip("/")
            for g in want["groups"]:
                for r in g["rules"]:
                    if base and "runbook_url" in r.get("annotations", {}):
                        r["annotations"]["runbook_url"] = f"{base}/{r['annotations']['runbook_url']}"
            assert pr[0]["spec"] == want, "PrometheusRule differs from deploy/prometheus/rules.yaml"
        if cm:
            assert cm[0]["metadata"]["labels"].get("grafana_dashboard") == "1"
            want = json.loads((ROOT / "deploy/grafana/quire.json").read_text())
            assert json.loads(cm[0]["data"]["quire.json"]) == want, "dashboard differs from deploy/grafana/quire.json"
    check(f"{name}: PodMonitor, PrometheusRule, dashboard", monitoring)

    def pdb_and_netpol():
        pdb = one(quire_docs(docs), "PodDisruptionBudget")
        assert pdb["spec"]["selector"]["matchLabels"] == worker(docs)["spec"]["selector"]["matchLabels"]
        np_ = one(quire_docs(docs), "NetworkPolicy", f"{RELEASE}")
        assert np_["spec"]["policyTypes"] == ["Ingress"]
        (rule,) = np_["spec"]["ingress"]
        assert rule["ports"] == [{"port": "metrics", "protocol": "TCP"}], rule
    check(f"{name}: PodDisruptionBudget and NetworkPolicy", pdb_and_netpol)



def schema_checks() -> None:
    base = yaml.safe_load((CHART / "ci/defaults-values.yaml").read_text())

    def refused(change: dict, why: str, expect: str):
        def run():
            values = json.loads(json.dumps(base))
            for path, v in change.items():
                cur = values
                keys = path.split(".")
                for k in keys[:-1]:
                    cur = cur.setdefault(k, {})
                cur[keys[-1]] = v
            try:
                render(values)
            except helm.HelmError as e:
                assert re.search(expect, str(e)), f"refused for another reason: {e}"
                return
            raise AssertionError(f"{why}: accepted {change}")
        check(f"schema: refuses {why}", run)

    refused({"worker.replicas": -1}, "negative replicas", r"replicas")
    refused({"worker.gpu": 1.5}, "a GPU count that is not an integer", r"gpu")
    refused({"worker.gpu": 2}, "two GPUs per Pod (one model per device per process)", r"gpu")
    refused({"worker.terminationGracePeriodSeconds": 40, "worker.graceSeconds": 30},
            "terminationGracePeriodSeconds without room for handing tasks back", r"graceSeconds \(30\) \+ 10 s")
    refused({"worker.strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 0}}},
            "a rollout that cannot move", r"maxSurge and maxUnavailable")
    refused({"worker.gpu": "1"}, "a GPU count given as a string", r"gpu")
    refused({"worker.gpus": 1}, "an unknown key (worker.gpus)", r"gpus")
    refused({"colour": "blue"}, "an unknown top-level key", r"colour")
    refused({"job.engine": "gpu"}, "an unknown engine", r"engine")
    refused({"coordinator.concurrencyPolicy": "Sometimes"}, "an unknown concurrencyPolicy", r"concurrencyPolicy")
    refused({"queue.url": "http://nats:4222"}, "a queue URL that is not nats://", r"url")
    refused({"worker.terminationGracePeriodSeconds": 30, "worker.graceSeconds": 30},
            "terminationGracePeriodSeconds not above --grace-s", r"terminationGracePeriodSeconds")
    refused({"job.inputs": []}, "a run without inputs", r"job.inputs")
    refused({"queue.url": ""}, "no queue and no bundled NATS", r"queue.url is required with nats.enabled=false")
    refused({"nats.enabled": True}, "an external queue.url besides the bundled NATS", r"nats.enabled=false")
    refused({"job.out": ""}, "inputs without job.out", r"job.out is required")
    refused({"job.run": "{date}T{time}"}, "{time} in the run (a retry would start another)", r"job.run .* must not hold \{time\}")
    refused({"job.name": "scans-{time}"}, "{time} in the job name", r"job.name .* must not hold \{time\}")
    refused({"job.run": ""}, "an empty run (quire's own default, {date}T{time}, would start a run per retry)",
            r"job.run")
    refused({"adhoc": {"enabled": True}}, "the removed ad-hoc Job's values", r"adhoc")
    refused({"nats.enabled": True, "queue.url": "", "queue.auth.method": "token", "queue.auth.token": "t"},
            "queue.auth with the bundled NATS", r"queue.auth is for an external NATS")
    refused({"nats.enabled": True, "queue.url": "", "queue.streamReplicas": 3},
            "more stream replicas than the bundled NATS has servers", r"queue.streamReplicas \(3\)")
    refused({"queue.streamReplicas": 6}, "more than 5 stream replicas", r"streamReplicas")
    refused({"worker.quantize": "q2"}, "an unknown quantization", r"quantize")
    refused({"worker.gpu": 1, "worker.quantize": "q8"}, "int8 weights on a GPU worker",
            r"worker.quantize q8 runs on the CPU only")
    refused({"worker.device": "cuda:0", "worker.quantize": "q4"}, "4-bit weights on a CUDA worker",
            r"worker.quantize q4 runs on the CPU only")

    def replicas():
        def env_replicas(change):
            values = json.loads(json.dumps(base))
            for path, v in change.items():
                cur = values
                keys = path.split(".")
                for k in keys[:-1]:
                    cur = cur.setdefault(k, {})
                cur[keys[-1]] = v
            c = worker_container(render(values))
            return env_of(c).get("QUIRE_NATS_REPLICAS", {}).get("value")
        assert env_replicas({}) is None, "an external NATS's streams keep their replicas unless asked"
        assert env_replicas({"queue.streamReplicas": 3}) == "3", "an external NATS cluster"
        bundled = {"nats.enabled": True, "queue.url": ""}
        assert env_replicas(bundled) == "1"
        cluster = {**bundled, "nats.config.cluster.enabled": True}
        assert env_replicas(cluster) == "3", "a bundled NATS cluster of 3 gets R3 streams"
        assert env_replicas({**cluster, "nats.config.cluster.replicas": 5}) == "3"
        assert env_replicas({**cluster, "nats.config.cluster.replicas": 5, "queue.streamReplicas": 5}) == "5"
    check("values: JetStream stream replicas follow queue.streamReplicas and the bundled NATS cluster", replicas)

    def secret_change_rolls_pods():
        def checksums(values):
            docs = render(values)
            return {o["metadata"]["name"]: pod_metadata(o)["annotations"]["checksum/secrets"] for o, _ in pod_specs(docs)}
        keys = json.loads(json.dumps(base))
        keys["s3"] = {"accessKeyId": "AKIA-one", "secretAccessKey": "first"}
        first = checksums(keys)
        assert first == checksums(keys), "the checksum changes without a change"
        keys["s3"]["secretAccessKey"] = "second"
        second = checksums(keys)
        assert first.keys() == second.keys() and all(first[k] != second[k] for k in first), (first, second)
    check("a changed Secret value changes every quire Pod's checksum annotation (helm upgrade rolls them)", secret_change_rolls_pods)

    def chart_default_run():
        # The chart's own values.yaml, only what to read and where to write set: a standing job
        # with one run per UTC day, so a Job made by hand the same day joins the night's run.
        docs = render({"job": {"inputs": ["s3://scans/incoming/"], "out": "s3://results/ocr"}})
        args = one(docs, "CronJob", "-nightly")["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["args"]
        assert arg_after(args, "--job") == "nightly" and arg_after(args, "--run") == "{date}", args
        text = notes({"job": {"inputs": ["s3://scans/incoming/"], "out": "s3://results/ocr"}})
        assert 'run "{date}"' in text, text
    check("defaults: the CronJob runs the standing job `nightly` with --run '{date}'", chart_default_run)

    def defaults_accepted():
        helm.Chart.load(str(CHART)).validate_schema(base)
    check("schema: accepts the defaults scenario", defaults_accepted)


# Helm's own limit for release names.
LONG_RELEASE = "scanned-archive-ocr-production-eu-west-nightly-batch1"
assert len(LONG_RELEASE) == 53
NAME_LIMITS = {"CronJob": 52, "StatefulSet": 52, "Service": 63, "Job": 63, "Deployment": 63, "ScaledObject": 63}


def names_within_limits(docs) -> None:
    """Object names and label values Kubernetes (and the controllers that name
    things after them) accept: 52 for a CronJob (its Jobs add 11 characters) and
    a StatefulSet (its revision label adds 11), 63 for names that become DNS
    labels or label values, 253 otherwise; label values at most 63."""
    for d in docs:
        n = d["metadata"]["name"]
        lim = NAME_LIMITS.get(d["kind"], 253)
        assert len(n) <= lim, f"{d['kind']} {n}: {len(n)} characters, more than {lim}"
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", n), f"{d['kind']} {n}: not a DNS name"
        label_sets = [d["metadata"].get("labels") or {}]
        spec = d.get("spec") or {}
        for path in (("template",), ("jobTemplate",), ("jobTemplate", "spec", "template")):
            cur = spec
            for k in path:
                cur = (cur or {}).get(k) or {}
            label_sets.append((cur.get("metadata") or {}).get("labels") or {})
        for labels in label_sets:
            for k, v in labels.items():
                assert len(str(v)) <= 63, f"{d['kind']} {n}: label {k}={v} over 63 characters"


def long_release_checks() -> None:
    versions = supported_versions()
    for scenario in ("defaults", "gpu-keda-irsa"):
        def run(scenario=scenario):
            values = yaml.safe_load((CHART / f"ci/{scenario}-values.yaml").read_text())
            docs = render(values, release=LONG_RELEASE)
            names_within_limits(docs)
            kube_validate(docs, versions)
            cj = [d["metadata"]["name"] for d in docs if d["kind"] == "CronJob"]
            assert cj and cj[0] in notes_for(values, LONG_RELEASE), "NOTES names another CronJob"
        check(f"{scenario}: a 53-character release name: names within Kubernetes' limits", run)

    def bundled_refused():
        try:
            render({}, release=LONG_RELEASE)
        except helm.HelmError as e:
            assert "nats.fullnameOverride" in str(e) and "52" in str(e), str(e)
            return
        raise AssertionError("a bundled NATS whose StatefulSet name is too long was accepted")
    check("bundled NATS with a 53-character release name: refused, naming nats.fullnameOverride", bundled_refused)

    def bundled_override():
        values = yaml.safe_load((CHART / "ci/bundled-nats-values.yaml").read_text())
        values["nats"]["fullnameOverride"] = "ocr-nats"
        docs = render(values, release=LONG_RELEASE)
        names_within_limits(docs)
        kube_validate(docs, versions)
        so = one(docs, "ScaledObject")
        host = so["spec"]["triggers"][0]["metadata"]["natsServerMonitoringEndpoint"].split(".")[0]
        assert any(d["kind"] == "Service" and d["metadata"]["name"] == host for d in docs), host
    check("bundled NATS with a 53-character release name and nats.fullnameOverride: names within limits", bundled_override)


ARTIFACTHUB_CATEGORIES = {"ai-machine-learning", "database", "integration-delivery", "monitoring-logging", "networking",
                          "security", "storage", "streaming-messaging", "skip-prediction"}


def chart_metadata() -> None:
    """Chart.yaml carries what Artifact Hub shows, and it agrees with the workspace."""
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    a = chart["annotations"]
    cargo = (ROOT / "Cargo.toml").read_text()
    assert f'license = "{a["artifacthub.io/license"]}"' in cargo, "licence differs from the workspace's"
    assert a["artifacthub.io/category"] in ARTIFACTHUB_CATEGORIES, a["artifacthub.io/category"]
    for key in ("artifacthub.io/links", "artifacthub.io/recommendations", "artifacthub.io/changes"):
        items = yaml.safe_load(a[key])
        assert isinstance(items, list) and items, key
        for i in items:
            assert str(i.get("url", "https://")).startswith("https://"), i
    for c in yaml.safe_load(a["artifacthub.io/changes"]):
        assert c["kind"] in ("added", "changed", "deprecated", "removed", "fixed", "security") and c["description"], c
    version = re.search(r'^version = "([^"]+)"', cargo, re.M).group(1)
    assert chart["appVersion"] == version, f"appVersion {chart['appVersion']} is not quire's version {version}"
    assert chart["keywords"] and chart["description"] and chart["kubeVersion"]


def rules_conventions() -> None:
    """Every alert links its runbook section and keeps the namespace label
    through every aggregation and match."""
    rules = yaml.safe_load((ROOT / "deploy/prometheus/rules.yaml").read_text())
    book = (ROOT / "deploy/prometheus/runbook.md").read_text()
    anchors = {h.strip().lower() for h in re.findall(r"^## (\S+)$", book, re.M)}
    alerts = [r for g in rules["groups"] for r in g["rules"] if "alert" in r]
    for r in alerts:
        url = r["annotations"].get("runbook_url", "")
        assert url == f"runbook.md#{r['alert'].lower()}", f"{r['alert']}: runbook_url {url!r}"
        assert r["alert"].lower() in anchors, f"runbook.md has no section {r['alert']}"
        for kw, labels in re.findall(r"\b(by|on)\s*\(([^)]*)\)", r["expr"]):
            assert "namespace" in labels, f"{r['alert']}: `{kw} ({labels})` drops the namespace label"
    assert len(anchors) == len(alerts), f"runbook sections without an alert: {anchors - {a['alert'].lower() for a in alerts}}"
    names = {r["alert"] for r in alerts}
    for want in ("QuireRunJobFailed", "QuireRunNearDeadline", "QuireRunWithoutWorkers", "QuireKedaScalerErrors"):
        assert want in names, f"{want} missing"
    tests = (ROOT / "deploy/prometheus/rules_test.yaml").read_text()
    for n in names:
        assert re.search(rf"alertname: {n}\n\s+exp_alerts:\n\s+- exp_labels", tests), f"no promtool test expects {n} to fire"


def readme_commands() -> None:
    """The README's "Run on Kubernetes" commands survive a shell and match the chart."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Run on Kubernetes"):text.index("## Benchmarks")]
    chart_readme = (CHART / "README.md").read_text()
    for where, body in (("README.md", section), ("helm/quire/README.md", chart_readme)):
        for m in re.finditer(r"--set[ =](\S+)", body):
            arg = m.group(1)
            if any(c in arg for c in "[]\\"):
                assert arg.startswith("'") or arg.startswith('"'), f"{where}: unquoted --set {arg} (zsh globs [ ], bash drops \\)"
        assert "exec deploy/" not in body, f"{where}: kubectl exec into workers that KEDA may have scaled to zero"
    # The CronJob the README names is the one the chart makes for its release (quire in batch).
    docs = render(yaml.safe_load((CHART / "ci/gpu-keda-irsa-values.yaml").read_text()))
    cj = one(docs, "CronJob")["metadata"]["name"]
    for name in re.findall(r"cronjob/([a-z0-9-]+)", section):
        assert name == cj, f"README names cronjob/{name}; the chart makes {cj}"
    assert "StorageClass" in section, "README: the bundled NATS needs a default StorageClass"
    assert "job.ackWaitSeconds" in section, "README: a killed worker's tasks move on after the chart's lease"


def model_cache_checks() -> None:
    base = yaml.safe_load((CHART / "ci/defaults-values.yaml").read_text())

    def with_cache(cache: dict) -> list[dict]:
        values = json.loads(json.dumps(base))
        values.setdefault("worker", {})["modelCache"] = cache
        return render(values)

    def cache_volume(docs):
        vols = worker(docs)["spec"]["template"]["spec"]["volumes"]
        return next(v for v in vols if v["name"] == "cache")

    def default_is_an_empty_dir():
        docs = render(base)
        assert not kinds(docs, "PersistentVolumeClaim"), "no claim unless asked for"
        assert "emptyDir" in cache_volume(docs)

    def chart_made_claim():
        docs = with_cache({"persistence": {"enabled": True, "storageClass": "fast-rwx", "size": "80Gi",
                                           "accessModes": ["ReadWriteMany"]}})
        (pvc,) = kinds(docs, "PersistentVolumeClaim")
        spec = pvc["spec"]
        assert spec["storageClassName"] == "fast-rwx" and spec["resources"]["requests"]["storage"] == "80Gi", spec
        assert spec["accessModes"] == ["ReadWriteMany"], spec
        assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep", "a claim outlives an uninstall"
        assert cache_volume(docs)["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
        assert len(pvc["metadata"]["name"]) <= 63
        # No storageClass: the cluster's default class (the field absent, not "").
        docs = with_cache({"persistence": {"enabled": True}})
        assert "storageClassName" not in kinds(docs, "PersistentVolumeClaim")[0]["spec"]

    def existing_claim_wins():
        docs = with_cache({"existingClaim": "models", "persistence": {"enabled": True}})
        assert not kinds(docs, "PersistentVolumeClaim")
        assert cache_volume(docs)["persistentVolumeClaim"]["claimName"] == "models"

    def coordinator_exports_its_run():
        values = json.loads(json.dumps(base))
        values["podMonitor"] = {"enabled": True}
        docs = render(values)
        pod = one(docs, "CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        c = pod["containers"][0]
        port = next(p for p in c.get("ports", []) if p["name"] == "metrics")["containerPort"]
        assert arg_after(c["args"], "--metrics-addr") == f"0.0.0.0:{port}", c["args"]
        monitors = [m for m in kinds(docs, "PodMonitor")
                    if m["spec"]["selector"]["matchLabels"].get("app.kubernetes.io/component") == "coordinator"]
        assert len(monitors) == 1 and monitors[0]["spec"]["podMetricsEndpoints"][0]["port"] == "metrics", monitors

    check("model cache: an emptyDir by default", default_is_an_empty_dir)
    check("coordinator: exports its run on a metrics port, scraped by its own PodMonitor", coordinator_exports_its_run)
    check("model cache: a chart-made PVC with storageClass, size and access modes, kept on uninstall", chart_made_claim)
    check("model cache: existingClaim wins over a chart-made PVC", existing_claim_wins)


def repository_checks() -> None:
    check("README: Run on Kubernetes commands quoted, the real CronJob name, no exec into workers", readme_commands)
    check("Chart.yaml: Artifact Hub metadata", chart_metadata)
    check("alert rules: runbook_url and the namespace label on every alert, each tested", rules_conventions)

    def copies_in_step():
        for a, b in (("deploy/prometheus/rules.yaml", "helm/quire/files/rules.yaml"),
                     ("deploy/grafana/quire.json", "helm/quire/files/quire.json")):
            assert (ROOT / a).read_bytes() == (ROOT / b).read_bytes(), f"{b} differs from {a}: copy it again"
    check("chart files match deploy/", copies_in_step)

    def metrics_exist():
        known = metric_names()
        dash = json.loads((ROOT / "deploy/grafana/quire.json").read_text())
        assert "__inputs" not in dash, "the dashboard must use a datasource variable, not __inputs"
        vars_ = {v["name"]: v for v in dash["templating"]["list"]}
        assert vars_["datasource"]["type"] == "datasource" and vars_["datasource"]["query"] == "prometheus"
        exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
        for p in dash["panels"]:
            assert p["datasource"]["uid"] == "${datasource}", p["title"]
        rules = yaml.safe_load((ROOT / "deploy/prometheus/rules.yaml").read_text())
        exprs += [r["expr"] for g in rules["groups"] for r in g["rules"]]
        used = {m for e in exprs for m in re.findall(r"\bquire_[a-z_]+", e)}
        assert used and used <= known, f"metrics quire does not export: {sorted(used - known)}"
        titles = " ".join(p["title"].lower() for p in dash["panels"])
        for want in ("pages per second", "tasks by outcome", "queue depth", "dead letters", "stage latency",
                     "batch size", "tokens per second", "seconds per page", "model load time"):
            assert want in titles, f"dashboard has no panel for {want}"
    check("dashboard and rules use metrics quire exports", metrics_exist)


def main() -> int:
    assert SCENARIOS, "no ci/*-values.yaml"
    names = {p.stem for p in SCENARIOS}
    for want in ("empty-values", "conventions-values", "defaults-values", "gpu-keda-irsa-values", "bundled-nats-values",
                 "external-nats-tls-values", "existing-secrets-values"):
        assert want in names, f"scenario {want} missing"
    for p in SCENARIOS:
        scenario_checks(p)
    schema_checks()
    model_cache_checks()
    long_release_checks()
    repository_checks()
    if failures:
        print(f"chart checks: {len(failures)} of {len(failures) + passed} FAILED", file=sys.stderr)
        return 1
    print(f"chart checks: all {passed} passed ({len(SCENARIOS)} scenarios)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
