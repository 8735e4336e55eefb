"""``bench.png``: bar charts of the main table (tokens/s and peak memory per case)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def write_png(rows: Sequence[Mapping[str, Any]], path: Path) -> str | None:
    """Bar charts of tokens/s and peak GiB per case; None when written, else why not."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "bench.png skipped: matplotlib is not installed (pip install 'unsloth-qwen-compat[bench]')"
    groups = list(dict.fromkeys((r["shape"], r["precision"]) for r in rows))
    paths = list(dict.fromkeys(r["path"] for r in rows))
    ok = {(r["shape"], r["precision"], r["path"]): r for r in rows if r.get("status") == "ok"}
    figure, axes = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(groups) * 2), 4.5))
    width = 0.8 / max(1, len(paths))
    for axis, key, label in (
        (axes[0], "tokens_per_s", "tokens/s"),
        (axes[1], "peak_allocated_gib", "peak GiB"),
    ):
        for i, name in enumerate(paths):
            values = [ok.get((*g, name), {}).get(key) or 0 for g in groups]
            axis.bar([g + i * width for g in range(len(groups))], values, width, label=name)
        axis.set_xticks([g + width * (len(paths) - 1) / 2 for g in range(len(groups))])
        axis.set_xticklabels([f"{s}\n{p}" for s, p in groups], fontsize=8)
        axis.set_ylabel(label)
        axis.set_title(label)
    # Above both plots: inside one, the legend covers the tallest bars.
    figure.legend(*axes[0].get_legend_handles_labels(), loc="upper center", ncol=len(paths))
    figure.tight_layout(rect=(0, 0, 1, 0.92))
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return None
