#!/usr/bin/env bash
# Run the conformance suite (or part of it) on several legs at once, stock Unsloth and the
# shim side by side, on a GPU machine with no network and the CUDA torch already installed.
#
#   conformance/offline_legs.sh REPORT_ROOT LEG[:DTYPE][@MODE[+MODE]] ... [-- PYTEST_ARGS]
#   e.g. conformance/offline_legs.sh /tmp/reports 2026.10 2025.10 2025.3:bf16 -- -m rope
#        conformance/offline_legs.sh /tmp/reports 2026.10@shim 2026.10-upstream@stock
# (@MODES: this leg's runs, shim and/or stock; default $CONFORMANCE_MODES, else both).
# Leg 2026.10-upstream is Unsloth with the upstream patch series applied
# (conformance/build_patched_unsloth.sh .whl-2026.10 .whl-2026.10-upstream).
#
# Wheels: .whl-common/ (shared runtime packages) and .whl-<LEG>/ (the leg's pins, as tox.ini
# lists them; a skip.txt there names common packages that leg must not get; a base.txt names
# a leg whose wheels it takes where it has none of its own). Each leg is
# installed with --no-deps into its own folder, put first on PYTHONPATH, so its transformers
# shadows the machine's while torch comes from the machine. Each run gets its own working
# directory (Unsloth writes a compile cache there) and REPORT_ROOT/<LEG>/<stock|shim>/.
# Then `python -m conformance.document --collect REPORT_ROOT` puts the reports in
# conformance-reports/ and regenerates CONFORMANCE.md from them.
set -uo pipefail
root=$(mkdir -p "$1" && cd "$1" && pwd)
shift
legs=()
while [[ $# -gt 0 && $1 != "--" ]]; do legs+=("$1"); shift; done
[[ ${1:-} == "--" ]] && shift
repo=$(cd "$(dirname "$0")/.." && pwd)
pids=()

launch() {  # RUN MODE DTYPE SITE MUTATION PYTEST_ARGS...  (RUN: the leg, or LEG-DTYPE)
  local leg=$1 mode=$2 dtype=$3 site=$4 mutation=$5
  shift 5
  local out=$root/$leg/$mode work=${TMPDIR:-/tmp}/conformance-run-$leg-$mode disable=0
  [[ $mode == stock ]] && disable=1
  mkdir -p "$out" "$work"
  (
    cd "$work" &&
      PYTHONPATH=$site:$repo CONFORMANCE_CACHE=${TMPDIR:-/tmp}/conformance-cache-$leg-$dtype \
      CONFORMANCE_DTYPE=$dtype UNSLOTH_QWEN_COMPAT_DISABLE=$disable CONFORMANCE_MUTATION=$mutation \
      UNSLOTH_QWEN_COMPAT_FUSED_QKV_BIAS=${UNSLOTH_QWEN_COMPAT_FUSED_QKV_BIAS:-1} \
      PYTHONUNBUFFERED=1 timeout -s INT -k 30 "${CONFORMANCE_TIMEOUT:-3000}" python3 -m conformance --report "$out" -p no:cacheprovider "$@" >"$out/log.txt" 2>&1
    echo "$leg $mode: exit $?" >>"$root/exits.txt"
  ) &
  pids+=($!)
}
for spec in "${legs[@]}"; do
  modes=${CONFORMANCE_MODES:-shim stock}
  if [[ $spec == *@* ]]; then
    modes=${spec#*@}
    modes=${modes//+/ }
    spec=${spec%%@*}
  fi
  leg=${spec%%:*}
  default=fp32
  [[ $leg == 2025.3* ]] && default=bf16 # Unsloth 2025.3.x refuses fp32 models (as tox.ini)
  dtype=$default
  [[ $spec == *:* ]] && dtype=${spec#*:}
  [[ -d $repo/.whl-$leg ]] || { echo "leg $leg: no wheel folder .whl-$leg"; continue; }
  site=${TMPDIR:-/tmp}/conformance-leg-$leg
  # Installed once per leg, under a lock: several invocations may share it (e.g. one per dtype).
  if ! (
    flock 9
    [[ -d $site ]] && exit 0
    wheels=("$repo/.whl-$leg"/*.whl)
    own=$(for w in "${wheels[@]}"; do basename "$w" | cut -d- -f1 | tr 'A-Z-' 'a-z_'; done)
    skip=$(cat "$repo/.whl-$leg/skip.txt" 2>/dev/null)
    # A base.txt naming another leg: this leg is that one with the pins of its own folder
    # (latest = 2026.10 with newer transformers / trl), so its folder holds only those.
    base=$(cat "$repo/.whl-$leg/base.txt" 2>/dev/null)
    if [[ -n $base ]]; then
      for w in "$repo/.whl-$base"/*.whl; do
        name=$(basename "$w" | cut -d- -f1 | tr 'A-Z-' 'a-z_')
        grep -qx "$name" <<<"$own" || { wheels+=("$w"); own+=$'\n'"$name"; }
      done
      skip+=$'\n'$(cat "$repo/.whl-$base/skip.txt" 2>/dev/null)
    fi
    for w in "$repo"/.whl-common/*.whl; do
      name=$(basename "$w" | cut -d- -f1 | tr 'A-Z-' 'a-z_')
      grep -qx "$name" <<<"$own"$'\n'"$skip" || wheels+=("$w")
    done
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site.partial" "${wheels[@]}" &&
      mv "$site.partial" "$site"
  ) 9>"$site.lock"; then
    echo "leg $leg: install failed"
    continue
  fi
  # LEG:DTYPE other than the leg's own reports under REPORT_ROOT/LEG-DTYPE/.
  run=$leg
  [[ $dtype != "$default" ]] && run=$leg-$dtype
  for mode in $modes; do
    launch "$run" "$mode" "$dtype" "$site" "" "$@"
  done
  # CONFORMANCE_MODES (or LEG@MODES) picks the runs (default "shim stock"); CONFORMANCE_TIMEOUT (s)
  # interrupts a run, which still writes its report.
  # CONFORMANCE_MUTATIONS="NAME=KEXPR ...": the shim run again with each deliberate defect
  # (conformance/mutations.py) on the cases KEXPR selects (a pytest -k expression, + for
  # spaces); each case that goes through the mutated code must fail.
  for mutation in ${CONFORMANCE_MUTATIONS:-}; do
    launch "$run" "mutation-${mutation%%=*}" "$dtype" "$site" "${mutation%%=*}" "$@" \
      -p conformance.mutations -k "$(tr + ' ' <<<"${mutation#*=}")"
  done
done
wait "${pids[@]}"
cat "$root/exits.txt"
for log in "$root"/*/*/log.txt; do
  echo "== $log"
  grep -E "^(pass|fail|refused|xfail|error|skip)=|passed|failed" "$log" | tail -3
done
