"""Fused LoRA QKV for Qwen2 / Qwen2.5, whose q/k/v projections carry a bias.

Stock ``FastLlamaModel.patch_peft_model`` installs Unsloth's fused LoRA QKV kernel
(``layer.self_attn.apply_qkv = apply_lora_qkv``) only when the q/k/v base layers have no
bias, so every Qwen2-family layer trains attention LoRA on the plain PEFT path (while
Unsloth's log counts the layer as patched). This is a speed patch, not a correctness one.

The patch wraps ``FastLlamaModel.patch_peft_model`` (``get_peft_model`` and
``FastLanguageModel.from_pretrained`` of an adapter both call it through the class). After
stock has run, every Qwen2 layer that stock's own fused-QKV gate would have accepted but
for the q/k/v bias gets :func:`apply_lora_qkv_with_bias`: Unsloth's ``LoRA_QKV`` autograd
Function, fed by the same ``get_lora_parameters`` stock's ``apply_lora_qkv`` uses (so 4-bit
and other quantized bases work as for Llama), then the base biases added out of place, so
autograd gives a bias that does require grad its gradient.

Which layers qualify is decided by stock's gate itself, not a copy of it: the probe reads
``patch_peft_model``'s source, finds the ``if`` that guards
``self_attn.apply_qkv = apply_lora_qkv`` and the ``if`` statements around it, and the patch
evaluates those very conditions (dropout, LoRA bias, fp32 base, FSDP, DoRA, packed and
MXFP4 bases, ... whatever the installed release checks) with the bias clauses left out.
A gate that reads something this patch cannot supply makes the probe say ``unsupported``;
a gate that no longer tests the bias makes it say ``native`` once upstream's
``apply_lora_qkv``, run on a stand-in attention with biased q/k/v, matches PEFT's forward
(a fused path that drops the biases is ``needed``, and not something this patch can fix).

At run time the kernel runs only in the plain-LoRA state in which every release's
``apply_lora_qkv`` calls it with no extras (one active, enabled, unmerged adapter, no LoRA
variant, no dropout or dropout off, no lora_B bias, a frozen base weight, no fake
quantization, no autocast to another dtype); anything else runs PEFT's modules (biases
included), which is stock's path for Qwen2. The decision reads module state only, so it
holds inside Unsloth 2026.x's per-layer ``torch.compile`` regions, where an output's
autograd node cannot tell which path ran. One consequence: 2026.x fuses LoRA dropout into
the kernel, this patch leaves layers with active dropout on PEFT's forward.

On Unsloth releases with FSDP / DeepSpeed bookkeeping for fused layers (2026.x), the
layers fused here are reported to it the way stock's are: FSDP's decline switches them
back to PEFT's forward, FSDP2's gate counts them, ZeRO-3 makes their decoder layers leaves.

On by default since the fused-QKV conformance cases pass with it on against HF + PEFT on
legs 2026.10, 2025.10, 2025.3 and latest (fp32 against HF fp32; bf16 and NF4 against HF
fp32 on the same weights, within 2.5x HF's own rounding error).
``UNSLOTH_QWEN_COMPAT_FUSED_QKV_BIAS=0`` (``false``/``no``/``off``, any case) switches it
off: Unsloth's functions stay untouched and ``status`` says ``switched off``. Before that
evidence it was opt-in (``=1``), since on by default it changes the path every Qwen2 user
trains with.

``revert()`` restores ``FastLlamaModel.patch_peft_model`` (and those helpers) exactly;
models that went through the wrapper before keep their per-layer ``apply_qkv``, which
keeps working (Unsloth's kernel was resolved once, at install or first call).
"""

from __future__ import annotations

import ast
import builtins
import functools
import inspect
import logging
import sys
import textwrap
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from types import CodeType, ModuleType
from typing import Any

from .._env import Environment, unsloth_switch
from .._registry import (
    Action,
    AttributeSwaps,
    Patch,
    ProbeResult,
    Unavailable,
    import_unsloth,
    native,
    needed,
    unsupported,
)
from ._common import code_mentions

logger = logging.getLogger("unsloth_qwen_compat")

_SHIM_OWNED = "__unsloth_qwen_compat__"
_PATCH_NAME = "qwen2_fused_qkv_bias"
_PROJECTIONS = ("q_proj", "k_proj", "v_proj")

