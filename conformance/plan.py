"""The oracle requests each case family needs, as plain JSON-able dicts.

A request names the zoo model, dtype and device, and the inputs by seed and shape. Tests
and the session-wide batch (conftest.py) build requests with the same functions, so a
test's request is found in the cache the batch filled. The oracle (oracle.py) executes
them; this module imports neither Unsloth nor transformers.
"""

from __future__ import annotations

from conformance import chat_reference, tolerances, zoo, zoo_tokenizer
from conformance.zoo import ModelSpec

#: Long enough to reach past both original_max_position_embeddings (256) and
#: max_position_embeddings (320) of the YaRN models.
FORWARD_LEN = 900

LORA_RANK = 8
LORA_ALPHA = 16
LORA_BATCH, LORA_LEN = 2, 300
# PEFT's init_lora_weights=False leaves B random (kaiming, |B| up to 0.35): scaled down so
# the adapter perturbs the base model instead of drowning it, while staying non-zero
# (with B = 0 the lora_A gradients would be identically zero and prove nothing).
LORA_B_SCALE = 0.1
ATTENTION_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP_PROJECTIONS = ["gate_proj", "up_proj", "down_proj"]

GENERATE_NEW_TOKENS = 16
GENERATE_SINGLE_LEN = 37
GENERATE_BATCH_LENS = [23, 41, 12]  # different lengths, so left padding is exercised
GENERATE_ATTEMPTS = 40

#: Teacher-forced decoding (test_decode.py): left-padded batches whose totals (prompt width
#: + new tokens) cross 32, 64, 128 and 256 during decoding, where KV caches that grow in
#: blocks reallocate. Prompt widths stay under every zoo model's window (YaRN: 320).
DECODE_BATCHES = [[29, 14, 6, 3], [61, 40, 8]]
DECODE_NEW_TOKENS = [232, 70]  # 29 -> 261 and 61 -> 131 tokens

NF4_LEN = 256

ADAPTER_LEN = 128


#: Linear-attention (gated DeltaNet) projections of the hybrid families.
LINEAR_ATTENTION_PROJECTIONS = {
    "qwen3_5": ["in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj"],
    "qwen3_5_moe": ["in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj"],
    "qwen3_next": ["in_proj_qkvz", "in_proj_ba", "out_proj"],
}
#: The hybrid MoE families' shared expert, by path: bare MLP names would also make Unsloth's
#: MoE detection add the routed experts' fused parameters, which PEFT's target_modules do not.
SHARED_EXPERT_PROJECTIONS = [f"shared_expert.{name}" for name in MLP_PROJECTIONS]


def lora_targets(family: str) -> list[str]:
    """LoRA target modules: all 7 projections, except Qwen3-MoE on transformers 5.

    transformers 5 stores Qwen3-MoE experts as fused 3D parameters (experts.gate_up_proj,
    experts.down_proj), not nn.Linear modules, so target_modules cannot reach them (PEFT
    would need target_parameters, which Unsloth's LoRA path does not share). The router
    (mlp.gate) is never a LoRA target. Attention is what both sides support there. The hybrid
    families add their linear-attention projections and their dense or shared-expert MLP.
    """
    if family in LINEAR_ATTENTION_PROJECTIONS:  # hybrid: attention, linear attention, MLP
        mlp = MLP_PROJECTIONS if family == "qwen3_5" else SHARED_EXPERT_PROJECTIONS
        return ATTENTION_PROJECTIONS + LINEAR_ATTENTION_PROJECTIONS[family] + mlp
    if family == "qwen3_moe" and zoo.transformers_major() >= 5:
        return list(ATTENTION_PROJECTIONS)
    return ATTENTION_PROJECTIONS + MLP_PROJECTIONS


def _base(kind: str, spec: ModelSpec, dtype: str, device: str) -> dict:
    return {"kind": kind, "model": spec.name, "dtype": dtype, "device": device}


def forward(spec: ModelSpec, dtype: str, device: str, seq_len: int = FORWARD_LEN, seed: int = 0) -> dict:
    return {**_base("forward", spec, dtype, device), "seq_len": seq_len, "seed": seed}


def rope_forward(cell, dtype: str, device: str, rope: dict | None = None) -> dict:
    """Logits of ``max_seq_length`` tokens of a RoPE-grid cell, on the checkpoint's config or,
    given ``rope`` (scaling, theta, max_position_embeddings), on that RoPE."""
    request = forward(cell.spec, dtype, device, seq_len=cell.max_seq_length, seed=5)
    return {**request, "rope": rope} if rope else request


def rope_facts(cell, rope: dict | None) -> dict:
    return {**_base("rope_facts", cell.spec, "na", "cpu"), "seq_len": cell.max_seq_length, "rope": rope}


