#!/usr/bin/env python3
"""Reference Markdown for the DocTags corpus in tests/fixtures/doctags/.

For every NAME.dt (one page, or several pages split at <page_break>) this
writes NAME.md: what docling-core renders for it,

    DocTagsDocument.from_doctags_and_image_pairs(pages, None)
    DoclingDocument.load_from_doctags(doc).export_to_markdown()

or, where docling-core raises, NAME.error.txt with the exception. The outputs
are committed; quire-doctags' tests compare with them (CI needs no Python).

Pinned: docling-core==2.104.0, tabulate==0.10.0 (which lays out its tables).
Run:  python3 tests/gen_doctags_md.py
It installs them into a venv under ~/.cache/quire-tools/doctags-venv when
missing and runs itself there.

A wider, uncommitted check: random well-formed pages with their references,

    python3 tests/gen_doctags_md.py --random 600 --seed 3 --out /tmp/dt-random
    QUIRE_DOCTAGS_CORPUS=/tmp/dt-random cargo test -p quire-doctags corpus

(pages docling-core fails on are left out).

References for DocTags pages kept elsewhere (never committed), as
scripts/check-doctags-real.sh uses it: every *.dt or *.doctags in --input
gets NAME.md (or NAME.error.txt) in --out,

    python3 tests/gen_doctags_md.py --input DIR --out /tmp/dt-ref
"""
import argparse
import random
import os
import subprocess
import sys
from pathlib import Path

PINS = ["docling-core==2.104.0", "tabulate==0.10.0"]
VENV = Path(os.environ.get("QUIRE_TOOLS", Path.home() / ".cache/quire-tools")) / "doctags-venv"
CORPUS = Path(__file__).resolve().parent / "fixtures" / "doctags"


def ensure_venv():
    py = VENV / "bin" / "python"
    if Path(sys.prefix).resolve() == VENV.resolve():
        return
    if not py.exists():
        subprocess.check_call([sys.executable, "-m", "venv", str(VENV)])
    subprocess.check_call([str(py), "-m", "pip", "install", "-q", *PINS])
    os.execv(str(py), [str(py), __file__, *sys.argv[1:]])


# Words that exercise escaping, number detection in tables and wide characters.
WORDS = ["alpha", "beta_gamma", "A&B", "3", "-4.5", "1,000", "True", "nan", "1e5", "ü", "東京", "a|b",
         "`tick`", "__init__", "\\_x", "$5", "50%", "(1)", "**b**", "# h", "1.", "- item", "0x1F",
         "12_3", "+7", "inf", ".5", "١٢"]