#: Locals of stock's per-layer gate this patch supplies: the layer's three projections.
_LAYER_LOCALS = frozenset(_PROJECTIONS)
#: Locals of the enclosing gates this patch computes the way every stock release does.
_GIVEN_LOCALS = frozenset({"model", "model_type", "active_adapter", "lora_dropout", "bias"})
#: Locals taken from stock's own (single) assignment, evaluated on the model (2026.x).
_ASSIGNED_LOCALS = frozenset({"float32_base", "fused_lora_declined_for_fsdp"})


class GateLayoutError(ValueError):
    """Stock's fused-QKV gate is not laid out the way this patch can read and mirror."""


def _loaded_names(node: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}


def _is_bias_clause(clause: ast.expr) -> bool:
    """``<projection>.bias is None`` in any spelling of the projection (``getattr(q, "base_layer", q)``)."""
    return (
        isinstance(clause, ast.Compare)
        and len(clause.ops) == 1
        and isinstance(clause.ops[0], ast.Is)
        and isinstance(clause.left, ast.Attribute)
        and clause.left.attr == "bias"
        and isinstance(clause.comparators[0], ast.Constant)
        and clause.comparators[0].value is None
        and bool(_loaded_names(clause.left) & _LAYER_LOCALS)
    )


def _clauses(test: ast.expr) -> list[ast.expr]:
    return list(test.values) if isinstance(test, ast.BoolOp) and isinstance(test.op, ast.And) else [test]


def _compile(expression: ast.expr, label: str) -> CodeType:
    tree = ast.fix_missing_locations(ast.Expression(body=expression))
    return compile(tree, f"<stock fused-QKV gate: {label}>", "eval")


@dataclass(frozen=True)
class StockQkvGate:
    """The condition under which stock ``patch_peft_model`` installs ``apply_lora_qkv``.

    Read from the installed function's source; evaluated with that function's globals, so
    helper predicates (``has_mxfp4_base``, ``_fast_lora.lora_bias_blocks_fused``, ...) are
    Unsloth's own.
    """

    namespace: dict[str, Any] = field(repr=False)
    #: Tests of the ``if`` statements around the loop over layers (dropout, LoRA bias, ...).
    outer: tuple[ast.expr, ...]
    #: The per-layer test without its q/k/v bias clauses (None: nothing else is checked).
    layer: ast.expr | None
    #: How many ``<projection>.bias is None`` clauses stock checks (0: upstream fuses biased q/k/v).
    bias_clauses: int
    #: Locals of the outer tests computed by stock's own assignment (name -> right-hand side).
    assigned: dict[str, ast.expr]
    _codes: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._codes["outer"] = [_compile(test, "enclosing if") for test in self.outer]
        self._codes["assigned"] = {n: _compile(rhs, n) for n, rhs in self.assigned.items()}
        self._codes["layer"] = None if self.layer is None else _compile(self.layer, "per layer")

    def describe(self) -> str:
        parts = [ast.unparse(test) for test in self.outer]
        if self.layer is not None:
            parts.append(ast.unparse(self.layer))
        return " and ".join(f"({p})" for p in parts)

    def model_open(self, model: Any) -> bool:
        """Stock's conditions on the whole model (the ``if`` around its loop over layers)."""
        scope = stock_locals(model)
        for name, code in self._codes["assigned"].items():
            scope[name] = eval(code, self.namespace, dict(scope))  # noqa: S307  (stock's own expression)
        return all(eval(code, self.namespace, scope) for code in self._codes["outer"])  # noqa: S307

    def layer_open(self, attention: Any) -> bool:
        """Stock's per-layer conditions, bias clauses left out."""
        code = self._codes["layer"]
        if code is None:
            return True
        scope = {name: getattr(attention, name) for name in _PROJECTIONS}
        return bool(eval(code, self.namespace, scope))  # noqa: S307  (stock's own expression)


def stock_locals(model: Any) -> dict[str, Any]:
    """The locals every stock ``patch_peft_model`` computes before its gate, computed alike."""
    active_adapter = model.active_adapters[0] if hasattr(model, "active_adapters") else model.active_adapter
    config = model.peft_config[active_adapter]
    return {
        "model": model,
        "model_type": model.config.model_type,
        "active_adapter": active_adapter,
        "lora_dropout": config.lora_dropout,
        "bias": config.bias,
    }


