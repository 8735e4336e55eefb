"""Greedy generation: KV cache == no cache == HF, one prompt and a left-padded batch.

Tokens are compared exactly, on the steps where the reference's top-1/top-2 gap clears
MIN_GREEDY_MARGIN (tolerances.py): the oracle chose prompts for which that is every step
when it could, and reports how many steps are decidable otherwise.
"""

import pytest
import torch

from conformance import candidate, plan, tolerances, zoo

pytestmark = pytest.mark.generate


def _mismatches(tokens: torch.Tensor, expected: torch.Tensor, decidable: list[int]) -> int:
    return sum(int((tokens[row, :n] != expected[row, :n]).sum()) for row, n in enumerate(decidable))


@pytest.mark.parametrize("shape", ["single", "batch"], ids=["one_prompt", "left_padded_batch"])
@pytest.mark.parametrize("spec", zoo.ZOO, ids=str)
def test_greedy_generate(spec, shape, settings, oracle, candidates, record):
    reference = oracle.get(plan.generate(spec, settings.dtype, settings.device))
    part = reference[shape]
    model, _ = candidates.get(spec, spec.max_position_embeddings, settings.dtype)
    args = (part["input_ids"], part["attention_mask"], plan.GENERATE_NEW_TOKENS, reference["pad_id"])
    cached = candidate.greedy(model, *args, use_cache=True)
    uncached = candidate.greedy(model, *args, use_cache=False)

    decidable = part["decidable"]
    record.note("compared_tokens", sum(decidable))
    if sum(decidable) == 0:
        pytest.skip(
            f"no greedy step clears the {settings.dtype} decision margin "
            f"{reference['min_margin']} for any prompt tried (random weights, MoE routing near-ties)"
        )
    tolerances.check(
        record,
        [
            ("cached_vs_hf", "generate_mismatch", _mismatches(cached, part["new_tokens"], decidable)),
            ("uncached_vs_hf", "generate_mismatch", _mismatches(uncached, part["new_tokens"], decidable)),
            ("cached_vs_uncached", "generate_mismatch", _mismatches(cached, uncached, decidable)),
        ],
        settings.dtype,
        detail=f"{spec}: {sum(decidable)}/{part['new_tokens'].numel()} tokens compared "
        f"(reference margin >= {reference['min_margin']}); hf {part['new_tokens'].tolist()} "
        f"cached {cached.tolist()} uncached {uncached.tolist()}",
    )
