"""The chat-template case's reference: Qwen's published templates as copies the shim did not vendor.

The shim ships Qwen's templates in ``unsloth_qwen_compat/templates/`` and registers them
where Unsloth lacks them. A reference read from those same bytes would pass a shim whose
copy is off by one character, so the suite keeps its own copies in ``chat_references/``,
each the ``chat_template`` of a published Qwen checkpoint's ``tokenizer_config.json`` as
another project stores it, pinned by SHA-256 with its provenance in
``chat_references/MANIFEST.json``. A copy whose hash does not match is an error, never a
reference.

The oracle renders the conversations below with every reference of the model's family
through transformers' own ``apply_chat_template`` (text and token ids); the case compares
what the candidate's tokenizer renders with that exactly. Qwen3 has two published
revisions here (release and current); they must agree on these conversations, or the
oracle says so instead of picking one. The zoo's tokenizers carry the reference marked
``zoo`` (``published_template``).

This module imports neither Unsloth nor the shim: the oracle process imports it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from conformance import inputs

REFERENCES_DIR = Path(__file__).with_name("chat_references")
MANIFEST = REFERENCES_DIR / "MANIFEST.json"

#: The conversations rendered, by name. Every branch of the templates that string-only
#: conversations reach: a system turn or none (Qwen2.5 then inserts its default system
#: prompt), reasoning in an assistant turn before the last user query (Qwen3 drops it) and
#: after it (Qwen3 keeps it).
CONVERSATIONS: dict[str, list[dict]] = {
    "multi_turn": inputs.CONVERSATION,
    "no_system": [
        {"role": "user", "content": "Name a prime number."},
        {"role": "assistant", "content": "Seven."},
        {"role": "user", "content": "And an even one?"},
    ],
    "reasoning_last": [
        {"role": "system", "content": "Think step by step."},
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "<think>\nTwo plus three is five.\n</think>\n\n5"},
    ],
}


class ReferenceTemplateError(RuntimeError):
    pass


def manifest() -> list[dict]:
    return json.loads(MANIFEST.read_text(encoding="utf-8"))["references"]


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _read(entry: dict) -> str:
    path = REFERENCES_DIR / entry["file"]
    # Bytes, not read_text: the hash is of the file, not of a newline-translated copy.
    text = path.read_bytes().decode("utf-8") if path.is_file() else None
    if text is None or _sha256(text) != entry["sha256"]:
        found = "missing" if text is None else f"sha256 {_sha256(text)}"
        raise ReferenceTemplateError(
            f"{path}: {found}, but {MANIFEST.name} pins sha256 {entry['sha256']} "
            f"({entry['template_of']} from {entry['project']}, {entry['path']}). Restore the file "
            f"from that source byte for byte; pin a new copy only with its provenance."
        )
    return text


def references(family: str) -> list[tuple[str, str]]:
    """``[(file name, template text)]`` for a zoo family, each checked against its pinned hash."""
    entries = [e for e in manifest() if family in e["families"]]
    if not entries:
        raise ReferenceTemplateError(f"{MANIFEST}: no reference chat template for family {family!r}")
    return [(e["file"], _read(e)) for e in entries]


def pinned_hashes(family: str) -> list[str]:
    """The pinned SHA-256 of each reference of ``family`` (the oracle's cache key holds them)."""
    return [e["sha256"] for e in manifest() if family in e["families"]]


def published_template(family: str) -> str:
    """The reference the zoo's tokenizers of ``family`` carry (the one marked ``zoo``)."""
    (entry,) = [e for e in manifest() if family in e["families"] and e["zoo"]]
    return _read(entry)


def variants(family: str) -> list[dict]:
    """Template keyword arguments per render: Qwen3's ``enable_thinking`` unset, on and off."""
    if family == "qwen2":
        return [{}]
    return [{}, {"enable_thinking": True}, {"enable_thinking": False}]


def label(conversation: str, kwargs: dict) -> str:
    thinking = kwargs.get("enable_thinking")
    return f"[{conversation}]" + ("" if thinking is None else f"[thinking={'on' if thinking else 'off'}]")


def token_ids(encoded) -> list[int]:
    # transformers 5 returns a BatchEncoding from apply_chat_template(tokenize=True), 4 a list.
    if hasattr(encoded, "keys"):
        encoded = encoded["input_ids"]
    return [int(i) for i in encoded]


def render(
    tokenizer, conversation: list[dict], kwargs: dict, template: str | None = None
) -> tuple[str, list[int]]:
    """Text and ids of ``conversation`` (generation prompt added) with ``template`` or the tokenizer's own."""
    common = dict(add_generation_prompt=True, **kwargs)
    if template is not None:
        common["chat_template"] = template
    text = tokenizer.apply_chat_template(conversation, tokenize=False, **common)
    return text, token_ids(tokenizer.apply_chat_template(conversation, tokenize=True, **common))


def render_references(tokenizer, family: str) -> list[dict]:
    """Every conversation x variant rendered with the family's references (oracle side).

    Each entry has ``label``, ``conversation``, ``kwargs``, ``text`` / ``ids`` (the
    references' rendering) and ``text_own`` (the tokenizer's own template, which must be
    the same: the zoo's tokenizer carries a reference).
    """
    refs = references(family)
    out = []
    for name, conversation in CONVERSATIONS.items():
        for kwargs in variants(family):
            rendered = {file: render(tokenizer, conversation, kwargs, template) for file, template in refs}
            (first, expected), *others = rendered.items()
            for file, got in others:
                if got != expected:
                    raise ReferenceTemplateError(
                        f"references {first} and {file} render {label(name, kwargs)} differently "
                        f"({expected[0]!r} vs {got[0]!r}): the published revisions disagree on this "
                        f"conversation, so it cannot be judged against both; change the conversation"
                    )
            out.append(
                {
                    "label": label(name, kwargs),
                    "conversation": name,
                    "kwargs": kwargs,
                    "text": expected[0],
                    "ids": expected[1],
                    "text_own": render(tokenizer, conversation, kwargs)[0],
                }
            )
    return out


def _mismatch(got, expected) -> int:
    """Positions that differ, plus the length difference: 0 only when equal."""
    return sum(a != b for a, b in zip(got, expected)) + abs(len(got) - len(expected))


def compare(tokenizer, rendered: list[dict]) -> tuple[list[tuple[str, str, int]], list[str]]:
    """What ``tokenizer`` renders against the references' ``rendered`` (candidate side).

    Returns ``(label, metric, count)`` measurements for tolerances.check (characters and ids
    that differ, bound 0) and, for each text that differs, a line showing both.
    """
    measurements, shown = [], []
    for entry in rendered:
        text, ids = render(tokenizer, CONVERSATIONS[entry["conversation"]], entry["kwargs"])
        measurements.append((f"text_chars{entry['label']}", "chat_mismatch", _mismatch(text, entry["text"])))
        measurements.append((f"token_ids{entry['label']}", "chat_mismatch", _mismatch(ids, entry["ids"])))
        if text != entry["text"]:
            shown.append(f"{entry['label']}: got {text!r}, the published template renders {entry['text']!r}")
    return measurements, shown