def _function_tree(function: Callable[..., Any] | None, source: str | None = None) -> ast.FunctionDef:
    name = getattr(function, "__qualname__", "patch_peft_model")
    if source is None:
        try:
            source = inspect.getsource(function)  # type: ignore[arg-type]
        except (OSError, TypeError) as exc:
            raise GateLayoutError(f"the source of {name} is not readable ({exc})") from exc
    tree = ast.parse(textwrap.dedent(source))
    definition = tree.body[0] if tree.body else None
    if not isinstance(definition, (ast.FunctionDef, ast.AsyncFunctionDef)):
        raise GateLayoutError(f"{name}: no function definition in its source")
    return definition  # type: ignore[return-value]


def read_stock_gate(
    function: Callable[..., Any] | None, namespace: dict[str, Any] | None = None, *, source: str | None = None
) -> StockQkvGate:
    """Find and check the fused-QKV gate in stock ``patch_peft_model`` (see :class:`StockQkvGate`).

    ``source`` reads that text instead of ``function``'s (then ``namespace`` is required).
    Raises :class:`GateLayoutError` when the gate cannot be mirrored.
    """
    function = getattr(function, "__func__", function)
    if namespace is None:
        namespace = function.__globals__  # type: ignore[union-attr]
    definition = _function_tree(function, source)
    parents: dict[ast.AST, ast.AST] = {}
    for node in ast.walk(definition):
        for child in ast.iter_child_nodes(node):
            parents[child] = node
    stores = [
        node
        for node in ast.walk(definition)
        if isinstance(node, ast.Assign)
        and any(isinstance(t, ast.Attribute) and t.attr == "apply_qkv" for t in node.targets)
    ]
    fused = [s for s in stores if isinstance(s.value, ast.Name) and s.value.id == "apply_lora_qkv"]
    if len(fused) != 1 or len(stores) != 1:
        raise GateLayoutError(
            f"expected one `self_attn.apply_qkv = apply_lora_qkv` in patch_peft_model, found {len(fused)} "
            f"(and {len(stores)} assignments to apply_qkv)"
        )
    enclosing: list[ast.If] = []
    node: ast.AST = fused[0]
    while node in parents:
        parent = parents[node]
        if isinstance(parent, ast.If):
            if node not in parent.body:
                raise GateLayoutError("apply_lora_qkv is installed in an else branch")
            enclosing.append(parent)
        node = parent
    if not enclosing:
        raise GateLayoutError("apply_lora_qkv is installed without a condition")
    layer_test, outer = enclosing[0].test, tuple(test.test for test in reversed(enclosing[1:]))
    clauses = _clauses(layer_test)
    kept = [c for c in clauses if not _is_bias_clause(c)]
    layer = None if not kept else kept[0] if len(kept) == 1 else ast.BoolOp(op=ast.And(), values=kept)

    for clause in kept:  # a bias test of another form: it cannot be left out safely, nor ignored
        for node in ast.walk(clause):
            if (
                isinstance(node, ast.Attribute)
                and node.attr == "bias"
                and _loaded_names(node) & _LAYER_LOCALS
            ):
                raise GateLayoutError(f"the per-layer gate tests the bias as `{ast.unparse(clause)}`")
    known = set(namespace) | set(dir(builtins))
    unknown = ({n for c in kept for n in _loaded_names(c)} - known) - _LAYER_LOCALS
    if unknown:
        raise GateLayoutError(f"the per-layer gate reads {sorted(unknown)}, which this shim does not supply")
    outer_names = {n for test in outer for n in _loaded_names(test)} - known
    unknown = outer_names - _GIVEN_LOCALS - _ASSIGNED_LOCALS
    if unknown:
        raise GateLayoutError(f"the gate around the layer loop reads {sorted(unknown)}, unknown to this shim")
    assigned = {}
    for name in sorted(outer_names & _ASSIGNED_LOCALS):
        values = [
            n.value
            for n in ast.walk(definition)
            if isinstance(n, ast.Assign)
            and len(n.targets) == 1
            and isinstance(n.targets[0], ast.Name)
            and n.targets[0].id == name
        ]
        if len(values) != 1:
            raise GateLayoutError(
                f"`{name}` is assigned {len(values)} times in patch_peft_model, expected once"
            )
        reads = _loaded_names(values[0]) - known - {"model"}
        if reads:
            raise GateLayoutError(f"`{name}` is computed from {sorted(reads)}, unknown to this shim")
        assigned[name] = values[0]
    return StockQkvGate(
        namespace=namespace,
        outer=outer,
        layer=layer,
        bias_clauses=len(clauses) - len(kept),
        assigned=assigned,
    )


