#!/usr/bin/env python3
"""Writes Pillow `Image.resize` reference outputs for `crates/quire-vlm` (`pil::resize`).

    /root/venv-ref/bin/python tests/gen_pil_resize.py

Output: tests/fixtures/idefics3/pil_resize.bin, a little-endian binary file:

    b"PILRSZ1\\0", u32 pillow major, u32 minor, u32 patch, u32 number of sources, then per source:
        u16 width, u16 height, width*height*3 RGB bytes (row-major), u16 number of outputs, then per output:
            u16 width, u16 height, u8 filter (PIL.Image.Resampling value), width*height*3 RGB bytes

Sources are small uniform-noise RGB images (noise maximises the pixels where rounding of
the 8-bit intermediate differs between pass orders). Targets mix up- and downscaling of each
axis, the pass-order boundary of Pillow's ImagingResampleInner ((ih - oh) vs 2 * (iw - ow)),
one-pixel-wide cases and strong reductions (wide kernels). No `reducing_gap`, like the
transformers image processors.
"""
import os
import struct

import numpy as np
import PIL
from PIL import Image

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "idefics3", "pil_resize.bin")
FILTERS = [Image.Resampling.LANCZOS, Image.Resampling.BICUBIC]


def targets(rng, w, h):
    t = set()
    while len(t) < 4:  # random, any direction per axis
        t.add((int(rng.randint(1, 36)), int(rng.randint(1, 36))))
    # on and next to the pass-order boundary: (h - oh) == 2 * (w - ow) (+1)
    for dw in (-2, 0, 3):
        ow = w - dw
        for extra in (0, 1):
            oh = h - (2 * dw + extra)
            if 1 <= ow <= 64 and 1 <= oh <= 64 and (ow, oh) != (w, h):
                t.add((ow, oh))
    t.discard((w, h))
    return sorted(t)


def main():
    rng = np.random.RandomState(20240605)
    sizes = [(int(rng.randint(1, 41)), int(rng.randint(1, 41))) for _ in range(20)]
    sizes += [(37, 45), (45, 37), (1, 30), (30, 1), (120, 9), (9, 120), (64, 64), (33, 32)]
    buf = bytearray(b"PILRSZ1\0")
    ver = [int(x) for x in PIL.__version__.split(".")[:3]]
    buf += struct.pack("<IIII", *ver, len(sizes))
    n_out = 0
    for w, h in sizes:
        src = (rng.rand(h, w, 3) * 256).astype(np.uint8)
        im = Image.fromarray(src, "RGB")
        buf += struct.pack("<HH", w, h) + src.tobytes()
        outs = []
        for ow, oh in targets(rng, w, h):
            if (w, h) in [(120, 9), (9, 120)]:
                ow, oh = max(1, ow // 3), max(1, oh // 3)
            for f in FILTERS:
                r = np.asarray(im.resize((ow, oh), resample=f))
                assert r.shape == (oh, ow, 3)
                outs.append(struct.pack("<HHB", ow, oh, int(f)) + r.tobytes())
        buf += struct.pack("<H", len(outs))
        for o in outs:
            buf += o
        n_out += len(outs)
    with open(OUT, "wb") as fh:
        fh.write(buf)
    print(f"wrote {OUT}: {len(sizes)} sources, {n_out} resized outputs, {len(buf)} bytes (Pillow {PIL.__version__})")


if __name__ == "__main__":
    main()
