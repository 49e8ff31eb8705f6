"""The test cluster's bucket, seen from the host (scripts/test-cluster.sh):
uploads inputs and the model, and checks what a run left there.

    s3.py wait                          until a put to the bucket goes through (60 s at most)
    s3.py put LOCAL KEY                 a file, or a folder's files below KEY/
    s3.py rm PREFIX                     every object below PREFIX
    s3.py jobs OUT_PREFIX               the jobs with a manifest below OUT_PREFIX, one a line
    s3.py progress OUT_PREFIX           "JOB N" for each job without a manifest: N result files so far
    s3.py check-run OUT_PREFIX JOB PAGES
        JOB has its manifest, results and Markdown; its records hold every page
        of every input exactly once (PAGES in all), none failed

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


def check_run(s3, bucket, out, job, pages):
    base = f"{out.rstrip('/')}/{job}/"
    found = list(keys(s3, bucket, base))
    if base + "manifest.json" not in found:
        fail(f"no manifest at s3://{bucket}/{base}manifest.json (found {found[:10]})")
    manifest = json.loads(s3.get_object(Bucket=bucket, Key=base + "manifest.json")["Body"].read())
    counts = manifest["counts"]
    results = [k for k in found if k.startswith(base + "results/") and k.endswith(".jsonl")]
    markdown = [k for k in found if k.startswith(base + "markdown/") and k.endswith(".md")]
    seen = Counter()
    failed = []
    for k in results:
        for line in s3.get_object(Bucket=bucket, Key=k)["Body"].read().decode().splitlines():
            if line.strip():
                r = json.loads(line)
                seen[(r["source"], r["page"])] += 1
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
    engines = Counter()
    for k in results:
        for line in s3.get_object(Bucket=bucket, Key=k)["Body"].read().decode().splitlines():
            if line.strip():
                engines[json.loads(line)["engine"]] += 1
    print(f"{job}: {pages} pages in {len(docs)} documents, each once ({dict(engines)}), "
          f"{len(results)} result files, {len(markdown)} Markdown files, manifest {counts}")


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
    elif cmd == "jobs":
        out = argv[2].rstrip("/") + "/"
        for k in keys(s3, bucket, out):
            rest = k[len(out):]
            if rest.count("/") == 1 and rest.endswith("/manifest.json"):
                print(rest.split("/")[0])
    elif cmd == "progress":
        out = argv[2].rstrip("/") + "/"
        done, results = set(), Counter()
        for k in keys(s3, bucket, out):
            parts = k[len(out):].split("/")
            if parts[1:] == ["manifest.json"]:
                done.add(parts[0])
            elif len(parts) == 3 and parts[1] == "results" and parts[2].endswith(".jsonl"):
                results[parts[0]] += 1
        for job, n in sorted(results.items()):
            if job not in done:
                print(job, n)
    elif cmd == "check-run":
        check_run(s3, bucket, argv[2], argv[3], int(argv[4]))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv)
