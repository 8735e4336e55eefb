"""``python -m unsloth_qwen_compat bench``: training throughput, peak memory and MFU on this GPU.

Three paths train the same random-weight Qwen checkpoint with the same LoRA, each in a
process of its own (Unsloth patches transformers globally on import, so no process may
host two paths):

- ``hf``: transformers + PEFT (+ bitsandbytes); Unsloth is hidden from that process and
  the worker checks it was never imported;
- ``unsloth``: stock Unsloth (``UNSLOTH_QWEN_COMPAT_DISABLE=1``: the shim is imported but
  patches nothing);
- ``shim``: Unsloth with the shim active, its speed patches included (the fused QKV of
  ``qwen2_fused_qkv_bias`` is on by default; a patch still opt-in is switched on here).

Both Unsloth paths and the HF path load through :mod:`unsloth_qwen_compat.loading`, so
quantization (NF4, double quant, bf16 compute) and LoRA (r=16, alpha=16, dropout 0,
q/k/v/o/gate/up/down) are the same. Precisions: ``bf16`` LoRA and ``qlora`` (4-bit NF4
quantized on load). Shapes are Qwen's published configs with random weights, built once
into ``--cache-dir``. A step is forward + backward + AdamW (lr 1e-4) on random token ids
with gradient checkpointing on; after ``--warmup`` steps the peak-memory counter is reset
and ``--steps`` steps are timed. Reported: the median step, tokens/s = batch x seq / that
median, the peak of ``torch.cuda.max_memory_allocated`` over the timed steps, and MFU.

MFU (model FLOPs utilisation) counts the FLOPs the model needs per token, not what the
run executes (gradient checkpointing's recomputed forward is not counted)::

    flops/token = 4 * N + 6 * N_lora + 12 * L * H * d * S

``N``: parameters of every matrix multiply (the q/k/v/o/gate/up/down projections and the
output head; the embedding lookup is no multiply). The base is frozen, so it costs a
forward (2N) and the backward to its input (2N) but no weight gradient (the usual 6N is
for full fine-tuning). ``N_lora``: the adapter, trained, so 6 per parameter. The last
term is attention's score and value products (QK^T and AV, 2 x 2 FLOPs per multiply-add,
forward plus a backward twice as large) for ``L`` layers, ``H`` query heads of size
``d`` and sequence length ``S``, with no discount for the causal mask (as PaLM's
appendix counts it). MFU = tokens/s x flops/token / the card's peak dense bf16 FLOP/s
(:data:`.workload.PEAK_BF16_DENSE_FLOPS`; an unknown card gets no MFU).

Three other modes:

- ``--rl``: GRPO-style steps (:mod:`.rl`): per step, generation (``--prompts`` x
  ``--replies`` x ``--new-tokens``, default 8 x 8 x 256, every reply to full length with
  the KV cache), reference log-probs through the disabled adapter, and the policy's
  forward/backward and AdamW step, each slice timed, with its peak memory; reports
  generated tokens/s, the step split and which slice takes most of it (default Qwen3-1.7B
  and Qwen3-8B, bf16 and qlora, 2 warm-up and 3 timed steps; ``rl.json`` / ``rl.md``;
  ``--rounds N``: stock and the shim N times each, alternating, hf once, and how far
  identical processes read apart beside the shim's ratio);

- ``--max-seq-bisect``: per path, the longest sequence that trains one step without
  running out of GPU memory (default Qwen3-8B, QLoRA, batch 1), found by bisection in one
  worker process per path;
- ``--qkv-bias-compare``: for Qwen2.5 shapes, step time of stock Unsloth, the shim, and
  stock Unsloth on the same shape with the q/k/v biases dropped (``bound``: the fused LoRA
  QKV kernel engages), run in that order with a second stock run last (``--rounds N``:
  N rounds, every other one in reverse order, so drift over the run falls on all three);
  reports how much of the stock-to-bound gap the shim closes ("not resolved" when a run of
  the plan is missing, the closing stock run say, or runs of one label differ by more than
  the gap). Its default batch is 12 at
  Qwen2.5-1.5B, where 4 is too noisy to rate the gap (:data:`.planning.QKV_COMPARE_BATCH`).

``--process-per shape`` runs a path's cases of one shape (its precisions) in one worker
process, one after another, and ``--process-per path`` all of a path's cases, so Unsloth's
import (about 25 s a process in the committed H200 runs) is paid once per process instead
of once per case; paths never share a process. Each case is reported as soon as it is done.
``--checkpoints-only`` builds the plan's checkpoints and stops (to build them ahead of a
timed run).

``--gpus 0,1,2,3`` runs on several GPUs of one machine at once: the runs of one shape and
precision (one table row, or one path of a bisection) stay together on one card, in
order, so every ratio is taken on a single card; rows go to whichever card is free.
The cards share the host, so rows running at once can slow each other a little.
``--checkpointing gpu`` gives the Unsloth paths plain checkpointing instead of Unsloth's
offload of checkpointed activations to host memory (they stay on the card, as on the hf
path). Small shapes at batch 4 are noisy either way: a step is short enough that the card
waits on the host; a larger ``--batch`` steadies them.

Results go to ``--out``: ``bench.json`` / ``bench.md`` / ``bench.png`` (``max_seq.*``,
``qkv_bias.*``, ``rl.*`` for the other modes), one log per worker process under ``logs/``. ``--append`` merges
into the results already there, so a long plan can run as several short invocations.
The reports are rewritten after every case, so a run that is stopped keeps what it measured.
Exit status: 0 when every case passed, 1 when any failed (a failed case is recorded with
its error's last line and the run goes on), 2 without a CUDA GPU or on bad arguments
(``--dry-run`` prints the plan anywhere).

The stages, one module each:

- :mod:`.workload`: what a case trains (shapes, LoRA, optimiser) and its FLOPs per token;
- :mod:`.planning`: the command line's arguments, and the cases they plan;
- :mod:`.checkpoints`: the random-weight checkpoints, built once per shape;
- :mod:`.runner`: one worker process per case, on one card or several at once;
- :mod:`.worker`: the worker process itself (started by path, see there); :mod:`.rl`: an RL step;
- :mod:`.report`: summaries, verdicts and tables; :mod:`.chart`: ``bench.png``;
- :mod:`.command`: ``bench`` itself; :mod:`.document`: ``BENCHMARKS.md`` and the README's
  numbers, generated from the committed results in ``benchmarks/``.
"""

from __future__ import annotations

from .command import command_line, main, run
from .planning import PATHS, PRECISIONS, Case, Settings, add_arguments, plan
from .report import gap_closed
from .worker import longest_fitting
from .workload import SHAPES, Shape, flops_per_token, lora_params, matmul_params, mfu, peak_bf16_flops

__all__ = [
    "PATHS",
    "PRECISIONS",
    "SHAPES",
    "Case",
    "Settings",
    "Shape",
    "add_arguments",
    "command_line",
    "flops_per_token",
    "gap_closed",
    "longest_fitting",
    "lora_params",
    "main",
    "matmul_params",
    "mfu",
    "peak_bf16_flops",
    "plan",
    "run",
]
