#!/usr/bin/env bash
# The RL work of one GPU job, within a wall-clock budget, on one CUDA GPU with no network:
#
#   1. examples/grpo_trl.py --compare-paths on Qwen3-1.7B's layers: TRL's own GRPOTrainer
#      in bf16, and the same loop on generate_replies / reference_logits in qlora, each on
#      the HF and the Unsloth path at once (correctness runs: they share the card);
#   2. bench --rl: Qwen3-1.7B and Qwen3-8B, bf16 and qlora, stock Unsloth / the shim / hf,
#      one process per path (Unsloth's import paid once), alone on the card (the bench's
#      checkpoints are built during step 1).
#
#   examples/gpu_rl_run.sh OUT [LEG]
#
# LEG (default 2026.10): the packages the machine lacks (Unsloth, TRL, PEFT, ...) are
# installed with --no-deps from .whl-common/ and .whl-LEG/ into a folder of their own, put
# first on PYTHONPATH, as conformance/offline_legs.sh does; torch and transformers are the
# machine's. LEG "installed": the interpreter's own packages, nothing installed. Only reports and logs go to OUT (checkpoints, compile caches and gradients stay
# in $TMPDIR). The job stops itself at BUDGET_S seconds; what finished by then is in OUT.
#
# Environment. Measured on one NVIDIA H200 (2026-12-03, leg 2026.10): a path's process took
# 280 s for its four rows (Qwen3-1.7B and -8B, bf16 and qlora), 126 s of it the first row
# (Unsloth compiles its blocks on first use), so the twelve rows need about 15 minutes: within
# a 10-minute job, run one precision (RL_PRECISIONS=bf16, then qlora) per job.
#   BUDGET_S=480        the whole job's wall clock
#   GRPO_CAP_S=200      step 1's share of it (its runs are stopped at this)
#   RL_PROMPTS=8 RL_REPLIES=4 RL_NEW_TOKENS=64 RL_WARMUP=2 RL_STEPS=2    bench --rl's step
#   RL_SHAPES=qwen3-1.7b,qwen3-8b  RL_PRECISIONS=bf16,qlora  RL_PATHS=unsloth,shim,hf
#   RL_ROUNDS=1          (N: stock and the shim N times each, alternating; hf once)
#   RL_PROCESS_PER=path  (paths run in that order, hf last: a run cut by the budget keeps
#                        every stock-vs-shim pair and loses hf's slowest rows first)
#   PHASES="grpo bench"  which steps to run; GRPO_LOOPS="trl:bf16 custom:qlora" step 1's runs (LOOP:PRECISION)
#   GRPO_SHAPE=qwen3-1.7b, BENCH_EXTRA=""   (a CPU rehearsal: GRPO_SHAPE=tiny BENCH_EXTRA="--device cpu"
#                        RL_SHAPES=tiny-qwen3 RL_PATHS=hf RL_PRECISIONS=bf16; --compare-paths refuses
#                        without CUDA, the rest runs)
set -uo pipefail
[[ $# -ge 1 ]] || { echo "usage: $0 OUT [LEG]" >&2; exit 2; }
out=$(mkdir -p "$1" && cd "$1" && pwd)
leg=${2:-2026.10}
repo=$(cd "$(dirname "$0")/.." && pwd)
scratch=${TMPDIR:-/tmp}/gpu-rl-run
mkdir -p "$scratch"
start=$SECONDS
budget=${BUDGET_S:-480}
phases=${PHASES:-grpo bench}
grpo_runs=${GRPO_LOOPS:-trl:bf16 custom:qlora}  # LOOP:PRECISION each
grpo_loops=$(for spec in $grpo_runs; do echo "${spec%%:*}"; done)
left() { echo $((budget - (SECONDS - start))); }
say() { echo "[gpu_rl_run +$((SECONDS - start))s] $*" | tee -a "$out/job.log"; }

site=$scratch/leg-$leg
if [[ $leg == installed ]]; then
  site=""  # the interpreter's own packages (a machine that has the leg installed already)
elif [[ ! -d $site ]]; then
  wheels=("$repo/.whl-$leg"/*.whl)
  own=$(for w in "${wheels[@]}"; do basename "$w" | cut -d- -f1 | tr 'A-Z-' 'a-z_'; done)
  skip=$(cat "$repo/.whl-$leg/skip.txt" 2>/dev/null)
  for w in "$repo"/.whl-common/*.whl; do
    name=$(basename "$w" | cut -d- -f1 | tr 'A-Z-' 'a-z_')
    grep -qx "$name" <<<"$own"$'\n'"$skip" || wheels+=("$w")
  done
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site.tmp" "${wheels[@]}" &&
    mv "$site.tmp" "$site" || { say "leg $leg: install failed"; exit 1; }
fi
export PYTHONPATH=${site:+$site:}$repo PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
say "leg $leg (${site:-packages of the interpreter}); $(python3 -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA GPU")' 2>&1 | tail -1)"
say "package at $(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo "an unknown commit (no git here)")"

cache=$scratch/bench-cache
bench_out=$scratch/bench-rl
rm -rf "$bench_out"  # this job's reports and logs only (the checkpoints in $cache are kept)
bench_args=(
  --rl --process-per "${RL_PROCESS_PER:-path}" --shapes "${RL_SHAPES:-qwen3-1.7b,qwen3-8b}"
  --precisions "${RL_PRECISIONS:-bf16,qlora}" --paths "${RL_PATHS:-unsloth,shim,hf}"
  --prompts "${RL_PROMPTS:-8}" --replies "${RL_REPLIES:-4}" --new-tokens "${RL_NEW_TOKENS:-64}"
  --warmup "${RL_WARMUP:-2}" --steps "${RL_STEPS:-2}" --rounds "${RL_ROUNDS:-1}"
  --cache-dir "$cache" --out "$bench_out"
  ${BENCH_EXTRA:-}
)

# Step 1, and the bench's checkpoints beside it (neither is timed).
pids=()
if [[ $phases == *bench* ]]; then
  # Bounded: a checkpoint not built by then is built (timed apart) at the start of step 2.
  (cd "$scratch" && timeout -s INT -k 10 "${GRPO_CAP_S:-200}" python3 -m unsloth_qwen_compat bench \
    "${bench_args[@]}" --checkpoints-only >"$out/bench-checkpoints.log" 2>&1
    echo "bench checkpoints: exit $?" >>"$out/job.log") &
  pids+=($!)
fi
if [[ $phases == *grpo* ]]; then
  grpo=$scratch/grpo
  rm -rf "$grpo" && mkdir -p "$grpo"
  cap=$(( ${GRPO_CAP_S:-200} - (SECONDS - start) ))
  (( cap < 30 )) && cap=30
  python3 "$repo/examples/grpo_trl.py" --make-checkpoint "$grpo/checkpoint" --shape "${GRPO_SHAPE:-qwen3-1.7b}" \
    >"$out/grpo-checkpoint.log" 2>&1 || say "grpo checkpoint: FAILED (log grpo-checkpoint.log)"
  for spec in $grpo_runs; do
    loop=${spec%%:*} precision=${spec#*:}
    (cd "$grpo" && timeout -s INT -k 10 "$cap" python3 "$repo/examples/grpo_trl.py" --compare-paths \
      --loop "$loop" --precision "$precision" --steps 5 --checkpoint "$grpo/checkpoint" --out "$grpo/$loop" \
      >"$out/grpo-$loop.log" 2>&1; echo "grpo $loop ($precision): exit $?" >>"$out/job.log") &
    pids+=($!)
  done
fi
wait "${pids[@]}"
say "step 1 done"
if [[ $phases == *grpo* ]]; then
  for loop in $grpo_loops; do
    mkdir -p "$out/grpo-$loop"
    for f in "$grpo/$loop"/grpo.json "$grpo/$loop"/*.log "$grpo/$loop"/*/grpo.json; do
      [[ -f $f ]] && cp "$f" "$out/grpo-$loop/$(realpath --relative-to="$grpo/$loop" "$f" | tr / -)"
    done
  done
fi

# Step 2: timed, alone on the card; stopped (SIGINT: reports keep what finished) before the budget ends.
if [[ $phases == *bench* ]]; then
  limit=$(( $(left) - 15 ))
  if (( limit < 60 )); then
    say "bench --rl: skipped, $limit s left"
  else
    say "bench --rl: up to $limit s"
    (cd "$scratch" && timeout -s INT -k 20 "$limit" python3 -m unsloth_qwen_compat bench "${bench_args[@]}" \
      >"$out/bench-rl.txt" 2>"$out/bench-rl.log")
    say "bench --rl: exit $?"
    mkdir -p "$out/bench-rl"
    cp "$bench_out"/rl.json "$bench_out"/rl.md "$out/bench-rl/" 2>/dev/null
    cp -r "$bench_out"/logs "$out/bench-rl/" 2>/dev/null
  fi
fi

# The short table.
{
  if [[ $phases == *grpo* ]]; then
    echo "== GRPO example, both paths (examples/grpo_trl.py --compare-paths)"
    for loop in $grpo_loops; do
      echo "-- --loop $loop: $(grep "grpo $loop" "$out/job.log" | tail -1)"
      grep -E "^(PASS|FAIL|SKIP) " "$out/grpo-$loop.log" 2>/dev/null || echo "(no verdict: see grpo-$loop.log)"
    done
  fi
  [[ $phases == *bench* ]] || exit 0
  echo "== bench --rl (sizes: ${RL_PROMPTS:-8} prompts x ${RL_REPLIES:-4} replies x ${RL_NEW_TOKENS:-64} new tokens, ${RL_WARMUP:-2} warm-up + ${RL_STEPS:-2} timed steps)"
  if [[ -s $out/bench-rl.txt ]]; then
    cat "$out/bench-rl.txt"
  else  # stopped by the budget: the report holds the cases that finished
    echo "(stopped by the budget; the cases that finished, from bench-rl/rl.md:)"
    grep "^|" "$out/bench-rl/rl.md" 2>/dev/null
  fi
  grep -E "FAILED|failed" "$out/bench-rl.log" 2>/dev/null | tail -12
} | tee "$out/summary.txt"
say "done in $((SECONDS - start)) s; results in $out"
