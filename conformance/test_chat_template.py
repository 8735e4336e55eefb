"""Chat template: rendered text and token ids of conversations, against Qwen's published template.

The candidate's tokenizer (as FastLanguageModel.from_pretrained returns it, and after
unsloth.chat_templates.get_chat_template with Unsloth's Qwen template name, which the shim
registers where Unsloth lacks it) is compared with what the oracle renders with the suite's
own pinned copies of Qwen's published templates (chat_reference.py; not the shim's copy).
Every conversation of chat_reference.CONVERSATIONS; Qwen3, Qwen3.5 and Qwen3-Next with
enable_thinking unset, on and off (Qwen3-Next-Instruct's template ignores it, and so must the
candidate). The get_chat_template variant of families Unsloth has no name for is skipped,
saying so.
"""

import copy

import pytest

from conformance import candidate, chat_reference, plan, tolerances, zoo, zoo_tokenizer

pytestmark = pytest.mark.chat_template

#: Unsloth's registry names for the published templates.
UNSLOTH_TEMPLATE_NAMES = {"qwen2": "qwen-2.5", "qwen3": "qwen3", "qwen3_moe": "qwen3"}
#: Why a family's published template has no name to ask Unsloth for.
NO_UNSLOTH_NAME = {
    "qwen3_next": (
        "Unsloth has no registry name for Qwen3-Next's template: its nearest, 'qwen3-instruct' "
        "(2026.10.9), is an earlier revision of Qwen's Instruct-2507 template, which rewrites "
        "earlier turns' reasoning (tests/test_chat_reference.py)"
    ),
}


def _unsloth_template(tokenizer, family: str):
    from unsloth.chat_templates import CHAT_TEMPLATES, get_chat_template

    if family not in UNSLOTH_TEMPLATE_NAMES:
        pytest.skip(
            NO_UNSLOTH_NAME.get(
                family, f"Unsloth has no registry name for the {family} template (none in 2026.10.9 either)"
            )
        )
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
    if spec.family not in zoo_tokenizer.TEMPLATE_FAMILIES:
        pytest.skip(f"no copy of Qwen's published {spec.family} chat template in this repository")
    reference = oracle.get(plan.chat(spec))
    stale = [r["label"] for r in reference["renders"] if r["text_own"] != r["text"]]
    assert not stale, f"zoo tokenizer does not carry the reference template ({stale}): rebuild the zoo"
    _, tokenizer = candidates.get(spec, spec.max_position_embeddings, settings.dtype)
    if source == "get_chat_template":
        tokenizer = _unsloth_template(tokenizer, spec.family)

    measurements, shown = chat_reference.compare(tokenizer, reference["renders"])
    tolerances.check(
        record, measurements, settings.dtype, detail=f"{spec} via {source}; " + " | ".join(shown)
    )