@functools.lru_cache(maxsize=8)
def _stock_gate(function: Callable[..., Any]) -> StockQkvGate:
    return read_stock_gate(function)


# -- the per-layer function ------------------------------------------------------------------

#: Unsloth's kernel entry points, resolved once (install, or the first call): the function must
#: not look modules up while torch.compile traces it (Unsloth 2026.x compiles each decoder layer).
_UPSTREAM: dict[str, Any] = {}

#: LoRA_QKV.forward's leading parameters, the same in every release this patch knows.
KERNEL_PARAMETERS = (
    "ctx", "X",
    "QW", "QW_quant", "QA", "QB", "QS",
    "KW", "KW_quant", "KA", "KB", "KS",
    "VW", "VW_quant", "VA", "VB", "VS",
    "inplace",
)  # fmt: skip


def _resolve_upstream() -> dict[str, Any]:
    """``LoRA_QKV``, the ``get_lora_parameters`` that stock ``apply_lora_qkv`` uses, and how
    that release applies the Function (2026.x: ``_apply``, Dynamo-disabled before torch 2.11)."""
    if not _UPSTREAM:
        apply_lora_qkv = inspect.unwrap(_llama().apply_lora_qkv)
        namespace = apply_lora_qkv.__globals__
        kernel = namespace["LoRA_QKV"]
        run = namespace.get("_apply")
        _UPSTREAM.update(
            get_lora_parameters=namespace["get_lora_parameters"],
            run=(lambda *args: run(kernel, *args)) if callable(run) else kernel.apply,
        )
    return _UPSTREAM


_FAKE_QUANTIZERS = ("activation_fake_quantizer", "weight_fake_quantizer")


def _llama() -> ModuleType:
    return sys.modules["unsloth.models.llama"]


def _plain_lora(proj: Any) -> bool:
    """The state in which every Unsloth release's ``apply_lora_qkv`` runs its kernel with no
    extras: one active, enabled, unmerged adapter with no LoRA variant (DoRA, ...), no dropout
    (or dropout off), no lora_B bias, a frozen base weight and no fake quantization. Anything
    else takes PEFT's own forward (stock's path for Qwen2 anyway)."""
    import torch

    adapters = proj.active_adapters
    if len(adapters) != 1 or proj.disable_adapters or proj.merged:
        return False
    adapter = adapters[0]
    if adapter not in proj.lora_A or adapter in (getattr(proj, "lora_variant", None) or {}):
        return False
    if (getattr(proj, "use_dora", None) or {}).get(adapter) or len(
        getattr(proj, "lora_magnitude_vector", ()) or ()
    ):
        return False
    base = getattr(proj, "base_layer", proj)
    weight = getattr(base, "weight", None)  # None: a packed (GPTQ / AWQ) base the kernel cannot read
    if weight is None or weight.requires_grad or proj.lora_B[adapter].bias is not None:
        return False
    dropout = proj.lora_dropout[adapter]
    if not (isinstance(dropout, torch.nn.Identity) or not dropout.training or getattr(dropout, "p", 1) == 0):
        return False
    for module in (base, proj.lora_A[adapter], proj.lora_B[adapter]):
        if any(getattr(module, name, None) is not None for name in _FAKE_QUANTIZERS):
            return False
        if "FakeQuantized" in type(module).__name__:  # torchao's NVFP4 / MX QAT linears
            return False
    return True


def _autocast_changes_dtype(X: Any) -> bool:
    """Autocast to another dtype than X's: the kernel's in-place accumulation would mix them."""
    import torch

    device = "cuda" if X.is_cuda else X.device.type
    try:
        return torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) != X.dtype
    except (AttributeError, RuntimeError, TypeError):  # an older torch or an unknown device type
        return torch.is_autocast_enabled()


