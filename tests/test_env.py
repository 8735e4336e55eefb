from __future__ import annotations

import pytest
from packaging.version import Version

from unsloth_qwen_compat import _env
from unsloth_qwen_compat._matrix import LEGS, matching_leg


@pytest.mark.parametrize(
    ("text", "release", "pre"),
    [
        ("2026.10.9", "2026.10.9", False),
        ("2026.10.9.dev3+g1a2b3c", "2026.10.9", True),
        ("5.0.0rc1", "5.0.0", True),
        ("2.11.0+cu130", "2.11.0", False),
    ],
)
def test_versions_parse_and_reduce_to_their_release(text: str, release: str, pre: bool) -> None:
    version = _env.parse_version(text)
    assert version is not None
    assert _env.release_of(version) == Version(release)
    assert (version.is_prerelease or version.is_devrelease) is pre


@pytest.mark.parametrize("text", [None, "", "not-a-version"])
def test_unparsable_versions_are_none(text: str | None) -> None:
    assert _env.parse_version(text) is None


def test_missing_distribution_reads_as_none() -> None:
    assert _env.distribution_version("surely-not-installed-dist-xyz") is None
    assert _env.distribution_version("packaging") is not None


def _env_with(unsloth: str | None, transformers: str | None) -> _env.Environment:
    return _env.Environment(
        python="CPython 3.11",
        platform="linux",
        versions={"unsloth": unsloth, "transformers": transformers},
        gpu=None,
        unsloth=_env.UnslothState(_env.MODE_GPU),
    )


@pytest.mark.parametrize("leg", LEGS, ids=lambda leg: leg.name)
def test_each_leg_matches_its_own_pins_including_dev_builds(leg) -> None:
    assert matching_leg(_env_with(leg.unsloth, leg.transformers)) is leg
    assert matching_leg(_env_with(leg.unsloth + ".dev1", leg.transformers)) is leg


def test_pairs_outside_the_matrix_match_no_leg() -> None:
    assert matching_leg(_env_with("2026.10.9", "4.57.1")) is None
    assert matching_leg(_env_with(None, "5.17.0")) is None


def test_prerelease_lists_dev_builds() -> None:
    env = _env_with("2026.11.0rc1", "5.17.0")
    assert env.prerelease == ["unsloth"]
