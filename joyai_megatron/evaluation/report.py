"""Several ``eval`` results side by side: a Markdown table and a PNG bar chart of the scores.

    python -m joyai_megatron.evaluation.report pretrained=runs/demo/eval/pretrained.json \
        sft=runs/demo/eval/sft.json ... --output runs/demo/eval/summary.md --chart runs/demo/eval/scores.png

Scores in [0, 1] (accuracies, pass rates, MTP acceptance ratio) share the chart; unbounded ones
(perplexities, acceptance length) appear in the table only.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

MTP_COLUMNS = ("acceptance_length", "acceptance_ratio", "tokens_per_target_forward")


def score_rows(results: dict[str, dict[str, Any]]) -> tuple[list[str], dict[str, dict[str, float]]]:
    """Column names (``task/metric``, ``mtp/...``) and each model's values."""
    rows: dict[str, dict[str, float]] = {}
    for name, doc in results.items():
        row = {f"{task}/{m}": v for task, metrics in doc["tasks"].items() for m, v in metrics.items()}
        row.update(
            {f"mtp/{k}": doc["mtp_acceptance"][k] for k in MTP_COLUMNS if k in doc.get("mtp_acceptance", {})}
        )
        rows[name] = row
    columns = sorted({c for row in rows.values() for c in row})
    return columns, rows


def markdown_table(columns: list[str], rows: dict[str, dict[str, float]]) -> str:
    lines = ["| model | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, row in rows.items():
        cells = [f"{row[c]:.4g}" if c in row else "-" for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def bar_chart(columns: list[str], rows: dict[str, dict[str, float]], path: Path) -> list[str]:
    """Grouped bars of the [0, 1] scores per model; returns the columns drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bounded = [
        c
        for c in columns
        if not c.endswith(("perplexity", "bits_per_byte", "acceptance_length", "tokens_per_target_forward"))
        and all(0.0 <= row.get(c, 0.0) <= 1.0 for row in rows.values())
    ]
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(bounded)), 3.6), dpi=100)
    width = 0.8 / max(len(rows), 1)
    for k, (name, row) in enumerate(rows.items()):
        xs = [i + (k - (len(rows) - 1) / 2) * width for i in range(len(bounded))]
        ax.bar(xs, [row.get(c, 0.0) for c in bounded], width, label=name)
    ax.set_xticks(
        range(len(bounded)), [c.replace("joyai_demo_", "").replace("/", "\n") for c in bounded], fontsize=8
    )
    ax.set_ylim(0, 1.2)  # room for the legend above the bars
    ax.set_ylabel("score")
    ax.legend(fontsize=8, ncols=min(len(rows), 4), loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return bounded


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("results", nargs="+", metavar="NAME=JSON", help="an eval results file per model")
    parser.add_argument("--output", type=Path, required=True, help="Markdown table")
    parser.add_argument("--chart", type=Path, help="PNG bar chart")
    args = parser.parse_args(argv)
    results = {}
    for item in args.results:
        name, _, path = item.partition("=")
        results[name] = json.loads(Path(path).read_text())
    columns, rows = score_rows(results)
    table = markdown_table(columns, rows)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(table)
    if args.chart:
        bar_chart(columns, rows, args.chart)
    print(table, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