def _plus_base_bias(output: Any, proj: Any) -> Any:
    bias = getattr(getattr(proj, "base_layer", proj), "bias", None)
    if bias is None:
        return output
    # Out of place: the kernel's outputs may be views, and a bias that requires grad gets one.
    return output + bias.to(output.dtype)


def apply_lora_qkv_with_bias(self: Any, X: Any, inplace: bool = True) -> tuple[Any, Any, Any]:
    """Unsloth's fused LoRA QKV kernel (``LoRA_QKV``) plus the q/k/v base biases.

    Installed as ``self_attn.apply_qkv`` on Qwen2 layers by unsloth_qwen_compat (patch
    ``qwen2_fused_qkv_bias``), where stock Unsloth leaves them on PEFT's forward. Outside
    the plain-LoRA state (see ``_plain_lora``) it runs PEFT's forward, as stock does.
    """
    projections = (self.q_proj, self.k_proj, self.v_proj)
    if _autocast_changes_dtype(X) or not all(_plain_lora(proj) for proj in projections):
        return self.q_proj(X), self.k_proj(X), self.v_proj(X)  # Unsloth's original_apply_qkv
    upstream = _UPSTREAM or _resolve_upstream()
    parameters = [value for proj in projections for value in upstream["get_lora_parameters"](proj)]
    Q, K, V = upstream["run"](X, *parameters, inplace)
    return _plus_base_bias(Q, self.q_proj), _plus_base_bias(K, self.k_proj), _plus_base_bias(V, self.v_proj)


setattr(apply_lora_qkv_with_bias, _SHIM_OWNED, _PATCH_NAME)


# -- choosing the layers ---------------------------------------------------------------------


def _decoder_layers(model: Any) -> list[Any]:
    inner = getattr(getattr(model, "model", None), "model", None)
    layers = getattr(inner, "layers", None)
    return [] if layers is None else list(layers)


@functools.lru_cache(maxsize=32)
def _forward_calls_apply_qkv(forward: Any) -> bool:
    return code_mentions(forward, names=("apply_qkv",)) or code_mentions(forward, text=("apply_qkv",))


def _has_base_bias(attention: Any) -> bool:
    return any(
        getattr(getattr(getattr(attention, n), "base_layer", getattr(attention, n)), "bias", None) is not None
        for n in _PROJECTIONS
    )


def layers_to_fuse(model: Any, gate: StockQkvGate, llama: ModuleType) -> tuple[list[Any], str]:
    """(attention modules to give :func:`apply_lora_qkv_with_bias`, why none when empty).

    A layer qualifies when the model is a Qwen2, stock's gate passes with its bias clauses
    left out, at least one of q/k/v has a bias, stock left the layer on ``original_apply_qkv``
    and the layer's attention forward is one of Unsloth's that calls ``self.apply_qkv``.
    """
    layers = _decoder_layers(model)
    if not layers:
        return [], "no decoder layers at model.model.model.layers"
    if not gate.model_open(model):
        return [], "stock fuses no LoRA kernel for this model either (dropout, LoRA bias, fp32 base or FSDP)"
    original = llama.original_apply_qkv
    chosen = []
    for layer in layers:
        attention = getattr(layer, "self_attn", None)
        if attention is None or not all(hasattr(attention, n) for n in _PROJECTIONS):
            continue
        if getattr(attention, "apply_qkv", original) is not original:
            continue  # stock (or someone else) already installed a projection function
        if not _forward_calls_apply_qkv(getattr(type(attention), "forward", None)):
            continue  # not Unsloth's attention forward: apply_qkv would never be called
        if _has_base_bias(attention) and gate.layer_open(attention):
            chosen.append(attention)
    return (
        chosen,
        "" if chosen else "no layer passes stock's per-layer conditions (LoRA on q/k/v, no DoRA, ...)",
    )


