"""The ``lmedit app`` page, built with Gradio (the ``app`` extra).

Gradio because it is what model demos in this ecosystem use (EasyEdit's own
demo included): it gives progress bars, a request queue, per-session state and
a page that never freezes while the server works, with no JavaScript of ours.
Every handler here only turns :mod:`lmedit.app.workbench` / :mod:`lmedit.app.runs`
results into widgets; errors from them become one-line Gradio errors.
"""


import logging
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

from lmedit.app import AppError
from lmedit.app.runs import RunBrowser
from lmedit.app.workbench import DEFAULT_PRESET, SCORE_KEYS, Workbench, build_request, lines

LOG = logging.getLogger(__name__)

EDIT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
COMPARE_DEFAULT = ("FT-M", "ROME", "GRACE")


def _gradio() -> Any:
    try:
        import gradio
    except ImportError:
        raise AppError("the web app needs Gradio: pip install 'lmedit[app]' (or bash scripts/install.sh with "
                       "LMEDIT_WITH_APP=1)") from None
    return gradio


def _errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run a handler; lmedit's one-line errors become Gradio errors (a message on the page, nothing else changes)."""
    import functools

    gr = _gradio()

    @functools.wraps(fn)
    def handler(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (AppError, ValueError, RuntimeError, OSError) as exc:
            LOG.info("app action failed: %s", exc)
            raise gr.Error(str(exc).splitlines()[0]) from None

    return handler


def _reporter(progress: Any) -> Callable[[float, str], None]:
    return lambda fraction, what: progress(fraction, desc=what)


def _frame(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> Any:
    import pandas as pd

    return pd.DataFrame([list(r) for r in rows], columns=list(headers))


def _fmt(value: Any) -> Any:
    return round(value, 3) if isinstance(value, float) else ("—" if value is None else value)


def _png(figure_writer: Callable[[Path], Any]) -> Any:
    """A figure drawn to a scratch PNG and returned as an image (the page never gets a path of ours)."""
    from PIL import Image

    with tempfile.TemporaryDirectory(prefix="lmedit-app-") as scratch:
        path = Path(scratch) / "figure.png"
        figure_writer(path)
        with Image.open(path) as image:
            return image.copy()


class AppPage:
    """The page's handlers over one workbench, one runs folder, one data file and one edits folder."""

    def __init__(self, bench: Workbench, runs: RunBrowser, items: Sequence[Any], data_label: str, edits: Path) -> None:
        self.bench = bench
        self.runs = runs
        self.items = list(items)
        self.data_label = data_label
        self.edits = edits

    # ------------------------------------------------------------------ edit tab

    def fill(self, index: float) -> tuple[str, str, str, str, str]:
        """The form filled from item ``index`` of the data file."""
        if not self.items:
            raise AppError("no data file was given (lmedit app --data FILE)")
        i = int(index or 0)
        if not 0 <= i < len(self.items):
            raise AppError(f"item {i} does not exist; the data file has items 0 to {len(self.items) - 1}")
        request = self.items[i]
        unrelated = [p.prompt for group in request.locality.values() for p in group][:3]
        return (request.prompt, request.target_new, request.subject or "", "\n".join(request.rephrase[:3]),
                "\n".join(unrelated))

    def apply(self, method: str, preset: str, prompt: str, target: str, subject: str, rephrase: str, unrelated: str,
              session_id: str, progress: Any) -> tuple[Any, ...]:
        found = self.bench.session(session_id)
        request = build_request(prompt, target, subject, rephrase, unrelated)
        with found.lock:
            outcome = found.stack.edit(method, preset, request, progress=_reporter(progress))
            stack = found.stack.rows()
        answers = _frame([[k, p, b, a] for (k, p), b, a in zip(outcome.probes, outcome.before, outcome.after)],
                         ["probe", "prompt", "before", "after"])
        scores = _frame([[k, _fmt(outcome.pre.get(k)), _fmt(outcome.post.get(k))] for k in SCORE_KEYS if k in outcome.post],
                        ["score", "before", "after"])
        entry = outcome.entry
        status = f"edit #{entry.number}: {entry.method} ({entry.preset or 'defaults'}) in {entry.seconds:.1f} s"
        return status, answers, scores, self._stack(stack)

    def undo(self, prompt: str, rephrase: str, unrelated: str, session_id: str) -> tuple[Any, ...]:
        from lmedit.app.workbench import greedy_answers, shown_probes

        found = self.bench.session(session_id)
        shown = shown_probes((prompt or "").strip(), lines(rephrase), lines(unrelated))
        with found.lock:
            before = greedy_answers(found.stack.model, found.stack.tok, [p for _, p in shown])
            entry = found.stack.undo()
            after = greedy_answers(found.stack.model, found.stack.tok, [p for _, p in shown])
            stack = found.stack.rows()
        answers = _frame([[k, p, b, a] for (k, p), b, a in zip(shown, before, after)],
                         ["probe", "prompt", "before undo", "after undo"])
        return f"undid edit #{entry.number} ({entry.method}): restored exactly", answers, self._stack(stack)

    def remove(self, number: float, session_id: str, progress: Any) -> tuple[str, Any]:
        found = self.bench.session(session_id)
        with found.lock:
            removed = found.stack.remove(int(number or 0), progress=_reporter(progress))
            stack = found.stack.rows()
        return f"removed edit #{removed.number} ({removed.method}); the edits after it were applied again", self._stack(stack)

    def save(self, number: float, name: str, session_id: str) -> tuple[str, Any]:
        folder = self._edit_folder(name)
        if folder.exists():
            raise AppError(f"a saved edit named {name!r} exists already; choose another name")
        found = self.bench.session(session_id)
        with found.lock:
            found.stack.save(int(number or 0), folder)
        gr = _gradio()
        return f"edit #{int(number or 0)} saved as {name!r}", gr.update(choices=self.saved_edits(), value=name)

    def load(self, name: str, session_id: str) -> tuple[str, Any]:
        folder = self._edit_folder(name)
        if not folder.is_dir():
            raise AppError(f"there is no saved edit named {name!r}")
        found = self.bench.session(session_id)
        with found.lock:
            entry = found.stack.load(folder)
            stack = found.stack.rows()
        return f"loaded {name!r} as edit #{entry.number} ({entry.method})", self._stack(stack)

    def _edit_folder(self, name: str) -> Path:
        name = (name or "").strip()
        if not EDIT_NAME.match(name):
            raise AppError("name the edit with letters, digits, '.', '_' or '-' (at most 64, no path)")
        return self.edits / name

    def saved_edits(self) -> list[str]:
        if not self.edits.is_dir():
            return []
        return sorted(p.name for p in self.edits.iterdir() if (p / "edit.json").is_file())

    @staticmethod
    def _stack(rows: list[list[Any]]) -> Any:
        return _frame(rows, ["#", "method", "preset", "edit", "seconds"])

    # ------------------------------------------------------------------ compare tab

    def compare(self, methods: list[str], prompt: str, target: str, subject: str, rephrase: str, unrelated: str,
                progress: Any) -> tuple[str, Any]:
        request = build_request(prompt, target, subject, rephrase, unrelated)
        probes, before, rows = self.bench.compare(methods, request, progress=_reporter(progress))
        headers = ["method"] + [f"{k}: {p}" for k, p in probes] + [*SCORE_KEYS[:3], "seconds", "error"]
        table = [["unedited", *before, *([None] * 3), None, ""]]
        for row in rows:
            answers = row.answers or [""] * len(probes)
            table.append([row.method, *answers, *(_fmt(row.scores.get(k)) for k in SCORE_KEYS[:3]),
                          _fmt(row.seconds), row.error])
        note = f"{len(rows)} methods, each from the unedited model (restored exactly after each)"
        return note, _frame([[_fmt(v) for v in r] for r in table], headers)

    # ------------------------------------------------------------------ trace tab

    def trace(self, prompt: str, subject: str, kind: str, samples: float, session_id: str, progress: Any) -> tuple[str, Any]:
        from lmedit.analysis.plots import plot_fact_heatmap

        trace, info = self.bench.trace(session_id, prompt, subject, kind=kind, samples=int(samples or 3),
                                       progress=_reporter(progress))
        image = _png(lambda path: plot_fact_heatmap(trace, kind, path, model_name=self.bench.model_name))
        text = (f"answer {info['answer']!r}: p {info['p_clean']:.3f} clean, {info['p_corrupted']:.3f} with the subject "
                f"corrupted. Largest effect of restoring the {kind} output at the last subject token: "
                f"**layer {info['layer']}** (+{info['effect']:.3f}); the layer to edit. "
                f"Traced on this tab's model with {info['edits']} edit(s) applied.")
        return text, image

    # ------------------------------------------------------------------ runs tab

    def show_runs(self, chosen: list[str] | None, typed: str, layout: str) -> tuple[str, str, Any, Any]:
        paths = list(chosen or []) + ([typed.strip()] if (typed or "").strip() else [])
        if not paths:
            raise AppError("choose a run folder in the menu or type one (relative to the runs folder)")
        table = self.runs.table(paths, layout)
        folders = self.runs.expand(paths)
        details = self.runs.details(self.runs.relative(folders[0])) if folders else None
        if details is None:
            return table, "", None, None
        progress = details["progress"]
        state = "complete" if progress["complete"] else "still running (or stopped)"
        text = (f"**{self.runs.relative(details['folder'])}**: chunks {progress['done']} / {progress['total']}, {state}. "
                + ", ".join(f"{k} {v}" for k, v in details["settings"].items() if v is not None))
        chunks = details["chunks"]
        frame = _frame([[_fmt(v) for v in row.values()] for row in chunks], list(chunks[0])) if chunks else None
        image = None
        if details["retention_plot"] is not None:
            from PIL import Image

            with Image.open(details["retention_plot"]) as opened:
                image = opened.copy()
        return table, text, frame, image

    def run_choices(self) -> Any:
        return _gradio().update(choices=self.runs.list_runs())


def build_page(page: AppPage, *, title: str = "lmedit") -> Any:
    """The Gradio Blocks of the four tabs."""
    from lmedit.registry import list_methods, list_presets
    from lmedit.reports import list_layouts

    gr = _gradio()
    methods = [m.name for m in list_methods()]
    model = page.bench.model_name

    def presets(method: str) -> Any:
        return gr.update(choices=[DEFAULT_PRESET, *list_presets(method)], value=DEFAULT_PRESET)

    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        gr.Markdown(f"## lmedit: edit **{model}**, compare methods, trace facts, browse runs")
        with gr.Tab("Edit", elem_id="tab-edit"):
            with gr.Row():
                method = gr.Dropdown(methods, value="FT-M" if "FT-M" in methods else methods[0], label="method",
                                     elem_id="edit-method")
                preset = gr.Dropdown([DEFAULT_PRESET, *list_presets("FT-M")], value=DEFAULT_PRESET, label="preset",
                                     elem_id="edit-preset")
                item = gr.Number(0, label=f"item of {page.data_label}", precision=0, elem_id="edit-item")
                fill = gr.Button("Fill from data", elem_id="edit-fill")
            prompt = gr.Textbox(label="prompt", placeholder="The Eiffel Tower is located in the city of", elem_id="edit-prompt")
            with gr.Row():
                target = gr.Textbox(label="new answer (target)", placeholder="Rome", elem_id="edit-target")
                subject = gr.Textbox(label="subject (for ROME, MEMIT, AlphaEdit)", placeholder="Eiffel Tower",
                                     elem_id="edit-subject")
            with gr.Row():
                rephrase = gr.Textbox(label="paraphrases (one per line)", lines=2, elem_id="edit-rephrase")
                unrelated = gr.Textbox(label="unrelated prompts that must not change (one per line)", lines=2,
                                       elem_id="edit-unrelated")
            with gr.Row():
                apply = gr.Button("Apply edit", variant="primary", elem_id="edit-apply")
                undo = gr.Button("Undo last edit", elem_id="edit-undo")
            status = gr.Markdown(elem_id="edit-status")
            answers = gr.Dataframe(headers=["probe", "prompt", "before", "after"], label="greedy answers",
                                   interactive=False, elem_id="edit-answers")
            scores = gr.Dataframe(headers=["score", "before", "after"], label="probe scores (teacher-forced)",
                                  interactive=False, elem_id="edit-scores")
            stack = gr.Dataframe(headers=["#", "method", "preset", "edit", "seconds"], label="applied edits (newest last)",
                                 interactive=False, elem_id="edit-stack")
            with gr.Row():
                number = gr.Number(1, label="edit #", precision=0, elem_id="edit-number")
                remove = gr.Button("Remove edit #", elem_id="edit-remove")
                name = gr.Textbox(label="save as", placeholder="eiffel-rome", elem_id="edit-name")
                save = gr.Button("Save edit #", elem_id="edit-save")
                saved = gr.Dropdown(page.saved_edits(), label="saved edits", elem_id="edit-saved")
                load = gr.Button("Load", elem_id="edit-load")
        with gr.Tab("Compare", elem_id="tab-compare"):
            chosen = gr.CheckboxGroup(methods, value=[m for m in COMPARE_DEFAULT if m in methods], label="methods",
                                      elem_id="compare-methods")
            c_prompt = gr.Textbox(label="prompt", elem_id="compare-prompt")
            with gr.Row():
                c_target = gr.Textbox(label="new answer (target)", elem_id="compare-target")
                c_subject = gr.Textbox(label="subject", elem_id="compare-subject")
            with gr.Row():
                c_rephrase = gr.Textbox(label="paraphrases (one per line)", lines=2, elem_id="compare-rephrase")
                c_unrelated = gr.Textbox(label="unrelated prompts (one per line)", lines=2, elem_id="compare-unrelated")
            c_run = gr.Button("Compare", variant="primary", elem_id="compare-run")
            c_note = gr.Markdown(elem_id="compare-note")
            c_table = gr.Dataframe(label="answers and scores per method", interactive=False, elem_id="compare-table")
        with gr.Tab("Trace", elem_id="tab-trace"):
            t_prompt = gr.Textbox(label="prompt", placeholder="The Eiffel Tower is located in the city of", elem_id="trace-prompt")
            with gr.Row():
                t_subject = gr.Textbox(label="subject", placeholder="Eiffel Tower", elem_id="trace-subject")
                t_kind = gr.Radio(["mlp", "hidden", "attn"], value="mlp", label="restore", elem_id="trace-kind")
                t_samples = gr.Slider(1, 10, value=3, step=1, label="noise samples", elem_id="trace-samples")
            t_run = gr.Button("Trace", variant="primary", elem_id="trace-run")
            t_text = gr.Markdown(elem_id="trace-text")
            t_image = gr.Image(label="p(answer) with each state restored", type="pil", interactive=False,
                               elem_id="trace-image")
        with gr.Tab("Runs", elem_id="tab-runs"):
            gr.Markdown(f"Run folders below the folder the app was started with (`{page.runs.root.name}`).")
            with gr.Row():
                r_chosen = gr.Dropdown(page.runs.list_runs(), multiselect=True, label="run folders", elem_id="runs-chosen")
                r_typed = gr.Textbox(label="or a folder (relative)", elem_id="runs-typed")
                r_layout = gr.Dropdown(list_layouts(), value="default", label="layout", elem_id="runs-layout")
            with gr.Row():
                r_show = gr.Button("Show", variant="primary", elem_id="runs-show")
                r_refresh = gr.Button("Refresh list", elem_id="runs-refresh")
            r_table = gr.Markdown(elem_id="runs-table")
            r_details = gr.Markdown(elem_id="runs-details")
            r_chunks = gr.Dataframe(label="per-chunk means", interactive=False, elem_id="runs-chunks")
            r_image = gr.Image(label="retention curves", type="pil", interactive=False, elem_id="runs-image")

        def sid(request: gr.Request) -> str:
            return request.session_hash or "default"

        method.change(presets, method, preset)
        fill.click(_errors(page.fill), item, [prompt, target, subject, rephrase, unrelated])

        def on_apply(m, p, pr, t, s, r, u, request: gr.Request, progress=gr.Progress()):  # noqa: B008
            return page.apply(m, p, pr, t, s, r, u, sid(request), progress)

        def on_undo(pr, r, u, request: gr.Request):
            return page.undo(pr, r, u, sid(request))

        def on_remove(n, request: gr.Request, progress=gr.Progress()):  # noqa: B008
            return page.remove(n, sid(request), progress)

        def on_save(n, nm, request: gr.Request):
            return page.save(n, nm, sid(request))

        def on_load(nm, request: gr.Request):
            return page.load(nm, sid(request))

        def on_compare(ms, pr, t, s, r, u, progress=gr.Progress()):  # noqa: B008
            return page.compare(ms, pr, t, s, r, u, progress)

        def on_trace(pr, s, k, n, request: gr.Request, progress=gr.Progress()):  # noqa: B008
            return page.trace(pr, s, k, n, sid(request), progress)

        apply.click(_errors(on_apply), [method, preset, prompt, target, subject, rephrase, unrelated],
                    [status, answers, scores, stack])
        undo.click(_errors(on_undo), [prompt, rephrase, unrelated], [status, answers, stack])
        remove.click(_errors(on_remove), number, [status, stack])
        save.click(_errors(on_save), [number, name], [status, saved])
        load.click(_errors(on_load), saved, [status, stack])
        c_run.click(_errors(on_compare), [chosen, c_prompt, c_target, c_subject, c_rephrase, c_unrelated], [c_note, c_table])
        t_run.click(_errors(on_trace), [t_prompt, t_subject, t_kind, t_samples], [t_text, t_image])
        r_show.click(_errors(page.show_runs), [r_chosen, r_typed, r_layout], [r_table, r_details, r_chunks, r_image])
        r_refresh.click(_errors(page.run_choices), None, r_chosen)

        def on_close(request: gr.Request) -> None:
            page.bench.release(sid(request))

        demo.unload(on_close)
    return demo


def theme() -> Any:
    """System fonts only: the default theme fetches web fonts, which an offline machine cannot."""
    gr = _gradio()
    return gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])


def launch(page: AppPage, *, host: str = "127.0.0.1", port: int | None = None, block: bool = True) -> tuple[Any, str]:
    """Serve the page; returns the Blocks and its URL (``block=False``: serve in the background, as tests do)."""
    demo = build_page(page)
    demo.queue(default_concurrency_limit=page.bench.max_sessions)
    _app, url, _share = demo.launch(server_name=host, server_port=port, prevent_thread_lock=not block, share=False,
                                    quiet=True, show_error=True, ssr_mode=False, theme=theme(), allowed_paths=[],
                                    footer_links=[])
    return demo, url
