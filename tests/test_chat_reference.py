"""The chat-template case's independent reference (conformance/chat_reference.py): the pinned
copies are intact, the shim's packaged templates render as they do, and a shim template off by
one character fails the same comparison the GPU case makes."""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import shutil

import pytest

from conformance import chat_reference, tolerances, zoo_tokenizer

from .conftest import REPO, requires_unsloth, run_python

SHIM_TEMPLATES = REPO / "unsloth_qwen_compat" / "templates"
#: The shim's file per zoo family (read by path: importing the package imports Unsloth).
SHIM_FILES = {"qwen2": "qwen2_5.jinja", "qwen3": "qwen3.jinja", "qwen3_moe": "qwen3.jinja"}
PROVENANCE = ("template_of", "project", "source", "path", "how")


def test_every_reference_is_pinned_with_its_provenance() -> None:
    entries = chat_reference.manifest()
    stored = {p.name for p in chat_reference.REFERENCES_DIR.iterdir() if p.name != "MANIFEST.json"}
    assert stored == {e["file"] for e in entries}, "a reference file without a manifest entry, or the reverse"
    for entry in entries:
        data = (chat_reference.REFERENCES_DIR / entry["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"], entry["file"]
        assert all(entry[key].strip() for key in PROVENANCE), entry["file"]
    for family in zoo_tokenizer.TEMPLATE_FAMILIES:
        assert [e["zoo"] for e in entries if family in e["families"]].count(True) == 1, family
        assert chat_reference.references(family)  # reads and checks every copy


def test_the_references_are_not_the_shims_files() -> None:
    # Same bytes where the published template is the same, but a copy of its own: editing the
    # shim's file cannot change the reference.
    for family in zoo_tokenizer.TEMPLATE_FAMILIES:
        for file, _ in chat_reference.references(family):
            path = chat_reference.REFERENCES_DIR / file
            assert not path.resolve().is_relative_to(SHIM_TEMPLATES.resolve())
            assert not path.is_symlink()
    assert zoo_tokenizer.published_template("qwen3") == chat_reference.published_template("qwen3")


def test_a_changed_reference_is_an_error_that_says_where_it_came_from(tmp_path, monkeypatch) -> None:
    copy = tmp_path / "refs"
    shutil.copytree(chat_reference.REFERENCES_DIR, copy)
    target = copy / "Qwen3-0.6B.llama.cpp.jinja"
    target.write_text(target.read_text(encoding="utf-8").replace("<think>", "<thinks>", 1), encoding="utf-8")
    monkeypatch.setattr(chat_reference, "REFERENCES_DIR", copy)
    monkeypatch.setattr(chat_reference, "MANIFEST", copy / "MANIFEST.json")
    with pytest.raises(
        chat_reference.ReferenceTemplateError, match=r"pins sha256 87a2728c.*Qwen/Qwen3-0\.6B"
    ):
        chat_reference.references("qwen3")
    (copy / "Qwen2.5-7B-Instruct.llama.cpp.jinja").unlink()
    with pytest.raises(chat_reference.ReferenceTemplateError, match="missing"):
        chat_reference.published_template("qwen2")


@functools.cache
def _tokenizer(family: str):
    return zoo_tokenizer.build_tokenizer(family)


@functools.cache
def _rendered(family: str) -> list[dict]:
    """What the oracle computes for the case: the references rendered by the zoo's tokenizer."""
    return chat_reference.render_references(_tokenizer(family), family)


def _shim_template(family: str) -> str:
    return (SHIM_TEMPLATES / SHIM_FILES[family]).read_text(encoding="utf-8")


def _judge(family: str, template: str) -> tuple[list[tuple[str, str, int]], list[tuple]]:
    """The case's comparison and check for a candidate tokenizer carrying ``template``."""
    tokenizer = copy.deepcopy(_tokenizer(family))
    tokenizer.chat_template = template
    measurements, shown = chat_reference.compare(tokenizer, _rendered(family))
    recorded = []
    try:
        tolerances.check(lambda *row: recorded.append(row), measurements, "fp32", detail=" | ".join(shown))
    except AssertionError:
        pass
    return measurements, recorded


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_the_shims_templates_render_exactly_as_the_references(family) -> None:
    rendered = _rendered(family)
    # Every conversation, and Qwen3's thinking unset / on / off; the zoo's tokenizer carries
    # the reference, so the oracle's sanity check (own template == reference) holds.
    assert len(rendered) == len(chat_reference.CONVERSATIONS) * len(chat_reference.variants(family))
    assert all(r["text_own"] == r["text"] for r in rendered)
    if family == "qwen3":
        by_label = {r["label"]: r["text"] for r in rendered}
        assert by_label["[multi_turn][thinking=off]"].endswith("<think>\n\n</think>\n\n")
        assert by_label["[multi_turn][thinking=on]"] == by_label["[multi_turn]"]
    else:
        no_system = next(r for r in rendered if r["conversation"] == "no_system")
        assert "You are Qwen, created by Alibaba Cloud." in no_system["text"]
    measurements, recorded = _judge(family, _shim_template(family))
    assert measurements and all(count == 0 for _, _, count in measurements)
    assert all(ok for *_, ok in recorded)


#: One-character slips in the shim's template (one character inserted or replaced), each
#: where only some of the renders see it.
ONE_CHARACTER_OFF = [
    # (family, text in the shim's template, the slip, the renders that must see it). Each
    # conversation and each thinking variant is the only one to catch some slip.
    # Qwen3, thinking off only: a space in the empty think block.
    (
        "qwen3",
        "{{- '<think>\\n\\n</think>\\n\\n' }}",
        "{{- '<think>\\n \\n</think>\\n\\n' }}",
        "[thinking=off]",
    ),
    # Qwen3: the generation prompt's role line (every render).
    ("qwen3", "{{- '<|im_start|>assistant\\n' }}", "{{- '<|im_start|>assistant \\n' }}", "["),
    # Qwen3: reasoning kept after the last user query (only reasoning_last renders it).
    ("qwen3", "'\\n</think>\\n\\n' + content", "'\\n</Think>\\n\\n' + content", "[reasoning_last]"),
    # Qwen2.5: the default system prompt (only the no-system conversation renders it).
    (
        "qwen2",
        "You are a helpful assistant.<|im_end|>",
        "You are a helpful assistant!<|im_end|>",
        "[no_system]",
    ),
    # Qwen2.5: the separator after each turn (every render).
    ("qwen2", "'<|im_end|>' + '\\n' }}", "'<|im_end|>' + '\\t' }}", "["),
]


@pytest.mark.parametrize(("family", "old", "new", "seen_by"), ONE_CHARACTER_OFF)
def test_a_shim_template_off_by_one_character_fails_the_case(family, old, new, seen_by) -> None:
    template = _shim_template(family)
    assert template.count(old) == 1, f"{old!r} not found once in the shim's template"
    mutated = template.replace(old, new)
    assert len(mutated) - len(template) in (0, 1) and mutated != template
    measurements, recorded = _judge(family, mutated)
    failed = {label for (label, _, count) in measurements if count > 0}
    assert failed, f"{old!r} -> {new!r} went unnoticed"
    # Exactly the renders that reach the slip fail, text and ids alike.
    expected = {label for (label, _, _) in measurements if seen_by in label}
    assert failed == expected
    assert not all(ok for *_, ok in recorded)


def test_qwen3_nexts_template_keeps_earlier_reasoning_and_ignores_thinking() -> None:
    """Qwen3-Next-Instruct's published template (the reference the zoo's qwen3_next tokenizer
    carries) renders an earlier assistant turn as written, <think> block included, and has no
    thinking switch: Qwen3's template drops that reasoning and honours enable_thinking."""
    next_renders = {r["label"]: r["text"] for r in _rendered("qwen3_next")}
    qwen3_renders = {r["label"]: r["text"] for r in _rendered("qwen3")}
    assert "<think>\nThe user asks about France.\n</think>" in next_renders["[multi_turn]"]
    assert "The user asks about France." not in qwen3_renders["[multi_turn]"]
    for conversation in chat_reference.CONVERSATIONS:
        assert (
            len({next_renders[label] for label in next_renders if label.startswith(f"[{conversation}]")}) == 1
        )
    assert all(r["text_own"] == r["text"] for r in _rendered("qwen3_next"))


@requires_unsloth
def test_unsloths_qwen3_instruct_is_not_qwen3_nexts_template() -> None:
    """Why the chat case asks Unsloth for no template name on Qwen3-Next: its nearest name,
    ``qwen3-instruct``, renders the multi-turn conversation (reasoning in an earlier turn)
    unlike Qwen's published Qwen3-Next-Instruct template, and the others alike. When this
    fails, Unsloth's name holds Qwen's current template: use it in the case
    (``conformance/test_chat_template.py``)."""
    code = """
        import json
        from unsloth.chat_templates import CHAT_TEMPLATES
        from conformance import chat_reference, zoo_tokenizer
        tokenizer = zoo_tokenizer.build_tokenizer("qwen3_next")
        tokenizer.chat_template = CHAT_TEMPLATES["qwen3-instruct"][0]
        rendered = chat_reference.render_references(zoo_tokenizer.build_tokenizer("qwen3_next"), "qwen3_next")
        measurements, shown = chat_reference.compare(tokenizer, rendered)
        print(json.dumps(sorted({label for label, _, count in measurements if count})))
    """
    done = run_python(code, env={"UNSLOTH_ALLOW_CPU": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    differing = json.loads(done.stdout.strip().splitlines()[-1])
    assert differing == [
        f"{metric}[multi_turn]{variant}"
        for metric in ("text_chars", "token_ids")
        for variant in ("", "[thinking=off]", "[thinking=on]")
    ], differing
