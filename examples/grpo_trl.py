"""GRPO on either path from the loader's config: TRL's GRPOTrainer, or the same loop by hand.

    python examples/grpo_trl.py --out DIR                          # HF path, TRL's GRPOTrainer (runs on CPU)
    python examples/grpo_trl.py --out DIR --loop custom            # the same loop written by hand
    python examples/grpo_trl.py --out DIR --framework unsloth      # Unsloth path (needs a CUDA GPU)
    python examples/grpo_trl.py --out DIR --compare-paths          # both paths at once, compared (GPU)
    python examples/grpo_trl.py --make-checkpoint DIR --shape qwen3-1.7b   # build a checkpoint only

The model comes from ``unsloth_qwen_compat.loading`` (``load_base_model`` then
``attach_lora``); ``--framework`` is the only difference between the paths. Without
``--checkpoint`` a random Qwen3 and its tokenizer are built in DIR first, so nothing is
downloaded: ``--shape tiny`` (2 layers, hidden 64) or ``--shape qwen3-1.7b`` (Qwen3-1.7B's
28 layers, hidden 2048, 16 query and 8 key/value heads of 128, MLP 6144, tied embeddings)
with the example's own 448-token vocabulary, so that the reward reads real text (Qwen's
151,936-token vocabulary would need Qwen's tokenizer, which is not downloaded).
``--precision`` picks bf16 or qlora (4-bit NF4, bf16 compute; needs CUDA); by default
qlora on a GPU and the checkpoint's dtype (float32) on the CPU. Each step samples ``NUM_GENERATIONS`` replies for each of
``PROMPTS_PER_STEP`` prompts, rewards them with :func:`reply_reward` (longer replies, and
replies naming ``REWARD_WORD``, score higher), and takes one optimizer step on a GRPO loss
with a KL term (``BETA``) against the model with its adapter disabled.

- ``--loop trl`` (default): the installed TRL's ``GRPOTrainer`` (no vLLM), given the
  loader's PEFT model. In the HF run Unsloth is hidden from the process: importing it
  would patch transformers and replace ``trl.GRPOTrainer`` with Unsloth's rewrite, which
  is what the Unsloth run trains with (``trainer`` in the JSON names the class). TRL
  1.15 scores completions with a Triton kernel that runs on CUDA/XPU only; without a GPU
  the example swaps in the same computation in PyTorch (:func:`torch_token_log_probs`;
  ``trl_log_prob_kernel`` in the JSON says which ran).
- ``--loop custom``: the loop a custom trainer writes with the loader's helpers:
  ``generate_replies`` (sampling with the KV cache, training flags put back afterwards),
  ``reference_logits`` (the adapter disabled, no second copy of the weights), a GRPO
  loss (group-normalised advantages, token-level mean over the batch's completion
  tokens as TRL's default ``dapo``, k3 KL estimate) and an AdamW step.

Logged per step, and written to DIR/grpo.json: reward, loss, KL, generation seconds,
generated tokens, step seconds and peak memory (on CUDA the allocator's peak; on CPU the
process's resident high-water mark, reset each step through /proc/self/clear_refs; "n/a"
where neither can be read). The run exits 1, naming the failed check, when:

- an adapter tensor did not change, or any frozen weight (the base model, and the
  reference adapter TRL adds) changed;
- a step after step 2 peaked above step 2's peak memory by more than
  ``PEAK_TOLERANCE`` of it (skipped, and said so, where memory cannot be measured);
- a step logged a non-finite reward, loss or KL, or generated nothing.

Before training, every run scores one fixed batch (:func:`first_step_batch`: the first
step's prompts, each with ``NUM_GENERATIONS`` replies of seeded random tokens of varied
lengths, rewarded by :func:`reply_reward`): the GRPO loss of step 1 on it, the policy's
mean negative log-likelihood of the reply tokens, and the loss's gradient on every adapter
tensor (``first_step`` in the JSON, the gradients in ``first_step_grads.pt``).

``--compare-paths`` runs the HF and the Unsloth path at once, in two processes on one
checkpoint, and fails unless both pass their own checks and their first-step scores of
that batch agree within the conformance suite's bounds for the dtype
(``conformance/tolerances.py``: ``lora_loss_rel`` for the GRPO loss and the
log-likelihood, ``lora_grad_rel`` for the worst adapter gradient tensor; qlora computes in
bf16 on weights both paths dequantize alike, so it takes the bf16 bounds). The batch is
fixed because sampled replies differ between the paths (their logits round differently,
so sampling drifts apart), and at step 1 (LoRA starts at zero: the policy is the
reference, the importance ratio 1) the GRPO loss of sampled replies depends only on their
rewards and lengths, not on the logits; the gradient and the log-likelihood do. The
logged first-step losses of both runs are in the JSON too, not compared. That mode needs
a CUDA GPU.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import runpy
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

EXAMPLES = Path(__file__).resolve().parent
REPO = EXAMPLES.parent

STEPS = 5
PROMPTS_PER_STEP = 2
NUM_GENERATIONS = 4  # TRL needs its generation batch (PROMPTS_PER_STEP * this) divisible by it
MAX_NEW_TOKENS = 16
BETA = 0.04  # the KL coefficient; TRL's default 0 would skip the reference model and log no KL
LEARNING_RATE = 1e-3
SEED = 0

#: A step after step 2 may peak at most this fraction above step 2's peak.
PEAK_TOLERANCE = 0.05
#: The adapter gradients of the first-step batch, written by every run.
FIRST_STEP_GRADS = "first_step_grads.pt"
#: The conformance suite's bounds table per loaded dtype (qlora computes in bf16).
BOUND_DTYPE = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}

#: --shape: keyword arguments for tiny_qwen.build_tiny_qwen (its vocabulary either way).
SHAPES: dict[str, dict[str, Any]] = {
    "tiny": {},
    "qwen3-1.7b": {
        "layers": 28,
        "hidden_size": 2048,
        "heads": 16,
        "kv_heads": 8,
        "head_dim": 128,
        "intermediate_size": 6144,
        "tie_word_embeddings": True,
    },
}

REWARD_WORD = "Paris"
REWARD_LENGTH = 48  # characters; longer replies earn no more

QUESTIONS = (
    "What is the capital of France?",
    "How many legs does a spider have?",
    "What does a language model predict?",
    "What do low rank adapters add?",
    "Name a number larger than one hundred.",
    "Where does the cat sleep?",
    "What does the quick brown fox jump over?",
    "Answer briefly: what is a token?",
)

#: The training YAML's shape; the loader owns model: and lora:.
CONFIG: dict[str, Any] = {
    "model": {
        "name": None,  # --checkpoint, or the tiny checkpoint built in --out
        "use_unsloth": False,  # set from --framework
        "load_in_4bit": None,  # QLoRA on a GPU (bitsandbytes 4-bit needs CUDA), else the model's dtype
        "dtype": "auto",
        "gradient_checkpointing": True,
    },
    "data": {"max_length": 256},
    "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "bias": "none", "seed": SEED},
}

STEP_FIELDS = (
    "step",
    "reward",
    "reward_std",
    "loss",
    "kl",
    "generation_seconds",
    "generated_tokens",
    "step_seconds",
    "peak_memory_bytes",
)


def reply_reward(text: str) -> float:
    """Deterministic: up to 1 for length (capped at REWARD_LENGTH characters), plus 1 for REWARD_WORD."""
    text = text.strip()
    return min(len(text), REWARD_LENGTH) / REWARD_LENGTH + (1.0 if REWARD_WORD in text else 0.0)


def prompt_messages(index: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": QUESTIONS[index % len(QUESTIONS)]}]


# --------------------------------------------------------------------------------------
# Measuring a step


class PeakMemory:
    """One step's peak memory: the CUDA allocator's on a GPU, else the process's resident set.

    On CPU the resident high-water mark (VmHWM) is reset at each step's start by writing
    5 to /proc/self/clear_refs (Linux); where that is refused, the peak is "n/a".
    """

    def __init__(self) -> None:
        import torch

        self._cuda = torch.cuda.is_available()
        if self._cuda:
            self.kind = "cuda_max_memory_allocated"
        elif self._reset_rss() and self._rss_high_water() is not None:
            self.kind = "rss_high_water"
        else:
            self.kind = "n/a"

    def reset(self) -> None:
        import torch

        if self._cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        elif self.kind != "n/a":
            self._reset_rss()

    def read(self) -> int | None:
        import torch

        if self._cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        return self._rss_high_water() if self.kind != "n/a" else None

    @staticmethod
    def _reset_rss() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
        except OSError:
            return False
        return True

    @staticmethod
    def _rss_high_water() -> int | None:
        try:
            status = Path("/proc/self/status").read_text()
        except OSError:
            return None
        found = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
        return int(found.group(1)) * 1024 if found else None


def synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


class WeightSnapshot:
    """The adapter's tensors (copied: they are small) and a digest of every frozen tensor."""

    def __init__(self, model: Any) -> None:
        self.adapter = {
            name: p.detach().to("cpu", copy=True) for name, p in model.named_parameters() if p.requires_grad
        }
        # Digests, not copies: on a real checkpoint a copy of the base would double its memory.
        self.frozen = {name: _digest(p) for name, p in model.named_parameters() if not p.requires_grad}


