"""The chat-template patch on the installed Unsloth's registry, with Qwen3 removed first
(a stand-in for Unsloth 2025.3, which has no Qwen3 template)."""

from __future__ import annotations

import hashlib
import json

from unsloth_qwen_compat.patches.chat_templates import FAMILIES, missing_families, published_template

from .conftest import REPO, requires_unsloth, run_python

#: SHA-256 of Qwen's published templates as TRL 1.15.0 stores them (templates/README.md).
PUBLISHED_SHA256 = {
    "qwen2_5.jinja": "cd8e9439f0570856fd70470bf8889ebd8b5d1107207f67a5efb46e342330527f",
    "qwen3.jinja": "a55ee1b1660128b7098723e0abcd92caa0788061051c62d51cbe87d9cf1974d8",
}


def test_packaged_templates_are_qwens_published_ones() -> None:
    for family, (filename, _) in FAMILIES.items():
        text = published_template(family)
        assert hashlib.sha256(text.encode()).hexdigest() == PUBLISHED_SHA256[filename]
    # The conformance suite judges them against copies of its own (tests/test_chat_reference.py),
    # never against these files.


def test_missing_families_reads_the_registry() -> None:
    qwen25 = ("{{ messages }}", "<|im_end|>", False, "")
    assert missing_families({}) == {"Qwen2.5": "not registered", "Qwen3": "not registered"}
    assert missing_families({"qwen2.5": qwen25, "qwen3": ("no thinking here", "", False, "")}) == {
        "Qwen3": "ignores enable_thinking (thinking on/off)"
    }
    assert missing_families({"qwen25": qwen25, "qwen-3": ("{{ enable_thinking }}", "", False, "")}) == {}


@requires_unsloth
def test_qwen3_template_is_registered_where_missing_and_renders_as_published() -> None:
    # Rendered against the conformance suite's pinned copies of Qwen's template, not the shim's.
    code = """
        import json, os, sys
        sys.path.insert(0, os.environ["EXAMPLES_DIR"])
        import unsloth.chat_templates as ct
        for name in ("qwen3", "qwen-3"):  # the stand-in: a registry without Qwen3
            ct.CHAT_TEMPLATES.pop(name)
        import unsloth_qwen_compat as m
        from conformance import chat_reference
        from tiny_qwen import build_tokenizer
        entry = next(p for p in m.status()["patches"] if p["name"] == "chat_templates")
        tokenizer = ct.get_chat_template(build_tokenizer(), chat_template="qwen3")
        rendered = chat_reference.render_references(build_tokenizer(), "qwen3")
        measurements, shown = chat_reference.compare(tokenizer, rendered)
        by_label = {r["label"]: r["text"] for r in rendered}
        m.revert()
        print(json.dumps({"entry": entry, "measurements": measurements, "shown": shown,
                          "differs_by_thinking": by_label["[multi_turn][thinking=on]"]
                          != by_label["[multi_turn][thinking=off]"],
                          "after_revert": "qwen3" in ct.CHAT_TEMPLATES}))
    """
    done = run_python(code, env={"UNSLOTH_ALLOW_CPU": "1", "EXAMPLES_DIR": str(REPO / "examples")})
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["entry"]["name"] == "chat_templates"
    assert (out["entry"]["verdict"], out["entry"]["action"]) == ("needed", "applied")
    assert "Qwen3 template not registered" in out["entry"]["reason"]
    assert len(out["measurements"]) == 18  # 3 conversations x thinking unset/on/off x text, ids
    assert all(count == 0 for _, _, count in out["measurements"]), out["shown"]
    assert out["differs_by_thinking"]
    assert out["after_revert"] is False
