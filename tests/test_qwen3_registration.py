"""The Qwen3 registration patch's pieces, checked on CPU against transformers' own Qwen3.

Unsloth's Llama kernels need a GPU, so the numerics of the whole fast path are a
conformance claim (conformance/, leg gpu-2025.3). Here: the q/k norm wrappers reproduce
transformers' Qwen3Attention projections exactly, the decode-step wrapper normalises
only Qwen3's q_proj / k_proj, rebinding a function swaps only the globals named, the
dispatch sends exactly qwen3 configs to the registered class, and patch_peft_model sees
qwen3 as qwen2 only for the duration of the call. Stand-ins for Unsloth are named so.
"""

from __future__ import annotations

import json
import types

import pytest
import torch
import torch.nn.functional as F

from unsloth_qwen_compat import UnsupportedConfigurationError
from unsloth_qwen_compat.patches import qwen3_registration as reg

from .conftest import requires_unsloth, run_python, tiny_qwen_config


def _qwen3_attention(seed: int = 0):
    from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention

    config = tiny_qwen_config("qwen3")
    config.head_dim = 24  # explicit head_dim != hidden / heads (16), as in Qwen3-0.6B
    torch.manual_seed(seed)
    attention = Qwen3Attention(config, layer_idx=0)
    with torch.no_grad():  # non-trivial norm weights, so a skipped or misplaced norm shows
        attention.q_norm.weight.uniform_(0.5, 1.5)
        attention.k_norm.weight.uniform_(0.5, 1.5)
    return attention


def _hf_qk(attention, x):
    """transformers' own Qwen3 q/k: norm each head of the projection."""
    shape = (*x.shape[:-1], -1, attention.head_dim)
    q = attention.q_norm(attention.q_proj(x).view(shape)).flatten(-2)
    k = attention.k_norm(attention.k_proj(x).view(shape)).flatten(-2)
    return q, k


def _plain_apply_qkv(self, X):  # stand-in for Unsloth's original_apply_qkv
    return self.q_proj(X), self.k_proj(X), self.v_proj(X)


def test_apply_qkv_wrapper_matches_transformers_qwen3_and_its_gradients() -> None:
    attention = _qwen3_attention()
    x = torch.randn(2, 5, attention.config.hidden_size, requires_grad=True)
    q_ref, k_ref = _hf_qk(attention, x)
    (q_ref.square().sum() + k_ref.sum()).backward()
    grad_ref = x.grad.clone()

    x.grad = None
    q, k, v = reg._with_qk_norm(_plain_apply_qkv)(attention, x)
    (q.square().sum() + k.sum()).backward()

    torch.testing.assert_close(q, q_ref, rtol=0, atol=0)
    torch.testing.assert_close(k, k_ref, rtol=0, atol=0)
    torch.testing.assert_close(v, attention.v_proj(x))
    torch.testing.assert_close(x.grad, grad_ref)
    assert reg._with_qk_norm(_plain_apply_qkv).wrapped is _plain_apply_qkv


def test_decode_linear_normalises_only_registered_projections_in_place() -> None:
    attention = _qwen3_attention(seed=1)
    x = torch.randn(3, 1, attention.config.hidden_size)

    def fast_linear_forward(proj, X, temp_lora=None, out=None):  # stand-in: Unsloth writes into `out`
        result = F.linear(X, proj.weight, proj.bias)
        return result if out is None else out.copy_(result)

    kernels = object.__new__(reg._Qwen3Kernels)  # only the decode-norm table, no Unsloth module
    kernels._decode_norms = reg.weakref.WeakKeyDictionary()
    linear = kernels._linear_with_qk_norm(fast_linear_forward)
    kernels._decode_norms[attention.q_proj] = (attention.q_norm, attention.head_dim)
    kernels._decode_norms[attention.k_proj] = (attention.k_norm, attention.head_dim)

    buffer = torch.empty(3, 1, attention.q_proj.out_features)
    q = linear(attention.q_proj, x, out=buffer)
    q_ref, k_ref = _hf_qk(attention, x)
    assert q is buffer  # the decode step keeps using its preallocated buffer
    torch.testing.assert_close(q, q_ref)
    torch.testing.assert_close(linear(attention.k_proj, x), k_ref)
    torch.testing.assert_close(linear(attention.v_proj, x), attention.v_proj(x))  # v untouched


def test_rebind_swaps_only_the_named_globals() -> None:
    module = types.ModuleType("stand_in_llama")
    exec("def helper(x):\n    return x + 1\ndef outer(x, k=2):\n    return helper(x) * k\n", vars(module))
    clone = reg._rebind(module.outer, {**vars(module), "helper": lambda x: x - 1})
    assert module.outer(3) == 8 and clone(3) == 4 and clone(3, k=3) == 6
    assert clone.__name__ == "outer" and clone.__wrapped__ is module.outer


def _save_tiny(tmp_path, model_type):
    path = tmp_path / model_type
    tiny_qwen_config(model_type).save_pretrained(path)
    return str(path)


class _StandInLoader(types.SimpleNamespace):
    """Stand-in for unsloth.models.loader: records what the dispatch asked for."""

    def get_model_name(self, name, load_in_4bit):
        return name

    def _get_dtype(self, dtype):
        return dtype


