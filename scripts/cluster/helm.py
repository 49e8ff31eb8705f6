"""Helm actions for scripts/test-cluster.sh, through Helm's Go SDK (PyPI's
helm-python-sdk, the same one helm/quire/tests/check_chart.py uses), so no
helm binary has to be built or downloaded.

    helm.py install RELEASE CHART NAMESPACE VALUES.yaml [VALUES.yaml ...]
    helm.py upgrade RELEASE CHART NAMESPACE VALUES.yaml [VALUES.yaml ...]   (on top of the release's values)
    helm.py test RELEASE NAMESPACE

The cluster is the one KUBECONFIG names. install and upgrade wait until every
resource is ready (kstatus), at most QUIRE_HELM_TIMEOUT_S (default 600) seconds;
test prints the test Pods' logs. Exit 1 with Helm's message when an action fails.
"""

import os
import sys

import helm_python as helm
import yaml


def merged(files):
    """Values files merged left to right, maps deeply, as `helm -f a -f b` does."""
    def merge(a, b):
        for k, v in b.items():
            if isinstance(v, dict) and isinstance(a.get(k), dict):
                merge(a[k], v)
            else:
                a[k] = v
        return a
    out = {}
    for f in files:
        with open(f) as fh:
            merge(out, yaml.safe_load(fh) or {})
    return out


def main(argv):
    if len(argv) < 3:
        sys.exit(__doc__)
    action = argv[1]
    timeout = int(os.environ.get("QUIRE_HELM_TIMEOUT_S", "600"))
    kubeconfig = os.environ["KUBECONFIG"]
    try:
        if action in ("install", "upgrade"):
            release, chart, namespace, files = argv[2], argv[3], argv[4], argv[5:]
            cfg = helm.Config(kubeconfig_path=kubeconfig, namespace=namespace)
            values = merged(files)
            if action == "install":
                r = cfg.install(chart, release, values, namespace=namespace, create_namespace=True,
                                wait="watcher", timeout=timeout)
            else:
                r = cfg.upgrade(chart, release, values, namespace=namespace, reuse_values=True,
                                wait="watcher", timeout=timeout)
            print(f"{action} {release}: revision {r.get('revision')}, {r.get('status')}")
        elif action == "test":
            release, namespace = argv[2], argv[3]
            cfg = helm.Config(kubeconfig_path=kubeconfig, namespace=namespace)
            r = cfg.test(release, timeout=timeout, logs=True)
            print(r.get("logs", "").strip())
            print(f"test {release}: passed")
        else:
            sys.exit(__doc__)
    except helm.HelmError as e:
        print(f"helm {action} failed: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main(sys.argv)
