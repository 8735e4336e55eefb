"""What every case trains: Qwen's published shapes (random weights), the LoRA and the
optimiser, and the model FLOPs a trained token costs (for MFU)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .. import _env

LORA = {"r": 16, "alpha": 16, "dropout": 0.0, "bias": "none"}
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LEARNING_RATE = 1e-4
GIB = 2**30

#: ``--rl``'s step by default: 8 prompts x 8 sampled replies x 256 new tokens (GRPO's usual
#: group of 8 replies per prompt), the replies forced to full length so every path decodes
#: the same number of tokens.
RL_PROMPTS = 8
RL_REPLIES = 8
RL_NEW_TOKENS = 256
#: Rows per forward in the reference and policy passes (their logits are rows x length x
#: vocabulary; 151,936 columns for Qwen), as a GRPO trainer's micro-batch.
RL_MICRO_BATCH = 16
#: KL coefficient of the policy loss (TRL's ``beta`` when it is on).
RL_BETA = 0.04
#: ``--rl``'s prompts (chat, rendered with the checkpoint's chat template), cycled.
RL_QUESTIONS = (
    "What is the capital of France?",
    "How many legs does a spider have?",
    "Explain in one sentence what a low rank adapter is.",
    "Write a haiku about gradient descent.",
    "What is 17 times 23?",
    "Name three prime numbers larger than one hundred.",
    "Why is the sky blue? Answer briefly.",
    "Summarise the rules of chess in two sentences.",
)
#: The slices of an RL step, in the order they run.
RL_SLICES = ("generate", "reference", "train")

#: Peak dense bf16 tensor FLOP/s by card, matched in order against the CUDA device name
#: (``NVIDIA H100 80GB HBM3`` is the SXM part). NVL variants have other peaks: no MFU.
PEAK_BF16_DENSE_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("A100", 312e12),
)


@dataclass(frozen=True)
class Shape:
    """A model shape as its published ``config.json`` states it (weights are random)."""

    name: str
    model_type: str  # qwen2 (q/k/v carry a bias) | qwen3
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    tie_word_embeddings: bool
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-6
    #: The model card's "Number of Parameters" (None for the test shapes).
    published_params: float | None = None

    @property
    def attention_bias(self) -> bool:
        return self.model_type == "qwen2"

    def config_kwargs(self, transformers_major: int) -> dict[str, Any]:
        """Keyword arguments for ``AutoConfig.for_model(model_type, ...)``."""
        kwargs: dict[str, Any] = {
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "hidden_act": "silu",
            "use_sliding_window": False,
        }
        if self.model_type == "qwen3":
            kwargs["head_dim"] = self.head_dim  # Qwen2 derives it: hidden / heads
        if transformers_major >= 5:  # v5 keeps theta (and any scaling) in rope_parameters
            kwargs["rope_parameters"] = {"rope_type": "default", "rope_theta": self.rope_theta}
        else:
            kwargs["rope_theta"] = self.rope_theta
        return kwargs


def _shapes(*shapes: Shape) -> dict[str, Shape]:
    return {shape.name: shape for shape in shapes}


#: Qwen's published configs (Qwen3 base, Qwen2.5 instruct). Qwen2.5-7B pads its vocabulary
#: to 152064, the others have 151936. The tiny shapes (the conformance zoo's size) exercise
#: the pipeline in seconds.
SHAPES = _shapes(
    Shape("qwen3-1.7b", "qwen3", 2048, 6144, 28, 16, 8, 128, 151936, 40960, True, published_params=1.7e9),
    Shape("qwen3-8b", "qwen3", 4096, 12288, 36, 32, 8, 128, 151936, 40960, False, published_params=8.2e9),
    Shape("qwen2.5-1.5b", "qwen2", 1536, 8960, 28, 12, 2, 128, 151936, 32768, True, published_params=1.54e9),
    Shape("qwen2.5-7b", "qwen2", 3584, 18944, 28, 28, 4, 128, 152064, 32768, False, published_params=7.61e9),
    Shape("tiny-qwen3", "qwen3", 256, 512, 2, 4, 2, 64, 1024, 4096, False),
    Shape("tiny-qwen2", "qwen2", 256, 512, 2, 4, 2, 64, 1024, 4096, False),
)


def transformers_major() -> int:
    version = _env.distribution_version("transformers")
    return int(version.split(".")[0]) if version else 0


def build_config(shape: Shape) -> Any:
    """The transformers config for ``shape`` (imports transformers)."""
    from transformers import AutoConfig

    return AutoConfig.for_model(shape.model_type, **shape.config_kwargs(transformers_major()))


# --------------------------------------------------------------------------------------
# FLOPs and MFU
# --------------------------------------------------------------------------------------


def _projection_sizes(shape: Shape) -> dict[str, tuple[int, int]]:
    """(in, out) of each LoRA-targeted projection of one layer."""
    h, inter = shape.hidden_size, shape.intermediate_size
    q = shape.num_attention_heads * shape.head_dim
    kv = shape.num_key_value_heads * shape.head_dim
    return {
        "q_proj": (h, q),
        "k_proj": (h, kv),
        "v_proj": (h, kv),
        "o_proj": (q, h),
        "gate_proj": (h, inter),
        "up_proj": (h, inter),
        "down_proj": (inter, h),
    }


def matmul_params(shape: Shape) -> int:
    """N: weights that take part in a matrix multiply (projections and the output head)."""
    per_layer = sum(n_in * n_out for n_in, n_out in _projection_sizes(shape).values())
    return shape.num_hidden_layers * per_layer + shape.hidden_size * shape.vocab_size


def lora_params(shape: Shape, r: int = LORA["r"]) -> int:
    """N_lora: the adapter's parameters (A: r x in, B: out x r on every projection)."""
    per_layer = sum(r * (n_in + n_out) for n_in, n_out in _projection_sizes(shape).values())
    return shape.num_hidden_layers * per_layer


def flops_per_token(shape: Shape, seq_len: int, r: int = LORA["r"]) -> float:
    """Model FLOPs per trained token, LoRA on a frozen base: 4N + 6 N_lora + 12 L H d S."""
    attention = 12 * shape.num_hidden_layers * shape.num_attention_heads * shape.head_dim * seq_len
    return float(4 * matmul_params(shape) + 6 * lora_params(shape, r) + attention)


FLOPS_FORMULA = (
    "MFU = tokens/s x (4 N + 6 N_lora + 12 L H d S) / peak dense bf16 FLOP/s; N = projection and "
    "output-head weights (frozen: forward 2N + input gradient 2N, no weight gradient), N_lora = "
    "adapter weights (6 per parameter), 12 L H d S = attention scores and values (forward + "
    "backward, causal mask not discounted); recomputation by gradient checkpointing not counted"
)


def peak_bf16_flops(device_name: str | None) -> float | None:
    """The card's peak dense bf16 FLOP/s, or None when it is not in the table."""
    if not device_name or "NVL" in device_name:
        return None
    for key, flops in PEAK_BF16_DENSE_FLOPS:
        if key.lower() in device_name.lower():
            return flops
    return None


def mfu(shape: Shape, seq_len: int, tokens_per_s: float, device_name: str | None) -> float | None:
    peak = peak_bf16_flops(device_name)
    if peak is None:
        return None
    return tokens_per_s * flops_per_token(shape, seq_len) / peak
