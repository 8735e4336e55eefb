"""A tiny random Qwen3 checkpoint with a Qwen-style tokenizer, built locally (nothing downloaded).

Used by the examples (and the loader's tests) so both training paths can load a real
checkpoint directory in seconds. Importing this module imports neither Unsloth nor
``unsloth_qwen_compat``: the HF reference process of ``gpu_parity.py`` relies on that.
"""

from __future__ import annotations

from pathlib import Path

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"

# ChatML, as Qwen2.5 / Qwen3 (without the thinking parts) render it.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

CORPUS = (
    "The quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun.",
    "A language model predicts the next token from the tokens before it, one step at a time.",
    "Low rank adapters add a small trainable update to a frozen weight matrix.",
    "What is the capital of France? The capital of France is Paris.",
    "How many legs does a spider have? A spider has eight legs; an insect has six.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 100 1000 3.14159",
    "You are a helpful assistant. Answer briefly and think step by step.",
)


def build_tokenizer(vocab_size: int = 400):
    """Byte-level BPE (as Qwen's) with the ChatML specials last, trained on a fixed corpus."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    bpe.train_from_iterator(list(CORPUS) * 20, trainer=trainer)
    bpe.add_special_tokens(
        [AddedToken(token, special=True, normalized=False) for token in (ENDOFTEXT, IM_START, IM_END)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        additional_special_tokens=[IM_START, IM_END],
        model_max_length=4096,
        padding_side="right",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_qwen(
    directory: str | Path,
    *,
    layers: int = 2,
    hidden_size: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int = 16,
    intermediate_size: int = 128,
    seed: int = 0,
    tie_word_embeddings: bool = False,
    device: str = "cpu",
    dtype: str | None = None,
) -> Path:
    """Write a random Qwen3 model and its tokenizer to ``directory`` (``save_pretrained``); return it.

    The defaults build a tiny model in float32 on the CPU; ``device="cuda"`` and
    ``dtype="bfloat16"`` build a large one (Qwen3-1.7B's layers, say) in seconds.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = Path(directory)
    tokenizer = build_tokenizer()
    config = AutoConfig.for_model(
        "qwen3",
        vocab_size=(len(tokenizer) + 63) // 64 * 64,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=2048,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=None,  # Qwen tokenizers add no BOS
        eos_token_id=tokenizer.convert_tokens_to_ids(IM_END),
        pad_token_id=tokenizer.convert_tokens_to_ids(ENDOFTEXT),
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config)
    if dtype is not None:
        model = model.to(getattr(torch, dtype))
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = config.pad_token_id
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def conversations(count: int) -> list[dict[str, list[dict[str, str]]]]:
    """``count`` short chats (TRL's conversational format) from the corpus."""
    rows = []
    for i in range(count):
        question, answer = CORPUS[i % len(CORPUS)], CORPUS[(i + 1) % len(CORPUS)]
        rows.append(
            {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}
        )
    return rows
