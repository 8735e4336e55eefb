"""The tiny model zoo: qwen2, qwen3, qwen3_moe and the hybrid qwen3_5, qwen3_5_moe and
qwen3_next, each ``plain`` and ``yarn``.

Models are built here from a config and seeded random weights, never downloaded, and
saved with ``save_pretrained`` (safetensors) under ``$CONFORMANCE_CACHE/zoo``. A model
directory is keyed by a hash of its spec, the shape table, the tokenizer corpus and
templates, and the transformers / tokenizers versions, so building is idempotent and a
version change builds fresh files instead of reusing ones another version wrote.

This module never imports Unsloth: the oracle process builds the zoo (see oracle.py), so
weights are initialised and written by stock transformers.

Run ``python -m conformance.zoo`` to build every model and print where it is.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import zlib
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

from conformance import zoo_tokenizer

#: The directory the ``conformance`` package lives in: a checkout's root, or site-packages.
PACKAGE_PARENT = Path(__file__).resolve().parent.parent
#: The checkout the suite runs from (a pyproject.toml next to the package), or None when
#: the suite is installed (``unsloth-qwen-compat[conformance]``).
CHECKOUT = PACKAGE_PARENT if (PACKAGE_PARENT / "pyproject.toml").is_file() else None

# Bump when the way models are built changes, so stale caches are not reused.
ZOO_FORMAT = 1

#: Shapes shared by every zoo model: big enough for real kernels to engage (head_dim 64,
#: GQA 4:2), small enough to build and run in seconds.
SHAPE = {
    "num_hidden_layers": 2,
    "hidden_size": 256,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 512,
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
}
HEAD_DIM = 64  # explicit for qwen3 / qwen3_moe (their configs carry head_dim); qwen2 derives 256 / 4
ROPE_THETA = 10000.0

#: Qwen3-MoE at tiny scale: 4 experts, top-2, every layer sparse.
MOE_SHAPE = {
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 128,
    "decoder_sparse_step": 1,
    "norm_topk_prob": True,
}

#: The hybrid families (transformers 5; qwen3_next from 4.57): gated-DeltaNet linear-attention
#: layers beside full-attention layers, partial rotary on the attention layers, zero-centred
#: RMSNorm weights. Four layers, so each layer type appears twice and a linear layer follows a
#: full one in the hybrid cache. Linear attention: 2 key heads, 4 value heads (GQA-like 2:1).
HYBRID_FAMILIES = ("qwen3_5", "qwen3_5_moe", "qwen3_next")
HYBRID_SHAPE = {
    "num_hidden_layers": 4,
    "layer_types": ["linear_attention", "full_attention", "linear_attention", "full_attention"],
    "linear_conv_kernel_dim": 4,
    "linear_key_head_dim": 32,
    "linear_value_head_dim": 32,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
}
#: Published Qwen3.5 / Qwen3-Next rotate a quarter of each attention head (64 of 256 dims).
PARTIAL_ROTARY_FACTOR = 0.25
#: Qwen3.5's text rotary is multimodal RoPE; its sections split the rotated half (8
#: frequencies here, as 11 + 11 + 10 split Qwen3.5's 32). Text-only positions are equal on
#: all three axes, so it computes plain partial RoPE.
MROPE = {"mrope_section": [3, 3, 2], "mrope_interleaved": True}
#: MoE hybrids add a shared expert (with its sigmoid gate) beside the routed experts.
HYBRID_MOE_SHAPE = {
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 128,
    "shared_expert_intermediate_size": 128,
}
#: The config ``model_type`` each family is built from. Qwen3.5 checkpoints are published
#: as vision-language models; their text config is what a causal LM is built from.
CONFIG_MODEL_TYPES = {"qwen3_5": "qwen3_5_text", "qwen3_5_moe": "qwen3_5_moe_text"}

#: Plain models: plenty of positions for the 900-token forward case.
PLAIN_MAX_POSITIONS = 1024

#: YaRN as Qwen3 publishes it for long context (factor 4 over the trained window), scaled
#: down: original 256 x factor 4 = 1024 > max_position_embeddings 320. That gap is what
#: trips Unsloth's "max_seq_length > max_position_embeddings" RoPE override.
YARN = {"factor": 4.0, "original_max_position_embeddings": 256}
YARN_MAX_POSITIONS = 320

# Random weights: std well above a trained model's init so logits are not flat (logit std
# ~ 1.5 with these shapes), which keeps greedy decoding away from near-ties.
WEIGHT_STD = 0.06
# Norm weights are 1 + N(0, 0.1): a norm that is skipped or applied twice (qk-norm!) then
# changes the output instead of hiding behind all-ones weights.
NORM_JITTER = 0.1
SEED = 1234

FAMILIES = ("qwen2", "qwen3", "qwen3_moe", *HYBRID_FAMILIES)
ROPES = ("plain", "yarn")


@dataclass(frozen=True)
class ModelSpec:
    #: qwen2 | qwen3 | qwen3_moe | qwen3_5 | qwen3_5_moe | qwen3_next (llama | mistral: RoPE-grid
    #: controls); the config's model_type, but for CONFIG_MODEL_TYPES.
    family: str
    rope: str  # plain | yarn | grid-<rope type> (conformance/rope_grid.py)
    #: RoPE-grid models only: the scaling (JSON, rope_type included; "" for plain RoPE), the
    #: base, the window, and longrope's original window as transformers 4 reads it (top level).
    scaling_json: str = ""
    theta: float = ROPE_THETA
    max_positions: int = 0
    top_level_original: int = 0

    @property
    def name(self) -> str:
        return f"{self.family}-{self.rope}"

    def __str__(self) -> str:  # the pytest id: test_forward_logits[qwen3-yarn]
        return self.name

    @property
    def max_position_embeddings(self) -> int:
        if self.max_positions:
            return self.max_positions
        return YARN_MAX_POSITIONS if self.rope == "yarn" else PLAIN_MAX_POSITIONS

    @property
    def original_max_position_embeddings(self) -> int | None:
        return YARN["original_max_position_embeddings"] if self.rope == "yarn" else None

    @property
    def scaling(self) -> dict | None:
        if self.rope == "yarn":
            return {"rope_type": "yarn", **YARN}
        return json.loads(self.scaling_json) if self.scaling_json else None

    @property
    def tokenizer_family(self) -> str:
        """Control families (llama, mistral) borrow the qwen2 tokenizer: only logits are compared."""
        if self.family in zoo_tokenizer.TEMPLATE_FAMILIES:
            return self.family
        return "qwen2"

    @property
    def model_type(self) -> str:
        """The ``model_type`` of the saved config."""
        return CONFIG_MODEL_TYPES.get(self.family, self.family)

    @property
    def hybrid(self) -> bool:
        return self.family in HYBRID_FAMILIES


ZOO = tuple(ModelSpec(f, r) for f in FAMILIES for r in ROPES)
BY_NAME = {spec.name: spec for spec in ZOO}
YARN_MODELS = tuple(spec for spec in ZOO if spec.rope == "yarn")


def by_name(name: str) -> ModelSpec:
    """A zoo model by name: the fixed zoo, or a model of the RoPE grid."""
    if name in BY_NAME:
        return BY_NAME[name]
    from conformance import rope_grid

    return rope_grid.models()[name]


def transformers_major() -> int:
    return int(metadata.version("transformers").split(".")[0])


def cache_root() -> Path:
    """Where zoo models, oracle results and logs go.

    ``$CONFORMANCE_CACHE`` when set; else the checkout's ``.conformance_cache/``; else, for
    an installed suite, the user's cache directory: never site-packages, which may be
    read-only and is shared by every project of that environment.
    """
    if os.environ.get("CONFORMANCE_CACHE"):
        return Path(os.environ["CONFORMANCE_CACHE"]).expanduser().resolve()
    if CHECKOUT is not None:
        return CHECKOUT / ".conformance_cache"
    # The XDG base directory rule: a relative XDG_CACHE_HOME is invalid and ignored.
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache"
    return (base / "unsloth-qwen-compat" / "conformance").resolve()


def _key(spec: ModelSpec) -> str:
    material = {
        "format": ZOO_FORMAT,
        "spec": asdict(spec),
        "shape": SHAPE,
        "moe": MOE_SHAPE,
        "yarn": YARN,
        "std": [WEIGHT_STD, NORM_JITTER, SEED],
        "tokenizer": [zoo_tokenizer.BPE_VOCAB_SIZE, zoo_tokenizer.CORPUS],
        "template": zoo_tokenizer.published_template(spec.tokenizer_family),
        "transformers": metadata.version("transformers"),
        "tokenizers": metadata.version("tokenizers"),
    }
    if spec.hybrid:  # only here, so the other models keep their directories
        material["hybrid"] = [HYBRID_SHAPE, HYBRID_MOE_SHAPE, PARTIAL_ROTARY_FACTOR, MROPE, spec.model_type]
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:16]


def model_dir(spec: ModelSpec) -> Path:
    return cache_root() / "zoo" / f"{spec.name}-{_key(spec)}"


def is_built(spec: ModelSpec) -> bool:
    return (model_dir(spec) / "COMPLETE").is_file()


def files_hash(spec: ModelSpec) -> str:
    """Hash of the model's files, written at build time (the oracle cache is keyed by it)."""
    return (model_dir(spec) / "COMPLETE").read_text().strip()


