"""tox.ini, the README and the tested matrix say the same thing."""

from __future__ import annotations

import configparser
import re

from unsloth_qwen_compat._matrix import LEGS, markdown_table

from .conftest import REPO


def _tox() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(REPO / "tox.ini")
    return parser


def test_every_leg_has_a_tox_env_with_its_pins() -> None:
    tox = _tox()
    section = next(s for s in tox.sections() if s.startswith("testenv:gpu-"))
    envs = set(re.search(r"\{(.*)\}", section).group(1).split(","))
    assert envs == {leg.name for leg in LEGS}
    deps = tox[section]["deps"]
    for leg in LEGS:
        for pin in leg.pins():
            assert f"{leg.name}: {pin}" in deps, f"tox.ini lacks {leg.name}: {pin}"


def test_readme_table_is_generated_from_the_matrix() -> None:
    readme = (REPO / "README.md").read_text()
    table = re.search(r"<!-- legs:.*?-->\n(.*?)\n<!-- /legs -->", readme, re.S).group(1)
    assert table == markdown_table(), (
        "regenerate: python -c 'from unsloth_qwen_compat._matrix import markdown_table; print(markdown_table())'"
    )


def test_cpu_env_pins_the_cpu_torch_and_drops_torchvision() -> None:
    tox = _tox()
    assert "torch==2.13.0" in tox["testenv:cpu"]["deps"]
    assert "uninstall -y -q torchvision" in tox["testenv:cpu"]["commands_pre"]
