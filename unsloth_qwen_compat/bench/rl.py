"""``bench --rl``: GRPO-style steps, timed slice by slice (run in the worker process).

A step is what a GRPO trainer that generates inside ``compute_loss`` does, through the
package's loader on every path:

1. ``generate``: ``replies`` sampled completions for each of ``prompts`` chat prompts, with
   the KV cache, through :func:`~unsloth_qwen_compat.loading.generate_replies` (on Unsloth
   that is ``for_inference`` / ``for_training`` around Unsloth's fast decoding). Every
   reply runs to ``new_tokens`` tokens (``min_new_tokens``), so each path decodes the
   same number of tokens;
2. ``reference``: the completions' per-token log-probabilities under the frozen base,
   :func:`~unsloth_qwen_compat.loading.reference_logits` (adapter disabled, no second
   copy of the weights, no gradients), in micro-batches of :data:`.workload.RL_MICRO_BATCH`
   rows;
3. ``train``: the policy's log-probabilities with gradients in the same micro-batches,
   GRPO's loss (group-normalised advantages, importance ratio, k3 KL to the reference
   with :data:`.workload.RL_BETA`, token-level mean), backward per micro-batch, one AdamW
   step.

The reward is a seeded random number per reply: the checkpoints have random weights, so
no reward could read their replies, and the bench measures time. Each slice is timed
between CUDA synchronisations and its own peak of ``torch.cuda.max_memory_allocated``
recorded.

Imports torch lazily: the worker imports this module only after it has hidden Unsloth (hf
path) or imported it through the package (Unsloth paths).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from .workload import GIB, RL_BETA, RL_MICRO_BATCH, RL_QUESTIONS, RL_SLICES


def rl_prompts(count: int) -> list[list[dict[str, str]]]:
    """``count`` one-turn chats, cycling :data:`.workload.RL_QUESTIONS`."""
    return [[{"role": "user", "content": RL_QUESTIONS[i % len(RL_QUESTIONS)]}] for i in range(count)]


def completion_log_probs(logits: Any, sequences: Any, prompt_length: int) -> Any:
    """Per-token log-probabilities (float32) of ``sequences``' completion tokens, shape
    (rows, completion length): the logit of each token minus the log of the partition sum."""
    import torch

    predicted = logits[:, prompt_length - 1 : -1].float()
    targets = sequences[:, prompt_length:]
    return predicted.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(predicted, dim=-1)


def group_advantages(rewards: Any) -> Any:
    """(prompts, replies) rewards -> one advantage per reply row, normalised within each
    prompt's group (TRL's default ``scale_rewards="group"``)."""
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    return (centred / (rewards.std(dim=1, keepdim=True) + 1e-4)).reshape(-1, 1)


def grpo_token_loss(policy: Any, reference: Any, advantages: Any, mask: Any, tokens: Any) -> Any:
    """GRPO's loss over one micro-batch, as its share of the token-level mean over the step.

    One optimisation per generation, so the importance ratio is exactly 1 in value but
    carries the policy gradient; the KL is the k3 estimate TRL uses.
    """
    import torch

    ratio = torch.exp(policy - policy.detach())
    delta = reference - policy
    kl = torch.exp(delta) - delta - 1
    return ((-ratio * advantages + RL_BETA * kl) * mask).sum() / tokens


class SliceTimer:
    """Seconds and peak GPU memory of each named slice of a step."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.seconds: dict[str, float] = {}
        self.peak_gib: dict[str, float | None] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        yield
        if self.cuda:
            torch.cuda.synchronize()
        self.seconds[name] = time.perf_counter() - started
        self.peak_gib[name] = torch.cuda.max_memory_allocated() / GIB if self.cuda else None


