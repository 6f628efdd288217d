"""Run folders as the app's Runs tab reads them: only under the folder the app was started with.

Every path the browser sends is a path *relative to that root*; it is refused
when it is absolute, starts at a home directory, or resolves (symbolic links
followed) anywhere outside the root. Run folders are read as JSON; nothing is
ever unpickled.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Sequence

from lmedit.app import AppError

MAX_DEPTH = 5
MAX_FOLDERS = 500
CHUNK_KEYS = ("rewrite_acc", "rephrase_acc", "locality", "portability")


class PathOutsideRoot(AppError):
    """A path from the browser points outside the app's root folder."""


class RunBrowser:
    """Lists and reads run folders below ``root``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise AppError(f"the runs folder {root} does not exist; pass an existing folder with --root")

    def resolve(self, text: str) -> Path:
        """The folder ``text`` names, relative to the root; :class:`PathOutsideRoot` if it leaves the root."""
        text = (text or "").strip()
        if "\x00" in text:
            raise PathOutsideRoot("a folder name cannot contain a NUL character")
        if text.startswith(("/", "\\", "~")) or Path(text).is_absolute() or (len(text) > 1 and text[1] == ":"):
            raise PathOutsideRoot(f"{text!r} is not a path inside the runs folder; give a path relative to it, "
                                  "as listed in the folder menu")
        candidate = (self.root / text.replace("\\", "/")).resolve()
        if not candidate.is_relative_to(self.root):
            raise PathOutsideRoot(f"{text!r} points outside the runs folder the app was started with; "
                                  "only folders below it can be read")
        if not candidate.is_dir():
            raise AppError(f"there is no folder {text!r} in the runs folder")
        return candidate

    def relative(self, folder: Path) -> str:
        return folder.relative_to(self.root).as_posix() or "."

    def list_runs(self) -> list[str]:
        """Run folders (with config.json) and trace folders (with trace.json) below the root, relative, sorted."""
        found: list[str] = []
        for current, dirs, files in os.walk(self.root):  # os.walk does not follow symbolic links to folders
            here = Path(current)
            depth = len(here.relative_to(self.root).parts)
            dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if depth < MAX_DEPTH else []
            if "config.json" in files or "trace.json" in files:
                found.append(self.relative(here))
            if len(found) >= MAX_FOLDERS:
                break
        return sorted(found)

    def expand(self, paths: Sequence[str]) -> list[Path]:
        """Checked folders for ``paths``; a folder of run folders stands for the run folders in it."""
        from lmedit.reports import expand_run_folders

        folders = [self.resolve(p) for p in paths]
        return [f for f in expand_run_folders(folders) if f.resolve().is_relative_to(self.root)]

    def table(self, paths: Sequence[str], layout: str = "default") -> str:
        """The runs as the report layout ``layout`` tabulates them (markdown)."""
        from lmedit.reports import ReportError, get_layout, load_run

        if not paths:
            raise AppError("choose at least one run folder")
        try:
            chosen = get_layout(layout)
            return chosen.table(chosen.rows([load_run(f) for f in self.expand(paths)]))
        except ReportError as exc:
            raise AppError(str(exc)) from None

    def details(self, path: str) -> dict[str, Any]:
        """One run: its settings, progress (chunks written of all), per-chunk means and its retention plot."""
        folder = self.resolve(path)
        return run_details(folder)


def run_details(folder: Path, run: dict[str, Any] | None = None) -> dict[str, Any]:
    """Settings, progress, per-chunk means and plots of one run folder (also used by the HTML report);
    ``run``: the folder as :func:`lmedit.reports.load_run` already read it."""
    from lmedit.reports import ReportError, load_run

    try:
        run = run if run is not None else load_run(folder)
    except ReportError as exc:
        raise AppError(str(exc)) from None
    config, summary = run["config"], run["summary"]
    return {
        "folder": folder,
        "settings": {k: config.get(k) for k in ("method", "model", "protocol", "T", "n_requests", "dtype", "preset")},
        "progress": run_progress(config, summary),
        "chunks": chunk_rows(summary),
        "retention_plot": _inside(folder, "lifelong.png"),
    }


def run_progress(config: dict[str, Any], summary: dict[str, Any]) -> dict[str, Any]:
    """Chunks written so far of all the run will write (a run still going is summarised from what it wrote)."""
    n = int(config.get("n_requests") or 0)
    per_chunk = int(config.get("T") or config.get("batch_size") or 1) if config.get("protocol") != "single" else 1
    total = math.ceil(n / max(1, per_chunk)) if n else len(summary.get("chunks", []))
    done = len(summary.get("chunks", []))
    return {"done": done, "total": total, "complete": bool(summary.get("complete", done >= total))}


def chunk_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Per-chunk means of the headline scores (the sequential protocol's unit of averaging)."""
    rows = []
    for chunk in summary.get("chunks", []):
        post = chunk.get("post", {})
        rows.append({"chunk": chunk.get("chunk"), "n": chunk.get("n"),
                     **{k: post.get(k) for k in CHUNK_KEYS if k in post}})
    return rows


def _inside(folder: Path, name: str) -> Path | None:
    path = (folder / name).resolve()
    return path if path.is_file() and path.is_relative_to(folder.resolve()) else None
