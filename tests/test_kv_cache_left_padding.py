"""The KV-cache left-padding patch: its probe on real and stand-in upstream code, and the
tensor math of its fix against references computed the Hugging Face way (CPU only).

The decode kernels themselves need a GPU; conformance/test_generate.py's
``left_padded_batch`` cases measure the whole generation there.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import textwrap
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest

# First, as in use: the package imports Unsloth, which wants to come before transformers.
from unsloth_qwen_compat.patches.kv_cache_left_padding import (
    attended_keys,
    decode_step_keeps_padding,
    keep_padding_in_decode_mask,
)

from .conftest import REPO, child_status, requires_unsloth

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("transformers.modeling_attn_mask_utils")  # what Unsloth 2025.x's decode calls

from transformers.modeling_attn_mask_utils import (  # noqa: E402
    _prepare_4d_attention_mask,
    _prepare_4d_causal_attention_mask_for_sdpa,
)
from transformers.models.qwen2 import modeling_qwen2  # noqa: E402

PAD = 0


def hf_position_ids(attention_mask):
    """Positions as transformers' generate computes them from a 2D mask."""
    return (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)


# -- stand-ins for upstream (each one named as such) -----------------------------------


def sliced_mask_stand_in(self, input_ids, attention_mask=None, **kwargs):
    """Stand-in for Unsloth 2025.10.12's ``_fast_prepare_inputs_for_generation`` (llama.py:127)
    with a transformers >= 4.53 base model: at a decode step it keeps the last token and the
    last mask column, and it passes ``cache_position`` on as ``position_ids``."""
    past_key_values = kwargs.get("past_key_values")
    if past_key_values is not None and len(past_key_values) == 0:
        past_key_values = kwargs["past_key_values"] = None
    if past_key_values is not None:
        base = getattr(self, self.base_model_prefix)
        input_ids = input_ids[:, [-1]]
        if hasattr(base, "_prepare_4d_causal_attention_mask_with_cache_position"):
            attention_mask = base._prepare_4d_causal_attention_mask_with_cache_position(attention_mask)
        else:
            attention_mask = attention_mask[:, [-1]]
    if "cache_position" in kwargs:
        kwargs["position_ids"] = kwargs["cache_position"]
    return {"input_ids": input_ids, "attention_mask": attention_mask, **kwargs}


def kept_mask_stand_in(self, input_ids, attention_mask=None, **kwargs):
    """Stand-in for Unsloth 2026.10.9's: the 2D mask is passed on whole."""
    if kwargs.get("past_key_values") is not None:
        input_ids = input_ids[:, -1:]
    return {"input_ids": input_ids, "attention_mask": attention_mask, **kwargs}


class OldTransformersBase:
    """Stand-in for a transformers < 4.53 base model, which still builds a 4D decode mask."""

    @staticmethod
    def _prepare_4d_causal_attention_mask_with_cache_position(attention_mask, **_):
        return _prepare_4d_attention_mask(attention_mask, torch.float32, tgt_len=1)


def _qwen2_config():
    return modeling_qwen2.Qwen2Config(
        vocab_size=16,
        hidden_size=16,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )


def _model(model_type="qwen2", base=modeling_qwen2.Qwen2Model):
    config = SimpleNamespace(model_type=model_type)
    return SimpleNamespace(config=config, dtype=torch.float32, base_model_prefix="model", model=base)


def _wrapped(upstream=sliced_mask_stand_in):
    llama = SimpleNamespace()  # stand-in for the unsloth.models.llama module
    llama._fast_prepare_inputs_for_generation = keep_padding_in_decode_mask(upstream, llama)
    return llama._fast_prepare_inputs_for_generation, llama


def _cache(bsz, length):
    tensor = torch.zeros(bsz, 1, length, 4)
    return [(tensor, tensor)]


def _left_padded_batch():
    # Row 0: 3 pads then 4 tokens; row 1: 7 tokens. Three decode steps already taken.
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1, 1], [1] * 10])
    ids = torch.where(mask == 1, torch.arange(10) + 3, torch.full_like(mask, PAD))
    return ids, mask


# -- the probe's judgement ------------------------------------------------------------


