"""The conformance suite installed with ``unsloth-qwen-compat[conformance]``: the wheel carries
it, it keeps its caches out of site-packages, its oracle child finds it, and
``python -m unsloth_qwen_compat conformance`` runs it from a scratch directory."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from importlib.util import find_spec
from pathlib import Path

import pytest

from conformance import __main__ as suite_main
from conformance import oracle_client, zoo

from .conftest import REPO, requires_unsloth

requires_setuptools = pytest.mark.skipif(
    find_spec("setuptools") is None, reason="building the wheel without isolation needs setuptools here"
)

#: What a wheel is built from (pyproject.toml reads the README and LICENSE; MANIFEST.in
#: decides the package data).
WHEEL_SOURCES = (
    "pyproject.toml",
    "MANIFEST.in",
    "README.md",
    "LICENSE",
    "unsloth_qwen_compat",
    "conformance",
)


def _load_command_module():
    """unsloth_qwen_compat/conformance_command.py by path: importing the package would import
    Unsloth into this test process."""
    path = REPO / "unsloth_qwen_compat" / "conformance_command.py"
    spec = importlib.util.spec_from_file_location("conformance_command_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("UNSLOTH", "CONFORMANCE_", "PYTHONPATH"))}
    return env | extra


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The package's wheel, built from a copy of its sources (a build in the checkout would
    leave build/ and egg-info behind)."""
    if find_spec("setuptools") is None:
        pytest.skip("building the wheel without isolation needs setuptools here")
    source = tmp_path_factory.mktemp("source")
    for name in WHEEL_SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / name, source / name)
    out = tmp_path_factory.mktemp("wheel")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(out),
            ".",
        ],
        cwd=source,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (built,) = out.glob("unsloth_qwen_compat-*.whl")
    return built


