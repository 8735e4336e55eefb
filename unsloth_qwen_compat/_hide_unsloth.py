"""Hide Unsloth from this process: a stand-in for "Unsloth is not installed".

Unsloth patches transformers globally on import, so a process that must run stock
transformers (the benchmark's and the parity example's HF path, the tests' "no Unsloth"
children) hides ``unsloth`` and ``unsloth_zoo`` from the import system and from package
metadata before anything imports them.

Importing ``unsloth_qwen_compat`` imports Unsloth, so such a process cannot reach this
module through the package: it runs this file by path (:data:`CODE` does, for
``python -c`` children). Hence the standard library only, and no package imports.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

HIDDEN = ("unsloth", "unsloth_zoo")


def hide_unsloth() -> None:
    """Make Unsloth unimportable and uninstalled-looking in this process."""
    import importlib.abc
    import importlib.metadata as metadata

    class HideUnsloth(importlib.abc.MetaPathFinder):
        def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
            if name.split(".")[0] in HIDDEN:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, HideUnsloth())
    real_version = metadata.version

    def version(name: str) -> str:
        if name.replace("-", "_") in HIDDEN:
            raise metadata.PackageNotFoundError(name)
        return real_version(name)

    metadata.version = version


def imported_hidden() -> list[str]:
    """The hidden distributions' top-level modules this process has imported anyway."""
    return sorted({name.split(".")[0] for name in sys.modules} & set(HIDDEN))


#: Python source that hides Unsloth, to run first in a ``python -c`` child.
CODE = f"import runpy; runpy.run_path({str(Path(__file__).resolve())!r})['hide_unsloth']()\n"