def test_attended_keys_reads_every_mask_form() -> None:
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    expected = mask != 0
    assert torch.equal(attended_keys(mask, 4), expected)
    additive = _prepare_4d_attention_mask(mask, torch.float32, tgt_len=1)  # (2, 1, 1, 4)
    assert torch.equal(attended_keys(additive, 4), expected)
    assert torch.equal(attended_keys(additive == 0, 4), expected)  # bool: True = attend
    assert attended_keys(mask[:, [-1]], 4) is None  # one column cannot say which keys are pads
    assert attended_keys(None, 4) is None


@pytest.mark.parametrize(
    ("upstream", "base", "keeps"),
    [
        (sliced_mask_stand_in, modeling_qwen2.Qwen2Model, False),  # 2025.10.12 + transformers >= 4.53
        (sliced_mask_stand_in, OldTransformersBase, True),  # 2025.10.12 + transformers < 4.53
        (kept_mask_stand_in, modeling_qwen2.Qwen2Model, True),  # 2026.10.9
    ],
    ids=["sliced", "old-transformers-4d", "kept"],
)
def test_probe_step_tells_a_dropped_padding_from_a_kept_one(upstream, base, keeps) -> None:
    assert decode_step_keeps_padding(upstream, base, _qwen2_config()) is keeps
    if not keeps:  # and the wrapped function passes the very same check
        wrapper, _ = _wrapped(upstream)
        assert decode_step_keeps_padding(wrapper, base, _qwen2_config()) is True


# -- the fix, batch of 2+ ------------------------------------------------------------


def test_decode_step_of_a_batch_gets_the_full_mask_and_upstream_positions() -> None:
    wrapper, _ = _wrapped()
    ids, mask = _left_padded_batch()
    cache_position = torch.tensor([9])
    prepared = wrapper(
        _model(), ids, attention_mask=mask, past_key_values=_cache(2, 9), cache_position=cache_position
    )
    assert torch.equal(prepared["attention_mask"], mask)
    assert torch.equal(prepared["input_ids"], ids[:, [-1]])
    assert prepared["position_ids"] is cache_position  # untouched: see the RoPE test below


def test_prefill_other_models_and_reverted_wrapper_are_left_alone() -> None:
    wrapper, llama = _wrapped()
    ids, mask = _left_padded_batch()
    prefill = wrapper(_model(), ids, attention_mask=mask, past_key_values=[], use_cache=True)
    assert torch.equal(prefill["attention_mask"], mask) and torch.equal(prefill["input_ids"], ids)
    decode = {"attention_mask": mask, "past_key_values": _cache(2, 9), "cache_position": torch.tensor([9])}
    assert wrapper(_model("llama"), ids, **decode)["attention_mask"].shape == (2, 1)
    llama._fast_prepare_inputs_for_generation = sliced_mask_stand_in  # as revert() leaves it
    assert wrapper(_model(), ids, **decode)["attention_mask"].shape == (2, 1)


def _decode_attention(prepared_mask, q, keys, values, hidden):
    """One decode step as Unsloth 2025.10.12 runs it for bsz > 1: transformers' SDPA mask
    helper on the step's mask (llama.py:1046-1053), then SDPA over the cache (llama.py:361)."""
    bsz, kv_len = keys.shape[0], keys.shape[-2]
    mask4 = _prepare_4d_causal_attention_mask_for_sdpa(prepared_mask, (bsz, 1), hidden, kv_len - 1)
    return torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=mask4)


def _attention_over_real_tokens(q, keys, values, mask):
    """Reference: per row, softmax over the keys the HF mask keeps, nothing else."""
    rows = []
    for row in range(q.shape[0]):
        keep = mask[row].bool()
        k, v = keys[row][:, keep], values[row][:, keep]
        scores = q[row] @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
        rows.append(scores.softmax(-1) @ v)
    return torch.stack(rows)


def test_the_restored_mask_makes_the_decode_attention_skip_the_pads() -> None:
    wrapper, _ = _wrapped()
    ids, mask = _left_padded_batch()
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(2, 2, 1, 8, generator=generator)
    keys = torch.randn(2, 2, 10, 8, generator=generator)
    values = torch.randn(2, 2, 10, 8, generator=generator)
    hidden = torch.zeros(2, 1, 16)
    decode = {"past_key_values": _cache(2, 9), "cache_position": torch.tensor([9])}
    reference = _attention_over_real_tokens(q, keys, values, mask)

    fixed = wrapper(_model(), ids, attention_mask=mask, **decode)["attention_mask"]
    torch.testing.assert_close(_decode_attention(fixed, q, keys, values, hidden), reference)

    stock = sliced_mask_stand_in(_model(), ids, attention_mask=mask, **decode)["attention_mask"]
    wrong = _decode_attention(stock, q, keys, values, hidden)
    assert (wrong[0] - reference[0]).abs().max() > 1e-2  # the padded row attends to its pads
    torch.testing.assert_close(wrong[1], reference[1])  # the unpadded row was never affected


