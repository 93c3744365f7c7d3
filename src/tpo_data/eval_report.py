"""The evaluation report: ``report.md`` (tables) and PNG plots, from ``report.json``'s dict.

Kept apart from :mod:`tpo_data.evaluation` (which generates and judges) so a
report can be redrawn from a saved ``report.json`` without any model.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from tpo_data.scoring import position_biased

PLOTS = ("win_rate.png", "lengths.png", "categories.png")


def _pct(value: float | None) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.1%}"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def markdown(report: dict[str, Any]) -> str:
    """Tables: per-model outputs, win rates (with 95% intervals), per-category win rates."""
    lines = [
        "# Held-out evaluation",
        "",
        f"{report['instructions']} held-out instructions (never used for training), one sample "
        f"per model at T={report['sampling']['temperature']}; judge: {report['judge']['label']}, "
        "shown the instruction and the responses only, both orders, ties and unparsable "
        "verdicts count as half.",
        "",
        "## Outputs",
        "",
        "| model | prompt | parse rate | mean thought (chars) | mean response (chars) |",
        "|---|---|---|---|---|",
    ]
    for m in report["models"]:
        s = m["stats"]
        lines.append(f"| {m['name']} | {m['prompt']} | {_pct(s['parse_rate'])} | "
                     f"{_num(s['mean_thought_chars'])} | {_num(s['mean_response_chars'])} |")
    lines += ["", "## Win rates", "",
              "| model | vs | win rate | 95% CI | won both orders | lost both | n |",
              "|---|---|---|---|---|---|---|"]
    for c in report["comparisons"]:
        w = c["overall"]
        ci = "-" if w["n"] < 2 else f"± {w['ci95']:.1%}"
        lines.append(f"| {c['model']} | {c['reference']} | {_pct(w['win_rate'])} | {ci} | "
                     f"{w['wins']} | {w['losses']} | {w['n']} |")
    if report["comparisons"]:
        categories = sorted({k for c in report["comparisons"] for k in c["categories"]})
        lines += ["", "## Win rate per category", "",
                  "| model | vs | " + " | ".join(categories) + " |",
                  "|---|---|" + "---|" * len(categories)]
        for c in report["comparisons"]:
            cells = [_pct(c["categories"].get(k, {}).get("win_rate")) for k in categories]
            lines.append(f"| {c['model']} | {c['reference']} | " + " | ".join(cells) + " |")
    judge = report["judge"]
    if judge.get("calls"):
        lines += ["", f"Judge calls: {judge['calls']}, tied or without a verdict {judge['unparsable']}, "
                  f"verdicts forced {judge.get('forced', 0)}."]
        if note := position_note(judge):
            lines += ["", note]
    lines += ["", "Plots: " + ", ".join(f"![{p}]({p})" for p in PLOTS), ""]
    return "\n".join(lines)


def position_note(judge: dict[str, Any]) -> str:
    """A warning when the pair-wise judge mostly named the position, not the better response."""
    first, decided = judge.get("first_wins"), judge.get("calls", 0) - judge.get("unparsable", 0)
    if first is None or not position_biased(first, decided):
        return ""  # a reward model, a report written before the count existed, or no clear bias
    return (f"Position-biased judge: response A (shown first) won {first} of {decided} decided calls "
            f"({first / decided:.0%}). Both orders are judged, so the bias cancels, but a verdict that "
            "flips with the order is a tie (1/2), which pulls the win rates above toward 50%; judge "
            "with a stronger model (--judge_model).")


def _figure(width: float = 6.5, height: float = 3.6) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=96, metadata={"Software": None})


def plot_win_rates(report: dict[str, Any], path: Path) -> None:
    """Win rate of each model against each reference, in model order, with 95% intervals."""
    fig = _figure()
    ax = fig.add_subplot()
    names = [m["name"] for m in report["models"]]
    for reference in sorted({c["reference"] for c in report["comparisons"]}):
        rows = [c for c in report["comparisons"] if c["reference"] == reference]
        xs = [names.index(c["model"]) for c in rows]
        ys = [c["overall"]["win_rate"] for c in rows]
        errs = [c["overall"]["ci95"] or 0.0 for c in rows]
        ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=4, label=f"vs {reference}")
    ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylim(0, 1)
    ax.set_ylabel("held-out win rate")
    ax.set_title("Win rate per iteration (ties = 1/2)")
    if report["comparisons"]:
        ax.legend()
    _save(fig, path)


def plot_lengths(report: dict[str, Any], path: Path) -> None:
    """Parse rate, and mean thought and response length, per model."""
    fig = _figure(8, 3.4)
    names = [m["name"] for m in report["models"]]
    stats = [m["stats"] for m in report["models"]]
    ax1 = fig.add_subplot(1, 2, 1)
    ax1.bar(names, [s["parse_rate"] for s in stats], color="tab:green")
    ax1.set_ylim(0, 1)
    ax1.set_title("Parse rate (format adherence)")
    ax2 = fig.add_subplot(1, 2, 2)
    xs = range(len(names))
    ax2.bar([x - 0.2 for x in xs], [s["mean_thought_chars"] or 0 for s in stats], 0.4, label="thought")
    ax2.bar([x + 0.2 for x in xs], [s["mean_response_chars"] or 0 for s in stats], 0.4,
            label="response")
    ax2.set_xticks(list(xs), names)
    ax2.set_ylabel("characters (parsed samples)")
    ax2.set_title("Mean thought / response length")
    ax2.legend()
    _save(fig, path)


def plot_categories(report: dict[str, Any], path: Path) -> None:
    """Per-category win rate bars, one bar group per category, one bar per comparison."""
    comparisons = report["comparisons"]
    categories = sorted({k for c in comparisons for k in c["categories"]})
    fig = _figure(max(6.5, 0.9 * len(categories) + 2), 3.8)
    ax = fig.add_subplot()
    width = 0.8 / max(len(comparisons), 1)
    for i, c in enumerate(comparisons):
        ys = [c["categories"].get(k, {}).get("win_rate", math.nan) for k in categories]
        ax.bar([x + i * width - 0.4 + width / 2 for x in range(len(categories))], ys, width,
               label=f"{c['model']} vs {c['reference']}")
    ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)
    ax.set_xticks(range(len(categories)), categories, rotation=30, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("win rate")
    ax.set_title("Held-out win rate per category")
    if comparisons:
        ax.legend(fontsize="small")
    _save(fig, path)


def write_report(report: dict[str, Any], folder: Path) -> list[Path]:
    """Write report.md and the plots into ``folder``; return the written paths."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.md").write_text(markdown(report), encoding="utf-8")
    plot_win_rates(report, folder / PLOTS[0])
    plot_lengths(report, folder / PLOTS[1])
    plot_categories(report, folder / PLOTS[2])
    return [folder / "report.md", *(folder / p for p in PLOTS)]
