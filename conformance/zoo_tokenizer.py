"""A tiny Qwen-style tokenizer, trained in-suite so nothing is downloaded.

Byte-level BPE (as Qwen's), trained with the ``tokenizers`` library on a small fixed
corpus, with the ChatML special tokens at the end of the vocabulary (where Qwen keeps
them) and Qwen's published chat template (the suite's pinned copy, chat_reference.py).
Training is deterministic for a fixed corpus and ``tokenizers`` version, and the result
is cached with the model files by zoo.py.
"""

from __future__ import annotations

from conformance import chat_reference

#: The families whose tokenizers carry a Qwen chat template (controls borrow qwen2's).
#: Qwen3-Next has no reference template in the suite: its tokenizers carry Qwen3's, and its
#: chat-template case is skipped, not passed.
TEMPLATE_FAMILIES = ("qwen2", "qwen3", "qwen3_moe", "qwen3_5", "qwen3_5_moe", "qwen3_next")

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
# Qwen3 registers <think> / </think> as added tokens that are not "special": they survive
# decode(skip_special_tokens=True), which is how reasoning text is kept.
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)
THINK_TOKENS = ("<think>", "</think>")

#: BPE vocabulary before the added tokens; the model's vocab is this plus the added
#: tokens, padded to a multiple of 64 (as Qwen pads its embedding matrix).
BPE_VOCAB_SIZE = 1000

CORPUS = """\
The quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun.
A language model predicts the next token from the tokens before it, one step at a time.
Rotary position embeddings rotate query and key vectors by an angle that grows with position.
YaRN stretches the rotary frequencies so a model trained on short text reads longer text.
Low rank adapters add a small trainable update to a frozen weight matrix: W + B @ A * scale.
def greedy(model, ids, steps):
    for _ in range(steps):
        logits = model(ids).logits[:, -1]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=-1)
    return ids
You are a helpful assistant. Answer briefly and think step by step before you answer.
What is the capital of France? The capital of France is Paris, a city on the Seine.
How many legs does a spider have? A spider has eight legs; an insect has six.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 100 1000 3.14159 2.71828
Punctuation, quotes "like this", brackets [a] (b) {c}, and symbols #@$%^&*+=<>/\\|~`.
Mixture of experts layers route each token to a few experts chosen by a small router.
"""


def _training_corpus() -> list[str]:
    # Enough repetitions with small variations for BPE to learn ~1000 merges deterministically.
    lines = CORPUS.splitlines()
    out = []
    for i in range(40):
        for j, line in enumerate(lines):
            out.append(f"{line} {i * 7 + j}" if (i + j) % 3 == 0 else line)
    return out


def build_tokenizer(model_type: str):
    """A ``PreTrainedTokenizerFast`` with ChatML specials and the Qwen template for ``model_type``."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_training_corpus(), trainer=trainer)
    # Added after training so they take the last ids, as in Qwen's vocabulary.
    bpe.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    bpe.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        additional_special_tokens=[IM_START, IM_END],
        model_max_length=32768,
        padding_side="right",
    )
    tokenizer.chat_template = published_template(model_type)
    return tokenizer


def published_template(model_type: str) -> str:
    """The chat template Qwen publishes for this model family: the suite's own pinned copy
    (chat_reference.py), not the shim's, so the chat-template case compares the shim with an
    independent reference."""
    return chat_reference.published_template(model_type)


def regular_token_count(tokenizer) -> int:
    """Ids below this are plain BPE tokens: safe as random input (no specials, no padding rows)."""
    return min(tokenizer.convert_tokens_to_ids(t) for t in (*SPECIAL_TOKENS, *THINK_TOKENS))
