"""Teacher-forced KV-cache decoding: every step's logits vs HF, every row, any dtype.

The oracle decodes greedily in fp32 (the truth) on left-padded batches whose totals cross
32, 64, 128 and 256 tokens (plan.DECODE_BATCHES); the candidate's own ``generate`` (its KV
cache, position ids and padding masks) is forced along the same tokens (conformance/decode.py)
and the logits of each row at each step are compared with the truth's. Rounding cannot make
this comparison diverge the way free-running greedy tokens do, so it runs in bf16 as fully as
in fp32: bf16 / fp16 steps are bounded by 2.5x the error of HF itself decoding in that dtype
along the same tokens (the peer), step by step.
"""

import pytest
import torch

from conformance import candidate, decode, plan, tolerances, zoo

pytestmark = pytest.mark.generate


@pytest.mark.parametrize(
    "batch", range(len(plan.DECODE_BATCHES)), ids=lambda b: f"prompts{plan.DECODE_BATCHES[b]}"
)
@pytest.mark.parametrize("spec", zoo.ZOO, ids=str)
def test_teacher_forced_decode(spec, batch, settings, oracle, candidates, record):
    reference = oracle.get(plan.decode(spec, settings.dtype, settings.device, batch))
    part = reference["batches"][0]
    model, _ = candidates.get(spec, spec.max_position_embeddings, settings.dtype)
    candidate.inference_mode(model)
    n = part["new_tokens"].shape[1]
    _, logits = decode.decode(
        model, part["input_ids"], part["attention_mask"], n, reference["pad_id"], forced=part["new_tokens"]
    )
    truth = part.get("truth", part)["logits"]
    peer_logits = part["logits"] if "truth" in part else None
    # Qwen3-MoE: a token whose expert choice is a near tie in the truth (router top-k gap
    # under the dtype's decision margin) can route differently by rounding alone, which moves
    # its own step by O(1) and, through its cached keys/values, later steps a little. Those
    # steps are left out, and the rest are compared per row (all its steps at once) so one
    # flipped token among the cached ones does not decide a step alone. Dense: every step.
    moe = "router_gaps" in part
    keep = torch.ones(truth.shape[:2], dtype=torch.bool)
    if moe:
        keep = part["router_gaps"] >= tolerances.MIN_GREEDY_MARGIN[settings.dtype]
    errors = _errors(logits, truth, keep, per_row=moe)
    peer = None if peer_logits is None else _errors(peer_logits, truth, keep, per_row=moe)
    if peer is None:
        bounds = torch.full_like(errors, tolerances.bound_for(settings.dtype, "decode_logits_rel"))
    else:
        bounds = tolerances.ROUNDING_K * peer + tolerances.ROUNDING_FLOOR["decode_logits_rel"]
    ratio = torch.nan_to_num(errors / bounds, nan=0.0)
    worst = int(ratio.argmax())
    where = f"row {worst}" if moe else "row {} step {}".format(*divmod(worst, ratio.shape[1]))
    width = part["input_ids"].shape[1]
    over = int((ratio > 1).sum())
    record.note("compared_steps", int(keep.sum()))
    record.note("router_near_tie_steps", int((~keep).sum()))
    record.note("over_bound", over)
    tolerances.check(
        record,
        [
            (
                "worst_row_logits_rel" if moe else "worst_step_logits_rel",
                "decode_logits_rel",
                float(errors.flatten()[worst]),
                None if peer is None else float(peer.flatten()[worst]),
            )
        ],
        settings.dtype,
        detail=f"{spec}: prompts {plan.DECODE_BATCHES[batch]} left-padded to {width}, {n} forced steps "
        f"(totals {width + 1}..{width + n}); worst at {where}; {over} of {ratio.numel()} "
        f"{'rows' if moe else 'steps'} over their bound",
    )


def _errors(candidate_logits, truth, keep, per_row: bool) -> torch.Tensor:
    """Relative errors against the truth over the kept steps: rows x steps (dropped steps 0),
    or per row over all its kept steps at once."""
    diff = torch.linalg.vector_norm((candidate_logits - truth).double(), dim=-1) ** 2
    norm = torch.linalg.vector_norm(truth.double(), dim=-1) ** 2
    diff, norm = diff * keep, norm * keep
    if per_row:
        return (diff.sum(dim=1) / norm.sum(dim=1).clamp_min(1e-300)).sqrt()
    return (diff / norm.clamp_min(1e-300)).sqrt()
