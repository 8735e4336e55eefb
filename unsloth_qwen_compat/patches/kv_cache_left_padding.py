"""Keep the padding in the attention mask of KV-cache decode steps (left-padded batches).

The defect (Unsloth 2025.10.12 with transformers >= 4.53, e.g. 4.57.1; every 2025.3.x).
HF ``generate`` hands each decode step the full 2D ``attention_mask`` (prompt + tokens
so far). Unsloth's ``_fast_prepare_inputs_for_generation`` (``unsloth/models/llama.py``,
installed on Qwen2/Qwen3/Qwen3-MoE ``ForCausalLM`` by ``fix_prepare_inputs_for_generation``)
builds a 4D mask from it only when the transformers base model still has
``_prepare_4d_causal_attention_mask_with_cache_position``; transformers 4.53 moved
masking to ``masking_utils`` and dropped that method, so 2025.10.12 takes its fallback
``attention_mask = attention_mask[:, [-1]]`` (llama.py:176; 2025.3.19 does the same
unconditionally, llama.py:110). The decode step then calls
``_prepare_4d_causal_attention_mask_for_sdpa`` on that one column (llama.py:1046-1053),
which is all ones, so transformers returns ``None`` ("nothing masked, one query") and
``LlamaAttention_fast_forward_inference`` / ``Qwen3Attention_fast_forward_inference`` run
SDPA over the whole cache with no mask (llama.py:359-363, qwen3.py:376-379): every
decoded token of a padded row attends to the pad tokens' keys and values. The prefill
is right (it gets the full mask), so the first new token is right and the rest drift
from HF (the conformance suite's ``left_padded_batch`` generation and teacher-forced decode
cases measure how far: CONFORMANCE.md, leg 2025.3; leg 2025.10 in the earlier runs of its
history, ``git show 93ac450:CONFORMANCE.md``). 2026.10.9 keeps the 2D mask (its fallback,
llama.py:535-541, no longer slices it), derives position ids from it (llama.py:543-552)
and masks the decode step with it for any batch size (llama.py:1762-1772, 805-835).

Position ids need no change: these releases give both the prefill (plain RoPE over
``arange``, llama.py:515) and the decode steps (``position_ids = cache_position``,
llama.py:185-186) positions shifted by the row's pad count relative to HF's
``cumsum(mask) - 1``. The shift is the same for every query and key of a row, and RoPE
scores depend only on the difference of positions, so attention is unchanged (uncached
generation, which has the same shift, equals HF token for token).

The fix (no refusal). The upstream function is wrapped and called as is, then:

- batch of 2+, decode step: where upstream returned the one-column mask, the wrapper puts
  back the full 2D mask HF passed in (its length is cached tokens + 1, the key length of
  the step), so the decode step's own mask code builds the (bsz, 1, 1, kv_len) padding
  mask and SDPA skips the pads.
- one sequence: those releases' decode step drops the mask whenever the batch has one
  row (llama.py:1054-1055) and then runs a plain matmul over the cache, so no mask can
  reach it. The wrapper prefills only the sequence's real tokens instead (its leading
  pads dropped from input_ids, mask and position ids) and, at each decode step, lowers
  the position by the tokens the cache lacks (mask length - 1 - cache length). That is
  exactly HF's generation of the unpadded prompt, which for one sequence is the same
  result. A mask whose zeros do not all lead (right padding) is left to upstream.

No Unsloth code is copied; nothing else in the step changes.

Qwen model types only (``qwen2``, ``qwen3``, ``qwen3_moe``): other models keep upstream's
behaviour. The probe runs the installed function on a stand-in left-padded decode step
(two rows, one padded, a three-token cache) with the installed transformers' Qwen base
class, and reads which keys the returned mask lets the new token attend.
"""

from __future__ import annotations

import functools
import importlib
import sys
from collections.abc import Callable
from types import ModuleType, SimpleNamespace
from typing import Any

from .._env import Environment
from .._qwen import QWEN_MODEL_TYPES
from .._registry import AttributeSwaps, Patch, ProbeResult, native, needed, unsupported
from ..lora_targets import model_type_of

#: (transformers module, class) that ``fix_prepare_inputs_for_generation`` patches for the
#: Qwen model types (``QWEN_MODEL_TYPES``), whose generation goes through the wrapped function.
_CAUSAL_LM_CLASSES = (
    ("transformers.models.qwen2.modeling_qwen2", "Qwen2ForCausalLM"),
    ("transformers.models.qwen3.modeling_qwen3", "Qwen3ForCausalLM"),
    ("transformers.models.qwen3_moe.modeling_qwen3_moe", "Qwen3MoeForCausalLM"),
)
#: (model type, base model class, config class) the probe tries, if transformers has them.
_PROBE_BASES = (("qwen2", "Qwen2Model", "Qwen2Config"), ("qwen3", "Qwen3Model", "Qwen3Config"))


