#!/usr/bin/env bash
# The hybrid Qwen models (Qwen3.5, Qwen3.5-MoE, Qwen3-Next) through both Unsloth entry points
# (FastLanguageModel, FastModel), stock Unsloth and the shim, on legs 2026.10 and latest, on one
# CUDA GPU without network; then the models x legs table of the run and every case that
# failed, errored or was refused.
#
#   conformance/gpu_models_run.sh OUT [LEG[:DTYPE] ...]      (default legs: 2026.10 latest)
#
# It is conformance/offline_legs.sh with these cases: every case of the hybrid zoo models
# (forward, LoRA gradients, KV-cache generation single and left-padded, 4-bit, YaRN with
# partial rotary, adapter save/reload, chat template) and the target_modules typo case of
# every family. Wheels as offline_legs.sh reads them: .whl-common/ and .whl-<leg>/ (.whl-latest/
# for leg latest) in the repository root. Reports: OUT/<leg>/<shim|stock>/conformance.json (and
# .md, log.txt); `python -m conformance.document --collect OUT` puts them in conformance-reports/
# (each replaces the committed run of the same kind and dtype: it says which cases that drops).
#   CONFORMANCE_SELECT   the pytest -k expression (default below)
#   CONFORMANCE_WORKERS  pytest-xdist workers per run (default 3; four runs share the machine)
#   CONFORMANCE_TIMEOUT  seconds before a run is interrupted, its report still written (default 450,
#                      so install + runs + table end within 10 minutes)
set -uo pipefail
out=${1:?usage: conformance/gpu_models_run.sh OUT [LEG[:DTYPE] ...]}
shift
legs=("$@")
[[ ${#legs[@]} -eq 0 ]] && legs=(2026.10 latest)
repo=$(cd "$(dirname "$0")/.." && pwd)
select=${CONFORMANCE_SELECT:-qwen3_5 or qwen3_next or test_lora_target_typo}
start=$SECONDS
CONFORMANCE_TIMEOUT=${CONFORMANCE_TIMEOUT:-450} "$repo/conformance/offline_legs.sh" "$out" "${legs[@]}" -- \
  -k "$select" -n "${CONFORMANCE_WORKERS:-3}" --dist loadgroup
echo "== $((SECONDS - start)) s; models x legs of this run (shim runs; stock beside them):"
PYTHONPATH=$repo python3 -m conformance.model_table --runs "$out" --cases
