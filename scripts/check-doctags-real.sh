#!/usr/bin/env bash
# Local-only check of quire's DocTags → Markdown on real pages that are kept
# outside the repository (public model answers and docling exports that are
# not ours to commit; see issue 20). For every page it compares quire with
# docling-core's export_to_markdown (references written now by
# tests/gen_doctags_md.py --input, docling-core pinned there) and prints
#
#   N files: E equal to docling-core, D differ for a documented reason,
#   X differ otherwise, F that docling-core fails on; words lost: W
#
# and fails when X or W is not 0. "Documented" means: undoing the
# differences the README lists under "DocTags models" on quire's blocks
# gives docling-core's Markdown exactly.
#
#   scripts/check-doctags-real.sh [DIR]
#
# DIR (or QUIRE_DOCTAGS_REAL) holds the pages, *.doctags or *.dt, directly or
# in DIR/cases; default ../shared/doctags-real next to the checkout. Without
# it the check is skipped (exit 0), as in CI. Needs Python 3 (the generator
# makes its venv) and cargo.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
dir="${1:-${QUIRE_DOCTAGS_REAL:-$root/../shared/doctags-real}}"
[[ -d "$dir/cases" ]] && dir="$dir/cases"
if [[ ! -d "$dir" ]]; then
    echo "check-doctags-real: skipped: no real DocTags pages at $dir (they are not in the repository; pass a folder or set QUIRE_DOCTAGS_REAL)"
    exit 0
fi
dir="$(cd "$dir" && pwd)"
refs="$(mktemp -d)"
trap 'rm -rf "$refs"' EXIT
python3 "$root/tests/gen_doctags_md.py" --input "$dir" --out "$refs" 2> >(grep -v -e UserWarning -e '_clamp_bbox_to_page' >&2)
cd "$root"
QUIRE_DOCTAGS_REAL="$dir" QUIRE_DOCTAGS_REAL_REF="$refs" \
    cargo test -q -p quire-doctags --lib real_pages -- --ignored --nocapture --test-threads 1 2>&1 |
    grep -v -e '^running ' -e '^test result' -e '^$' -e '^\.$'
