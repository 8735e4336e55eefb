"""Every bound the suite asserts, one table per dtype, and the one helper that checks them.

Errors are relative: ||candidate - reference|| / ||reference||, in float64 (``rel_error``).
Counts (mismatched tokens or characters) are bounded by 0: those must match exactly.

The reference is Hugging Face transformers with eager attention, run in the same dtype on
the same device, on the same weights. An implementation that is right differs from it only
by floating-point summation order (fused kernels, SDPA/flash attention vs eager), which
sets the floor of each bound; the bugs the suite exists to catch sit far above it:
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
        # Correct fp32 runs measure ~1e-6 (unit roundoff 6e-8, grown by 2 layers of different
        # summation order over hidden 256 and 900 keys). 1e-4 leaves two decades of headroom
        # for other kernels and GPUs and is still 3.5 decades below the YaRN bug (0.5).
        "logits_rel": 1e-4,
        # The same logits restricted to positions past original_max_position_embeddings,
        # where RoPE scaling acts; same arithmetic, same bound.
        "rope_logits_rel": 1e-4,
        # The RoPE grid (test_rope_grid.py): the README's contract bound. Right cells measure
        # ~1e-6; a RoPE defect is >= 1e-2 (a 1% base change measured 0.05).
        "rope_grid_logits_rel": 1e-5,
        # A mean over 600 token losses: errors average out, so it is tighter than logits.
        "lora_loss_rel": 1e-5,
        # Max over every lora_A/lora_B gradient tensor. Gradients go through the backward
        # kernels and gradient checkpointing recomputation; small tensors (r=8 rows) have
        # fewer terms to average, so 10x the logits bound. A wrong LoRA scale or a dropped
        # adapter path is O(1).
        "lora_grad_rel": 1e-3,
        # Logits after saving and reloading an adapter: the adapter tensors round-trip
        # exactly, so this is the forward bound again.
        "adapter_logits_rel": 1e-4,
        **EXACT_COUNTS,
    },
    "bf16": {
        # bf16 unit roundoff is 2^-9 ~ 2e-3 per operation and both sides round at different
        # points (fused kernels vs eager): dense models measure ~1-1.5% on logits. Qwen3-MoE
        # measures ~4-7%: rounding flips the router's top-2 choice for some tokens, which
        # changes those tokens' outputs by O(1). 0.1 covers that and stays 5x below the YaRN
        # bug (0.5; 0.8-1.0 on this zoo).
        "logits_rel": 1e-1,
        "rope_logits_rel": 1e-1,
        # A mean over many tokens: an order tighter than a single logit (measured <= 2e-4).
        "lora_loss_rel": 1e-2,
        # bf16 gradients of tiny LoRA tensors are noisy (few terms, bf16 accumulation in the
        # base matmuls, MoE routing flips): measured 2-8%. 0.2 catches a wrong scale (100%)
        # without flaking on rounding.
        "lora_grad_rel": 2e-1,
        "adapter_logits_rel": 1e-1,
        **EXACT_COUNTS,
    },
    "fp16": {
        # fp16 has 3 more mantissa bits than bf16 (unit roundoff 2^-12 ~ 2.4e-4), so rounding
        # noise is ~8x smaller, but MoE routing flips still cost O(1) on a few tokens:
        # half the bf16 bounds.
        "logits_rel": 5e-2,
        "rope_logits_rel": 5e-2,
        "lora_loss_rel": 5e-3,
        "lora_grad_rel": 1e-1,
        "adapter_logits_rel": 5e-2,
        **EXACT_COUNTS,
    },
    "nf4": {
        # Both sides quantize the same bf16 weights with bitsandbytes NF4 (blocksize 64,
        # double quant), so the dequantized weights are bit-identical; what remains is bf16
        # compute order (and MoE routing flips): the bf16 logits bound.
        "nf4_vs_hf_nf4_rel": 1e-1,
        # Quantization error itself: NF4 on Gaussian weights has ~8-10% relative weight
        # error; on these 2-layer random models the logits moved 0.33-0.45 (H200, both
        # Unsloth and the zoo's dense and MoE models). 0.6 is a sanity bound: a wrong absmax
        # scale, codebook or transposed dequant gives >= 1.
        "nf4_vs_bf16_rel": 0.6,
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


#: Reduced precision: a candidate's error against the fp32 truth may be at most
#: ROUNDING_K x the error of HF itself run in that dtype (the peer), plus ROUNDING_FLOOR for a
#: peer that happens to round luckily. Kernel libraries test the same way (flash-attention: 2x).
ROUNDING_K = 2.5
ROUNDING_FLOOR = 2e-3


def rounding_bound(peer_error: float) -> float:
    return ROUNDING_K * peer_error + ROUNDING_FLOOR


def bound_for(dtype: str, metric: str) -> float:
    return BOUNDS[dtype][metric]


def check(record, measurements: list[tuple[str, str, float]], dtype: str, detail: str = "") -> None:
    """Record each ``(label, metric, measured)`` against the table's bound, then assert all.

    ``label`` names the quantity in the report (e.g. ``cached_vs_hf``), ``metric`` picks the
    bound from the table. ``record`` is the per-test recorder fixture (conftest.py). Every
    assertion of the suite goes through here, so the report has every number (all are
    recorded before the first failure is raised) and every failure says the same things.
    """
    failures = []
    for label, metric, measured in measurements:
        bound = bound_for(dtype, metric)
        ok = measured <= bound and not math.isnan(measured)
        record(label, measured, bound, dtype, ok)
        if not ok:
            failures.append(f"{label} = {measured:.3g} exceeds bound {bound:.3g} ({metric}, dtype {dtype})")
    if failures:
        raise AssertionError(
            "; ".join(failures) + (f"\n  {detail}" if detail else "") + f"\n  versions: {versions.one_line()}"
        )
