"""``lmedit app``: the local web page (Edit, Compare, Trace, Runs) on one model.

Kept cheap to import: Gradio, torch and the model load only when the command runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from lmedit.commands.common import DEVICE_HELP, DTYPE_HELP, checked_placement, console, err_console, fail, setup_logging

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def app_command(
    model: str = typer.Option("smollm2-135m", help="Model preset, Hugging Face id or local folder."),
    root: Path = typer.Option(Path("."), help="Folder whose run folders the Runs tab may read (nothing outside it); "
                                              "saved edits go to ROOT/edits unless --edits says otherwise."),
    data: Optional[Path] = typer.Option(None, help="Benchmark file to pick edit items from (default: the packaged demo set)."),
    edits: Optional[Path] = typer.Option(None, help="Folder for edits saved from the page (default: ROOT/edits)."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on. Anything but 127.0.0.1 lets other machines edit "
                                               "your model (a warning is printed)."),
    port: Optional[int] = typer.Option(None, help="Port (default: the first free one from 7860)."),
    sessions: int = typer.Option(2, help="Browser sessions with a model copy of their own (each holds one copy in memory)."),
    device: str = typer.Option("cpu", help=DEVICE_HELP),
    dtype: str = typer.Option("float32", help=DTYPE_HELP),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Open the web app: edit and undo, compare methods, trace a fact, browse run folders."""
    setup_logging(verbose)
    checked_placement(device, dtype)
    if sessions < 1:
        fail("--sessions must be at least 1")
    if not root.is_dir():
        fail(f"--root {root} is not a folder; give the folder that holds your run folders")
    warning = host_warning(host)
    if warning:
        err_console.print(f"[yellow]warning:[/] {warning}", highlight=False)
    try:
        page = make_page(model, root, data=data, edits=edits, sessions=sessions, device=device, dtype=dtype)
        from lmedit.app.ui import launch

        _demo, url = launch(page, host=host, port=port, block=False)
    except (ValueError, RuntimeError, OSError) as exc:
        fail(str(exc))
    console.print(f"lmedit app on [bold]{url}[/] (model {model}; runs under {page.runs.root}); Ctrl+C stops it",
                  highlight=False)
    _wait()


def host_warning(host: str) -> str | None:
    """What to tell a user who serves the page beyond this machine (None on the loopback address)."""
    if host in LOCAL_HOSTS:
        return None
    return (f"listening on {host}: anyone who can reach this machine on that address can edit the model and read the "
            "run folders under --root; the app has no login")


def make_page(model: str, root: Path, *, data: Optional[Path] = None, edits: Optional[Path] = None, sessions: int = 2,
              device: str = "cpu", dtype: str = "float32", loaded: Any = None) -> Any:
    """The page's handlers: the model loaded once (or ``loaded=(model, tok)``), the data items, the runs folder."""
    from lmedit.app.runs import RunBrowser
    from lmedit.app.ui import AppPage
    from lmedit.app.workbench import Workbench
    from lmedit.data import load_requests
    from lmedit.models import load_model

    items = load_requests(data)  # checked before the model loads: a bad file costs no waiting
    runs = RunBrowser(root)
    if loaded is None:
        with console.status(f"loading {model}..."):
            loaded = load_model(model, dtype=dtype, device=device)
    bench = Workbench(*loaded, model, max_sessions=sessions)
    label = data.name if data else "the demo set"
    return AppPage(bench, runs, items, label, Path(edits) if edits else runs.root / "edits")


def _wait() -> None:
    import time

    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        console.print("stopped")