def attended_keys(mask: Any, kv_len: int) -> Any:
    """Per row, which of ``kv_len`` keys the step's (last) query may attend, or None.

    Reads every form a prepared mask takes: 2D (1 = attend), 4D additive float (0 =
    attend, dtype min = masked) and 4D bool (True = attend). None when the mask cannot
    say (absent, or covering fewer keys than the step has).
    """
    import torch

    if not isinstance(mask, torch.Tensor):
        return None
    if mask.dim() == 2:
        return mask != 0 if mask.shape[-1] == kv_len else None
    if mask.dim() == 4 and mask.shape[-1] >= kv_len:
        row = mask[:, 0, -1, :kv_len]
        if row.dtype == torch.bool:
            return row
        return row > torch.finfo(row.dtype).min / 2
    return None


def decode_step_keeps_padding(prepare: Callable[..., Any], base_model: Any, config: Any) -> bool:
    """Whether ``prepare`` (an Unsloth ``_fast_prepare_inputs_for_generation``) hands a
    left-padded decode step a mask that still masks the pads.

    The stand-in step: two rows of four tokens (three cached, one new), the first row
    left-padded by two; ``base_model`` is the transformers base class the upstream code
    asks for ``_prepare_4d_causal_attention_mask_with_cache_position``.
    """
    import torch

    input_ids = torch.tensor([[0, 0, 5, 6], [3, 4, 5, 6]])
    attention_mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    cached = torch.zeros(2, 1, 3, 4)
    model = SimpleNamespace(config=config, dtype=torch.float32, base_model_prefix="model", model=base_model)
    prepared = prepare(
        model,
        input_ids,
        attention_mask=attention_mask,
        past_key_values=[(cached, cached)],
        cache_position=torch.tensor([3]),
        use_cache=True,
    )
    attended = attended_keys(prepared.get("attention_mask"), attention_mask.shape[-1])
    return attended is not None and bool(torch.equal(attended.cpu(), attention_mask != 0))


def _leading_pads(attention_mask: Any) -> int:
    """Left-padding tokens of a one-row mask whose zeros all lead (0 if any zero does not)."""
    row = attention_mask[0]
    pads = int((row.cumsum(-1) == 0).sum())
    return pads if pads < row.shape[-1] and int(row.sum()) == row.shape[-1] - pads else 0


def _cached_length(past_key_values: Any) -> int | None:
    try:
        if hasattr(past_key_values, "get_seq_length"):
            return int(past_key_values.get_seq_length())
        return int(past_key_values[0][0].shape[-2])
    except Exception:
        return None


def keep_padding_in_decode_mask(original: Callable[..., Any], llama: Any) -> Callable[..., Any]:
    """Wrap ``_fast_prepare_inputs_for_generation`` for Qwen models: decode steps of a batch
    keep the full 2D mask; a single left-padded sequence is prefilled without its padding
    and decoded at its own positions. Once ``llama`` no longer holds the wrapper
    (reverted), it only calls ``original``."""
    import torch

    @functools.wraps(original)
    def _fast_prepare_inputs_for_generation(self: Any, input_ids: Any, *args: Any, **kwargs: Any) -> Any:
        attention_mask = kwargs.get("attention_mask", args[0] if args else None)
        prepared = original(self, input_ids, *args, **kwargs)
        if getattr(llama, "_fast_prepare_inputs_for_generation", None) is not wrapper:
            return prepared  # reverted: a class patched meanwhile gets upstream behaviour
        if model_type_of(self) not in QWEN_MODEL_TYPES:
            return prepared
        if not (
            isinstance(attention_mask, torch.Tensor)
            and attention_mask.dim() == 2
            and isinstance(input_ids, torch.Tensor)
            and attention_mask.shape == input_ids.shape
        ):
            return prepared
        single = input_ids.shape[0] == 1
        past_key_values = prepared.get("past_key_values")
        if past_key_values is None:  # the prefill, or a step without the cache
            if single and kwargs.get("use_cache", True):
                _prefill_without_left_padding(prepared, attention_mask)
            return prepared
        if single:
            _shift_to_unpadded_positions(prepared, attention_mask, _cached_length(past_key_values))
            return prepared
        current = prepared.get("attention_mask")
        if (
            isinstance(current, torch.Tensor)
            and current.dim() == 2
            and current.shape[-1] < attention_mask.shape[-1]
        ):
            # Upstream kept only the last column; the full mask spans cache + this token.
            prepared["attention_mask"] = attention_mask
        return prepared

    wrapper = _fast_prepare_inputs_for_generation
    wrapper.__unsloth_qwen_compat__ = True  # type: ignore[attr-defined]
    return wrapper


