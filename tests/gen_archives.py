#!/usr/bin/env python3
"""Generates the small archive fixtures under tests/fixtures/archives/ (committed; rerun to
regenerate). Used by crates/quire-store (archive unit tests), tests/pipeline.rs and
tests/distributed.rs.

    python3 -m venv /tmp/archives-venv
    /tmp/archives-venv/bin/pip install webdataset==1.0.2 pillow==13.0.0
    /tmp/archives-venv/bin/python tests/gen_archives.py

Good shards are written with webdataset's TarWriter in img2dataset's layout (key = 5-digit
shard number + 4-digit index; members KEY.jpg, KEY.txt, KEY.json); zips with Python's
zipfile. The damaged and hostile ones are made with tarfile/zipfile and byte surgery.
Everything stays well under 200 KB.

With --bench DIR N it instead writes DIR/shard.tar with N JPEG images in the same layout and
the same images as loose files under DIR/loose/ (for benches/archives/, not committed).
"""
import io
import json
import os
import sys
import tarfile
import zipfile

import webdataset as wds
from PIL import Image, ImageDraw

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "archives")
MTIME = 1_700_000_000


def image(i, w=48, h=32, fmt="JPEG"):
    """A small picture that differs per index: a coloured background and a bar."""
    im = Image.new("RGB", (w, h), ((i * 53) % 256, (i * 97) % 256, (i * 31) % 256))
    d = ImageDraw.Draw(im)
    d.rectangle([2 + i % (w // 2), 4, 8 + i % (w // 2), h - 4], fill=(255 - (i * 53) % 256, 240, 16))
    buf = io.BytesIO()
    im.save(buf, format=fmt, quality=90) if fmt == "JPEG" else im.save(buf, format=fmt)
    return buf.getvalue()


def img2dataset_sample(shard, i, with_image=True):
    key = f"{shard:05d}{i:04d}"
    s = {
        "__key__": key,
        "txt": f"a picture number {i} of shard {shard}",
        "json": {"key": key, "url": f"https://example.com/{key}.jpg", "caption": f"picture {i}", "status": "success"},
    }
    if with_image:
        s["jpg"] = image(shard * 100 + i)
    return s


def write_shard(path, shard, n, without_image=()):
    with wds.TarWriter(path) as sink:
        for i in range(n):
            sink.write(img2dataset_sample(shard, i, with_image=i not in without_image))


def tar_bytes(members, fmt=tarfile.GNU_FORMAT):
    """members: (name, bytes) pairs, or (name, bytes, tar type)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt, encoding="utf-8", errors="surrogateescape") as t:
        for m in members:
            name, data = m[0], m[1]
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            ti.mtime = MTIME
            if len(m) > 2:
                ti.type = m[2]
                ti.linkname = "000000000.jpg"
                ti.size = 0
                data = b""
            t.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def zip_bytes(members, compress=zipfile.ZIP_STORED):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=compress) as z:
        for name, data in members:
            zi = zipfile.ZipInfo(name, date_time=(2024, 1, 2, 3, 4, 6))
            zi.compress_type = compress
            z.writestr(zi, data)
    return buf.getvalue()


def mark_encrypted(data, name):
    """Sets the 'encrypted' flag of member `name` in its local and central headers (the bytes
    stay plain: readers must refuse it for the flag, not for garbage)."""
    data = bytearray(data)
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as z:
        info = z.getinfo(name)
    lh = info.header_offset
    assert data[lh:lh + 4] == b"PK\x03\x04"
    data[lh + 6] |= 1
    enc = name.encode()
    pos = 0
    while True:
        pos = data.index(b"PK\x01\x02", pos)
        n = int.from_bytes(data[pos + 28:pos + 30], "little")
        if bytes(data[pos + 46:pos + 46 + n]) == enc:
            data[pos + 8] |= 1
            return bytes(data)
        pos += 4


def main():
    os.makedirs(OUT, exist_ok=True)
    for f in os.listdir(OUT):
        if os.path.isfile(os.path.join(OUT, f)):
            os.remove(os.path.join(OUT, f))
    # Four img2dataset shards; shard 1 has a sample whose download failed (no image).
    for shard in range(4):
        write_shard(os.path.join(OUT, f"shard-{shard:06d}.tar"), shard, 5, without_image={2} if shard == 1 else ())
    # A gzip'd shard.
    with wds.TarWriter(os.path.join(OUT, "gz-000000.tar.gz")) as sink:
        for i in range(3):
            sink.write(img2dataset_sample(7, i))
    # A zip of loose pictures and captions, in folders.
    z = [(f"pics/{i:03d}.png", image(500 + i, fmt="PNG")) for i in range(3)]
    z.insert(1, ("pics/001.txt", b"not an image, left alone"))
    with open(os.path.join(OUT, "pictures.zip"), "wb") as f:
        f.write(zip_bytes(z))

    good = tar_bytes([(f"00000000{i}.jpg", image(900 + i)) for i in range(4)])
    bad = os.path.join(OUT, "bad")
    os.makedirs(bad, exist_ok=True)
    for f in os.listdir(bad):
        os.remove(os.path.join(bad, f))
    # Cut inside the data of the third image: two samples read, then `truncated`.
    third = good.index(image(902)[-100:])
    with open(os.path.join(bad, "truncated.tar"), "wb") as f:
        f.write(good[: third + 10])
    zgood = zip_bytes([(f"{i:03d}.jpg", image(950 + i)) for i in range(4)])
    with open(os.path.join(bad, "truncated.zip"), "wb") as f:
        f.write(zgood[: zgood.index(image(953)[-100:]) + 10])
    # Hostile names, a link and a nested archive next to one good sample.
    with open(os.path.join(bad, "names.tar"), "wb") as f:
        f.write(tar_bytes([
            ("000000000.jpg", image(1)),
            ("../escape.jpg", image(2)),
            ("/abs/000000002.jpg", image(3)),
            ("caf\udce9.jpg", image(4)),
            ("link.jpg", b"", tarfile.SYMTYPE),
            ("000000005.tar", good),
            ("000000006.jpg", image(6)),
        ]))
    # Duplicate keys: 000000001 again after another sample.
    with open(os.path.join(bad, "duplicates.tar"), "wb") as f:
        f.write(tar_bytes([
            ("000000000.jpg", image(10)), ("000000001.jpg", image(11)), ("000000001.txt", b"one"),
            ("000000002.jpg", image(12)), ("000000001.json", b"{}"),
        ]))
    # No images at all: captions and metadata only.
    with open(os.path.join(bad, "noimages.tar"), "wb") as f:
        f.write(tar_bytes([(f"00000000{i}.{e}", b"x") for i in range(3) for e in ("txt", "json")]))
    # A zip bomb (4 MB of zeros, ~4 KB deflated), an encrypted member and a nested zip.
    zb = zip_bytes([
        ("000.jpg", image(20)),
        ("bomb.bmp", bytes(4 << 20)),
        ("secret.jpg", image(21)),
        ("inner.zip", zgood),
        ("002.jpg", image(22)),
    ], compress=zipfile.ZIP_DEFLATED)
    with open(os.path.join(bad, "hostile.zip"), "wb") as f:
        f.write(mark_encrypted(zb, "secret.jpg"))
    # A 0-byte shard.
    open(os.path.join(bad, "empty.tar"), "wb").close()


def bench(out, n):
    os.makedirs(os.path.join(out, "loose"), exist_ok=True)
    with wds.TarWriter(os.path.join(out, "shard.tar")) as sink:
        for i in range(n):
            data = image(i, 256, 192)
            key = f"{0:05d}{i:04d}" if n <= 10_000 else f"{i:09d}"
            sink.write({"__key__": key, "jpg": data, "txt": f"picture {i}", "json": {"key": key}})
            with open(os.path.join(out, "loose", f"{key}.jpg"), "wb") as f:
                f.write(data)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--bench":
        bench(sys.argv[2], int(sys.argv[3]))
    else:
        main()