def test_a_constant_position_shift_per_row_leaves_rope_attention_unchanged() -> None:
    # Why batch position ids are left alone: 2025.10.12 positions a left-padded row by
    # arange (prefill) and cache_position (decode), i.e. HF's positions + its pad count.
    config = _qwen2_config()
    rotary = modeling_qwen2.Qwen2RotaryEmbedding(config)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]])
    generator = torch.Generator().manual_seed(1)
    head_dim = config.hidden_size // config.num_attention_heads
    q = torch.randn(1, 1, 8, head_dim, generator=generator)
    k = torch.randn(1, 1, 8, head_dim, generator=generator)

    def scores(position_ids):
        cos, sin = rotary(q, position_ids)
        q_rot, k_rot = modeling_qwen2.apply_rotary_pos_emb(q, k, cos, sin)
        return (q_rot @ k_rot.transpose(-1, -2))[0, 0, 3:, 3:]  # real tokens only

    unsloth_positions = torch.arange(8)[None]
    hf_positions = hf_position_ids(mask)
    assert not torch.equal(unsloth_positions[:, 3:], hf_positions[:, 3:])
    torch.testing.assert_close(scores(unsloth_positions), scores(hf_positions), rtol=1e-5, atol=1e-5)


# -- the fix, one sequence -------------------------------------------------------------


def test_one_left_padded_sequence_is_prefilled_and_decoded_at_hf_positions() -> None:
    wrapper, _ = _wrapped()
    pads, length = 3, 8
    mask = torch.tensor([[0] * pads + [1] * (length - pads)])
    ids = torch.where(mask == 1, torch.arange(length) + 3, torch.full_like(mask, PAD))
    prepared = wrapper(
        _model("qwen3"),
        ids,
        attention_mask=mask,
        past_key_values=[],
        cache_position=torch.arange(length),
        use_cache=True,
    )
    assert torch.equal(prepared["input_ids"], ids[:, pads:])
    assert torch.equal(prepared["attention_mask"], mask[:, pads:])
    assert torch.equal(prepared["position_ids"], hf_position_ids(mask)[0, pads:])
    cached = length - pads  # the prefill cached the real tokens only
    for step in range(1, 4):  # as generate() grows the inputs, one token a step
        ids = torch.cat([ids, torch.tensor([[20 + step]])], 1)
        mask = torch.cat([mask, torch.ones(1, 1, dtype=mask.dtype)], 1)
        prepared = wrapper(
            _model("qwen3"),
            ids,
            attention_mask=mask,
            past_key_values=_cache(1, cached),
            cache_position=torch.tensor([ids.shape[1] - 1]),
            use_cache=True,
        )
        assert torch.equal(prepared["input_ids"], ids[:, [-1]])
        assert prepared["position_ids"].tolist() == [int(hf_position_ids(mask)[0, -1])]
        cached += 1


@pytest.mark.parametrize(
    "mask",
    [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [0, 1, 1, 0, 1], [0, 0, 0, 0, 0]],
    ids=["unpadded", "right-padded", "gap", "all-pad"],
)
def test_one_sequence_without_a_pure_left_padding_is_left_to_upstream(mask) -> None:
    wrapper, _ = _wrapped()
    mask = torch.tensor([mask])
    ids = torch.arange(5)[None] + 3
    position = torch.arange(5)
    kwargs = {"attention_mask": mask, "past_key_values": [], "cache_position": position, "use_cache": True}
    prepared = wrapper(_model(), ids, **kwargs)
    assert torch.equal(prepared["input_ids"], ids) and prepared["position_ids"] is position
    # The cache then holds every token, so decode positions stay upstream's too.
    decode = wrapper(_model(), ids, **{**kwargs, "past_key_values": _cache(1, 4)})
    assert decode["position_ids"] is position


def test_one_padded_sequence_without_the_cache_is_left_alone() -> None:
    wrapper, _ = _wrapped()
    mask = torch.tensor([[0, 0, 1, 1]])
    ids = torch.tensor([[PAD, PAD, 5, 6]])
    prepared = wrapper(_model(), ids, attention_mask=mask, use_cache=False)
    assert torch.equal(prepared["input_ids"], ids) and torch.equal(prepared["attention_mask"], mask)