def _digest(tensor: Any) -> str:
    import torch

    data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8)
    return hashlib.blake2b(data.numpy().tobytes(), digest_size=16).hexdigest()


# --------------------------------------------------------------------------------------
# TRL's log-prob kernel off the GPU

#: The positional arguments TRL 1.15's fused LM head passes to its kernel's ``apply``.
TRL_KERNEL_ARGUMENTS = (
    "hidden",
    "weight",
    "bias",
    "targets",
    "temperature",
    "chunk_size",
    "final_logit_softcapping",
    "logit_scale",
    "outputs",
)


def torch_token_log_probs(
    hidden: Any,
    weight: Any,
    bias: Any,
    targets: Any,
    temperature: float,
    chunk_size: int,
    final_logit_softcapping: float | None = None,
    logit_scale: float = 1.0,
    outputs: tuple[str, ...] = ("log_probs",),
) -> tuple[Any, Any, Any, Any, Any]:
    """TRL's ``ChunkedLogProbFunction`` in plain PyTorch (full logits, float32): for CPU runs.

    Same arguments and results: per-token log-probabilities of ``targets`` and, when named
    in ``outputs``, entropy, log of the summed squared probabilities, mean logit and
    whether the target is the first arg-max; autograd gives the backward.
    """
    import torch

    logits = torch.nn.functional.linear(
        hidden.float(), weight.float(), None if bias is None else bias.float()
    )
    logits = logits * logit_scale
    if final_logit_softcapping is not None:
        logits = final_logit_softcapping * torch.tanh(logits / final_logit_softcapping)
    logits = logits / temperature
    log_z = torch.logsumexp(logits, dim=-1)
    log_probs = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - log_z
    entropy = log_sum_sq_probs = mean_logits = is_top1 = None
    if "entropy" in outputs:
        entropy = log_z - (torch.softmax(logits, dim=-1) * logits).sum(-1)
    if "log_sum_sq_probs" in outputs:
        log_sum_sq_probs = (torch.logsumexp(2 * logits, dim=-1) - 2 * log_z).detach()
    if "mean_logits" in outputs:
        mean_logits = logits.mean(-1).detach()
    if "is_top1" in outputs:
        is_top1 = logits.argmax(-1) == targets
    return log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1


