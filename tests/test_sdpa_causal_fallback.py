"""The SDPA causal fallback: causal exactly where Unsloth 2025.3's unmasked call is not."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from unsloth_qwen_compat.patches.sdpa_causal_fallback import causal_when_unmasked

from .conftest import requires_unsloth, run_python


def _qkv(q_len: int, kv_len: int):
    torch.manual_seed(0)
    return torch.randn(2, 4, q_len, 8), torch.randn(2, 4, kv_len, 8), torch.randn(2, 4, kv_len, 8)


class StandInAttention:
    """Stand-in for an attention module running Unsloth's LlamaAttention_fast_forward, which
    calls the SDPA global directly with the module as ``self``."""

    def __init__(self, model_type: str, sdpa) -> None:
        self.config = SimpleNamespace(model_type=model_type)
        self.sdpa = sdpa

    def forward(self, q, k, v, **kwargs):
        return self.sdpa(q, k, v, **kwargs)


def test_unmasked_full_sequence_becomes_causal() -> None:
    q, k, v = _qkv(6, 6)
    wrapped = StandInAttention("qwen2", causal_when_unmasked(F.scaled_dot_product_attention)).forward
    got = wrapped(q, k, v, attn_mask=None, is_causal=False)
    torch.testing.assert_close(got, F.scaled_dot_product_attention(q, k, v, is_causal=True))
    # Position 2 must not see positions 3-5: same as attending over the prefix alone.
    prefix = F.scaled_dot_product_attention(q[:, :, :3], k[:, :, :3], v[:, :, :3], is_causal=True)
    torch.testing.assert_close(got[:, :, :3], prefix)
    assert not torch.allclose(got, F.scaled_dot_product_attention(q, k, v))  # the stock call differs


@pytest.mark.parametrize("model_type", ["llama", "mistral", None])
def test_other_models_keep_stock_behaviour(model_type) -> None:
    q, k, v = _qkv(6, 6)
    sdpa = causal_when_unmasked(F.scaled_dot_product_attention)
    caller = StandInAttention(model_type, sdpa).forward if model_type else sdpa
    got = caller(q, k, v, attn_mask=None, is_causal=False)
    torch.testing.assert_close(got, F.scaled_dot_product_attention(q, k, v))  # as upstream calls it


def test_decode_steps_and_masked_calls_are_passed_through() -> None:
    wrapped = StandInAttention("qwen3", causal_when_unmasked(F.scaled_dot_product_attention)).forward
    q, k, v = _qkv(1, 6)  # one new token against the cache: attends to everything
    torch.testing.assert_close(
        wrapped(q, k, v, attn_mask=None, is_causal=False), F.scaled_dot_product_attention(q, k, v)
    )
    q, k, v = _qkv(6, 6)
    mask = torch.zeros(6, 6).masked_fill(torch.ones(6, 6, dtype=torch.bool).triu(1), float("-inf"))
    mask[:, 0] = float("-inf")  # a padding column: the caller's mask is used as given
    mask[0, 0] = 0.0
    torch.testing.assert_close(
        wrapped(q, k, v, attn_mask=mask, is_causal=False),
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
    )


@requires_unsloth
def test_native_on_an_unsloth_that_chooses_causality_itself() -> None:
    done = run_python(
        """
        import json, unsloth_qwen_compat as shim
        print(json.dumps({p["name"]: p for p in shim.status()["patches"]}["sdpa_causal_fallback"]))
        """,
        env={"UNSLOTH_ALLOW_CPU": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    import json

    entry = json.loads(done.stdout.strip().splitlines()[-1])
    assert entry["verdict"] == "native" and entry["action"] == "skipped", entry