def rope_config_kwargs(spec: ModelSpec) -> dict:
    """RoPE settings spelled the way the installed transformers reads them."""
    scaling = spec.scaling
    extra = {"original_max_position_embeddings": spec.top_level_original} if spec.top_level_original else {}
    if spec.hybrid and transformers_major() < 5:  # qwen3_next on transformers 4.57
        extra["partial_rotary_factor"] = PARTIAL_ROTARY_FACTOR
    if transformers_major() >= 5:
        # v5 keeps theta and scaling together in rope_parameters (partial rotary too).
        params = {"rope_type": "default", **(scaling or {}), "rope_theta": spec.theta}
        if spec.hybrid:
            params["partial_rotary_factor"] = PARTIAL_ROTARY_FACTOR
            if spec.family in CONFIG_MODEL_TYPES:
                params.update(MROPE)
        return {"rope_parameters": params, **extra}
    # v4: theta at top level, scaling in rope_scaling (Qwen's published configs use "rope_type").
    return {"rope_theta": spec.theta, "rope_scaling": scaling, **extra}


def make_config(spec: ModelSpec, tokenizer):
    from transformers import AutoConfig

    vocab = len(tokenizer)
    kwargs = dict(
        SHAPE,
        vocab_size=(vocab + 63) // 64 * 64,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.convert_tokens_to_ids(zoo_tokenizer.ENDOFTEXT),
        eos_token_id=tokenizer.convert_tokens_to_ids(zoo_tokenizer.IM_END),
        pad_token_id=tokenizer.convert_tokens_to_ids(zoo_tokenizer.ENDOFTEXT),
        use_sliding_window=False,
        **rope_config_kwargs(spec),
    )
    if spec.family in ("qwen3", "qwen3_moe", *HYBRID_FAMILIES):
        kwargs["head_dim"] = HEAD_DIM
    if spec.family == "mistral":
        kwargs["sliding_window"] = None
        # MistralConfig keeps head_dim=None, and transformers 4.57's dynamic / yarn / longrope
        # RoPE functions read that None instead of deriving hidden_size / heads.
        kwargs["head_dim"] = SHAPE["hidden_size"] // SHAPE["num_attention_heads"]
    if spec.family == "qwen3_moe":
        kwargs.update(MOE_SHAPE)
    if spec.hybrid:
        kwargs.update(HYBRID_SHAPE)
        del kwargs["use_sliding_window"]  # not a field of the hybrid configs
    if spec.family in ("qwen3_5_moe", "qwen3_next"):
        kwargs.update(HYBRID_MOE_SHAPE)
    if spec.family == "qwen3_next":  # every layer sparse, as published
        kwargs.update(decoder_sparse_step=1, norm_topk_prob=True, mlp_only_layers=[])
    return AutoConfig.for_model(spec.model_type, **kwargs)


