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
"""
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


def main():
    ensure_venv()
    from docling_core.types.doc.document import DocTagsDocument, DoclingDocument

    for dt in sorted(CORPUS.glob("*.dt")):
        pages = dt.read_text(encoding="utf-8").split("<page_break>")
        md, err = dt.with_suffix(".md"), dt.with_suffix(".error.txt")
        for p in (md, err):
            p.unlink(missing_ok=True)
        try:
            doc = DoclingDocument.load_from_doctags(
                DocTagsDocument.from_doctags_and_image_pairs(pages, None), document_name=dt.stem
            )
            md.write_text(doc.export_to_markdown() + "\n", encoding="utf-8")
        except Exception as e:  # docling-core fails on some malformed pages
            err.write_text(f"{type(e).__name__}: {e}\n", encoding="utf-8")
            print(f"{dt.name}: {type(e).__name__}: {e}", file=sys.stderr)


if __name__ == "__main__":
    main()
