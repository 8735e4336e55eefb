#!/usr/bin/env bash
# The retire proof on a GPU machine without network: the conformance suite on Unsloth with the
# upstream patch series applied and the shim disabled, next to the shim on stock Unsloth.
#
#   conformance/upstream_proof.sh OUT [defects|rest|core|hybrid|all] [-- PYTEST_ARGS]
#
# Needs .whl-common/ and .whl-2026.10/ (the leg's wheels) in the checkout; builds
# .whl-2026.10-upstream/ from them (conformance/build_patched_unsloth.sh) unless it is there.
# Runs at once, with conformance/offline_legs.sh: leg 2026.10 with the shim (its fused QKV on:
# its default, set explicitly as tox.ini runs legs) and leg 2026.10-upstream with
# UNSLOTH_QWEN_COMPAT_DISABLE=1, on the part of the suite PART selects:
#   defects  the cases of the patched defects: -m "rope or lora_targets or fused_qkv", RoPE and
#            fused QKV through FastLanguageModel (the path the series changes), the typo case
#            through both entry points
#   rest     every other case, through FastLanguageModel
#   core     every case but the hybrid models' (Qwen3.5, Qwen3.5-MoE, Qwen3-Next), both entry points
#   hybrid   the hybrid models' cases, both entry points (their first Triton compiles are most
#            of a cold machine's time: conformance/warm_kernels.py)
#   all      the whole suite, both entry points
# core + hybrid is the whole suite: `python -m conformance.upstream_proof merge` joins each
# run's two reports, then `compare` judges the joined pair.
# and `status` of the patched install. Writes OUT/reports/<leg>/<run>/conformance.{json,md}
# (python -m conformance.document --collect takes that folder), OUT/status-upstream.{txt,json},
# OUT/patched.json (the wheel and diffs, with sha256) and OUT/compare.{md,json}, then prints
# the verdicts and the comparison. Exit 0 when the proof holds for the part run.
# UPSTREAM_LEG (default 2026.10), WORKERS (pytest-xdist workers per run, default 4) and
# CONFORMANCE_TIMEOUT (s per run, default 480: a run stopped there still writes its report).
set -uo pipefail
out=$(mkdir -p "$1" && cd "$1" && pwd)
shift
part=${1:-defects}
[[ $# -gt 0 && $1 != "--" ]] && shift
[[ ${1:-} == "--" ]] && shift
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
leg=${UPSTREAM_LEG:-2026.10}
case $part in
  defects)
    select=(-m "rope or lora_targets or fused_qkv" -k "FastLanguageModel or test_lora_target_typo_is_rejected")
    export CONFORMANCE_ENTRY_POINTS=FastLanguageModel,FastModel ;;
  rest)
    select=(-m "not (rope or lora_targets or fused_qkv)")
    export CONFORMANCE_ENTRY_POINTS=FastLanguageModel ;;
  core) select=(-k "not (qwen3_5 or qwen3_next)") ;;
  hybrid) select=(-k "qwen3_5 or qwen3_next") ;;
  all) select=() ;;
  *) echo "upstream_proof: PART must be defects, rest, core, hybrid or all, not '$part'" >&2; exit 2 ;;
esac
started=$(date +%s)
if [[ ! -d .whl-$leg-upstream ]]; then
  python3 conformance/patched_wheel.py ".whl-$leg" ".whl-$leg-upstream" || exit 1
fi
cp ".whl-$leg-upstream/patched.json" "$out/patched.json"

# status of the patched install, as soon as its leg is installed (its run's log appears then).
rm -f "$out/.legs-done"
(
  log="$out/reports/$leg-upstream/stock/log.txt"
  until [[ -e $log || -e $out/.legs-done ]]; do sleep 1; done
  [[ -e $log ]] || { echo "leg $leg-upstream was not installed" >"$out/status-upstream.log"; exit 1; }
  export PYTHONPATH=${TMPDIR:-/tmp}/conformance-leg-$leg-upstream:$repo
  python3 -m unsloth_qwen_compat status >"$out/status-upstream.txt" 2>"$out/status-upstream.log"
  python3 -m unsloth_qwen_compat status --json >"$out/status-upstream.json" 2>>"$out/status-upstream.log"
) &
status_pid=$!

export UNSLOTH_QWEN_COMPAT_FUSED_QKV_BIAS=1 CONFORMANCE_TIMEOUT=${CONFORMANCE_TIMEOUT:-480}
conformance/offline_legs.sh "$out/reports" "$leg@shim" "$leg-upstream@stock" -- \
  -n "${WORKERS:-4}" --dist loadgroup "${select[@]}" "$@" >"$out/offline_legs.log" 2>&1
touch "$out/.legs-done"
wait "$status_pid"

echo "== status of the patched Unsloth ($(grep -m1 '^unsloth ' "$out/status-upstream.txt" 2>/dev/null | sed 's/  */ /g'))"
grep -E "^(rope_scaling|lora_target_maps|qwen2_fused_qkv_bias) |^verdict:" "$out/status-upstream.txt" | cut -c1-110 ||
  { echo "status failed:"; tail -5 "$out/status-upstream.log"; }
echo "== runs"
cat "$out/reports/exits.txt" 2>/dev/null
python3 -m conformance.upstream_proof compare \
  "$out/reports/$leg/shim/conformance.json" "$out/reports/$leg-upstream/stock/conformance.json" --out "$out"
proof=$?
retired=1
grep -q "^verdict: everything is native: the shim can be retired" "$out/status-upstream.txt" 2>/dev/null && retired=0
echo "== part '$part' in $(($(date +%s) - started)) s; proof exit $proof, status retire exit $retired; files in $out"
exit $((proof || retired))
