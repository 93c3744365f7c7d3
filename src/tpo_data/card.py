"""Dataset cards, statistics and plots for one TPO iteration.

The card (``README.md``) is what makes a published version self-describing: its
YAML header declares the ``pairs`` and ``candidates`` configs so
``datasets.load_dataset`` finds them, and its body carries the lineage, recipe,
statistics, plots and distilabel's ``pipeline.yaml`` so the data can be
regenerated. Everything rendered here passes through :func:`tpo_data.secrets.scrub`.
"""

from __future__ import annotations

import io
import json
import statistics
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import yaml

from tpo_data.secrets import scrub

if TYPE_CHECKING:
    import datasets

CONFIG_NAMES = ("pairs", "candidates")
PLOT_FILES = {
    "score": "plots/score_distribution.png",
    "length": "plots/length_distribution.png",
    "parse_rate": "plots/parse_rate.png",
}


def data_file_path(config: str) -> str:
    """Path of a config's single parquet shard inside a version folder (Hub layout)."""
    return f"data/{config}/train-00000-of-00001.parquet"


def _column(ds: datasets.Dataset, name: str) -> list[Any]:
    return list(ds[name]) if name in ds.column_names else []


def _mean(values: Iterable[float | int | None]) -> float | None:
    present = [float(v) for v in values if v is not None]
    return round(statistics.fmean(present), 4) if present else None


def compute_stats(candidates: datasets.Dataset, pairs: datasets.Dataset) -> dict[str, Any]:
    """Summary statistics of one iteration, stored in the manifest and shown on the card."""
    parsed = _column(candidates, "parsed")
    scores = [s for s in _column(candidates, "score") if s is not None]
    instructions = set(_column(candidates, "instruction_id"))
    per_category: dict[str, list[bool]] = {}
    for category, ok in zip(_column(candidates, "category"), parsed, strict=False):
        per_category.setdefault(category, []).append(bool(ok))
    rhos = sorted(set(_column(pairs, "rho")))
    return {
        "candidates": candidates.num_rows,
        "instructions": len(instructions),
        "parsed": sum(bool(p) for p in parsed),
        "parse_rate": round(sum(bool(p) for p in parsed) / len(parsed), 4) if parsed else None,
        "parse_rate_by_category": {
            category: round(sum(oks) / len(oks), 4)
            for category, oks in sorted(per_category.items())
        },
        "scored": len(scores),
        "score_mean": _mean(scores),
        "length_mean": _mean(_column(candidates, "length")),
        "pairs": pairs.num_rows,
        "pair_rate": round(pairs.num_rows / len(instructions), 4) if instructions else None,
        "chosen_score_mean": _mean(_column(pairs, "chosen_score")),
        "rejected_score_mean": _mean(_column(pairs, "rejected_score")),
        "score_gap_mean": _mean(_column(pairs, "score_gap")),
        "chosen_length_mean": _mean(_column(pairs, "chosen_length")),
        "rejected_length_mean": _mean(_column(pairs, "rejected_length")),
        "rho": rhos[0] if len(rhos) == 1 else rhos,
    }


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    # No Software/date metadata: identical data gives identical bytes, hence identical hashes.
    fig.savefig(buf, format="png", dpi=96, metadata={"Software": None})
    return buf.getvalue()


def _histogram(title: str, xlabel: str, series: Mapping[str, Sequence[float]]) -> bytes:
    # Figure + Agg canvas directly: no pyplot global state, no dependence on MPLBACKEND.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    # None marks "no score" (e.g. a parse failure kept as the rejected sample).
    series = {label: [v for v in values if v is not None] for label, values in series.items()}
    everything = [v for values in series.values() for v in values]
    if everything:
        low, high = min(everything), max(everything)
        bins = [low + (high - low) * i / 30 for i in range(31)] if high > low else 10
        for label, values in series.items():
            if values:
                ax.hist(
                    values, bins=bins, alpha=0.5, label=f"{label} (n={len(values)})", density=True
                )
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density")
    fig.tight_layout()
    return _png(fig)