def random_page(rng):
    def words(n=None):
        return " ".join(rng.choice(WORDS) for _ in range(n or rng.randint(1, 5)))

    def loc():
        x0, x1 = sorted(rng.sample(range(501), 2))
        y0, y1 = sorted(rng.sample(range(501), 2))
        return f"<loc_{x0}><loc_{y0}><loc_{x1}><loc_{y1}>"

    def cell():
        r = rng.random()
        if r < 0.15:
            return "<ecel>"
        if r < 0.4:
            return rng.choice(["<lcel>", "<lcel>", "<ucel>", "<ucel>", "<xcel>"])
        return f"<{rng.choice(['fcel', 'fcel', 'fcel', 'ched', 'rhed', 'srow'])}>{rng.choice(WORDS)}"

    def table(tag="otsl", extra=""):
        cols = rng.randint(1, 4)
        rows = ""
        for _ in range(rng.randint(1, 5)):
            n = cols if rng.random() < 0.8 else rng.randint(1, cols + 1)
            rows += f"<fcel>{rng.choice(WORDS)}" + "".join(cell() for _ in range(n - 1)) + "<nl>"
        cap = f"<caption>{loc()}{words()}</caption>" if rng.random() < 0.3 else ""
        return f"<{tag}>{loc()}{extra}{cap}{rows}</{tag}>"

    def element():
        k = rng.choice(["title", "text", "text", "header", "list", "code", "formula", "table", "table", "picture",
                        "chart", "checkbox_selected", "checkbox_unselected", "footnote", "caption", "page_header",
                        "page_footer", "inline"])
        if k == "header":
            n = rng.randint(1, 6)
            return f"<section_header_level_{n}>{loc()}{words()}</section_header_level_{n}>"
        if k == "list":
            t = rng.choice(["ordered_list", "unordered_list"])
            items = "".join(f"<list_item>{loc()}{words()}</list_item>" for _ in range(rng.randint(1, 4)))
            return f"<{t}>{items}</{t}>"
        if k == "code":
            lang = rng.choice(["", "<_Python_>", "<_C_>", "<_unknown_>"])
            return f"<code>{loc()}{lang}{words()}\n{words()}</code>"
        if k == "table":
            return table()
        if k == "chart":
            return table("chart", rng.choice(["", "<pie_chart>", "<line_chart>"]))
        if k == "picture":
            cls = rng.choice(["", "<logo>", "<bar_chart>", "<line>", "<stamp>"])
            cap = f"<caption>{loc()}{words()}</caption>" if rng.random() < 0.5 else ""
            return f"<picture>{loc()}{cls}{cap}</picture>"
        if k == "inline":
            parts = "".join(rng.choice([f"<text>{words()}</text>", f"<formula>{words(1)}</formula>",
                                        f"<code>{words(1)}</code>"]) for _ in range(rng.randint(1, 4)))
            return f"<inline>{loc()}{parts}</inline>"
        return f"<{k}>{loc()}{words()}</{k}>"

    return "<doctag>" + "".join(element() for _ in range(rng.randint(1, 8))) + "</doctag>"


def reference(pages):
    from docling_core.types.doc.document import DocTagsDocument, DoclingDocument

    doc = DoclingDocument.load_from_doctags(DocTagsDocument.from_doctags_and_image_pairs(pages, None))
    return doc.export_to_markdown() + "\n"


def main():
    ensure_venv()
    ap = argparse.ArgumentParser()
    ap.add_argument("--random", type=int, default=0, help="write this many random pages instead")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--input", type=Path, help="write references for the pages in this folder to --out instead")
    args = ap.parse_args()
    if args.input:
        args.out.mkdir(parents=True, exist_ok=True)
        files = sorted(p for p in args.input.iterdir() if p.suffix in (".dt", ".doctags"))
        for dt in files:
            write_reference(dt, args.out / dt.stem)
        print(f"references for {len(files)} files of {args.input} written to {args.out}")
        return
    if args.random:
        rng = random.Random(args.seed)
        args.out.mkdir(parents=True, exist_ok=True)
        kept = 0
        for i in range(args.random):
            page = random_page(rng)
            try:
                md = reference([page])
            except Exception:
                continue
            (args.out / f"random-{i:05}.dt").write_text(page, encoding="utf-8")
            (args.out / f"random-{i:05}.md").write_text(md, encoding="utf-8")
            kept += 1
        print(f"{kept} of {args.random} random pages written to {args.out}")
        return

    for dt in sorted(CORPUS.glob("*.dt")):
        write_reference(dt, dt.with_suffix(""))


def write_reference(dt, stem):
    """STEM.md with docling-core's Markdown for the pages of `dt`, or
    STEM.error.txt with the exception where docling-core fails."""
    pages = dt.read_text(encoding="utf-8").split("<page_break>")
    md, err = stem.with_name(stem.name + ".md"), stem.with_name(stem.name + ".error.txt")
    for p in (md, err):
        p.unlink(missing_ok=True)
    try:
        md.write_text(reference(pages), encoding="utf-8")
    except Exception as e:  # docling-core fails on some malformed pages
        err.write_text(f"{type(e).__name__}: {e}\n", encoding="utf-8")
        print(f"{dt.name}: {type(e).__name__}: {e}", file=sys.stderr)


if __name__ == "__main__":
    main()
