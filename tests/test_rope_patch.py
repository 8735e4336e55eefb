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


# -- Unsloth before 2026.6.3: cos/sin tables built from the config ------------------------

TINY = dict(
    hidden_size=64,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=32,
    num_hidden_layers=1,
    intermediate_size=64,
    vocab_size=128,
    max_position_embeddings=320,
)
SCALINGS = {
    "linear": {"rope_type": "linear", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256},
    "yarn-attention-factor": {
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 256,
        "attention_factor": 1.3,
    },
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    },
}


def _qwen3_config(scaling):
    transformers = pytest.importorskip("transformers")
    theta = 1e6
    try:  # transformers 5: everything in rope_parameters
        parameters = (
            {"rope_type": "default", "rope_theta": theta}
            if scaling is None
            else {**scaling, "rope_theta": theta}
        )
        return transformers.Qwen3Config(rope_parameters=parameters, **TINY)
    except TypeError:  # transformers 4
        return transformers.Qwen3Config(rope_scaling=scaling, rope_theta=theta, **TINY)


@pytest.mark.parametrize("name", sorted(SCALINGS))
def test_cos_sin_tables_match_transformers_rotary_embedding(name) -> None:
    import torch
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

    from unsloth_qwen_compat.patches.rope_scaling import rope_cos_sin, scaled_inv_freq

    config = _qwen3_config(SCALINGS[name])
    positions = torch.arange(900)[None]
    reference_cos, reference_sin = Qwen3RotaryEmbedding(config)(
        torch.zeros(1, dtype=torch.float32), positions
    )
    cos, sin = rope_cos_sin(*scaled_inv_freq(config), 900)
    torch.testing.assert_close(cos, reference_cos[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sin, reference_sin[0], rtol=1e-5, atol=1e-5)
    plain_cos, _ = rope_cos_sin(*scaled_inv_freq(_qwen3_config({"rope_type": "linear", "factor": 1.0})), 900)
    assert (cos - plain_cos).abs().max() > 1e-3  # the scaling really changes the table


def test_plain_rope_needs_no_table_and_dynamic_types_are_refused() -> None:
    from unsloth_qwen_compat.patches.rope_scaling import UnsupportedRopeScalingError, scaled_inv_freq

    assert scaled_inv_freq(_qwen3_config(None)) is None
    with pytest.raises(UnsupportedRopeScalingError, match="supported: linear, yarn, llama3"):
        scaled_inv_freq(SimpleNamespace(rope_scaling={"rope_type": "dynamic", "factor": 2.0}))


def _from_pretrained_stand_in(calls):
    # Stand-in for FastLlamaModel.from_pretrained of 2025.x (records what it was given).
    def from_pretrained(
        model_name="unsloth/x",
        max_seq_length=None,
        dtype=None,
        token=None,
        rope_scaling=None,
        trust_remote_code=False,
        revision=None,
        **kwargs,
    ):
        calls.append(
            {
                "model_name": model_name,
                "max_seq_length": max_seq_length,
                "rope_scaling": rope_scaling,
                "kwargs": kwargs,
            }
        )
        return "model"

    return from_pretrained


@pytest.mark.parametrize(("max_seq_length", "passes_scaling"), [(320, False), (1024, True)])
def test_old_from_pretrained_gets_the_config_scaling_so_it_does_not_swap_it(
    tmp_path, max_seq_length, passes_scaling
) -> None:
    from unsloth_qwen_compat.patches.rope_scaling import _keeping_config_scaling

    _qwen3_config(SCALINGS["yarn"]).save_pretrained(tmp_path)
    calls: list[dict] = []
    wrapped = _keeping_config_scaling(_from_pretrained_stand_in(calls))
    # Extra keywords, as FastLanguageModel forwards them, must arrive as themselves.
    assert wrapped(str(tmp_path), max_seq_length=max_seq_length, use_gradient_checkpointing=False) == "model"
    assert calls[0]["kwargs"] == {"use_gradient_checkpointing": False}
    scaling = calls[0]["rope_scaling"]
    assert (scaling is not None) is passes_scaling
    if passes_scaling:
        assert scaling["rope_type"] == "yarn" and scaling["factor"] == 4.0


def test_old_from_pretrained_past_the_window_builds_tables_from_the_checkpoint_config(tmp_path) -> None:
    # 2025.x raises the model config's max_position_embeddings to max_seq_length, and
    # transformers < 4.53 derives YaRN's factor from it: the rotary must see the checkpoint's.
    from transformers import AutoConfig

    from unsloth_qwen_compat.patches.rope_scaling import _keeping_config_scaling, _remembering_config

    _qwen3_config(SCALINGS["yarn"]).save_pretrained(tmp_path)
    checkpoint_positions = AutoConfig.from_pretrained(tmp_path).max_position_embeddings

    class Rotary:  # stand-in for LlamaRotaryEmbedding(dim, max_position_embeddings, base, device, config)
        def __init__(self, dim=None, max_position_embeddings=None, base=None, device=None, config=None):
            pass

    Rotary.__init__ = _remembering_config(Rotary.__init__)
    built = []

    def from_pretrained(model_name, max_seq_length=None, rope_scaling=None, **kwargs):
        raised = AutoConfig.from_pretrained(model_name, max_position_embeddings=max_seq_length)
        built.append((raised, Rotary(config=raised)))
        return "model"

    _keeping_config_scaling(from_pretrained)(str(tmp_path), max_seq_length=1024)
    raised, rotary = built[0]
    assert raised.max_position_embeddings == 1024
    assert rotary._compat_rope_config.max_position_embeddings == checkpoint_positions != 1024
    # Outside such a load the rotary keeps the config it is given.
    assert Rotary(config=raised)._compat_rope_config is raised


def test_old_from_pretrained_refuses_yarn_past_its_own_window(tmp_path) -> None:
    from unsloth_qwen_compat.patches.rope_scaling import UnsupportedRopeScalingError, _keeping_config_scaling

    _qwen3_config(SCALINGS["yarn"]).save_pretrained(tmp_path)
    calls: list[dict] = []
    wrapped = _keeping_config_scaling(_from_pretrained_stand_in(calls))
    with pytest.raises(UnsupportedRopeScalingError, match="max_seq_length <= 1024"):
        wrapped(str(tmp_path), max_seq_length=2048)
    assert calls == []
    # A caller's explicit rope_scaling is theirs: passed through untouched.
    wrapped(str(tmp_path), max_seq_length=2048, rope_scaling={"type": "linear", "factor": 8.0})
    assert calls[-1]["rope_scaling"] == {"type": "linear", "factor": 8.0}


@pytest.mark.parametrize("layout", ["per-device lists (2025.4+)", "plain buffers (2025.3)"])
def test_cache_is_stored_where_each_unsloth_reads_it(layout) -> None:
    import torch

    from unsloth_qwen_compat.patches.rope_scaling import _cache_from_config, rope_cos_sin, scaled_inv_freq

    class StandInRotary(torch.nn.Module):  # stand-in for Unsloth's LlamaRotaryEmbedding
        def __init__(self) -> None:
            super().__init__()
            if layout.startswith("per-device"):
                self.multi_gpu_cos_cached, self.multi_gpu_sin_cached = [None], [None]

    rotary = StandInRotary()
    config = _qwen3_config(SCALINGS["yarn"])
    object.__setattr__(rotary, "_compat_rope_config", config)
    _cache_from_config(lambda *a: pytest.fail("upstream table built"))(
        rotary, 48, torch.device("cpu", 0), torch.float32
    )
    expected, _ = rope_cos_sin(*scaled_inv_freq(config), 48)
    stored = rotary.multi_gpu_cos_cached[0] if layout.startswith("per-device") else rotary.cos_cached
    torch.testing.assert_close(stored, expected)
    assert rotary.current_rope_size == 48
