"""The RoPE patch's decisions, on stand-in configs (the numerics are checked by conformance/)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from unsloth_qwen_compat.patches.rope_scaling import (
    extended_yarn,
    keep_yarn_when_extending,
    rope_scaling_of,
    rope_theta_of,
)

from .conftest import requires_unsloth, run_python

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256}


def v4_config(scaling=None, max_positions=320):
    return SimpleNamespace(rope_scaling=scaling, rope_theta=1e6, max_position_embeddings=max_positions)


def v5_config(scaling=None, max_positions=320):
    parameters = (
        {"rope_type": "default", "rope_theta": 1e6} if scaling is None else {**scaling, "rope_theta": 1e6}
    )
    return SimpleNamespace(rope_parameters=parameters, max_position_embeddings=max_positions)


@pytest.mark.parametrize("make", [v4_config, v5_config], ids=["v4-rope_scaling", "v5-rope_parameters"])
def test_scaling_and_theta_read_on_both_layouts(make) -> None:
    assert rope_scaling_of(make(YARN))["rope_type"] == "yarn"
    assert rope_scaling_of(make(None)) == {}
    assert rope_theta_of(make(YARN)) == 1e6


def test_v4_type_key_is_understood() -> None:
    assert rope_scaling_of(v4_config({"type": "yarn", "factor": 2.0}))["rope_type"] == "yarn"


@pytest.mark.parametrize("make", [v4_config, v5_config])
@pytest.mark.parametrize(
    ("max_seq_length", "grown_factor"),
    [(640, None), (1024, None), (2048, 8.0), (4096, 16.0)],
)
def test_yarn_is_kept_and_grown_only_past_its_own_window(make, max_seq_length, grown_factor) -> None:
    config = make(YARN)
    result = extended_yarn(config, max_seq_length / config.max_position_embeddings)
    if grown_factor is None:
        assert result is None  # original 256 x factor 4 = 1024 covers it: keep the config as is
    else:
        assert result["rope_type"] == "yarn"
        assert result["factor"] == pytest.approx(grown_factor)
        assert result["original_max_position_embeddings"] == 256
        assert result["rope_theta"] == 1e6


def test_wrapper_passes_other_types_to_upstream() -> None:
    calls = []

    def upstream(config, factor):
        calls.append(factor)
        return {"type": "linear", "factor": factor}, "linear"

    wrapped = keep_yarn_when_extending(upstream)
    assert wrapped(v4_config({"type": "linear", "factor": 2.0}), 3.0) == (
        {"type": "linear", "factor": 3.0},
        "linear",
    )
    assert wrapped(v4_config(None), 2.0)[1] == "linear"
    assert wrapped(v4_config(YARN), 2.0) == (None, "yarn")
    assert calls == [3.0, 2.0]


@requires_unsloth
def test_patched_upstream_function_keeps_yarn_on_a_real_config() -> None:
    # The installed Unsloth's own _extended_rope_scaling, before and after the shim.
    code = """
        import json
        from transformers import Qwen3Config
        import unsloth.models.llama as llama
        stock = llama._extended_rope_scaling
        kwargs = dict(hidden_size=64, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                      num_hidden_layers=1, intermediate_size=64, vocab_size=128, max_position_embeddings=320)
        yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256, "rope_theta": 1e6}
        try:
            config = Qwen3Config(rope_parameters=yarn, **kwargs)
        except TypeError:
            config = Qwen3Config(rope_scaling=yarn, rope_theta=1e6, **kwargs)
        before = stock(config, 2.0)
        import unsloth_qwen_compat
        after = llama._extended_rope_scaling(config, 2.0)
        grown = llama._extended_rope_scaling(config, 8.0)
        print(json.dumps({"before": before, "after": after, "grown": grown}))
    """
    done = run_python(code, env={"UNSLOTH_ALLOW_CPU": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    if out["before"][0] is None or out["before"][0].get("type", out["before"][0].get("rope_type")) == "yarn":
        pytest.skip("this Unsloth keeps YaRN natively: nothing to compare")
    assert out["after"] == [None, "yarn"]
    assert out["grown"][0]["rope_type"] == "yarn" and out["grown"][0]["factor"] == pytest.approx(10.0)