def use_torch_log_probs_off_gpu() -> str:
    """Route TRL's GRPO log-probs to :func:`torch_token_log_probs` where its Triton kernel cannot run.

    Returns what the run uses. TRL's kernel is left alone on a CUDA machine; its call
    signature is checked first, so a TRL that changed it fails here rather than mid-step.
    """
    import inspect

    import torch
    import trl
    import trl.trainer.utils as trl_utils

    if torch.cuda.is_available():
        return "trl (Triton)"
    if not hasattr(trl_utils, "_ChunkedLogProbFunction"):
        raise RuntimeError(
            f"trl {trl.__version__}: trl.trainer.utils has no _ChunkedLogProbFunction; this example's CPU "
            "stand-in for it was written against trl 1.15"
        )
    kernel = trl_utils._ChunkedLogProbFunction  # None where Triton is not installed
    if getattr(kernel, "_unsloth_cpu_dispatch", False):
        # Unsloth's CPU fallback, imported in this process, already routes it the same way.
        return "unsloth_zoo CPU routing"
    if kernel is not None:
        if not hasattr(kernel, "forward"):
            raise RuntimeError(
                f"trl.trainer.utils._ChunkedLogProbFunction is {kernel!r}, not TRL's kernel: something else "
                "replaced it; the CPU stand-in leaves it alone"
            )
        found = tuple(inspect.signature(kernel.forward).parameters)[1:]  # after ctx
        if found != TRL_KERNEL_ARGUMENTS:
            raise RuntimeError(
                f"trl {trl.__version__}: ChunkedLogProbFunction.forward takes {found}, the CPU stand-in "
                f"expects {TRL_KERNEL_ARGUMENTS}"
            )

    class TorchLogProbs:
        apply = staticmethod(torch_token_log_probs)

    trl_utils._ChunkedLogProbFunction = TorchLogProbs
    return "torch stand-in (no CUDA)"


# --------------------------------------------------------------------------------------
# The two loops