def _parse_rate_plot(candidates: datasets.Dataset) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    counts: Counter[str] = Counter()
    ok: Counter[str] = Counter()
    for category, parsed in zip(
        _column(candidates, "category"), _column(candidates, "parsed"), strict=False
    ):
        counts[category] += 1
        ok[category] += bool(parsed)
    # Parenthesised so it cannot collide with a category called "all".
    labels = ["(all)", *sorted(counts)]
    totals = [sum(counts.values()), *(counts[c] for c in labels[1:])]
    rates = [
        (sum(ok.values()) if i == 0 else ok[c]) / n if n else 0.0
        for i, (c, n) in enumerate(zip(labels, totals, strict=True))
    ]
    fig = Figure(figsize=(6, 3.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.bar(labels, rates, color=["tab:gray", *["tab:blue"] * (len(labels) - 1)])
    ax.set_ylim(0, 1)
    ax.set_ylabel("share of samples parsed")
    ax.set_title("Thought/response parse rate")
    ax.tick_params(axis="x", labelrotation=30)
    fig.tight_layout()
    return _png(fig)


def make_plots(candidates: datasets.Dataset, pairs: datasets.Dataset) -> dict[str, bytes]:
    """PNG plots for the card, keyed by their path in the version folder."""
    return {
        PLOT_FILES["score"]: _histogram(
            "Judge scores",
            "score",
            {
                "all candidates": _column(candidates, "score"),
                "chosen": _column(pairs, "chosen_score"),
                "rejected": _column(pairs, "rejected_score"),
            },
        ),
        PLOT_FILES["length"]: _histogram(
            "Response lengths",
            "characters",
            {
                "all candidates": _column(candidates, "length"),
                "chosen": _column(pairs, "chosen_length"),
                "rejected": _column(pairs, "rejected_length"),
            },
        ),
        PLOT_FILES["parse_rate"]: _parse_rate_plot(candidates),
    }


def card_metadata(configs: Sequence[str] = CONFIG_NAMES) -> dict[str, Any]:
    """YAML header of the card: one config per table, ``pairs`` is the default."""
    return {
        "configs": [
            {
                "config_name": name,
                "data_files": [{"split": "train", "path": f"data/{name}/train-*"}],
                **({"default": True} if name == "pairs" else {}),
            }
            for name in configs
        ],
        "tags": ["tpo", "preference", "synthetic", "distilabel"],
    }


def _table(rows: Iterable[tuple[str, Any]]) -> str:
    lines = ["| field | value |", "|---|---|"]
    for key, value in rows:
        if isinstance(value, (dict, list)):
            value = json.dumps(value, sort_keys=True)
        cell = "" if value is None else str(value).replace("|", "\\|")
        lines.append(f"| {key} | {cell} |")
    return "\n".join(lines)


def build_card(
    manifest: Mapping[str, Any],
    stats: Mapping[str, Any],
    recipe: Mapping[str, Any],
    pipeline_yaml: str | None,
    plot_files: Iterable[str],
    *,
    title: str | None = None,
    configs: Sequence[str] = CONFIG_NAMES,
) -> str:
    """Render the README.md dataset card of one version (YAML header + markdown)."""
    version = manifest.get("version", "")
    header = yaml.safe_dump(card_metadata(configs), sort_keys=False)
    lineage = [
        ("version", version),
        ("iteration", manifest.get("iteration")),
        ("parent model", manifest.get("parent_model")),
        ("parent version", manifest.get("parent_version")),
        ("seed", manifest.get("seed")),
        ("instruction slice", manifest.get("instruction_slice")),
        ("created", manifest.get("created")),
    ]
    rows = [(f"`{name}` rows", count) for name, count in (manifest.get("row_counts") or {}).items()]
    parts = [
        f"---\n{header}---",
        f"# {title or f'TPO preference data, {version}'}",
        "Thought Preference Optimization data produced by tpo-data for one training iteration. "
        "This version is immutable; later iterations are published under their own tags.",
        "```python\nfrom datasets import load_dataset\n"
        # The card is part of the immutable version, written before any tag exists.
        f'# revision: the tag this version was published under ("{version}" unless `--tag` named another)\n'
        f'pairs = load_dataset(REPO_ID, "pairs", revision="{version}", split="train")\n'
        f'candidates = load_dataset(REPO_ID, "candidates", revision="{version}", '
        'split="train")\n```',
        "## Lineage",
        _table(lineage),
        "## Statistics",
        _table([*rows, *stats.items()]),
        "## Plots",
        "\n\n".join(
            f"![{path.rsplit('/', 1)[-1].removesuffix('.png')}]({path})" for path in plot_files
        ),
        "## Recipe",
        f"```yaml\n{yaml.safe_dump(dict(recipe), sort_keys=False).rstrip()}\n```",
    ]
    if pipeline_yaml:
        parts += [
            "## Regenerating",
            "`pipeline.yaml` in this repository is the distilabel pipeline that produced "
            "the candidates "
            "(`distilabel pipeline run --config pipeline.yaml`).",
            f"<details><summary>pipeline.yaml</summary>\n\n```yaml\n{pipeline_yaml.rstrip()}\n```\n\n</details>",
        ]
    versions = manifest.get("library_versions") or {}
    if versions:
        parts += ["## Library versions", _table(sorted(versions.items()))]
    return scrub("\n\n".join(parts) + "\n")