def _fusing_biased_qkv(
    patch_peft_model: Callable[..., Any], gate: StockQkvGate, report: Callable[[int, int, str], None]
) -> Callable[..., Any]:
    @functools.wraps(patch_peft_model)
    def wrapper(model: Any, *args: Any, **kwargs: Any) -> Any:
        model = patch_peft_model(model, *args, **kwargs)
        if getattr(getattr(model, "config", None), "model_type", None) != "qwen2":
            return model
        llama = _llama()
        try:
            chosen, why = layers_to_fuse(model, gate, llama)
        except Exception as exc:  # a speed patch must never break training: stock stays as is
            logger.warning(
                "unsloth_qwen_compat: qwen2_fused_qkv_bias could not inspect the model (%s: %s); "
                "q/k/v stay on PEFT's forward",
                type(exc).__name__,
                exc,
            )
            return model
        for attention in chosen:
            attention.apply_qkv = apply_lora_qkv_with_bias
        leaf_modules = getattr(llama, "set_deepspeed_fused_lora_leaf_modules", None)
        if chosen and callable(leaf_modules):  # 2026.x: ZeRO-3 must treat fused layers as leaves
            chosen_ids = {id(a) for a in chosen}
            leaf_modules([layer for layer in _decoder_layers(model) if id(layer.self_attn) in chosen_ids])
        report(len(chosen), len(_decoder_layers(model)), why)
        return model

    setattr(wrapper, _SHIM_OWNED, _PATCH_NAME)
    return wrapper


def _shim_fused(model: Any) -> list[Any]:
    if model is None:
        return []
    return [m for m in model.modules() if getattr(m, "apply_qkv", None) is apply_lora_qkv_with_bias]


def _counting_shim_layers(fused_lora_modules: Callable[..., Any]) -> Callable[..., Any]:
    """``_fused_lora_modules`` (FSDP2's gate) that also lists the layers fused here."""

    @functools.wraps(fused_lora_modules)
    def wrapper(model: Any, *args: Any, **kwargs: Any) -> list[Any]:
        found = list(fused_lora_modules(model, *args, **kwargs))
        seen = {id(m) for m in found}
        return found + [m for m in _shim_fused(model) if id(m) not in seen]

    setattr(wrapper, _SHIM_OWNED, True)
    return wrapper


def _declining_shim_layers_too(decline: Callable[..., Any]) -> Callable[..., Any]:
    """``_decline_fused_lora_for_fsdp`` that also puts PEFT's forward back on layers fused here."""

    @functools.wraps(decline)
    def wrapper(model: Any, *args: Any, **kwargs: Any) -> int:
        declined = decline(model, *args, **kwargs)
        # Upstream's own override keeps every fused kernel; honour it for these layers too.
        if unsloth_switch("UNSLOTH_FORCE_FUSED_LORA"):
            return declined
        ours = _shim_fused(model)
        original = decline.__globals__["original_apply_qkv"]
        for module in ours:
            module.apply_qkv = original
        if ours:
            logger.warning(
                "unsloth_qwen_compat: FSDP declines fused LoRA kernels, so %d Qwen2 q/k/v projections fused "
                "by apply_lora_qkv_with_bias were switched back to PEFT's forward too",
                len(ours),
            )
        return declined + len(ours)

    setattr(wrapper, _SHIM_OWNED, True)
    return wrapper


def _kernel_layout_problem(llama: ModuleType) -> str:
    """Why this release's fused QKV kernel cannot be called as the per-layer function does ("" if it can)."""
    apply_lora_qkv = inspect.unwrap(llama.apply_lora_qkv)
    if not code_mentions(apply_lora_qkv, names=("LoRA_QKV", "get_lora_parameters")):
        return "apply_lora_qkv no longer calls get_lora_parameters and the LoRA_QKV autograd Function"
    kernel = apply_lora_qkv.__globals__.get("LoRA_QKV")
    forward = getattr(kernel, "forward", None)
    try:
        leading = tuple(inspect.signature(forward).parameters)[: len(KERNEL_PARAMETERS)]
    except (TypeError, ValueError):
        leading = ()
    if leading != KERNEL_PARAMETERS:
        return f"LoRA_QKV.forward no longer takes ({', '.join(KERNEL_PARAMETERS)}, ...)"
    return ""


def _calls(function: Any, name: str) -> bool:
    return code_mentions(function, names=(name,)) or code_mentions(function, text=(name,))


def _missing(llama: ModuleType, names: Iterable[str]) -> list[str]:
    return [n for n in names if n not in vars(llama)]


