"""Teacher-forced KV-cache decoding, shared by the oracle and the candidate (torch only).

The candidate's decode loop is fed the reference's greedy tokens, so both sides compute the
logits of the same sequences step by step, however early a rounding difference would have
made a free-running greedy comparison diverge: every step of every row is compared.

Forcing goes through ``generate`` itself (a logits processor that leaves only the forced
token), so the candidate runs the KV cache, position ids and padding masks of its own
generate path, and ``output_logits`` returns the raw logits before the forcing.
"""

from __future__ import annotations

import torch


class RegularTokensOnly:
    """A logits processor: only ids below ``high`` (plain BPE tokens, no specials) may be chosen.

    The reference's free-running greedy path is kept free of special tokens: Unsloth's decode
    (2026.10.9, stock and shim alike) treats a generated pad token (``<|endoftext|>``) as
    padding and masks it out of later steps, where HF keeps attending to it. A row that
    emits its end-of-text token has finished in real generation, so that difference is not
    a training or generation defect, and a forced path through it would measure only that.
    """

    def __init__(self, high: int) -> None:
        self.high = high

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        out = scores.clone()
        out[:, self.high :] = float("-inf")
        return out


class ForcedTokens:
    """A logits processor: at step s of every row, only ``tokens[row, s]`` may be chosen."""

    def __init__(self, tokens: torch.Tensor, prompt_width: int) -> None:
        self.tokens = tokens
        self.prompt_width = prompt_width

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        step = input_ids.shape[1] - self.prompt_width
        forced = self.tokens[:, step].to(scores.device)
        out = torch.full_like(scores, float("-inf"))
        out.scatter_(1, forced[:, None], 0.0)
        return out


def greedy_generate(model, input_ids, attention_mask, new_tokens: int, pad_id: int, **options):
    """``model.generate`` greedily for exactly ``new_tokens`` (no early EOS), with the KV cache
    unless ``use_cache=False`` is among ``options`` (passed on, e.g. scores or processors).
    The one greedy call of the suite: the oracle's free-running reference, the candidate's,
    and the teacher-forced decode all go through it."""
    device = next(model.parameters()).device
    options.setdefault("use_cache", True)
    with torch.no_grad():
        return model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,  # no early EOS: every row yields exactly new_tokens
            pad_token_id=pad_id,
            **options,
        )


def decode(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    new_tokens: int,
    pad_id: int,
    forced: torch.Tensor | None = None,
    regular_below: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(new tokens, raw logits batch x steps x vocab in fp32) of greedy KV-cache decoding,
    free-running (over ids below ``regular_below`` when given), or following ``forced``
    (batch x new_tokens)."""
    from transformers import LogitsProcessorList

    processors = LogitsProcessorList()
    if forced is not None:
        processors.append(ForcedTokens(forced, input_ids.shape[1]))
    elif regular_below is not None:
        processors.append(RegularTokensOnly(regular_below))
    out = greedy_generate(
        model,
        input_ids,
        attention_mask,
        new_tokens,
        pad_id,
        logits_processor=processors,
        output_logits=True,
        return_dict_in_generate=True,
    )
    logits = torch.stack([step.float() for step in out.logits], dim=1).cpu()
    tokens = out.sequences[:, input_ids.shape[1] :].cpu()
    if forced is not None and not tokens.equal(forced.cpu()):
        raise AssertionError("generate did not follow the forced tokens (a logits processor was ignored)")
    return tokens, logits


def per_step_errors(candidate: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """batch x steps: ||c - r|| / ||r|| over the vocabulary, per row and step, in float64."""
    c, r = candidate.double(), reference.double()
    return torch.linalg.vector_norm(c - r, dim=-1) / torch.linalg.vector_norm(r, dim=-1).clamp_min(1e-300)
