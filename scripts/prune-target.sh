#!/usr/bin/env bash
# Keeps a long-lived cargo target folder from filling the disk: every source
# change leaves the previous test and example binaries behind (each tens to
# hundreds of MB), and incremental state piles up per checkout path.
#
#   scripts/prune-target.sh TARGET_DIR [MIN_FREE_GIB]
#
# Removes, in each profile folder, every test/example executable that has a
# newer build of the same name. If the disk still has less than MIN_FREE_GIB
# (default 8) free, removes the incremental state too. Prints what it freed.
set -euo pipefail
target="${1:?usage: prune-target.sh TARGET_DIR [MIN_FREE_GIB]}"
min_free_gib="${2:-8}"
[ -d "$target" ] || exit 0

free_kib() { df -Pk "$target" | awk 'NR == 2 { print $4 }'; }
before=$(free_kib)

for dir in "$target"/*/deps "$target"/*/examples; do
  [ -d "$dir" ] || continue
  # NAME-<16 hex digits>, executable, newest first: keep the first of each NAME.
  find "$dir" -maxdepth 1 -type f -perm -u+x -regextype posix-extended \
      -regex '.*/[^/.]+-[0-9a-f]{16}' -printf '%T@ %p\n' \
    | sort -rn \
    | awk '{ path = $2; name = path; sub(/-[0-9a-f]+$/, "", name); if (seen[name]++) print path }' \
    | xargs -r rm -f --
done

if [ "$(free_kib)" -lt $((min_free_gib * 1024 * 1024)) ]; then
  rm -rf "$target"/*/incremental
fi

after=$(free_kib)
freed_mib=$(((after - before) / 1024))
if [ "$freed_mib" -gt 0 ]; then
  echo "prune-target: freed ${freed_mib} MiB in $target ($((after / 1024 / 1024)) GiB free)" >&2
fi
if [ "$after" -lt $((2 * 1024 * 1024)) ]; then
  echo "prune-target: only $((after / 1024)) MiB free on the disk of $target; the build may fail for want of space" >&2
fi