def _randomize(model, spec: ModelSpec) -> None:
    import torch

    generator = torch.Generator().manual_seed(SEED + zlib.crc32(spec.name.encode()))
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            if "norm" in name.rsplit(".", 2)[-2]:
                # Around the model's own init: 1 for x * w norms, 0 for the hybrids' zero-centred
                # x * (1 + w) norms (their gated linear-attention norm is x * w again).
                centre = 0.0 if bool((param == 0).all()) else 1.0
                param.copy_(centre + NORM_JITTER * noise)
            else:
                # Weights, the qkv biases of qwen2, routers and fused expert tensors alike.
                param.copy_(WEIGHT_STD * noise)


def transformers_builds(spec: ModelSpec) -> bool:
    """Whether the installed transformers has the model type (Qwen3.5 needs transformers 5)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return spec.model_type in CONFIG_MAPPING_NAMES


#: What a config-only checkpoint holds: the ``model_type`` and architecture a newer
#: transformers writes, so a loader can see what it was asked to load and refuse it.
ARCHITECTURES = {
    "qwen3_5": "Qwen3_5ForCausalLM",
    "qwen3_5_moe": "Qwen3_5MoeForCausalLM",
    "qwen3_next": "Qwen3NextForCausalLM",
}


def build(spec: ModelSpec) -> Path:
    """Build (or find) the model directory for ``spec``; safe to call repeatedly.

    Where the installed transformers lacks the model type, the directory is a config-only
    checkpoint (``config.json`` names the type, no weights) plus the tokenizer: loading it
    must end in a clear refusal, which is what the cases check on such a leg.
    """
    target = model_dir(spec)
    if is_built(spec):
        return target
    tokenizer = zoo_tokenizer.build_tokenizer(spec.tokenizer_family)
    staging = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    if transformers_builds(spec):
        import torch
        from transformers import AutoModelForCausalLM

        config = make_config(spec, tokenizer)
        torch.manual_seed(SEED)
        model = AutoModelForCausalLM.from_config(config, **_fp32_kwarg())
        _randomize(model, spec)
        model.generation_config.do_sample = False
        model.save_pretrained(staging)
    else:
        staging.mkdir(parents=True)
        config = {"model_type": spec.model_type, "architectures": [ARCHITECTURES[spec.family]]}
        (staging / "config.json").write_text(json.dumps(config, indent=1))
    tokenizer.save_pretrained(staging)
    (staging / "zoo_spec.json").write_text(json.dumps({"name": spec.name, **asdict(spec)}, indent=1))
    (staging / "COMPLETE").write_text(_hash_files(staging))
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target


def _fp32_kwarg() -> dict:
    # transformers 5 renamed torch_dtype to dtype.
    import torch

    return {"dtype": torch.float32} if transformers_major() >= 5 else {"torch_dtype": torch.float32}


def _hash_files(directory: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(directory.iterdir()):
        if path.is_file() and path.name != "COMPLETE":
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


if __name__ == "__main__":
    for spec in ZOO if len(sys.argv) < 2 else [by_name(n) for n in sys.argv[1:]]:
        print(spec.name, build(spec))