def train_with_trl(model: Any, tokenizer: Any, steps: int, out: Path, meter: PeakMemory) -> dict[str, Any]:
    """TRL's GRPOTrainer on the loader's PEFT model: per-step records, the class that ran, step 1's replies."""
    import torch
    import trl
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    if not hasattr(GRPOTrainer, "_generate_single_turn"):
        raise RuntimeError(
            f"trl {trl.__version__}: GRPOTrainer has no _generate_single_turn, through which this example "
            "times generation (written against trl 1.15)"
        )
    generation: dict[str, Any] = {"seconds": 0.0, "tokens": 0, "first": None}

    class TimedGRPOTrainer(GRPOTrainer):
        """GRPOTrainer, with its generation call timed and its tokens counted."""

        def _generate_single_turn(self, *args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            result = super()._generate_single_turn(*args, **kwargs)
            synchronize()
            generation["seconds"] += time.perf_counter() - start
            completions = [list(ids) for ids in result[0]]  # cut after EOS
            generation["tokens"] += sum(len(ids) for ids in completions)
            if generation["first"] is None:
                generation["first"] = completions
            return result

    records: dict[int, dict[str, Any]] = {}
    snapshot: list[WeightSnapshot] = []

    class RecordSteps(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            # After TRL's own changes to the model (with beta > 0 it adds a frozen "ref" adapter).
            snapshot.append(WeightSnapshot(kwargs["model"]))

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            generation.update(seconds=0.0, tokens=0)
            meter.reset()
            self.start = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            peak = meter.read()
            records[state.global_step] = {
                "step": state.global_step,
                "generation_seconds": generation["seconds"],
                "generated_tokens": generation["tokens"],
                "step_seconds": time.perf_counter() - self.start,
                "peak_memory_bytes": peak,
            }

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
            record = records.get(state.global_step)
            if record is not None and logs and "loss" in logs:
                record.update(
                    loss=logs.get("loss"),
                    reward=logs.get("reward"),
                    reward_std=logs.get("reward_std"),
                    kl=logs.get("kl"),
                )

    def reward(completions: list, **kwargs: Any) -> list[float]:
        # Chat prompts give chat completions: [{"role": "assistant", "content": ...}].
        texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
        return [reply_reward(text) for text in texts]

    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    trainer = TimedGRPOTrainer(
        model=model,  # already a PeftModel from attach_lora: no peft_config (TRL refuses both)
        reward_funcs=reward,
        processing_class=tokenizer,
        train_dataset=Dataset.from_list([{"prompt": prompt_messages(i)} for i in range(len(QUESTIONS))]),
        callbacks=[RecordSteps()],
        args=GRPOConfig(
            output_dir=str(out / "trainer"),
            max_steps=steps,
            # Counted in completions: PROMPTS_PER_STEP prompts x NUM_GENERATIONS replies; the
            # generation batch defaults to it and must be divisible by num_generations.
            per_device_train_batch_size=PROMPTS_PER_STEP * NUM_GENERATIONS,
            num_generations=NUM_GENERATIONS,
            max_completion_length=MAX_NEW_TOKENS,
            beta=BETA,
            learning_rate=LEARNING_RATE,
            lr_scheduler_type="constant",
            weight_decay=0.0,  # else the adapter would change without any gradient
            # The loader set checkpointing the way each path wants; GRPOConfig defaults it on
            # and would redo it the HF way on both.
            gradient_checkpointing=False,
            # GRPOConfig defaults bf16 on; follow the dtype the loader chose instead.
            bf16=dtype == torch.bfloat16,
            fp16=dtype == torch.float16,
            use_vllm=False,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            seed=SEED,
            data_seed=SEED,
        ),
    )
    trainer.train()
    kind = type(trainer).__mro__[1]  # the GRPOTrainer class this process's trl exports
    return {
        "steps": [records[step] for step in sorted(records)],
        "trainer": f"{kind.__module__}.{kind.__qualname__}",
        "first_step_completion_ids": generation["first"],
        "before": snapshot[0],
    }


def model_inputs(sequences: Any, attention_mask: Any) -> dict[str, Any]:
    """A forward's inputs for left-padded rows: the positions generate() used, counted from
    each row's first real token."""
    return {
        "input_ids": sequences,
        "attention_mask": attention_mask,
        "position_ids": (attention_mask.cumsum(-1) - 1).clamp(min=0),
    }


def group_advantages(rewards: Any) -> Any:
    """(prompts, replies) rewards -> one advantage per row, normalised within each prompt's
    group (TRL's default ``scale_rewards="group"``)."""
    advantages = (rewards - rewards.mean(dim=1, keepdim=True)) / (rewards.std(dim=1, keepdim=True) + 1e-4)
    return advantages.reshape(-1, 1)


def grpo_loss(policy: Any, reference: Any, advantages: Any, completion_mask: Any) -> tuple[Any, Any]:
    """GRPO's loss (token-level mean over the batch's completion tokens, TRL's default
    ``dapo``) and the mean k3 KL (detached). One update per generation: the ratio is exactly
    1 but carries the policy gradient."""
    import torch

    mask = completion_mask.to(policy.dtype)
    tokens = mask.sum().clamp(min=1)
    ratio = torch.exp(policy - policy.detach())
    kl = torch.exp(reference - policy) - (reference - policy) - 1  # k3, as TRL
    loss = ((-ratio * advantages + BETA * kl) * mask).sum() / tokens
    return loss, (kl.detach() * mask).sum() / tokens


def completion_log_probs(logits: Any, sequences: Any, prompt_length: int) -> Any:
    """Log-probabilities of the completion tokens (float32), shape (rows, completion length)."""
    import torch

    predicted = logits[:, prompt_length - 1 : -1].float()
    targets = sequences[:, prompt_length:]
    return torch.log_softmax(predicted, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def train_by_hand(model: Any, tokenizer: Any, steps: int, meter: PeakMemory) -> dict[str, Any]:
    """The GRPO loop a custom trainer writes with the loader's generate_replies / reference_logits."""
    import torch

    from unsloth_qwen_compat.loading import generate_replies, reference_logits

    before = WeightSnapshot(model)
    torch.manual_seed(SEED)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=LEARNING_RATE, weight_decay=0.0
    )
    records = []
    first_step_completion_ids = None
    for step in range(1, steps + 1):
        meter.reset()
        start = time.perf_counter()
        first = (step - 1) * PROMPTS_PER_STEP
        prompts = [prompt_messages(first + i) for i in range(PROMPTS_PER_STEP)]
        replies = generate_replies(
            model,
            tokenizer,
            prompts,
            num_return_sequences=NUM_GENERATIONS,
            max_new_tokens=MAX_NEW_TOKENS,
            do_sample=True,
            temperature=1.0,
            top_p=1.0,
            top_k=0,
        )
        synchronize()
        generation_seconds = time.perf_counter() - start
        if first_step_completion_ids is None:
            first_step_completion_ids = [
                ids[: int(length)].tolist()
                for ids, length in zip(replies.completion_ids, replies.completion_mask.sum(dim=1))
            ]
        device = replies.sequences.device
        rewards = torch.tensor(
            [[reply_reward(text) for text in group] for group in replies.texts], device=device
        )
        inputs = model_inputs(replies.sequences, replies.attention_mask)
        reference = completion_log_probs(
            reference_logits(model, **inputs), replies.sequences, replies.prompt_length
        )
        policy = completion_log_probs(model(**inputs).logits, replies.sequences, replies.prompt_length)
        loss, kl = grpo_loss(policy, reference, group_advantages(rewards), replies.completion_mask)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize()
        records.append(
            {
                "step": step,
                "reward": rewards.mean().item(),
                "reward_std": rewards.std().item(),
                "loss": loss.item(),
                "kl": kl.item(),
                "generation_seconds": generation_seconds,
                "generated_tokens": int(replies.completion_mask.sum()),
                "step_seconds": time.perf_counter() - start,
                "peak_memory_bytes": meter.read(),
            }
        )
        del replies, reference, policy, loss, kl
    return {
        "steps": records,
        "trainer": "examples/grpo_trl.py (by hand)",
        "first_step_completion_ids": first_step_completion_ids,
        "before": before,
    }


# --------------------------------------------------------------------------------------
# The first-step batch both paths score


def first_step_batch(tokenizer: Any) -> dict[str, Any]:
    """Step 1's prompts, each with ``NUM_GENERATIONS`` fixed replies (CPU tensors).

    Reply tokens are drawn with a seeded generator from the tokenizer's ordinary tokens, so
    both paths (each in its own process) build the same batch. Reply ``i`` of a group ends
    with EOS after ``MAX_NEW_TOKENS * (i + 1) / NUM_GENERATIONS`` tokens (the last runs to
    the limit), so lengths, and with them the rewards, differ within every group.
    """
    import torch

    texts = [
        tokenizer.apply_chat_template(prompt_messages(i), tokenize=False, add_generation_prompt=True)
        for i in range(PROMPTS_PER_STEP)
    ]
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        prompts = tokenizer(texts, return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = padding_side
    special = set(tokenizer.all_special_ids)
    ordinary = torch.tensor([i for i in range(len(tokenizer)) if i not in special])
    rows = PROMPTS_PER_STEP * NUM_GENERATIONS
    generator = torch.Generator().manual_seed(SEED)
    completion = ordinary[torch.randint(len(ordinary), (rows, MAX_NEW_TOKENS), generator=generator)]
    completion_mask = torch.zeros(rows, MAX_NEW_TOKENS, dtype=torch.long)
    for row in range(rows):
        length = MAX_NEW_TOKENS * (row % NUM_GENERATIONS + 1) // NUM_GENERATIONS
        completion_mask[row, :length] = 1
        if length < MAX_NEW_TOKENS:
            completion[row, length - 1] = tokenizer.eos_token_id
            completion[row, length:] = tokenizer.pad_token_id
    lengths = completion_mask.sum(dim=1).tolist()
    replies = [tokenizer.decode(ids[:n], skip_special_tokens=True) for ids, n in zip(completion, lengths)]
    prompt_ids = prompts["input_ids"].repeat_interleave(NUM_GENERATIONS, dim=0)
    prompt_mask = prompts["attention_mask"].repeat_interleave(NUM_GENERATIONS, dim=0)
    return {
        "sequences": torch.cat([prompt_ids, completion], dim=1),
        "attention_mask": torch.cat([prompt_mask, completion_mask], dim=1),
        "completion_mask": completion_mask,
        "prompt_length": prompt_ids.shape[1],
        "rewards": torch.tensor([reply_reward(text) for text in replies]).reshape(PROMPTS_PER_STEP, -1),
    }


def score_first_step(model: Any, tokenizer: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """The GRPO loss of step 1 on :func:`first_step_batch`, the policy's mean negative
    log-likelihood of its reply tokens, and the loss's gradient on every adapter tensor
    (returned apart: name -> float32 CPU tensor). The gradients are cleared afterwards; no
    weight changes."""
    import torch

    from unsloth_qwen_compat.loading import reference_logits

    device = next(p for p in model.parameters() if p.requires_grad).device
    batch = first_step_batch(tokenizer)
    sequences = batch["sequences"].to(device)
    inputs = model_inputs(sequences, batch["attention_mask"].to(device))
    completion_mask = batch["completion_mask"].to(device)
    prompt_length = batch["prompt_length"]
    reference = completion_log_probs(reference_logits(model, **inputs), sequences, prompt_length)
    policy = completion_log_probs(model(**inputs).logits, sequences, prompt_length)
    loss, kl = grpo_loss(policy, reference, group_advantages(batch["rewards"]).to(device), completion_mask)
    mask = completion_mask.to(policy.dtype)
    nll = -(policy.detach() * mask).sum() / mask.sum()
    loss.backward()
    grads = {
        name: p.grad.detach().float().cpu()
        for name, p in model.named_parameters()
        if p.requires_grad and p.grad is not None
    }
    model.zero_grad(set_to_none=True)
    scores = {
        "loss": loss.item(),
        "nll": nll.item(),
        "kl": kl.item(),
        "rewards": batch["rewards"].tolist(),
        "completion_tokens": int(batch["completion_mask"].sum()),
        "adapter_grad_tensors": len(grads),
        "adapter_grad_norm": float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values()))),
    }
    return scores, grads


# --------------------------------------------------------------------------------------
# Checks


def weight_checks(before: WeightSnapshot, model: Any) -> list[dict[str, Any]]:
    after = dict(model.named_parameters())
    changes = {
        name: (after[name].detach().cpu().float() - value.float()).abs().max().item()
        for name, value in before.adapter.items()
    }
    unchanged = sorted(name for name, change in changes.items() if change == 0)
    altered = sorted(name for name, digest in before.frozen.items() if _digest(after[name]) != digest)
    return [
        {
            "name": "the LoRA adapter weights changed",
            "passed": bool(changes) and not unchanged,
            "detail": f"{len(changes) - len(unchanged)} of {len(changes)} adapter tensors changed, "
            f"largest change {max(changes.values(), default=0.0):.3g}"
            + (f"; unchanged: {unchanged[:4]}" if unchanged else ""),
        },
        {
            "name": "the frozen weights did not change",
            "passed": not altered,
            "detail": f"{len(before.frozen) - len(altered)} of {len(before.frozen)} frozen tensors unchanged"
            + (f"; changed: {altered[:4]}" if altered else ""),
        },
    ]


def memory_check(records: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    name = f"peak memory after step 2 within {PEAK_TOLERANCE:.0%} of step 2's"
    peaks = [r["peak_memory_bytes"] for r in records]
    if kind == "n/a" or len(peaks) < 3 or any(p is None for p in peaks):
        return {"name": name, "passed": None, "detail": f"not measured ({kind}, {len(peaks)} steps)"}
    reference, later = peaks[1], peaks[2:]
    worst = max(later)
    mib = [round(p / 2**20, 1) for p in peaks]
    return {
        "name": name,
        "passed": worst <= reference * (1 + PEAK_TOLERANCE),
        "detail": f"{kind} per step (MiB): {mib}; step 2 {reference / 2**20:.1f}, "
        f"largest later {worst / 2**20:.1f} ({worst / reference - 1:+.1%})",
    }


def logging_check(records: list[dict[str, Any]], steps: int) -> dict[str, Any]:
    problems = []
    if len(records) != steps:
        problems.append(f"{len(records)} steps recorded, {steps} asked")
    for record in records:
        missing = [f for f in STEP_FIELDS if f not in record]
        bad = [
            f
            for f in ("reward", "loss", "kl")
            if not isinstance(record.get(f), (int, float)) or not math.isfinite(record[f])
        ]
        if missing or bad or not record.get("generated_tokens"):
            problems.append(
                f"step {record.get('step')}: missing {missing}, non-finite {bad}, "
                f"generated {record.get('generated_tokens')} tokens"
            )
    return {
        "name": "every step logged a finite reward, loss and KL and generated tokens",
        "passed": not problems,
        "detail": "; ".join(problems) or f"{len(records)} steps",
    }


# --------------------------------------------------------------------------------------
# One run


def _hide_unsloth() -> None:
    """Unsloth unimportable in this process; run by path (the package's import would load Unsloth)."""
    runpy.run_path(str(REPO / "unsloth_qwen_compat" / "_hide_unsloth.py"))["hide_unsloth"]()


def run(args: argparse.Namespace) -> int:
    if args.framework == "hf":
        # Unsloth patches transformers and swaps trl.GRPOTrainer for its own on import;
        # the HF run is stock transformers and TRL.
        _hide_unsloth()
    # First: on the Unsloth path this imports and patches Unsloth before transformers loads.
    import unsloth_qwen_compat  # noqa: F401  isort: skip

    import torch

    from unsloth_qwen_compat.loading import (
        ConfigError,
        UnslothUnavailableError,
        attach_lora,
        count_trainable_parameters,
        framework_of,
        load_base_model,
        load_info,
    )

    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = args.checkpoint or build_checkpoint(out / f"checkpoint-{args.shape}", args.shape)
    config = json.loads(json.dumps(CONFIG))
    config["model"]["name"] = str(checkpoint)
    config["model"]["use_unsloth"] = args.framework == "unsloth"  # the one flag
    precision = args.precision
    if precision == "auto":
        precision = "qlora" if torch.cuda.is_available() else "fp32"
    config["model"]["load_in_4bit"] = precision == "qlora"
    config["model"]["dtype"] = {"bf16": "bfloat16", "fp32": "float32"}.get(precision, "auto")
    try:
        model, tokenizer = load_base_model(config)
    except (ConfigError, UnslothUnavailableError, RuntimeError) as exc:
        print(f"grpo_trl.py: {exc}", file=sys.stderr)
        return 2
    model = attach_lora(model, config)
    info = load_info(model)
    bound_dtype = BOUND_DTYPE.get(info.dtype if info else "", "bf16")
    first_step, first_step_grads = score_first_step(model, tokenizer)
    torch.save(first_step_grads, out / FIRST_STEP_GRADS)
    print(
        f"first-step batch: GRPO loss {first_step['loss']:.6g}, NLL {first_step['nll']:.6g}, "
        f"adapter gradient norm {first_step['adapter_grad_norm']:.6g} over {first_step['adapter_grad_tensors']} tensors"
    )
    meter = PeakMemory()
    torch.manual_seed(SEED)
    kernel = None
    if args.loop == "trl":
        kernel = use_torch_log_probs_off_gpu()
        trained = train_with_trl(model, tokenizer, args.steps, out, meter)
    else:
        trained = train_by_hand(model, tokenizer, args.steps, meter)
    records = trained["steps"]
    for record in records:
        print(_describe_step(record, meter.kind))
    checks = [
        *weight_checks(trained["before"], model),
        memory_check(records, meter.kind),
        logging_check(records, args.steps),
    ]
    passed = all(check["passed"] is not False for check in checks)
    result = {
        "framework": framework_of(model),
        "loop": args.loop,
        "trainer": trained["trainer"],
        "trl_log_prob_kernel": kernel,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "versions": unsloth_qwen_compat.status()["environment"]["versions"],
        "checkpoint": str(checkpoint),
        "shape": args.shape if args.checkpoint is None else None,
        "precision": precision,
        "bound_dtype": bound_dtype,
        "config": config,
        "grpo": {
            "prompts_per_step": PROMPTS_PER_STEP,
            "num_generations": NUM_GENERATIONS,
            "max_new_tokens": MAX_NEW_TOKENS,
            "beta": BETA,
            "learning_rate": LEARNING_RATE,
            "reward": f"min(len(reply), {REWARD_LENGTH}) / {REWARD_LENGTH} + ({REWARD_WORD!r} in reply)",
        },
        "trainable_parameters": count_trainable_parameters(model),
        "peak_memory_kind": meter.kind,
        "peak_tolerance": PEAK_TOLERANCE,
        "steps": records,
        "first_step_completion_ids": trained["first_step_completion_ids"],
        "first_step": first_step,
        "checks": checks,
        "passed": passed,
    }
    (out / "grpo.json").write_text(json.dumps(result, indent=2))
    _print_checks(checks)
    print(f"results: {out / 'grpo.json'}")
    return 0 if passed else 1


def build_checkpoint(directory: Path, shape: str) -> Path:
    """A random Qwen3 of ``shape`` (:data:`SHAPES`) with the example's tokenizer, in
    ``directory``; the large shape is built in bf16 on the GPU when there is one."""
    import torch

    sys.path.insert(0, str(EXAMPLES))
    from tiny_qwen import build_tiny_qwen

    if shape == "tiny":
        return build_tiny_qwen(directory)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return build_tiny_qwen(directory, **SHAPES[shape], device=device, dtype="bfloat16")


def _describe_step(record: dict[str, Any], kind: str) -> str:
    def number(name: str, spec: str) -> str:
        value = record.get(name)
        return "missing" if value is None else format(value, spec)

    peak = record.get("peak_memory_bytes")
    return (
        f"step {record['step']}: reward {number('reward', '.3f')}, loss {number('loss', '.4g')}, "
        f"KL {number('kl', '.4g')}, generation {record['generation_seconds']:.2f} s, "
        f"{record['generated_tokens']} tokens, step {record['step_seconds']:.2f} s, "
        f"peak {'n/a' if peak is None else f'{peak / 2**20:.1f} MiB ({kind})'}"
    )


def _print_checks(checks: list[dict[str, Any]]) -> None:
    for check in checks:
        verdict = {True: "PASS", False: "FAIL", None: "SKIP"}[check["passed"]]
        print(f"{verdict}  {check['name']}: {check['detail']}")


# --------------------------------------------------------------------------------------
# --compare-paths


def _bounds(dtype: str) -> dict[str, float]:
    """The conformance suite's bounds for ``dtype`` (its one table of them)."""
    sys.path.insert(0, str(REPO))
    from conformance.tolerances import BOUNDS

    return BOUNDS[dtype]


def _rel(candidate: float, reference: float) -> float:
    return (
        abs(candidate - reference) / abs(reference)
        if reference
        else (0.0 if candidate == reference else math.inf)
    )


def _tensor_rel(candidate: Any, reference: Any) -> float:
    import torch

    denominator = torch.linalg.vector_norm(reference.double()).item()
    numerator = torch.linalg.vector_norm(candidate.double() - reference.double()).item()
    return numerator / denominator if denominator else (0.0 if numerator == 0 else math.inf)


def path_comparison(
    results: dict[str, dict[str, Any]], grads: dict[str, dict[str, Any]] | None = None
) -> dict[str, Any]:
    """--compare-paths' verdict from each path's grpo.json (``results``: framework -> its JSON)
    and first-step adapter gradients (``grads``: framework -> name -> tensor)."""
    grads = grads or {}
    checks = [
        {
            "name": f"{framework} run passed its own checks",
            "passed": bool(results.get(framework, {}).get("passed")),
        }
        for framework in ("hf", "unsloth")
    ]
    scores = {f: r.get("first_step") for f, r in results.items() if r.get("first_step")}
    dtypes = {r.get("bound_dtype") for r in results.values()}
    if len(scores) == 2 and len(dtypes) == 1:
        (dtype,) = dtypes
        bounds = _bounds(dtype)
        hf, unsloth = scores["hf"], scores["unsloth"]
        for key, what in (("loss", "GRPO loss"), ("nll", "reply tokens' mean negative log-likelihood")):
            error = _rel(unsloth[key], hf[key])
            checks.append(
                {
                    "name": f"first-step {what} on the shared batch agrees (lora_loss_rel, {dtype})",
                    "passed": error <= bounds["lora_loss_rel"],
                    "detail": f"hf {hf[key]:.6g}, unsloth {unsloth[key]:.6g}, rel {error:.2e} "
                    f"(bound {bounds['lora_loss_rel']:.0e})",
                }
            )
        name = f"first-step adapter gradients on the shared batch agree (lora_grad_rel, {dtype})"
        if set(grads) == {"hf", "unsloth"} and grads["hf"] and set(grads["hf"]) == set(grads["unsloth"]):
            errors = {key: _tensor_rel(grads["unsloth"][key], grads["hf"][key]) for key in grads["hf"]}
            worst = max(errors, key=errors.__getitem__)
            checks.append(
                {
                    "name": name,
                    "passed": errors[worst] <= bounds["lora_grad_rel"],
                    "detail": f"{len(errors)} tensors, worst rel {errors[worst]:.2e} ({worst}; bound "
                    f"{bounds['lora_grad_rel']:.0e})",
                }
            )
        else:
            found = {f: len(g) for f, g in grads.items()}
            only = sorted(set(grads.get("hf", {})) ^ set(grads.get("unsloth", {})))[:4]
            checks.append(
                {"name": name, "passed": False, "detail": f"tensors per path {found}; in one only: {only}"}
            )
    else:
        checks.append(
            {
                "name": "first-step scores on the shared batch agree",
                "passed": False,
                "detail": f"scores from {sorted(scores)}, dtypes {sorted(map(str, dtypes))}",
            }
        )
    for check in checks:
        check.setdefault("detail", "")
    passed = all(check["passed"] for check in checks)
    return {
        "compare_paths": True,
        "checks": checks,
        "passed": passed,
        "first_step": scores,
        # The losses each run logged at step 1, on its own sampled replies: not compared
        # (see the module's docstring), kept for the record.
        "first_step_logged_loss": {
            f: r["steps"][0].get("loss") for f, r in results.items() if r.get("steps")
        },
        "first_step_replies_identical": (
            results["hf"]["first_step_completion_ids"] == results["unsloth"]["first_step_completion_ids"]
            if len(results) == 2
            else None
        ),
        "paths": {f: {"trainer": r.get("trainer"), "steps": r.get("steps")} for f, r in results.items()},
    }


def compare_paths(args: argparse.Namespace) -> int:
    """Both paths at once, each in its own process, on one checkpoint; compared.

    Refused without CUDA (Unsloth cannot train on CPU).
    """
    import torch

    if not torch.cuda.is_available():
        print(
            "grpo_trl.py --compare-paths needs a CUDA GPU (the Unsloth path cannot train on CPU)",
            file=sys.stderr,
        )
        return 2
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = args.checkpoint or build_checkpoint(out / f"checkpoint-{args.shape}", args.shape)
    environment = dict(os.environ)
    environment["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), environment.get("PYTHONPATH")) if p)
    running = {}
    for framework in ("hf", "unsloth"):
        directory = out / framework
        directory.mkdir(exist_ok=True)
        command = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--framework", framework,
            "--loop", args.loop,
            "--steps", str(args.steps),
            "--precision", args.precision,
            "--checkpoint", str(checkpoint),
            "--out", str(directory),
        ]  # fmt: skip
        log = (out / f"{framework}.log").open("w")
        # Unsloth writes unsloth_compiled_cache/ into the working directory.
        running[framework] = (
            subprocess.Popen(command, cwd=directory, env=environment, stdout=log, stderr=subprocess.STDOUT),
            log,
        )
    results: dict[str, dict[str, Any]] = {}
    grads: dict[str, dict[str, Any]] = {}
    for framework, (process, log) in running.items():
        code = process.wait()
        log.close()
        directory = out / framework
        print(f"{framework}: exit {code}, log {log.name}")
        if (directory / "grpo.json").exists():
            results[framework] = json.loads((directory / "grpo.json").read_text())
        if (directory / FIRST_STEP_GRADS).exists():
            grads[framework] = torch.load(directory / FIRST_STEP_GRADS)
        if code != 0:
            print("".join(Path(log.name).read_text().splitlines(keepends=True)[-30:]))
    summary = path_comparison(results, grads)
    summary["loop"] = args.loop
    (out / "grpo.json").write_text(json.dumps(summary, indent=2))
    _print_checks(summary["checks"])
    print(f"results: {out / 'grpo.json'}")
    return 0 if summary["passed"] else 1


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, help="directory for grpo.json (and the tiny checkpoint)")
    parser.add_argument("--framework", choices=("hf", "unsloth"), default="hf", help="the loader's path")
    parser.add_argument(
        "--loop", choices=("trl", "custom"), default="trl", help="TRL's GRPOTrainer or by hand"
    )
    parser.add_argument(
        "--steps", type=int, default=STEPS, help=f"optimizer steps (at least 3; default {STEPS})"
    )
    parser.add_argument(
        "--checkpoint", type=Path, help="a Qwen checkpoint directory (default: build a tiny one)"
    )
    parser.add_argument(
        "--shape", choices=tuple(SHAPES), default="tiny", help="the checkpoint built without --checkpoint"
    )
    parser.add_argument(
        "--precision",
        choices=("auto", "bf16", "fp32", "qlora"),
        default="auto",
        help="auto: qlora on a GPU, fp32 on the CPU",
    )
    parser.add_argument(
        "--compare-paths", action="store_true", help="run both paths at once and compare them (CUDA)"
    )
    parser.add_argument(
        "--make-checkpoint", type=Path, metavar="DIR", help="build --shape's checkpoint in DIR and stop"
    )
    args = parser.parse_args()
    if args.make_checkpoint:
        print(build_checkpoint(args.make_checkpoint.resolve(), args.shape))
        return 0
    if args.out is None:
        parser.error("--out is required (or --make-checkpoint DIR)")
    if args.steps < 3:
        parser.error("--steps must be at least 3 (the memory check compares later steps with step 2)")
    return compare_paths(args) if args.compare_paths else run(args)


if __name__ == "__main__":
    sys.exit(main())
