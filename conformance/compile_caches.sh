#!/usr/bin/env bash
# Carry the compile caches of a conformance run from one machine to a fresh one (a CI runner, a
# rented GPU): on a cold machine most of a leg's time is compiling (conformance/README.md, "How
# long it takes"), and each of these caches turns a later process's compile into a lookup.
#
#   conformance/compile_caches.sh pack ARCHIVE [PART_MB]   # after a run: ARCHIVE (or ARCHIVE.part-aa, ...)
#   conformance/compile_caches.sh unpack ARCHIVE           # before a run, on the fresh machine
#
# The caches, each only where it exists:
#   triton    $TRITON_CACHE_DIR, else ~/.triton/cache (compiled kernels, autotune results)
#   inductor  /tmp/torchinductor_$USER: torch.compile's FX / AOTAutograd graphs (Unsloth removes
#             TORCHINDUCTOR_CACHE_DIR when imported, so this default is where they go)
#   unsloth   $UNSLOTH_MEGA_CACHE_DIR, else ~/.cache/unsloth/mega_cache (Unsloth's bundle of them)
# They hold compiled code for one torch / Triton / CUDA build and GPU: unpack only onto the same
# stack (a mismatch is a cache miss, never a wrong result). xz: 205 MB of Triton cache packed to
# 11 MB. With PART_MB, the archive is split into parts of at most that size.
set -euo pipefail
command=${1:-}
archive=${2:-}
[[ $command == pack || $command == unpack ]] && [[ -n $archive ]] || {
  echo "usage: $0 pack ARCHIVE [PART_MB] | unpack ARCHIVE" >&2
  exit 2
}
user=${USER:-$(id -un)}
triton=${TRITON_CACHE_DIR:-$HOME/.triton/cache}
inductor=/tmp/torchinductor_$user
mega=${UNSLOTH_MEGA_CACHE_DIR:-$HOME/.cache/unsloth/mega_cache}
caches=("triton:$triton" "inductor:$inductor" "unsloth:$mega")  # NAME:DIR, as in the archive

if [[ $command == pack ]]; then
  stage=$(mktemp -d)
  trap 'rm -rf "$stage"' EXIT
  for pair in "${caches[@]}"; do
    name=${pair%%:*} dir=${pair#*:}
    if [[ -d $dir ]]; then
      ln -s "$dir" "$stage/$name"
      echo "$name: $dir, $(find "$dir" -type f | wc -l) files, $(du -sh "$dir" | cut -f1)"
    fi
  done
  [[ -n $(ls "$stage") ]] || { echo "no compile cache found" >&2; exit 1; }
  # The kernel warm-ups' markers (warm_kernels.cache_markers) are inside the caches: they travel
  # with the kernels they describe, and a session that finds them all starts no warm-up.
  if [[ -n ${3:-} ]]; then
    tar -chC "$stage" . | xz -T0 -6 | split -b "${3}M" - "$archive.part-"
    ls -l "$archive".part-*
  else
    tar -chC "$stage" . | xz -T0 -6 >"$archive"
    ls -l "$archive"
  fi
else
  if [[ -f $archive ]]; then parts=("$archive"); else parts=("$archive".part-*); fi
  [[ -f ${parts[0]} ]] || { echo "no $archive or $archive.part-*" >&2; exit 1; }
  stage=$(mktemp -d)
  trap 'rm -rf "$stage"' EXIT
  cat "${parts[@]}" | xz -dc | tar -xC "$stage"
  for pair in "${caches[@]}"; do
    name=${pair%%:*} dir=${pair#*:}
    if [[ -d $stage/$name ]]; then
      mkdir -p "$dir"
      cp -a "$stage/$name/." "$dir/"
      echo "$name: $(find "$dir" -type f | wc -l) files in $dir"
    fi
  done
fi
