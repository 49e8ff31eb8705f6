"""Reads quire's caption datasets back with the readers users have: pyarrow for the
Parquet file, webdataset for the caption shard. Run by the Rust tests with the python of
scripts/setup-python-readers.sh (pinned pyarrow and webdataset versions are there).

    python read_back.py EXPECTED.jsonl [--parquet FILE] [--webdataset SHARD]

EXPECTED.jsonl holds the records the files must hold, in order. With --webdataset, an
input shard with an image per record key is also written with webdataset's TarWriter,
and the two shards are zipped by key as a training reader would. Exits non-zero, saying
what differs, on any mismatch; prints a JSON summary otherwise.
"""

import argparse
import json
import os
import sys
import tempfile


def fail(msg):
    print(f"read_back: {msg}", file=sys.stderr)
    sys.exit(1)


def check_parquet(path, expected):
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    meta = pq.ParquetFile(path).metadata
    codecs = {meta.row_group(g).column(c).compression for g in range(meta.num_row_groups) for c in range(meta.num_columns)}
    if codecs and codecs != {"ZSTD"}:
        fail(f"{path}: compression {codecs}, expected ZSTD")
    rows = table.to_pylist()
    if len(rows) != len(expected):
        fail(f"{path}: {len(rows)} rows, expected {len(expected)}")
    for i, (row, rec) in enumerate(zip(rows, expected)):
        err = rec.get("error")
        want = {
            "key": rec.get("key"),
            "source": rec["source"],
            "member": rec.get("member"),
            "page": rec["page"],
            "caption": rec["text"],
            "status": "error" if err else "ok",
            "error_kind": err["kind"] if err else None,
            "error_message": err["message"] if err else None,
            "model": rec.get("model"),
            "prompt": rec.get("prompt"),
            "tokens_in": rec["tokens_in"],
            "tokens_out": rec["tokens_out"],
            "width": rec["width"],
            "height": rec["height"],
            "finish_reason": rec["finish_reason"],
            "task_id": rec["task_id"],
        }
        for k, v in want.items():
            if row.get(k) != v:
                fail(f"{path} row {i} column {k}: {row.get(k)!r}, expected {v!r}")
    kv = {k.decode(): v.decode() for k, v in (meta.metadata or {}).items()}
    return {"rows": len(rows), "columns": table.column_names, "metadata": sorted(kv)}


def check_webdataset(path, expected):
    import webdataset as wds

    with_keys = [r for r in expected if r.get("key")]
    samples = list(wds.WebDataset(path, shardshuffle=False))
    got_keys = [s["__key__"] for s in samples]
    want_keys = [r["key"] for r in with_keys]
    if got_keys != want_keys:
        fail(f"{path}: keys {got_keys}, expected {want_keys}")
    for s, rec in zip(samples, with_keys):
        caption = s["txt"].decode("utf-8")
        want = "" if rec.get("error") else rec["text"]
        if caption != want:
            fail(f"{path} {s['__key__']}.txt: {caption!r}, expected {want!r}")
        if json.loads(s["json"]) != rec:
            fail(f"{path} {s['__key__']}.json differs from the record")

    # The column-store pattern: an input shard with the images, zipped with the caption
    # shard by key.
    with tempfile.TemporaryDirectory() as tmp:
        images = os.path.join(tmp, "images.tar")
        with wds.TarWriter(images) as w:
            for r in with_keys:
                w.write({"__key__": r["key"], "jpg": f"image bytes of {r['key']}".encode()})
        zipped = 0
        for img, cap in zip(wds.WebDataset(images, shardshuffle=False), wds.WebDataset(path, shardshuffle=False)):
            if img["__key__"] != cap["__key__"]:
                fail(f"zipping by key: {img['__key__']} beside {cap['__key__']}")
            if img["jpg"] != f"image bytes of {img['__key__']}".encode():
                fail("zipping by key: the image is not the input shard's")
            zipped += 1
        if zipped != len(with_keys):
            fail(f"zipped {zipped} samples, expected {len(with_keys)}")
    return {"samples": len(samples), "zipped": zipped}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("expected")
    ap.add_argument("--parquet")
    ap.add_argument("--webdataset")
    a = ap.parse_args()
    with open(a.expected, encoding="utf-8") as f:
        expected = [json.loads(line) for line in f if line.strip()]
    out = {}
    if a.parquet:
        out["parquet"] = check_parquet(a.parquet, expected)
    if a.webdataset:
        out["webdataset"] = check_webdataset(a.webdataset, expected)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
