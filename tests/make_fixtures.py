#!/usr/bin/env python3
"""Generates the small PDF/image fixtures under tests/fixtures/docs/ (committed; rerun to
regenerate). Used by crates/quire-render/tests/render.rs.

    python3 -m venv /root/venv-fix
    /root/venv-fix/bin/pip install reportlab==5.1.0 pillow==13.0.0 pypdf==7.1.1 cryptography
    /root/venv-fix/bin/python tests/make_fixtures.py

Text PDFs are reproducible (reportlab invariant mode); the encrypted ones are not (random
salts), which is fine. Everything stays well under 1 MB in total.
"""
import io
import os
import struct
import zlib

from PIL import Image, ImageDraw, ImageFont
from pypdf import PdfReader, PdfWriter
from reportlab.lib.pagesizes import letter, landscape
from reportlab.lib.utils import ImageReader, simpleSplit
from reportlab.pdfgen import canvas

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "docs")
FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSerif.ttf"

PARAGRAPHS = [
    "The river had been rising for three days before anyone in the village thought to move "
    "the grain out of the lower barns. By the time the council met, the water was already "
    "lapping at the steps of the mill, and the miller's youngest son had been sent upstream "
    "to watch the bridge.",
    "Records kept by the parish clerk show that the flood of that spring reached a height "
    "of nine feet above the summer level. The clerk noted the damage to each household in "
    "a careful hand, listing lost livestock, ruined seed and the number of days each family "
    "spent sheltering in the church.",
    "Modern hydrologists who have studied these accounts believe the cause was a sudden "
    "thaw following an unusually heavy snowfall in the hills. Similar conditions returned "
    "twice in the following century, and each time the village rebuilt a little higher on "
    "the slope.",
    "Today the old mill is a museum. Visitors can still see the marks left by the water on "
    "the stone walls, and a small brass plate records the names of the people who kept the "
    "village fed through that difficult season.",
    "Optical character recognition systems are often evaluated on documents like these: "
    "plain paragraphs, a few numbers such as 1847 and 9.5 percent, and the occasional "
    "hyphenated word at the end of a line.",
]


def scan_image(lines, size=(850, 1100), seed_noise=True):
    """A grayscale 'scanned page': text drawn into pixels, slight gray background."""
    img = Image.new("L", size, 246)
    d = ImageDraw.Draw(img)
    font = ImageFont.truetype(FONT, 26) if os.path.exists(FONT) else ImageFont.load_default(26)
    y = 80
    for line in lines:
        d.text((70, y), line, fill=20, font=font)
        y += 40
    if seed_noise:
        # a few specks, deterministic
        for i in range(400):
            x, yy = (i * 7919) % size[0], (i * 104729) % size[1]
            d.point((x, yy), fill=180)
    return img


SCAN_LINES = [
    "SCANNED LETTER",
    "",
    "Dear Sir,",
    "We write to confirm the delivery of twelve",
    "crates of apples on the fourth of October.",
    "The invoice will follow by separate post.",
    "",
    "Yours faithfully,",
    "The Orchard Company",
]


def text_pages(c, pages, start=0, landscape_last=False):
    """Writes `pages` pages of real sentences; returns nothing."""
    for p in range(pages):
        size = landscape(letter) if (landscape_last and p == pages - 1) else letter
        c.setPageSize(size)
        w, h = size
        c.setFont("Helvetica-Bold", 16)
        c.drawString(72, h - 72, f"Chapter {start + p + 1}: The Flood")
        c.setFont("Helvetica", 11)
        y = h - 100
        for k in range(3):
            para = PARAGRAPHS[(start + p + k) % len(PARAGRAPHS)]
            for line in simpleSplit(para, "Helvetica", 11, w - 144):
                c.drawString(72, y, line)
                y -= 15
            y -= 10
        if p == 0 and start == 0:
            # a red box, to check colour channel order of the rendering
            c.setFillColorRGB(1, 0, 0)
            c.rect(72, 72, 144, 72, stroke=0, fill=1)
            c.setFillColorRGB(0, 0, 0)
        c.drawString(w / 2 - 10, 40, str(start + p + 1))
        c.showPage()


def scanned_page(c, img):
    c.setPageSize(letter)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=55)
    buf.seek(0)
    c.drawImage(ImageReader(buf), 0, 0, width=letter[0], height=letter[1])
    c.showPage()


def write(name, data):
    with open(os.path.join(OUT, name), "wb") as f:
        f.write(data)


def pdf_bytes(build):
    buf = io.BytesIO()
    c = canvas.Canvas(buf, invariant=1)
    build(c)
    c.save()
    return buf.getvalue()


