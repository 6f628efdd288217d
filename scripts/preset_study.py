"""Summarise a preset study: edit success against both kinds of locality, per setting, from sweep folders.

A study is one or more `lmedit sweep` folders whose jobs cross settings (the sweep's method labels) with two
validation files held apart from the test items: KnowEdit ZsRE items past the table's range, whose locality probes
ask the *same subject* under another relation, and CounterFact records (ROME's format) past the ones the docs use,
whose ten neighbourhood prompts ask *other subjects* that share the relation and the true object. Each setting gets one row; the balance is the mean of edit
success, rephrase and locality on both files, the criterion docs/locate-then-edit.md uses to choose presets.

    python scripts/preset_study.py runs/study/rome runs/study/memit --out docs/preset-study.md \
        --plot docs/images/preset-study.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

SAME_SUBJECT = "locality/Relation_Specificity"


def _kind(data: str) -> str | None:
    """'zsre' for KnowEdit ZsRE (same-subject locality), 'cf' for CounterFact in ROME's format (ten other-subject
    neighbourhood prompts per record); None for anything else, which the table leaves out."""
    name = Path(data).name.lower()
    if "zsre" in name:
        return "zsre"
    if name.startswith("counterfact_portability"):
        return "cf"
    return None


def read_study(folders: list[Path]) -> dict[str, dict[str, Any]]:
    """{label: {"method", "zsre": post metrics, "cf": post metrics, "seconds": [s/edit...]}} over finished jobs."""
    rows: dict[str, dict[str, Any]] = {}
    for folder in folders:
        plan = json.loads((folder / "sweep.json").read_text())
        for job in plan["jobs"]:
            summary_path = folder / job["folder"] / "summary.json"
            if not summary_path.is_file():
                continue
            kind = _kind(job["data"])
            if kind is None:
                continue
            summary = json.loads(summary_path.read_text())
            row = rows.setdefault(job["label"], {"method": job["method"], "overrides": job["overrides"],
                                                 "seconds": []})
            row[kind] = summary["post"]
            row["seconds"].append(summary["timing"]["edit_seconds_per_request"])
    return rows


def _cells(row: dict[str, Any]) -> dict[str, float | None]:
    zsre, cf = row.get("zsre") or {}, row.get("cf") or {}
    cells = {
        "zsre_success": zsre.get("rewrite_acc"), "zsre_rephrase": zsre.get("rephrase_acc"),
        "same_subject": zsre.get(SAME_SUBJECT), "zsre_portability": zsre.get("portability"),
        "cf_success": cf.get("rewrite_acc"), "cf_rephrase": cf.get("rephrase_acc"), "other_subjects": cf.get("locality"),
    }
    parts = [cells[k] for k in ("zsre_success", "zsre_rephrase", "same_subject", "cf_success", "cf_rephrase",
                                "other_subjects")]
    cells["balance"] = sum(parts) / len(parts) if all(p is not None for p in parts) else None
    cells["seconds"] = sum(row["seconds"]) / len(row["seconds"])
    return cells


def _fmt(value: float | None, scale: float = 100.0) -> str:
    return "—" if value is None else f"{value * scale:.1f}"


def markdown(rows: dict[str, dict[str, Any]]) -> str:
    lines = ["| setting | change | ZsRE Edit Succ. | ZsRE rephrase | same-subject loc. | ZsRE portability | "
             "CF Edit Succ. | CF rephrase | other-subject loc. | balance | s / edit |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for label, row in rows.items():
        c = _cells(row)
        change = ", ".join(f"{k}={v}" for k, v in row["overrides"].items() if k != "neighbour_prompts")
        if "neighbour_prompts" in row["overrides"]:
            change = f"{len(row['overrides']['neighbour_prompts'])} neighbour prompts, " + change
        lines.append(f"| {label} | {change or 'preset'} | {_fmt(c['zsre_success'])} | {_fmt(c['zsre_rephrase'])} | "
                     f"{_fmt(c['same_subject'])} | {_fmt(c['zsre_portability'])} | {_fmt(c['cf_success'])} | "
                     f"{_fmt(c['cf_rephrase'])} | {_fmt(c['other_subjects'])} | {_fmt(c['balance'])} | "
                     f"{c['seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def plot(rows: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    panels = (("same_subject", ("zsre_success", "zsre_rephrase"), "KnowEdit ZsRE (held apart): same-subject locality"),
              ("other_subjects", ("cf_success", "cf_rephrase"), "CounterFact (held apart): other-subject locality"))
    styles: dict[str, tuple[str, str]] = {}
    for ax, (x_key, y_keys, title) in zip(axes, panels):
        for label, row in rows.items():
            c = _cells(row)
            if c[x_key] is None or any(c[k] is None for k in y_keys):
                continue
            y = sum(c[k] for k in y_keys) / len(y_keys) * 100  # success alone sits at 100 for most settings
            marker, color = styles.setdefault(row["method"], ("osD^v"[len(styles) % 5], f"C{len(styles)}"))
            ax.scatter(c[x_key] * 100, y, marker=marker, color=color)
            ax.annotate(label, (c[x_key] * 100, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("locality (%)")
        ax.set_ylabel("edit success and rephrase, mean (%)")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path, help="sweep folders of the study")
    parser.add_argument("--out", type=Path, help="also write the table here (.md)")
    parser.add_argument("--plot", type=Path, help="write the trade-off plot here (.png)")
    args = parser.parse_args()
    rows = read_study(args.folders)
    if not rows:
        raise SystemExit("no finished jobs in " + ", ".join(map(str, args.folders)))
    table = markdown(rows)
    print(table)
    if args.out:
        args.out.write_text(table)
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