def rl_step(
    model: Any,
    tokenizer: Any,
    optimizer: Any,
    *,
    prompts: int,
    replies: int,
    new_tokens: int,
    seed: int,
    cuda: bool,
    micro_batch: int = RL_MICRO_BATCH,
) -> dict[str, Any]:
    """One step (generate, reference, train); its slices' seconds and peaks, tokens and loss."""
    import torch

    from ..loading import generate_replies, reference_logits

    timer = SliceTimer(cuda)
    with timer("generate"):
        torch.manual_seed(seed)
        replies_out = generate_replies(
            model,
            tokenizer,
            rl_prompts(prompts),
            num_return_sequences=replies,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=True,
            temperature=1.0,
            top_p=1.0,
            top_k=0,
        )
    sequences, attention_mask = replies_out.sequences, replies_out.attention_mask
    prompt_length = replies_out.prompt_length
    # The positions generate() used: counted from each row's first real token (left padding).
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    rows = sequences.shape[0]
    chunks = [slice(start, start + micro_batch) for start in range(0, rows, micro_batch)]

    def inputs(chunk: slice) -> dict[str, Any]:
        return {
            "input_ids": sequences[chunk],
            "attention_mask": attention_mask[chunk],
            "position_ids": position_ids[chunk],
            "use_cache": False,
        }

    with timer("reference"):
        reference = torch.cat(
            [
                completion_log_probs(reference_logits(model, **inputs(c)), sequences[c], prompt_length)
                for c in chunks
            ]
        )
    with timer("train"):
        generator = torch.Generator().manual_seed(seed)
        rewards = torch.rand(prompts, replies, generator=generator)
        advantages = group_advantages(rewards).to(sequences.device)
        mask = replies_out.completion_mask.to(torch.float32)
        tokens = mask.sum().clamp(min=1)
        loss_sum = torch.zeros((), device=sequences.device)
        for c in chunks:
            policy = completion_log_probs(model(**inputs(c)).logits, sequences[c], prompt_length)
            loss = grpo_token_loss(policy, reference[c], advantages[c], mask[c], tokens)
            loss.backward()
            loss_sum += loss.detach()
            del policy, loss
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = float(loss_sum)
    return {
        "seconds": dict(timer.seconds),
        "peak_gib": dict(timer.peak_gib),
        "step_s": sum(timer.seconds.values()),
        "sequences": rows,
        "sequence_length": int(sequences.shape[1]),
        "prompt_length": int(prompt_length),
        "prompt_tokens": int(attention_mask[:, :prompt_length].sum()),
        "generated_tokens": int(replies_out.completion_mask.sum()),
        "loss": loss_value,
    }


def timed_rl_steps(
    spec: Mapping[str, Any],
    model: Any,
    tokenizer: Any,
    optimizer: Any,
    cuda: bool,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """``spec["warmup"]`` untimed steps, then ``spec["steps"]`` timed ones; the summary of the
    timed steps (medians per slice, generated tokens/s, peaks) and every step's record."""
    steps = []
    for number in range(spec["warmup"] + spec["steps"]):
        record = rl_step(
            model,
            tokenizer,
            optimizer,
            prompts=spec["batch"],
            replies=spec["replies"],
            new_tokens=spec["seq_len"],
            seed=spec["seed"] * 1000 + number,
            cuda=cuda,
        )
        record["warmup"] = number < spec["warmup"]
        record["ended_at"] = round(time.time(), 3)
        steps.append(record)
        split = ", ".join(f"{name} {record['seconds'][name]:.3f} s" for name in RL_SLICES)
        log(
            f"step {number} {'warm-up' if record['warmup'] else 'timed'}: {record['step_s']:.3f} s ({split}), "
            f"{record['generated_tokens']} tokens generated, loss {record['loss']:.4f}"
        )
        if not math.isfinite(record["loss"]):
            raise RuntimeError(f"loss is {record['loss']} at step {number}")
        if record["generated_tokens"] == 0:
            raise RuntimeError(f"step {number} generated no tokens")
    return {"rl_steps": steps, **summarize_rl_steps([s for s in steps if not s["warmup"]])}


def summarize_rl_steps(timed: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Medians per slice and of the step, generated tokens/s over the timed steps, peaks."""
    if not timed:
        raise ValueError("no timed steps")
    generated = sum(s["generated_tokens"] for s in timed)
    generate_seconds = sum(s["seconds"]["generate"] for s in timed)
    peaks = {
        name: max((s["peak_gib"][name] for s in timed if s["peak_gib"].get(name) is not None), default=None)
        for name in RL_SLICES
    }
    known = [p for p in peaks.values() if p is not None]
    return {
        "median_step_s": statistics.median(s["step_s"] for s in timed),
        "slice_median_s": {name: statistics.median(s["seconds"][name] for s in timed) for name in RL_SLICES},
        "generated_tokens_per_step": statistics.median(s["generated_tokens"] for s in timed),
        "generated_tokens_per_s": generated / generate_seconds if generate_seconds > 0 else None,
        "slice_peak_gib": peaks,
        "peak_allocated_gib": max(known) if known else None,
        "losses": [s["loss"] for s in timed],
    }
