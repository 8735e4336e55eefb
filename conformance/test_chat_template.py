"""Chat template: rendered text and token ids of a multi-turn conversation.

The candidate's tokenizer (as FastLanguageModel.from_pretrained returns it, and after
unsloth.chat_templates.get_chat_template with Unsloth's Qwen template name) is compared
with the oracle's tokenizer rendering the template Qwen publishes (unsloth_qwen_compat/templates/*.jinja).
Qwen3 is checked with enable_thinking on and off.
"""

import copy

import pytest

from conformance import candidate, inputs, plan, tolerances, zoo

pytestmark = pytest.mark.chat_template

#: Unsloth's registry names for the published templates.
UNSLOTH_TEMPLATE_NAMES = {"qwen2": "qwen-2.5", "qwen3": "qwen3", "qwen3_moe": "qwen3"}


def _ids(encoded) -> list[int]:
    # transformers 5 returns a BatchEncoding from apply_chat_template(tokenize=True), 4 a list.
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def _char_mismatch(text: str, expected: str) -> int:
    return sum(a != b for a, b in zip(text, expected)) + abs(len(text) - len(expected))


def _unsloth_template(tokenizer, family: str):
    from unsloth.chat_templates import CHAT_TEMPLATES, get_chat_template

    name = UNSLOTH_TEMPLATE_NAMES[family]
    if name not in CHAT_TEMPLATES:
        message = f"unsloth.chat_templates has no {name!r} template"
        if candidate.shim_state()["enabled"]:
            pytest.fail(message + " (the shim should register it)")
        pytest.skip(message)
    return get_chat_template(copy.deepcopy(tokenizer), chat_template=name)


@pytest.mark.parametrize("source", ["from_pretrained", "get_chat_template"])
@pytest.mark.parametrize("spec", zoo.ZOO, ids=str)
def test_chat_template(spec, source, settings, oracle, candidates, record):
    reference = oracle.get(plan.chat(spec))
    assert reference["variants"][0]["text"] == reference["variants"][0]["text_published"], (
        "zoo tokenizer does not carry the published template: rebuild the zoo"
    )
    _, tokenizer = candidates.get(spec, spec.max_position_embeddings, settings.dtype)
    if source == "get_chat_template":
        tokenizer = _unsloth_template(tokenizer, spec.family)

    measurements, shown = [], []
    for variant in reference["variants"]:
        kwargs = dict(add_generation_prompt=True, **variant["kwargs"])
        suffix = "".join(f"[thinking={'on' if v else 'off'}]" for v in variant["kwargs"].values())
        text = tokenizer.apply_chat_template(inputs.CONVERSATION, tokenize=False, **kwargs)
        ids = _ids(tokenizer.apply_chat_template(inputs.CONVERSATION, tokenize=True, **kwargs))
        measurements.append(
            (f"text_chars{suffix}", "chat_mismatch", _char_mismatch(text, variant["text_published"]))
        )
        measurements.append((f"token_ids{suffix}", "chat_mismatch", _char_mismatch(ids, variant["ids"])))
        if text != variant["text_published"]:
            shown.append(f"{suffix or 'text'}: got {text!r}, published renders {variant['text_published']!r}")
    tolerances.check(
        record, measurements, settings.dtype, detail=f"{spec} via {source}; " + " | ".join(shown)
    )