def _stock_from_pretrained(
    model_name="x",
    max_seq_length=2048,
    dtype=None,
    load_in_4bit=True,
    load_in_8bit=False,
    full_finetuning=False,
    token=None,
    device_map="sequential",
    rope_scaling=None,
    fix_tokenizer=True,
    trust_remote_code=False,
    use_gradient_checkpointing="unsloth",
    resize_model_vocab=None,
    revision=None,
    use_exact_model_name=False,
    fast_inference=False,
    *args,
    **kwargs,
):
    return ("stock", model_name)


class _Tagged:
    def __init__(self):
        self.tags = []
        self.config = types.SimpleNamespace(
            update=lambda d: setattr(self, "updated", d), to_dict=lambda: {"torch_dtype": "bfloat16"}
        )

    def add_model_tags(self, tags):
        self.tags += tags


def test_dispatch_sends_only_qwen3_to_the_registered_class(tmp_path) -> None:
    calls = []

    class FastQwen3Model:
        @staticmethod
        def from_pretrained(**kwargs):
            calls.append(kwargs)
            return _Tagged(), _Tagged()

    wrapper = reg._dispatching_qwen3(_stock_from_pretrained, FastQwen3Model, _StandInLoader())
    qwen3, qwen2 = _save_tiny(tmp_path, "qwen3"), _save_tiny(tmp_path, "qwen2")

    assert wrapper(qwen2, max_seq_length=512) == ("stock", qwen2)
    assert calls == []
    model, tokenizer = wrapper(qwen3, max_seq_length=512, dtype=torch.bfloat16, load_in_4bit=True)
    assert len(calls) == 1 and calls[0]["model_name"] == qwen3 and calls[0]["max_seq_length"] == 512
    assert model.tags == ["unsloth"] and tokenizer.tags == ["unsloth"]
    assert model.updated["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    # Paths this release keeps on upstream's generic code, and one it cannot serve:
    assert wrapper(qwen3, load_in_8bit=True) == ("stock", qwen3)
    assert wrapper(qwen3, full_finetuning=True) == ("stock", qwen3)
    with pytest.raises(UnsupportedConfigurationError, match="fast_inference=False"):
        wrapper(qwen3, fast_inference=True)
    with pytest.raises(UnsupportedConfigurationError, match="use_unsloth: false"):
        wrapper(_save_tiny(tmp_path, "qwen3_moe"))
    assert wrapper(str(tmp_path / "no-such-model")) == ("stock", str(tmp_path / "no-such-model"))


def test_patch_peft_model_sees_qwen2_only_during_the_call() -> None:
    from transformers import Qwen3Config

    seen = []

    def stock_patch_peft_model(model, use_gradient_checkpointing=True):
        seen.append(model.config.model_type)
        if use_gradient_checkpointing == "boom":
            raise RuntimeError("boom")
        return model

    wrapper = reg._peft_patching_qwen3(stock_patch_peft_model)
    model = types.SimpleNamespace(config=Qwen3Config())
    assert wrapper(model) is model
    with pytest.raises(RuntimeError):
        wrapper(model, "boom")
    assert seen == ["qwen2", "qwen2"]
    assert model.config.model_type == "qwen3" and "model_type" not in vars(model.config)
    assert json.loads(model.config.to_json_string())["model_type"] == "qwen3"


@requires_unsloth
def test_probe_is_native_where_unsloth_has_fast_qwen3() -> None:
    done = run_python(
        """
        import json, unsloth_qwen_compat as shim
        entry = {p["name"]: p for p in shim.status()["patches"]}["qwen3_registration"]
        import unsloth.models as models
        print(json.dumps({"entry": entry, "owned": getattr(models.FastQwen3Model, "__unsloth_qwen_compat__", False)}))
        """,
        env={"UNSLOTH_ALLOW_CPU": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["entry"]["verdict"] == "native", result
    assert result["entry"]["action"] == "skipped" and result["owned"] is False


def test_an_adapter_directory_resolves_to_its_qwen3_base(tmp_path) -> None:
    import inspect

    from peft import LoraConfig

    base = _save_tiny(tmp_path, "qwen3")
    adapter = tmp_path / "adapter"
    LoraConfig(r=8, target_modules=["q_proj"], base_model_name_or_path=base).save_pretrained(adapter)
    bound = inspect.signature(_stock_from_pretrained).bind(str(adapter))
    bound.apply_defaults()
    assert reg._resolve(bound, _StandInLoader()) == ("qwen3", base, str(adapter))
    bound = inspect.signature(_stock_from_pretrained).bind(base)
    bound.apply_defaults()
    assert reg._resolve(bound, _StandInLoader()) == ("qwen3", base, None)
    assert reg._tokenizer_source(str(adapter)) is None  # no tokenizer files: the base's is used


def test_fastmodel_refuses_qwen3_moe_where_fastlanguagemodel_does(tmp_path) -> None:
    # FastModel's from_pretrained (the generic path) gets the same Qwen3-MoE refusal on an
    # Unsloth without FastQwen3MoeModel, and every other model goes to it unchanged.
    wrapper = reg._refusing_qwen3_moe(_stock_from_pretrained, _StandInLoader())
    qwen3 = _save_tiny(tmp_path, "qwen3")
    assert wrapper(qwen3, max_seq_length=512) == ("stock", qwen3)
    with pytest.raises(UnsupportedConfigurationError, match="no Qwen3-MoE support"):
        wrapper(_save_tiny(tmp_path, "qwen3_moe"))