#: fp32 on a CPU, PEFT's forward vs the fused kernel: rounding is ~1e-7; a dropped bias is ~1.
_BIAS_CHECK_TOLERANCE = 1e-4


def fused_qkv_bias_error(apply_lora_qkv: Callable[..., Any]) -> float:
    """Largest relative difference between ``apply_lora_qkv`` and PEFT's own q/k/v forward on a
    tiny stand-in attention whose q/k/v carry a bias and a LoRA adapter with a non-zero B: the
    same numbers when the fused path adds the biases, off by the bias when not. fp32 on the CPU
    also on a GPU machine: the kernel's math is device-agnostic (torch matmuls), and there no
    TF32 setting of the process can blur the comparison."""
    import torch
    from peft import LoraConfig, inject_adapter_in_model

    class StandInAttention(torch.nn.Module):  # what apply_lora_qkv reads: q_proj, k_proj, v_proj
        def __init__(self) -> None:
            super().__init__()
            self.q_proj = torch.nn.Linear(32, 32, bias=True)
            self.k_proj = torch.nn.Linear(32, 16, bias=True)
            self.v_proj = torch.nn.Linear(32, 16, bias=True)

    with torch.random.fork_rng(devices=[]):  # the caller's generator must not move
        torch.manual_seed(0)
        attention = inject_adapter_in_model(
            LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(_PROJECTIONS)),
            StandInAttention(),
        )
        for name, parameter in attention.named_parameters():
            parameter.requires_grad_("lora_" in name)
            if "lora_B" in name:
                torch.nn.init.normal_(parameter, std=0.1)  # PEFT starts B at zero
        X = torch.randn(2, 5, 32)
    with torch.no_grad():
        fused = apply_lora_qkv(attention, X.clone())
        reference = (attention.q_proj(X), attention.k_proj(X), attention.v_proj(X))
    return max(float((a - b).norm() / b.norm()) for a, b in zip(fused, reference))