def lora(spec: ModelSpec, dtype: str, device: str) -> dict:
    return {
        **_base("lora", spec, dtype, device),
        "batch": LORA_BATCH,
        "seq_len": LORA_LEN,
        "seed": 1,
        "r": LORA_RANK,
        "alpha": LORA_ALPHA,
        "targets": lora_targets(spec.family),
        "b_scale": LORA_B_SCALE,
        "init_seed": 7,
    }


def generate(spec: ModelSpec, dtype: str, device: str) -> dict:
    return {
        **_base("generate", spec, dtype, device),
        "max_new_tokens": GENERATE_NEW_TOKENS,
        "single_len": GENERATE_SINGLE_LEN,
        "batch_lens": GENERATE_BATCH_LENS,
        "seed": 2,
        "attempts": GENERATE_ATTEMPTS,
        "min_margin": tolerances.MIN_GREEDY_MARGIN[dtype],
    }


def decode(spec: ModelSpec, dtype: str, device: str, batch: int) -> dict:
    """Teacher-forced decoding of one of DECODE_BATCHES (oracle.run_decode)."""
    return {
        **_base("decode", spec, dtype, device),
        "batches": [DECODE_BATCHES[batch]],
        "new_tokens": DECODE_NEW_TOKENS[batch],
        "seed": 6 + batch,
    }


def decodes(spec: ModelSpec, dtype: str, device: str) -> list[dict]:
    return [decode(spec, dtype, device, b) for b in range(len(DECODE_BATCHES))]


def chat(spec: ModelSpec) -> dict:
    # Tokenizer only: no device or dtype involved. What is rendered, and with which pinned
    # references, keys the cached result: a changed reference or conversation is rendered again.
    family = spec.tokenizer_family
    return {
        **_base("chat", spec, "na", "cpu"),
        "references": chat_reference.pinned_hashes(family),
        "conversations": chat_reference.CONVERSATIONS,
        "variants": chat_reference.variants(family),
    }


def nf4(spec: ModelSpec, skip_modules: list[str], packed_tensors: list[str] | None = None) -> list[dict]:
    """Reference for the 4-bit case: HF + bitsandbytes NF4 (bf16 compute), and plain bf16.

    ``packed_tensors``: parameters (``layers.N.<path>``) the candidate stores in NF4 beyond the
    Linear layers bitsandbytes' HF path quantizes (Unsloth's fused MoE expert stacks). The
    reference then NF4-rounds them too, so both compute with the same 4-bit weights."""
    quantization = {
        "quant_type": "nf4",
        "double_quant": True,
        "compute_dtype": "bf16",
        "skip_modules": sorted(skip_modules),
    }
    if packed_tensors:
        quantization["packed_tensors"] = sorted(packed_tensors)
    quantized = {
        **_base("forward", spec, "bf16", "cuda"),
        "seq_len": NF4_LEN,
        "seed": 3,
        "quantization": quantization,
    }
    return [quantized, forward(spec, "bf16", "cuda", seq_len=NF4_LEN, seed=3)]


def lora_reduced(spec: ModelSpec, base: str, device: str, skip_modules: list[str] | None) -> dict:
    """HF + PEFT LoRA on a bf16 or an NF4 base (``base``), trained under bf16 autocast as a
    Trainer with bf16=True runs it: loss and gradients, with the fp32 truth on the same
    rounded / dequantized weights (the reference for the fused QKV kernel in reduced precision)."""
    request = {**lora(spec, "bf16", device), "autocast": "bf16"}
    if base == "nf4":
        request["quantization"] = nf4(spec, skip_modules or [])[0]["quantization"]
    return request


def adapter_forward(spec: ModelSpec, dtype: str, device: str, adapter_dir: str, adapter_hash: str) -> dict:
    """HF + PeftModel.from_pretrained(adapter_dir) logits (adapter saved by the candidate)."""
    return {
        **forward(spec, dtype, device, seq_len=ADAPTER_LEN, seed=4),
        "adapter_dir": adapter_dir,
        "adapter_hash": adapter_hash,
    }


def for_family(
    family: str, spec: ModelSpec, dtype: str, device: str, nf4_skip: list[str] | None
) -> list[dict]:
    """The requests a case family can know before the candidate runs (batched per session)."""
    if family in ("forward", "rope"):
        return [forward(spec, dtype, device)]
    if family == "fused_qkv" and spec.family == "qwen2" and device == "cuda":
        bases = ["bf16", "nf4"] if nf4_skip is not None else ["bf16"]
        return [lora(spec, dtype, device), *(lora_reduced(spec, b, device, nf4_skip) for b in bases)]
    if family in ("lora", "adapter", "fused_qkv"):
        return [lora(spec, dtype, device)]
    if family == "generate":
        return [generate(spec, dtype, device), *decodes(spec, dtype, device)]
    if family == "chat_template":  # only where a published template is in the repository
        return [chat(spec)] if spec.family in zoo_tokenizer.TEMPLATE_FAMILIES else []
    if family == "quant4" and device == "cuda" and nf4_skip is not None:
        return nf4(spec, nf4_skip)
    return []