def bomb_png(w, h):
    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    # A short valid zlib stream: far less data than the header promises.
    idat = zlib.compress(b"\0" * 4096, 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def encrypt(src, user, owner):
    r = PdfReader(io.BytesIO(src))
    wtr = PdfWriter()
    for p in r.pages:
        wtr.add_page(p)
    # AES-128 (R4), which every reader handles; owner-only restricts printing/copying.
    wtr.encrypt(user_password=user, owner_password=owner, algorithm="AES-128",
                permissions_flag=0 if not user else -1)
    out = io.BytesIO()
    wtr.write(out)
    return out.getvalue()


def main():
    os.makedirs(OUT, exist_ok=True)
    scan = scan_image(SCAN_LINES)

    born = pdf_bytes(lambda c: text_pages(c, 3, landscape_last=True))
    write("born_digital.pdf", born)
    write("scanned.pdf", pdf_bytes(lambda c: scanned_page(c, scan)))

    def mixed(c):
        text_pages(c, 1, start=0)
        scanned_page(c, scan)
        text_pages(c, 1, start=2)
    write("mixed.pdf", pdf_bytes(mixed))

    write("encrypted_user.pdf", encrypt(born, "secret", "owner-secret"))
    write("owner_only.pdf", encrypt(born, "", "owner-secret"))
    write("truncated.pdf", born[: int(len(born) * 0.55)])
    # Header, then bytes that are no PDF syntax, then a proper end marker.
    garbage = bytes((i * 73 + 41) % 251 for i in range(6000))
    write("corrupt.pdf", b"%PDF-1.7\n" + garbage + b"\n%%EOF\n")
    write("zero_pages.pdf", zero_page_pdf())
    write("empty.pdf", b"")
    write("not_a_pdf.pdf", b"This is a plain text file that someone saved with a .pdf name.\n" * 5)

    photo = Image.new("RGB", (320, 240), (40, 90, 160))
    d = ImageDraw.Draw(photo)
    d.ellipse((100, 60, 220, 180), fill=(240, 200, 40))
    d.rectangle((0, 200, 320, 240), fill=(30, 140, 60))
    buf = io.BytesIO(); photo.save(buf, "JPEG", quality=80); write("photo.jpg", buf.getvalue())
    buf = io.BytesIO(); photo.save(buf, "PNG"); write("png_named.jpg", buf.getvalue())
    buf = io.BytesIO(); photo.save(buf, "PNG"); write("image.png", buf.getvalue())
    buf = io.BytesIO(); photo.save(buf, "WEBP", quality=80); write("image.webp", buf.getvalue())
    buf = io.BytesIO(); photo.save(buf, "BMP"); write("image.bmp", buf.getvalue())

    # EXIF orientation 6 (rotate 90 clockwise to display): stored 320x240, shown 240x320.
    exif = Image.Exif(); exif[0x0112] = 6
    buf = io.BytesIO(); photo.save(buf, "JPEG", quality=80, exif=exif); write("exif_rotated.jpg", buf.getvalue())

    f1 = Image.new("P", (120, 80)); f1.putpalette([255, 0, 0] + [0, 0, 255] + [0] * 762)
    f2 = f1.copy(); ImageDraw.Draw(f2).rectangle((0, 0, 120, 80), fill=1)
    buf = io.BytesIO(); f1.save(buf, "GIF", save_all=True, append_images=[f2], duration=200, loop=0)
    write("animated.gif", buf.getvalue())

    frames = []
    for k, color in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        fr = Image.new("RGB", (200 + 10 * k, 100), color)
        ImageDraw.Draw(fr).text((10, 40), f"frame {k + 1}", fill=(255, 255, 255))
        frames.append(fr)
    buf = io.BytesIO()
    frames[0].save(buf, "TIFF", save_all=True, append_images=frames[1:], compression="tiff_deflate")
    write("multipage.tif", buf.getvalue())

    fax = scan_image(SCAN_LINES[:5], size=(600, 400), seed_noise=False).point(lambda v: 255 if v > 128 else 0).convert("1")
    buf = io.BytesIO(); fax.save(buf, "TIFF", compression="group4"); write("fax_g4.tif", buf.getvalue())

    rgba = Image.new("RGBA", (64, 64), (0, 0, 0, 0))  # fully transparent black -> white
    ImageDraw.Draw(rgba).rectangle((16, 16, 47, 47), fill=(0, 0, 255, 255))
    buf = io.BytesIO(); rgba.save(buf, "PNG"); write("rgba.png", buf.getvalue())
    gray = Image.linear_gradient("L").resize((128, 64))
    buf = io.BytesIO(); gray.save(buf, "PNG"); write("gray.png", buf.getvalue())
    buf = io.BytesIO(); scan.resize((425, 550)).save(buf, "PNG", optimize=True)
    write("scan été 01.png", buf.getvalue())

    write("bomb.png", bomb_png(100_000, 100_000))

    total = sum(os.path.getsize(os.path.join(OUT, n)) for n in os.listdir(OUT))
    print(f"{len(os.listdir(OUT))} fixtures, {total} bytes in {OUT}")


def zero_page_pdf():
    objs = [b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [] /Count 0 >>"]
    out = b"%PDF-1.4\n"
    offsets = []
    for i, o in enumerate(objs, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + o + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objs) + 1)
    for off in offsets:
        out += b"%010d 00000 n \n" % off
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objs) + 1, xref)
    return out


if __name__ == "__main__":
    main()