class Qwen2FusedQkvBias(Patch):
    name = "qwen2_fused_qkv_bias"
    summary = "fused LoRA QKV kernel for Qwen2's biased q/k/v (speed)"
    unsloth_module = "unsloth.models.llama"
    speed_only = True
    # On by default: it was opt-in until its conformance cases (test_fused_qkv) passed with it
    # on against HF on the measured legs (2026.10, 2025.10, 2025.3, latest; CONFORMANCE.md), its
    # speed in BENCHMARKS.md. UNSLOTH_QWEN_COMPAT_FUSED_QKV_BIAS=0 (or
    # false / no / off) keeps stock's PEFT path for q/k/v.
    off_env = "UNSLOTH_QWEN_COMPAT_FUSED_QKV_BIAS"
    conformance_cases = ("test_fused_qkv",)
    reproduction = """\
import torch
from unsloth import FastLanguageModel
from unsloth.kernels.fast_lora import apply_lora_qkv
model, _ = FastLanguageModel.from_pretrained("Qwen/Qwen2.5-0.5B", max_seq_length=2048,
                                             dtype=torch.bfloat16, load_in_4bit=False)
model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16, lora_dropout=0, bias="none",
                                         target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                         "gate_proj", "up_proj", "down_proj"])
layers = model.base_model.model.model.layers
print(sum(getattr(l.self_attn, "apply_qkv", None) is apply_lora_qkv for l in layers), "of", len(layers))
# 0 of 24, while Unsloth logs "patched 24 layers with 24 QKV layers": q/k/v have a bias, so
# patch_peft_model leaves them on PEFT's forward. Qwen/Qwen3-0.6B (no bias) prints 28 of 28.
"""

    def __init__(self) -> None:
        #: (layers fused, decoder layers) by the last patch_peft_model call through the shim.
        self.last_fused: tuple[int, int] | None = None

    def probe(self, llama: ModuleType, env: Environment) -> ProbeResult:
        patch_peft_model = getattr(getattr(llama, "FastLlamaModel", None), "patch_peft_model", None)
        if patch_peft_model is None:
            return unsupported("FastLlamaModel.patch_peft_model not found: layout changed upstream")
        if getattr(patch_peft_model, _SHIM_OWNED, None) == _PATCH_NAME:
            return needed("already patched in this process")
        # Other patches (qwen3_registration) may wrap it too: the gate is in stock's own code.
        stock = inspect.unwrap(patch_peft_model)
        missing = _missing(llama, ("apply_lora_qkv", "original_apply_qkv", "LlamaAttention_fast_forward"))
        if missing:
            return unsupported(f"unsloth.models.llama has no {', '.join(missing)}: layout changed upstream")
        why = _kernel_layout_problem(llama)
        if why:
            return unsupported(why)
        if not _calls(llama.LlamaAttention_fast_forward, "apply_qkv"):
            return unsupported("LlamaAttention_fast_forward no longer projects q/k/v through self.apply_qkv")
        try:
            qwen2 = import_unsloth(env, "unsloth.models.qwen2")
        except Unavailable as why:
            return why.result
        pre_patch = getattr(getattr(qwen2, "FastQwen2Model", None), "pre_patch", None)
        if pre_patch is None or not code_mentions(pre_patch, names=("LlamaAttention_fast_forward",)):
            return unsupported("Qwen2 attention no longer runs Unsloth's LlamaAttention_fast_forward")
        # Stock's gate itself, read from its source (about 15 ms on a CPU, once per process).
        try:
            gate = _stock_gate(stock)
        except (GateLayoutError, SyntaxError) as exc:
            return unsupported(f"cannot mirror patch_peft_model's fused-QKV gate: {exc}")
        if gate.bias_clauses:
            return needed("fused LoRA QKV is gated on q/k/v having no bias, so Qwen2 never gets it")
        # Upstream fuses biased q/k/v: its apply_lora_qkv must add the biases. Run it and see.
        try:
            error = fused_qkv_bias_error(llama.apply_lora_qkv)
        except Exception as exc:  # the stand-in does not fit this release: the gate is all we know
            return native(
                "the fused LoRA QKV path no longer requires bias-free q/k/v "
                f"(apply_lora_qkv not run on biased q/k/v here: {type(exc).__name__}: {exc})"
            )
        if error > _BIAS_CHECK_TOLERANCE:
            return needed(
                "patch_peft_model fuses biased q/k/v, but apply_lora_qkv's outputs differ from PEFT's "
                f"by {error:.3g} (relative) on biased q/k/v: the biases are dropped",
                fixable=False,
            )
        return native("patch_peft_model fuses biased q/k/v and apply_lora_qkv adds their biases")

    def install(self, swaps: AttributeSwaps, llama: ModuleType, env: Environment) -> None:
        if getattr(llama.FastLlamaModel.patch_peft_model, _SHIM_OWNED, None) == _PATCH_NAME:
            return
        # GateLayoutError: the Shim records a failed apply.
        gate = _stock_gate(inspect.unwrap(llama.FastLlamaModel.patch_peft_model))
        _resolve_upstream()
        swaps.wrap_staticmethod(
            llama.FastLlamaModel, "patch_peft_model", lambda f: _fusing_biased_qkv(f, gate, self._report)
        )
        # 2026.x keeps a registry of fused layers for FSDP: make it see these too.
        if "_fused_lora_modules" in vars(llama):
            swaps.set_attr(llama, "_fused_lora_modules", _counting_shim_layers(llama._fused_lora_modules))
        if "_decline_fused_lora_for_fsdp" in vars(llama):
            swaps.set_attr(
                llama,
                "_decline_fused_lora_for_fsdp",
                _declining_shim_layers_too(llama._decline_fused_lora_for_fsdp),
            )

    def _report(self, fused: int, total: int, why: str) -> None:
        self.last_fused = (fused, total)
        text = f"apply_lora_qkv_with_bias fused {fused} of {total} Qwen2 layers (last patch_peft_model)"
        if why:
            text += f": {why}"
        logger.warning("unsloth_qwen_compat: %s", text)
        package = sys.modules.get("unsloth_qwen_compat")
        live = getattr(package, "shim", None)
        try:
            shim = live() if callable(live) else None
        except Exception:  # the package is still importing
            shim = None
        if shim is None or shim.patches.get(self.name) is not self:
            return
        entry = shim.ledger.get(self.name)
        if entry is not None and entry.action is Action.APPLIED:
            entry.detail = entry.detail.split("; ")[0] + "; " + text
