"""Every bound the suite asserts, one table per dtype, and the one helper that checks them.

Errors are relative: ||candidate - reference|| / ||reference||, in float64 (``rel_error``).
Counts (mismatched tokens or characters) are bounded by 0: those must match exactly.

The reference is Hugging Face transformers with eager attention on the same device and
weights. In fp32 it is the truth and the bounds are fixed (BOUNDS["fp32"]). In bf16 / fp16
(and NF4) the truth is HF in fp32 on the same rounded (dequantized) weights, and each bound
is ROUNDING_K x the error of HF itself in that precision (the peer) + a floor: an
implementation that is right differs from the truth only by rounding, as the peer does; the
bugs the suite exists to catch sit far above it:
YaRN replaced by linear scaling is rel ~0.5, a RoPE scaling ignored is ~0.04-0.56, a LoRA
scale or a missing q/k norm is O(1).
"""

from __future__ import annotations

import math

import torch

from conformance import versions

#: Counts that must be 0 whatever the dtype: a mismatch there is a bug, not rounding.
EXACT_COUNTS: dict[str, float] = {
    # Greedy tokens and chat templates are compared exactly (see MIN_GREEDY_MARGIN for why
    # exact token equality is fair).
    "generate_mismatch": 0,
    "chat_mismatch": 0,
    # A target_modules typo accepted; a Qwen2/Qwen3 model loaded on Unsloth's generic path.
    "typo_accepted": 0,
    "generic_path": 0,
    # LoRA trains adapters only: any gradient on a base weight is a bug.
    "base_weight_grads": 0,
    # Layers whose q/k/v stay on PEFT's forward while stock fused the rest of the layer
    # (test_fused_qkv.py). Stock Unsloth on Qwen2 measures all of them.
    "unfused_qkv_layers": 0,
}

BOUNDS: dict[str, dict[str, float]] = {
    "fp32": {
        # Fixed bounds: the reference is HF fp32 itself. Measured maxima over every passing
        # fp32 case the suite recorded on an H200 before these bounds (`git show 93ac450:CONFORMANCE.md`):
        # logits 1.75e-6, LoRA loss 1.3e-7, LoRA gradients 2.9e-6, HF reload 1.1e-6. Each
        # bound is ~5-10x that, and 3+ decades below the defects the suite exists to catch
        # (a 1% RoPE base change: 0.05; YaRN as linear: 0.5; a wrong LoRA scale: O(1)).
        "logits_rel": 1e-5,
        # The same logits restricted to positions past original_max_position_embeddings,
        # where RoPE scaling acts; same arithmetic, same bound.
        "rope_logits_rel": 1e-5,
        # The RoPE grid (test_rope_grid.py): worst right cell measured 1.8e-6.
        "rope_grid_logits_rel": 1e-5,
        # A mean over 600 token losses: errors average out, so it is tighter than logits.
        "lora_loss_rel": 1e-6,
        # Max over every lora_A/lora_B gradient tensor (small r=8 tensors, backward kernels,
        # gradient checkpointing recomputation): measured 2.9e-6.
        "lora_grad_rel": 3e-5,
        # Logits after saving and reloading an adapter (the tensors round-trip exactly).
        "adapter_logits_rel": 1e-5,
        # Teacher-forced decoding, one row and step at a time: worst of 6,824 steps per run on leg
        # 2026.10 (H200, shim and stock) 1.66e-6; the defects it exists for are >= 1e-2.
        "decode_logits_rel": 1e-5,
        **EXACT_COUNTS,
    },
    # Reduced precision: every comparison with HF carries HF's own error in that dtype (the
    # peer) and is bounded by ROUNDING_K x peer + ROUNDING_FLOOR (below); these fixed rows
    # remain only for comparisons of the candidate with itself.
    "bf16": {
        # The candidate reloading its own adapter: the same kernels on the same weights, so
        # bit-identical but for the adapter's storage dtype (measured 0).
        "adapter_logits_rel": 2e-3,
        # The fused QKV kernel vs Unsloth's PEFT path on the same bf16 / NF4 model
        # (test_fused_qkv_vs_peft_path); the HF comparison of the same kernel has a rounding
        # bound (test_fused_qkv_vs_hf_reduced). Both paths round in bf16 at different points.
        "lora_loss_rel": 1e-2,
        "lora_grad_rel": 2e-1,
        **EXACT_COUNTS,
    },
    "fp16": {
        "adapter_logits_rel": 1e-3,
        "lora_loss_rel": 5e-3,
        "lora_grad_rel": 1e-1,
        **EXACT_COUNTS,
    },
    "nf4": {
        # NF4 parity with HF has a rounding bound (nf4_vs_hf_nf4, against fp32 on the
        # dequantized weights). The quantization error itself (4-bit vs bf16 logits) is a note:
        # it depends on the model (0.33-0.81 on the zoo), not on whether the 4-bit path is right.
        # The set of quantized Linear modules must be the same as the reference's (same
        # skip list: lm_head and MoE routers stay 16-bit).
        "quantized_modules_mismatch": 0,
    },
}

#: Greedy decoding is compared token by token only while the reference's top-1 / top-2
#: logit gap exceeds this, so a legitimate rounding difference cannot flip a near-tie.
#: The oracle picks prompts whose greedy path clears it; the steps after the first one
#: that does not (if any) are not compared, and the report says how many were.
#: For Qwen3-MoE the same margin applies to the router's top-k gap of every token a step
#: depends on (a rounding-flipped expert choice changes a token's output by O(1)).
#: fp32: ~1000x the expected absolute logit error (1e-6 rel of logits ~1-3): every step
#: is compared. bf16 / fp16: ~5x (1% / 0.2% of ~3): fewer steps qualify, MoE ones hardly
#: any, so reduced-precision generation is a weaker check (run fp32 where Unsloth allows).
MIN_GREEDY_MARGIN = {"fp32": 1e-3, "bf16": 0.15, "fp16": 0.05}