@requires_setuptools
def test_the_wheel_ships_the_conformance_suite_and_the_data_it_reads(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        (metadata_name,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        metadata = archive.read(metadata_name).decode()
    suite = {f"conformance/{p.name}" for p in (REPO / "conformance").glob("*.py")}
    assert suite <= names, sorted(suite - names)
    # Read at run time: the installed suite's pytest settings, the suite's pinned copies of
    # Qwen's chat templates (the zoo's tokenizers and the chat-template case's reference), and
    # the shim's own templates (its chat_templates patch).
    assert "conformance/installed.ini" in names
    references = {
        f"conformance/chat_references/{p.name}" for p in (REPO / "conformance/chat_references").iterdir()
    }
    assert "conformance/chat_references/MANIFEST.json" in references
    assert references <= names, sorted(references - names)
    assert {
        "unsloth_qwen_compat/templates/qwen2_5.jinja",
        "unsloth_qwen_compat/templates/qwen3.jinja",
    } <= names
    assert "unsloth_qwen_compat/py.typed" in names
    assert not [n for n in names if n.endswith((".sh", ".pyc")) or n.startswith("tests/")]
    assert "Provides-Extra: conformance" in metadata
    for requirement in ("pytest>=8", "pytest-xdist>=3", "tokenizers", "transformers>=4.51", "peft>=0.15"):
        assert f'Requires-Dist: {requirement}; extra == "conformance"' in metadata


@requires_unsloth
@requires_setuptools
def test_the_installed_suite_runs_outside_a_checkout_and_writes_nothing_into_site_packages(
    wheel: Path, tmp_path: Path
) -> None:
    site = tmp_path / "site"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # A training repo whose own pytest settings the suite must not take up.
    repo = tmp_path / "training-repo"
    repo.mkdir()
    (repo / "pyproject.toml").write_text('[tool.pytest.ini_options]\naddopts = "--not-a-pytest-option"\n')
    command = [sys.executable, "-m", "unsloth_qwen_compat", "conformance", "--report", "report"]
    env = _clean_env(PYTHONPATH=str(site), XDG_CACHE_HOME=str(tmp_path / "xdg"))
    done = subprocess.run(
        [*command, "-m", "chat_template", "-k", "qwen2-plain", "-q"],  # one zoo model to build
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = repo / "report"
    assert f"conformance report: {report / 'conformance.md'}" in done.stdout
    data = json.loads((report / "conformance.json").read_text())
    cases = data["cases"]
    assert cases and all(c["nodeid"].startswith("conformance/test_chat_template.py::") for c in cases)
    # The run says it ended on its own with every selected case: what the retire proof requires.
    assert (data["collected"], data["exitstatus"], data["interrupted"]) == (len(cases), 0, False)
    # fp32 means fp32 in Triton's kernels too (unset, their fp32 dot products run in TF32).
    assert data["versions"]["triton_f32_default"] == "ieee"
    assert sorted(p.name for p in repo.iterdir()) == ["pyproject.toml", "report"]  # no compile cache
    cache = tmp_path / "xdg" / "unsloth-qwen-compat" / "conformance"
    assert {"zoo", "oracle", "pytest"} <= {p.name for p in cache.iterdir()}
    written = {p.name for p in site.rglob("*") if p.name != "__pycache__" and "__pycache__" not in p.parts}
    assert not written & {".pytest_cache", ".conformance_cache", "unsloth_compiled_cache", "logs"}


# -- the cache and the oracle child ----------------------------------------------------------


def test_the_cache_is_the_variable_then_the_checkouts_then_the_users(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CONFORMANCE_CACHE", str(tmp_path / "mine"))
    assert zoo.cache_root() == tmp_path / "mine"
    monkeypatch.delenv("CONFORMANCE_CACHE")
    assert zoo.CHECKOUT == REPO
    assert zoo.cache_root() == REPO / ".conformance_cache"
    monkeypatch.setattr(zoo, "CHECKOUT", None)  # installed
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert zoo.cache_root() == tmp_path / "xdg" / "unsloth-qwen-compat" / "conformance"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for unset_or_invalid in ("", "relative/cache"):
        monkeypatch.setenv("XDG_CACHE_HOME", unset_or_invalid)
        assert zoo.cache_root() == tmp_path / "home" / ".cache" / "unsloth-qwen-compat" / "conformance"


def test_the_oracle_child_finds_this_suite(monkeypatch, tmp_path: Path) -> None:
    parent = str(zoo.PACKAGE_PARENT)
    # A checkout comes first, as always.
    assert oracle_client._child_pythonpath("elsewhere", tmp_path) == os.pathsep.join([parent, "elsewhere"])
    monkeypatch.setattr(zoo, "CHECKOUT", None)
    # Installed where the child finds it anyway: PYTHONPATH untouched (a caller's pins first).
    assert oracle_client._child_pythonpath(parent, tmp_path) == parent
    # Another copy ahead of it: this one is put first.
    other = tmp_path / "other"
    (other / "conformance").mkdir(parents=True)
    (other / "conformance" / "__init__.py").write_text("")
    assert oracle_client._child_pythonpath(str(other), tmp_path) == os.pathsep.join([parent, str(other)])


def test_the_installed_suite_brings_its_own_pytest_settings(monkeypatch, tmp_path: Path) -> None:
    calls = []
    monkeypatch.setattr(suite_main.pytest, "main", lambda args: calls.append(args) or 0)
    monkeypatch.setenv("CONFORMANCE_CACHE", str(tmp_path / "cache"))
    suite_main.main(["--report", "out", "-m", "rope"])
    assert calls.pop() == [str(suite_main.SUITE), "-m", "rope", "--conformance-report", "out"]
    monkeypatch.setattr(zoo, "CHECKOUT", None)
    suite_main.main(["--report", "out", "-m", "rope"])
    assert calls.pop() == [
        "-c",
        str(suite_main.INSTALLED_INI),
        "--rootdir",
        str(zoo.PACKAGE_PARENT),
        "-o",
        f"cache_dir={tmp_path / 'cache' / 'pytest'}",
        str(suite_main.SUITE),
        "-m",
        "rope",
        "--conformance-report",
        "out",
    ]
    suite_main.main(["-c", "mine.ini", "--rootdir=here"])
    assert calls.pop()[:3] == ["-o", f"cache_dir={tmp_path / 'cache' / 'pytest'}", str(suite_main.SUITE)]
    assert suite_main.INSTALLED_INI.is_file()


# -- python -m unsloth_qwen_compat conformance ------------------------------------------------

FAKE_SUITE = """\
import json, os, sys
from pathlib import Path
args = sys.argv[1:]
report = Path(args[args.index("--report") + 1])
report.mkdir(parents=True)
for name in ("conformance.md", "conformance.json"):
    (report / name).write_text(json.dumps({"argv": args, "cwd": os.getcwd()}))
sys.exit(3)
"""


def test_the_command_runs_the_suite_from_a_scratch_directory(monkeypatch, capsys, tmp_path: Path) -> None:
    command = _load_command_module()
    fake = tmp_path / "fake"
    (fake / "conformance").mkdir(parents=True)
    (fake / "conformance" / "__init__.py").write_text("")
    (fake / "conformance" / "__main__.py").write_text(FAKE_SUITE)
    monkeypatch.setattr(command, "child_environment", lambda: _clean_env(PYTHONPATH=str(fake)))
    caller = tmp_path / "caller"
    (caller / "mine").mkdir(parents=True)
    (caller / "mine" / "test_x.py").write_text("")
    monkeypatch.chdir(caller)
    code = command.run("report", ["mine/test_x.py::case", "-k", "qwen3", "mine/absent.py"])
    assert code == 3  # the suite's exit code
    seen = json.loads((caller / "report" / "conformance.json").read_text())
    assert seen["argv"] == [
        "--report",
        str(caller / "report"),
        f"{caller / 'mine' / 'test_x.py'}::case",
        "-k",
        "qwen3",
        "mine/absent.py",
    ]
    scratch = Path(seen["cwd"])
    assert scratch.name.startswith("unsloth-qwen-compat-conformance-")
    assert not scratch.exists()  # gone after the run, with Unsloth's compile cache
    assert sorted(p.name for p in caller.iterdir()) == ["mine", "report"]
    out = capsys.readouterr().out
    assert f"conformance report: {caller / 'report' / 'conformance.md'} and " in out


def test_the_command_says_what_to_install_when_the_suite_is_missing(monkeypatch, capsys, tmp_path) -> None:
    command = _load_command_module()
    monkeypatch.setattr(command, "SUITE_MODULES", ("json", "conformance_suite_not_installed_here"))
    monkeypatch.chdir(tmp_path)
    assert command.run("report", []) == 2
    err = capsys.readouterr().err
    assert "needs conformance_suite_not_installed_here, not importable here" in err
    assert "pip install 'unsloth-qwen-compat[conformance]'" in err
    assert not (tmp_path / "report").exists()
