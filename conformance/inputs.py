"""Deterministic inputs shared by the oracle and the candidate.

Both sides build inputs from the same (seed, shape) with these functions, and the oracle
also returns the ids it used; tests feed the candidate the oracle's copy, so the two can
never drift apart.
"""

from __future__ import annotations

import torch


def random_ids(seed: int, batch: int, length: int, high: int) -> torch.Tensor:
    """Token ids drawn from the plain BPE range [0, high): no specials, no padding rows."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, high, (batch, length), generator=generator)


def left_padded(seed: int, lengths: list[int], high: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A left-padded batch of random prompts with the given lengths, and its attention mask."""
    width = max(lengths)
    ids = torch.full((len(lengths), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(lengths), width), dtype=torch.long)
    for row, length in enumerate(lengths):
        ids[row, width - length :] = random_ids(seed * 1000 + row, 1, length, high)[0]
        mask[row, width - length :] = 1
    return ids, mask


#: A multi-turn conversation for the chat-template case. The first assistant turn
#: carries reasoning, which Qwen3's template drops for turns before the last user query.
CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant. Answer briefly."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "<think>\nThe user asks about France.\n</think>\n\nParis."},
    {"role": "user", "content": "How many legs does a spider have?"},
]