def rel_error(candidate: torch.Tensor, reference: torch.Tensor) -> float:
    """||candidate - reference|| / ||reference||, computed in float64 on the CPU."""
    cand = candidate.detach().to("cpu", torch.float64)
    ref = reference.detach().to("cpu", torch.float64)
    if cand.shape != ref.shape:
        raise AssertionError(f"shape mismatch: candidate {tuple(cand.shape)} vs reference {tuple(ref.shape)}")
    denominator = torch.linalg.vector_norm(ref).item()
    numerator = torch.linalg.vector_norm(cand - ref).item()
    if denominator == 0.0:
        return 0.0 if numerator == 0.0 else math.inf
    return numerator / denominator


#: Reduced precision (bf16 / fp16, NF4): the truth is Hugging Face in fp32 on the same
#: (rounded or dequantized) weights, the peer is Hugging Face run in the candidate's dtype.
#: A candidate's error against the truth may be at most ROUNDING_K x the peer's error against
#: the same truth, plus a floor for a peer that happens to round luckily. Kernel libraries
#: test the same way (flash-attention: 2x the error of the same-dtype PyTorch reference).
#: CONFORMANCE.md shows, per case, the candidate's error beside its peer's, and the
#: mutation table shows what the bound lets through and what it does not.
ROUNDING_K = 2.5
#: Per metric, the floor: ~the bf16 unit roundoff (2^-9) for a single quantity, and below the
#: smallest defect that metric exists to see (stock 2025.3's non-causal attention moved a
#: LoRA loss by 4.9e-3: the loss floor is 10x under it).
ROUNDING_FLOOR: dict[str, float] = {
    "logits_rel": 2e-3,
    "rope_logits_rel": 2e-3,
    "rope_grid_logits_rel": 2e-3,
    "decode_logits_rel": 2e-3,
    "adapter_logits_rel": 2e-3,
    "nf4_vs_hf_nf4_rel": 2e-3,
    "lora_loss_rel": 5e-4,
    "lora_grad_rel": 2e-3,
}


def rounding_bound(peer_error: float, metric: str = "logits_rel") -> float:
    return ROUNDING_K * peer_error + ROUNDING_FLOOR[metric]


def against_truth(reference: dict, key: str, candidate: torch.Tensor) -> tuple[float, float | None]:
    """(candidate error, peer error) for tensor ``key`` of an oracle result.

    Where the oracle computed a truth (``reference["truth"]``: fp32 on the same weights, for
    a reference run in reduced precision), both errors are against it and the second is HF's
    own in the reference's dtype; otherwise (fp32) the error is against the reference and the
    peer is None (a fixed bound applies).
    """
    truth = reference.get("truth")
    if truth is None:
        return rel_error(candidate, reference[key]), None
    return rel_error(candidate, truth[key]), rel_error(reference[key], truth[key])


def scalar_against_truth(reference: dict, key: str, candidate: float) -> tuple[float, float | None]:
    """against_truth for a scalar (a loss): |candidate - truth| / |truth|."""
    truth = reference.get("truth")
    target = reference[key] if truth is None else truth[key]
    measured = abs(candidate - target) / abs(target)
    return measured, (None if truth is None else abs(reference[key] - target) / abs(target))


def worst_against_truth(
    reference: dict, key: str, candidates: dict[str, torch.Tensor], name=lambda k: k
) -> tuple[str, float, float | None]:
    """Over a dict of tensors (LoRA gradients): the entry whose error is largest relative to
    its own bound, as (name, candidate error, peer error)."""
    truth = reference.get("truth")
    rows = []
    for k, expected in reference[key].items():
        c = candidates[name(k)]
        if truth is None:
            rows.append((k, rel_error(c, expected), None))
        else:
            rows.append((k, rel_error(c, truth[key][k]), rel_error(expected, truth[key][k])))
    return max(rows, key=lambda r: r[1] / (1.0 if r[2] is None else rounding_bound(r[2], "lora_grad_rel")))


def bound_for(dtype: str, metric: str) -> float:
    return BOUNDS[dtype][metric]


def check(record, measurements: list[tuple[str, str, float]], dtype: str, detail: str = "") -> None:
    """Record each ``(label, metric, measured[, peer])`` against its bound, then assert all.

    Without ``peer`` (or with None) the bound is the table's; with the peer's error (HF in the
    same reduced precision, against the same fp32 truth) it is ``rounding_bound(peer)``.

    ``label`` names the quantity in the report (e.g. ``cached_vs_hf``), ``metric`` picks the
    bound from the table. ``record`` is the per-test recorder fixture (conftest.py). Every
    assertion of the suite goes through here, so the report has every number (all are
    recorded before the first failure is raised) and every failure says the same things.
    """
    failures = []
    for label, metric, measured, *peer in measurements:
        peer = peer[0] if peer else None
        if peer is None:
            bound, how = bound_for(dtype, metric), metric
        else:
            bound = rounding_bound(peer, metric)
            how = f"{ROUNDING_K} x HF-{dtype}'s own error {peer:.3g} + {ROUNDING_FLOOR[metric]:g}"
        ok = measured <= bound and not math.isnan(measured)
        if peer is None:
            record(label, measured, bound, dtype, ok)
        else:
            record(label, measured, bound, dtype, ok, peer=peer)
        if not ok:
            failures.append(f"{label} = {measured:.3g} exceeds bound {bound:.3g} ({how}, dtype {dtype})")
    if failures:
        raise AssertionError(
            "; ".join(failures) + (f"\n  {detail}" if detail else "") + f"\n  versions: {versions.one_line()}"
        )
