"""The test cluster's bucket, seen from the host (scripts/test-cluster.sh):
uploads inputs and the model, and checks what a standing job's runs left there.

    s3.py wait                          until a put to the bucket goes through (60 s at most)
    s3.py put LOCAL KEY                 a file, or a folder's files below KEY/
    s3.py rm PREFIX                     every object below PREFIX
    s3.py results OUT_PREFIX JOB        how many result files JOB has so far
    s3.py check-job OUT_PREFIX JOB PAGES
        JOB's manifest, results and Markdown: its records hold every page of
        every current input exactly once (PAGES in all), none failed, one
        Markdown file per document, the manifest's counts agree
    s3.py check-run OUT_PREFIX JOB RUN KEY=N... [--new-under PREFIX]
        JOB/runs/RUN/manifest.json exists, is listed in the job manifest's runs,
        and its counts have KEY=N for each given; with --new-under, the objects
        the run found new are exactly the job's objects below PREFIX, and the
        run's tasks_done is exactly their tasks (no other object's task ran)
    s3.py finished OUT_PREFIX JOB RUN   the run's finished_at (RFC 3339) in the job manifest

Reads S3_ENDPOINT, BUCKET, AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY.
"""

import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

import boto3
from botocore.config import Config


def client():
    return boto3.client(
        "s3", endpoint_url=os.environ["S3_ENDPOINT"], region_name="garage",
        aws_access_key_id=os.environ["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=os.environ["AWS_SECRET_ACCESS_KEY"],
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}, connect_timeout=5, read_timeout=30),
    )


def keys(s3, bucket, prefix):
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for o in page.get("Contents", []):
            yield o["Key"]


def fail(msg):
    print(f"s3.py: {msg}", file=sys.stderr)
    sys.exit(1)


def get_json(s3, bucket, key):
    try:
        return json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    except s3.exceptions.NoSuchKey:
        fail(f"no s3://{bucket}/{key}")


def records(s3, bucket, keys_):
    for k in keys_:
        for line in s3.get_object(Bucket=bucket, Key=k)["Body"].read().decode().splitlines():
            if line.strip():
                yield json.loads(line)


def check_job(s3, bucket, out, job, pages):
    base = f"{out.rstrip('/')}/{job}/"
    found = list(keys(s3, bucket, base))
    manifest = get_json(s3, bucket, base + "manifest.json")
    counts = manifest["counts"]
    results = [k for k in found if k.startswith(base + "results/") and k.endswith(".jsonl")]
    markdown = [k for k in found if k.startswith(base + "markdown/") and k.endswith(".md")]
    seen = Counter()
    failed = []
    engines = Counter()
    for r in records(s3, bucket, results):
        seen[(r["source"], r["page"])] += 1
        engines[r["engine"]] += 1
        if r.get("error"):
            failed.append((r["source"], r["page"], r["error"]))
    dup = {p: n for p, n in seen.items() if n > 1}
    if dup:
        fail(f"{job}: pages recorded more than once: {dup}")
    if failed:
        fail(f"{job}: pages failed: {failed}")
    if len(seen) != pages or counts.get("pages_ok") != pages or counts.get("pages_failed") != 0:
        fail(f"{job}: {len(seen)} pages recorded, manifest counts {counts}; expected {pages} ok")
    docs = {s for s, _ in seen}
    if len(markdown) != len(docs):
        fail(f"{job}: {len(markdown)} Markdown files for {len(docs)} documents")
    if len(manifest.get("objects", [])) != len(docs):
        fail(f"{job}: the manifest lists {len(manifest.get('objects', []))} objects, the records {len(docs)} documents")
    print(f"{job}: {pages} pages in {len(docs)} documents, each once ({dict(engines)}), "
          f"{len(results)} result files, {len(markdown)} Markdown files")


def check_run(s3, bucket, out, job, run, want, new_under):
    base = f"{out.rstrip('/')}/{job}/"
    m = get_json(s3, bucket, f"{base}runs/{run}/manifest.json")
    jm = get_json(s3, bucket, base + "manifest.json")
    if run not in [r["run"] for r in jm.get("runs", [])]:
        fail(f"{job}: run {run} missing from the job manifest's runs {[r['run'] for r in jm.get('runs', [])]}")
    counts = m["counts"]
    wrong = {k: (counts.get(k), v) for k, v in want.items() if counts.get(k) != v}
    if wrong:
        fail(f"{job} run {run}: counts (found, expected) {wrong}; all counts {counts}")
    if new_under:
        prefix = f"s3://{bucket}/{new_under}"
        new = sorted(o["uri"] for o in m.get("objects", []) if o["change"] == "new")
        below = sorted(o["uri"] for o in jm["objects"] if o["uri"].startswith(prefix))
        if new != below:
            fail(f"{job} run {run}: objects found new {new[:5]}... ({len(new)}), objects below {prefix} {len(below)}")
        tasks = sum(len(o["tasks"]) for o in jm["objects"] if o["uri"].startswith(prefix))
        if counts["tasks_done"] != tasks:
            fail(f"{job} run {run}: {counts['tasks_done']} tasks done, the new objects have {tasks}")
        since = {o["since_run"] for o in jm["objects"] if o["uri"].startswith(prefix)}
        if since != {run}:
            fail(f"{job} run {run}: the new objects came in with runs {since}")
    print(f"{job} run {run}: " + ", ".join(f"{k}={counts.get(k)}" for k in
          ("objects", "objects_new", "objects_changed", "objects_unchanged", "objects_removed", "tasks", "tasks_done", "tasks_skipped", "pages_ok")))


def main(argv):
    if len(argv) < 2:
        sys.exit(__doc__)
    s3, bucket = client(), os.environ["BUCKET"]
    cmd = argv[1]
    if cmd == "wait":
        deadline = time.time() + 60
        while True:
            try:
                s3.put_object(Bucket=bucket, Key="ready", Body=b"ok")
                return
            except Exception as e:  # Garage answers before its bucket exists
                if time.time() > deadline:
                    fail(f"the bucket never took a put: {e}")
                time.sleep(0.5)
    elif cmd == "put":
        local, key = Path(argv[2]), argv[3]
        files = [local] if local.is_file() else sorted(p for p in local.rglob("*") if p.is_file())
        for f in files:
            s3.upload_file(str(f), bucket, key if local.is_file() else f"{key.rstrip('/')}/{f.relative_to(local)}")
    elif cmd == "rm":
        for k in list(keys(s3, bucket, argv[2])):
            s3.delete_object(Bucket=bucket, Key=k)
    elif cmd == "results":
        base = f"{argv[2].rstrip('/')}/{argv[3]}/results/"
        print(sum(1 for k in keys(s3, bucket, base) if k.endswith(".jsonl")))
    elif cmd == "check-job":
        check_job(s3, bucket, argv[2], argv[3], int(argv[4]))
    elif cmd == "check-run":
        rest, new_under = argv[5:], None
        if "--new-under" in rest:
            i = rest.index("--new-under")
            new_under = rest[i + 1]
            rest = rest[:i] + rest[i + 2:]
        want = {k: int(v) for k, v in (a.split("=", 1) for a in rest)}
        check_run(s3, bucket, argv[2], argv[3], argv[4], want, new_under)
    elif cmd == "finished":
        jm = get_json(s3, bucket, f"{argv[2].rstrip('/')}/{argv[3]}/manifest.json")
        print(next((r["finished_at"] for r in jm.get("runs", []) if r["run"] == argv[4]), ""))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv)
