"""Compare the sweep check's folders (scripts/sweep_check.sh OUT) with its serial run.

For each job: the Ray run's summary equals the serial one (timing and memory left out); every request has exactly
one record; after the driver kill, the records written before it are still there, unchanged, and the rerun ran only
the chunks that were missing.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path


def comparable(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k not in ("timing", "memory")}


def close(a, b, path: str = "") -> list[str]:
    """Where two summaries differ: exactly for everything but perplexities (relative 1e-6 allowed, see docs)."""
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{path}: keys differ"]
        return [d for k in a for d in close(a[k], b[k], f"{path}/{k}")]
    if isinstance(a, list) and isinstance(b, list):
        return [f"{path}: lengths differ"] if len(a) != len(b) else [d for i, (x, y) in enumerate(zip(a, b))
                                                                     for d in close(x, y, f"{path}[{i}]")]
    if isinstance(a, float) and isinstance(b, float) and "ppl" in path:
        return [] if math.isclose(a, b, rel_tol=1e-6) else [f"{path}: {a} != {b}"]
    return [] if a == b else [f"{path}: {a} != {b}"]


def records(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]


def main(out: Path) -> None:
    serial = {p.parent.name: json.loads(p.read_text()) for p in sorted((out / "serial").glob("*/summary.json"))}
    for run in [r for r in ("ray", "wkill", "dkill") if (out / r).is_dir()]:  # "ray" is absent after SKIP_CLEAN=1
        exact = [name for name in serial
                 if comparable(json.loads((out / run / name / "summary.json").read_text())) == comparable(serial[name])]
        near = [name for name in serial if not close(comparable(json.loads((out / run / name / "summary.json").read_text())),
                                                     comparable(serial[name]))]
        once = all(sorted(r["index"] for r in records(out / run / name)) == sorted(r["index"] for r in records(out / "serial" / name))
                   for name in serial)
        print(f"{run}: {len(exact)}/{len(serial)} summaries identical to serial, {len(near)}/{len(serial)} equal "
              f"(perplexities to 1e-6); every request recorded exactly once: {once}")
    before = out / "dkill_snapshot"
    kept = total = rerun = 0
    for name in serial:
        old = (before / name / "results.jsonl")
        old_lines = old.read_text().splitlines() if old.is_file() else []
        new_lines = (out / "dkill" / name / "results.jsonl").read_text().splitlines()
        chunks_old = {json.loads(line)["chunk"] for line in old_lines}
        kept += sum(line in new_lines for line in old_lines)
        total += len({r["chunk"] for r in records(out / "dkill" / name)})
        rerun += len({r["chunk"] for r in records(out / "dkill" / name)} - chunks_old)
    print(f"driver kill: {kept} record lines written before the kill kept unchanged; the rerun ran {rerun} of {total} chunks")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/sweep-check"))
