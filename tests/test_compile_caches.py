"""conformance/compile_caches.sh: the compile caches packed on one machine come back, file for
file, where the next machine's processes look for them (CPU; folders stand in for the caches)."""

import os
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "conformance" / "compile_caches.sh"


def _env(root: Path) -> dict:
    return {
        **os.environ,
        "HOME": str(root / "home"),
        "TRITON_CACHE_DIR": str(root / "triton"),
        "UNSLOTH_MEGA_CACHE_DIR": str(root / "mega"),
        "USER": "compile-caches-test",
    }


@pytest.mark.parametrize("part_mb", [None, "1"])
def test_pack_then_unpack_restores_every_cache(tmp_path: Path, part_mb) -> None:
    before, after = tmp_path / "before", tmp_path / "after"
    (before / "triton" / "ab").mkdir(parents=True)
    (before / "triton" / "ab" / "kernel.cubin").write_bytes(os.urandom(3 << 19))  # 1.5 MiB: 2 parts
    (before / "mega" / "bundle").mkdir(parents=True)
    (before / "mega" / "bundle" / "a.bin").write_text("mega")
    (before / "triton" / "unsloth-qwen-compat-warm").mkdir()
    (before / "triton" / "unsloth-qwen-compat-warm" / "fp32.qwen3_5-plain.abc.ok").write_text("{}")
    archive = tmp_path / "caches.txz"
    pack = ["bash", str(SCRIPT), "pack", str(archive), *([part_mb] if part_mb else [])]
    done = subprocess.run(pack, env=_env(before), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "triton:" in done.stdout and "unsloth:" in done.stdout
    if part_mb:
        assert len(list(tmp_path.glob("caches.txz.part-*"))) == 2
    done = subprocess.run(
        ["bash", str(SCRIPT), "unpack", str(archive)], env=_env(after), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert (after / "triton" / "ab" / "kernel.cubin").read_bytes() == (
        before / "triton" / "ab" / "kernel.cubin"
    ).read_bytes()
    assert (after / "mega" / "bundle" / "a.bin").read_text() == "mega"
    # The warm-ups' markers travel with the kernels they describe.
    assert (after / "triton" / "unsloth-qwen-compat-warm" / "fp32.qwen3_5-plain.abc.ok").read_text() == "{}"


def test_a_wrong_call_says_how_to_call_it(tmp_path: Path) -> None:
    done = subprocess.run(
        ["bash", str(SCRIPT), "pak", "x"], env=_env(tmp_path), capture_output=True, text=True
    )
    assert done.returncode == 2 and "usage:" in done.stderr
    done = subprocess.run(
        ["bash", str(SCRIPT), "unpack", str(tmp_path / "none.txz")],
        env=_env(tmp_path),
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1 and "no " in done.stderr