# -- the installed Unsloth (2026.10.9 in CI) -------------------------------------------


@requires_unsloth
def test_installed_unsloth_verdict() -> None:
    status = child_status(env={"UNSLOTH_ALLOW_CPU": "1"})
    entry = {p["name"]: p for p in status["patches"]}["kv_cache_left_padding"]
    if status["environment"]["versions"]["unsloth"] == "2026.10.9":
        assert (entry["verdict"], entry["action"]) == ("native", "skipped"), entry
    else:
        assert entry["verdict"] in ("needed", "native", "unsupported"), entry


# -- Unsloth 2025.10.12 and 2025.3.19 ----------------------------------------------------

#: Where the upstream sources were unpacked (a folder per version, or the wheel beside it):
#: ``pip download unsloth==VERSION --no-deps -d DIR`` (and unzip). Unset: those cases skip.
UPSTREAM_SRC = Path(os.environ.get("UNSLOTH_QWEN_COMPAT_UPSTREAM_SRC", "") or "/nonexistent")


def _upstream_llama_source(version: str) -> str:
    unpacked = UPSTREAM_SRC / f"unsloth-{version}" / "unsloth" / "models" / "llama.py"
    if unpacked.is_file():
        return unpacked.read_text()
    wheel = UPSTREAM_SRC / f"unsloth-{version}-py3-none-any.whl"
    if wheel.is_file():
        with zipfile.ZipFile(wheel) as archive:
            return archive.read("unsloth/models/llama.py").decode()
    pytest.skip(f"Unsloth {version}'s source not found: set UNSLOTH_QWEN_COMPAT_UPSTREAM_SRC to its folder")


def _upstream_prepare(version: str):
    """Stand-in module: upstream's own ``_fast_prepare_inputs_for_generation``, compiled from
    that release's source with the few names it reads (installed transformers' version)."""
    import inspect
    import logging

    from packaging.version import Version

    tree = ast.parse(_upstream_llama_source(version))
    node = next(n for n in tree.body if getattr(n, "name", None) == "_fast_prepare_inputs_for_generation")
    namespace = {
        "torch": torch,
        "inspect": inspect,
        "Version": Version,
        "transformers_version": Version(transformers.__version__),
        "logger": logging.getLogger("unsloth-stand-in"),
    }
    exec(compile(ast.Module(body=[node], type_ignores=[]), f"unsloth-{version}/llama.py", "exec"), namespace)
    return namespace["_fast_prepare_inputs_for_generation"]


@pytest.mark.parametrize("version", ["2025.10.12", "2025.3.19"])
def test_old_releases_drop_the_padding_and_the_wrapper_restores_it(version) -> None:
    upstream = _upstream_prepare(version)
    # 2025.3.19 cuts the mask to its last column at every decode step; 2025.10.12 does so
    # when the base model lacks the 4D-mask helper, as from transformers 4.53 (the 2025.10
    # leg's 4.57.1, and the 5.x installed here).
    old_base = hasattr(modeling_qwen2.Qwen2Model, "_prepare_4d_causal_attention_mask_with_cache_position")
    drops = version == "2025.3.19" or not old_base
    assert decode_step_keeps_padding(upstream, modeling_qwen2.Qwen2Model, _qwen2_config()) is not drops
    if version == "2025.10.12":  # and with an old transformers base it builds a right 4D mask
        assert decode_step_keeps_padding(upstream, OldTransformersBase, _qwen2_config()) is True
    wrapper, _ = _wrapped(upstream)
    assert decode_step_keeps_padding(wrapper, modeling_qwen2.Qwen2Model, _qwen2_config()) is True


#: Unsloth 2025.10.12 + transformers 4.57.1 installed beside the CI venv:
#: ``python`` and the folders to put on its path, os.pathsep-separated.
LEG_2025_10 = os.environ.get("UNSLOTH_QWEN_COMPAT_LEG_2025_10", "").split(os.pathsep)