def _prefill_without_left_padding(prepared: dict[str, Any], attention_mask: Any) -> None:
    """One sequence: prefill only its real tokens (one host read per generate() call)."""
    pads = _leading_pads(attention_mask)
    if not pads:
        return
    prepared["input_ids"] = prepared["input_ids"][:, pads:]
    prepared["attention_mask"] = attention_mask[:, pads:]
    position_ids = prepared.get("position_ids")
    if position_ids is not None:
        prepared["position_ids"] = position_ids[..., pads:] - pads


def _shift_to_unpadded_positions(prepared: dict[str, Any], attention_mask: Any, cached: int | None) -> None:
    """One sequence, decode step: the cache holds fewer tokens than the mask spans exactly when
    the prefill dropped the padding; the new token's position is then that much lower."""
    position_ids = prepared.get("position_ids")
    if cached is None or position_ids is None:
        return
    pads = attention_mask.shape[-1] - 1 - cached
    if pads > 0:
        prepared["position_ids"] = position_ids - pads


def _probe_bases() -> list[tuple[str, Any, Any]]:
    """(model type, base class, tiny config) for the Qwen base models transformers has.

    Uses the modeling modules Unsloth already imported; imports Qwen2's only if none is.
    """
    found = []
    for model_type, base_name, config_name in _PROBE_BASES:
        module = sys.modules.get(f"transformers.models.{model_type}.modeling_{model_type}")
        if module is None and model_type == "qwen2" and not found:
            try:
                module = importlib.import_module("transformers.models.qwen2.modeling_qwen2")
            except ImportError:
                module = None
        base, config_class = getattr(module, base_name, None), getattr(module, config_name, None)
        if base is None or config_class is None:
            continue
        config = config_class(
            vocab_size=16,
            hidden_size=8,
            intermediate_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
        found.append((model_type, base, config))
    return found


class KvCacheLeftPadding(Patch):
    name = "kv_cache_left_padding"
    summary = "KV-cache generation of left-padded batches masks the padding"
    unsloth_module = "unsloth.models.llama"
    conformance_cases = ("test_greedy_generate",)
    reproduction = """\
import torch
from unsloth import FastLanguageModel
model, tokenizer = FastLanguageModel.from_pretrained("Qwen/Qwen3-0.6B", load_in_4bit=False)
tokenizer.padding_side = "left"
batch = tokenizer(["Hi", "Write a long sentence about the sea and the sky"],
                  return_tensors="pt", padding=True).to("cuda")
kwargs = dict(**batch, do_sample=False, max_new_tokens=16, pad_token_id=tokenizer.pad_token_id)
cached = model.generate(**kwargs, use_cache=True)
uncached = model.generate(**kwargs, use_cache=False)
# The padded row ("Hi") differs after its first new token: each decode step attends to
# the pad tokens, because the step's attention_mask is cut to its last column.
print((cached != uncached).sum(dim=1))
"""

    def probe(self, llama: ModuleType, env: Environment) -> ProbeResult:
        prepare = getattr(llama, "_fast_prepare_inputs_for_generation", None)
        if prepare is None or not hasattr(llama, "fix_prepare_inputs_for_generation"):
            return unsupported("_fast_prepare_inputs_for_generation not found: layout changed upstream")
        if getattr(prepare, "__unsloth_qwen_compat__", False):
            return needed("already patched in this process")
        bases = _probe_bases()
        if not bases:
            return unsupported("transformers has no Qwen2/Qwen3 base model to probe with")
        dropped = []
        for model_type, base, config in bases:
            try:
                keeps = decode_step_keeps_padding(prepare, base, config)
            except Exception as exc:
                return unsupported(
                    f"_fast_prepare_inputs_for_generation raised on a left-padded {model_type} "
                    f"decode step: {type(exc).__name__}: {exc}"
                )
            if not keeps:
                dropped.append(model_type)
        if dropped:
            return needed(
                "decode steps of left-padded batches get a mask without the padding "
                f"({'/'.join(dropped)}), so generation with the KV cache attends to pad tokens"
            )
        return native("decode steps of left-padded batches keep the padding in their attention mask")

    def install(self, swaps: AttributeSwaps, llama: ModuleType, env: Environment) -> None:
        original = llama._fast_prepare_inputs_for_generation
        if getattr(original, "__unsloth_qwen_compat__", False):
            return
        wrapper = keep_padding_in_decode_mask(original, llama)
        # fix_prepare_inputs_for_generation reads the module global when a model is loaded
        # (each FastQwen*Model.pre_patch), so replacing it covers every later load.
        swaps.set_attr(llama, "_fast_prepare_inputs_for_generation", wrapper)
        # Classes a load before this import already patched hold the original itself.
        for module_name, class_name in _CAUSAL_LM_CLASSES:
            cls = getattr(sys.modules.get(module_name), class_name, None)
            if cls is not None and vars(cls).get("prepare_inputs_for_generation") is original:
                swaps.set_attr(cls, "prepare_inputs_for_generation", wrapper)