# Stand-in for a GPU (named as such): Unsloth 2025.10.12 refuses to import without one
# and has no CPU mode; this makes torch report an H200 and mocks bitsandbytes, so the
# real GPU modules import and the probe can run their code on CPU tensors.
FAKE_GPU = textwrap.dedent(
    """
    import sys, torch
    from unittest import mock
    class _Properties:
        name = "NVIDIA H200"; total_memory = 140 * 2**30; major = 9; minor = 0
        multi_processor_count = 132
    torch.cuda.is_available = lambda: True
    torch.cuda.device_count = lambda: 1
    torch.cuda.current_device = lambda: 0
    torch.cuda.get_device_capability = lambda *a, **k: (9, 0)
    torch.cuda.is_bf16_supported = lambda *a, **k: True
    torch.cuda.get_device_properties = lambda *a, **k: _Properties()
    torch.cuda.get_device_name = lambda *a, **k: "NVIDIA H200"
    torch.cuda.mem_get_info = lambda *a, **k: (100 * 2**30, 140 * 2**30)
    torch.cuda.memory.mem_get_info = torch.cuda.mem_get_info
    torch.version.cuda = "13.0"
    bnb = mock.MagicMock(); bnb.__version__ = "0.50.2"; bnb.__spec__ = mock.MagicMock()
    for suffix in ["", ".functional", ".nn", ".nn.modules", ".optim", ".utils", ".autograd",
                   ".autograd._functions", ".cextension"]:
        sys.modules["bitsandbytes" + suffix] = bnb if not suffix else getattr(bnb, suffix[1:].replace(".", "_"))
    import triton.backends.nvidia.driver as _driver
    _driver.libcuda_dirs = lambda: ["/usr/lib"]
    torch._C._cuda_getCurrentRawStream = lambda *a: 0
    torch.cuda.current_stream = lambda *a, **k: mock.MagicMock()
    torch.cuda.Stream = mock.MagicMock
    """
)


def test_real_unsloth_2025_10_12_is_probed_needed_and_patched(tmp_path) -> None:
    python, *path = LEG_2025_10
    if not Path(python).is_file() or not all(Path(p).is_dir() for p in path):
        pytest.skip("no Unsloth 2025.10.12 environment here (set UNSLOTH_QWEN_COMPAT_LEG_2025_10)")
    code = FAKE_GPU + textwrap.dedent(
        """
        import json, torch
        import unsloth, unsloth.models.llama as llama
        original = llama._fast_prepare_inputs_for_generation
        import unsloth_qwen_compat as m
        entry = {p["name"]: p for p in m.status()["patches"]}["kv_cache_left_padding"]
        from types import SimpleNamespace
        from transformers.models.qwen3 import modeling_qwen3
        llama.fix_prepare_inputs_for_generation(modeling_qwen3.Qwen3ForCausalLM)  # as pre_patch does
        installed = vars(modeling_qwen3.Qwen3ForCausalLM)["prepare_inputs_for_generation"]
        config = modeling_qwen3.Qwen3Config(num_hidden_layers=1, hidden_size=8, intermediate_size=8,
                                            num_attention_heads=2, num_key_value_heads=1, vocab_size=16)
        model = SimpleNamespace(config=config, dtype=torch.float32, base_model_prefix="model",
                                model=modeling_qwen3.Qwen3Model)
        step = dict(attention_mask=torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]]),
                    past_key_values=[(torch.zeros(2, 1, 3, 4),) * 2],
                    cache_position=torch.tensor([3]), use_cache=True)
        ids = torch.tensor([[0, 0, 5, 6], [3, 4, 5, 6]])
        patched = installed(model, ids, **step)
        m.revert()
        stock = installed(model, ids, **step)  # the class still holds the wrapper: now a pass-through
        print(json.dumps({
            "version": unsloth.__version__, "entry": entry,
            "class_got_wrapper": installed is not original,
            "patched_mask": patched["attention_mask"].tolist(),
            "reverted_mask": stock["attention_mask"].tolist(),
            "restored": llama._fast_prepare_inputs_for_generation is original,
        }))
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("UNSLOTH")}
    env.update(PYTHONPATH=os.pathsep.join([str(REPO), *path]), UNSLOTH_ALLOW_CPU="1")
    done = subprocess.run(
        [python, "-c", code], env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["version"] == "2025.10.12"
    assert (out["entry"]["verdict"], out["entry"]["action"]) == ("needed", "applied"), out["entry"]
    assert out["class_got_wrapper"] is True
    assert out["patched_mask"] == [[0, 0, 1, 1], [1, 1, 1, 1]]
    assert out["reverted_mask"] == [[1], [1]]  # upstream's own decode-step mask: the pads are gone
    assert out["restored"] is True
