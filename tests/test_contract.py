"""The method contract, checked for every registered method on three tiny layouts (Llama, GPT-2, Gemma 3),
each in float32, bfloat16 and float16.

Nothing here names a method: the matrix is ``list_methods()`` × layouts, each method's
settings for a tiny model come from its registration (``tiny_setup``), and the points a
method cannot meet are read from its ``Contract`` declaration, which the test then checks
instead. A newly registered method is tested here without any change to this file.

Per (method, layout, dtype): requests are validated before any work; the edit takes effect;
restore is bit-exact (every parameter and buffer, the probe outputs, no per-model state
left behind); save → load into a fresh model gives the same outputs; three sequential
edits restore exactly; an evaluation pass changes no state (weights, method state, outputs).
A method's own set-up (training, for MEND, MALMEN and SERAC) runs in float32, as users train; the
model it then edits is cast to the dtype under test.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from conftest import build_tiny_gpt2, build_tiny_llama, snapshot, state_equal
from lmedit import model_state
from lmedit.editor import Editor
from lmedit.evaluation.evaluator import EvalConfig
from lmedit.handles import EditHandle, restore_all
from lmedit.registry import Contract, MethodError, MethodInfo, list_methods, load_edit
from lmedit.requests import EditRequest
from lmedit.routing import router_of


def build_tiny_gemma3(vocab_size: int, seed: int = 0, layers: int = 3) -> torch.nn.Module:
    """Gemma 3's text model: tied embeddings, scaled embeddings, q/k norms, a sliding window, head_dim*heads != hidden."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    config = Gemma3TextConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=128, sliding_window=8,
    )
    model = Gemma3ForCausalLM(config).eval()
    model.requires_grad_(False)
    return model


LAYOUTS: dict[str, Callable[..., torch.nn.Module]] = {
    "llama": build_tiny_llama,
    "gpt2": build_tiny_gpt2,
    "gemma3": build_tiny_gemma3,
}
METHODS = [info.name for info in list_methods()]
# Per-model state that is a cache of the unedited model (its weights' fingerprint) or a locate-then-edit
# session (AlphaEdit's accumulated keys are documented to live as long as the model object): not edit state.
CACHES_THAT_OUTLIVE_AN_EDIT = {"stats-fingerprint", "locate"}

# The subject ends each prompt: in a tiny random model attention carries little from one
# position to the next, so an edit at the subject's last token must show at the last position.
REQUESTS = [
    EditRequest("the capital of france", "rome", subject="france", rephrase=["where is the capital of france"],
                locality={"neighborhood": [("who wrote hamlet", "tolstoy")]}, case_id="france"),
    EditRequest("the mother tongue of tolstoy", "italian", subject="tolstoy", case_id="tolstoy"),
    EditRequest("the sport of the king", "tennis", subject="king", case_id="king"),
]


# --------------------------------------------------------------------------- set-up, once per (method, layout)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory, word_tok: Any) -> Callable[[str, str], dict[str, Any]]:
    """``prepared(method, layout)``: the method's tiny-model overrides, made once (training included)."""
    cache: dict[tuple[str, str], dict[str, Any]] = {}
    home = tmp_path_factory.mktemp("lmedit-home")

    def get(method: str, layout: str) -> dict[str, Any]:
        if (method, layout) not in cache:
            info = _info(method)
            if info.tiny_setup is None:
                pytest.fail(f"{method} registers no tiny_setup: the contract test cannot run it "
                            "(see docs/adding-a-method.md, step 4)")
            workdir = tmp_path_factory.mktemp(f"{method}-{layout}")
            with pytest.MonkeyPatch.context() as patch:
                patch.setenv("LMEDIT_HOME", str(home))
                cache[(method, layout)] = info.tiny_setup(_model(layout, word_tok), word_tok, workdir)
        return cache[(method, layout)]

    return get


@pytest.fixture(autouse=True)
def isolated_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMEDIT_HOME", str(tmp_path_factory.getbasetemp() / "contract-home"))


def _info(method: str) -> MethodInfo:
    return next(info for info in list_methods() if info.name == method)


# scripts/gpu_check.sh runs this whole matrix on a GPU with LMEDIT_TEST_DEVICE=cuda
DEVICE = os.environ.get("LMEDIT_TEST_DEVICE", "cpu")


def _model(layout: str, tok: Any, seed: int = 0, dtype: str = "float32") -> torch.nn.Module:
    return LAYOUTS[layout](len(tok), seed=seed).to(DEVICE, getattr(torch, dtype))


def _editor(method: str, layout: str, tok: Any, prepared: Callable[[str, str], dict[str, Any]],
            dtype: str, model: torch.nn.Module | None = None) -> Editor:
    info = _info(method)
    hparams = info.load_hparams(overrides=prepared(method, layout))
    return Editor(model if model is not None else _model(layout, tok, dtype=dtype), tok, method, hparams=hparams,
                  eval_config=EvalConfig(mode="both"))


def _outputs(editor: Editor, requests: list[EditRequest] = REQUESTS) -> list[tuple[Any, ...]]:
    """Every probe's outcome as the (possibly routed) model produces it: teacher-forced tokens and NLL, generation."""
    probes = editor.evaluator.probes(requests)
    return [(o.teacher_predicted, o.teacher_nll, o.generated) for o in editor.evaluator.run_probes(editor.model, probes)]


def _same_outputs(first: list[tuple[Any, ...]], second: list[tuple[Any, ...]]) -> bool:
    """Same tokens; NLLs to float rounding (a fresh model's kernels may sum in another order)."""
    return all(a[0] == b[0] and a[2] == b[2] and abs(a[1] - b[1]) <= 1e-4 * max(1.0, abs(a[1]))
               for a, b in zip(first, second)) and len(first) == len(second)


def _saved_bytes(handle: EditHandle, folder: Path) -> dict[str, str]:
    """Digest of every file ``handle.save`` writes: the method's whole state, weights or memory."""
    handle.save(folder)
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _single(method: str) -> bool:
    return not _info(method).supports_batch


matrix = pytest.mark.parametrize("layout", list(LAYOUTS))
dtypes = pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
methods = pytest.mark.parametrize("method", METHODS)


# --------------------------------------------------------------------------- the contract points


def test_every_method_is_in_the_matrix_and_declares_consistently() -> None:
    assert len(METHODS) >= 12 and len(set(METHODS)) == len(METHODS)
    for info in list_methods():
        assert isinstance(info.contract, Contract)
        assert info.summary, f"{info.name}: the apply function needs a docstring (its first line is the summary)"
        assert info.hparams_class.__doc__, f"{info.name}: the hyperparameter dataclass needs a docstring"


@methods
def test_requests_are_validated_before_any_work(method: str, word_tok: Any) -> None:
    info = _info(method)
    if info.supports_batch:
        info.check_requests(REQUESTS)
    else:
        with pytest.raises(MethodError, match="one request at a time"):
            info.check_requests(REQUESTS)
    no_subject = EditRequest("the capital of france", "rome")
    if info.needs_subject:
        with pytest.raises(ValueError, match="subject"):
            info.check_requests([no_subject])
    else:
        info.check_requests([no_subject])


@methods
@matrix
@dtypes
def test_the_edit_takes_effect(method: str, layout: str, dtype: str, word_tok: Any, prepared: Any) -> None:
    editor = _editor(method, layout, word_tok, prepared, dtype)
    request = REQUESTS[0]
    pre = editor.capture([request])
    before = _outputs(editor, [request])
    handle = editor.apply(request)
    assert isinstance(handle, EditHandle)
    after = _outputs(editor, [request])
    contract = _info(method).contract
    effect = "none" if editor.model.config.model_type in contract.no_tiny_effect_on else contract.effect
    if effect == "target":
        # the target's NLL after the edit prompt (probe 0 is the rewrite probe) falls by at least 0.3 nats. Reaching
        # accuracy 1.0 is not required: Gemma 3 normalises each MLP output again (post_feedforward_layernorm), which
        # caps what one edited projection of a random 3-layer model can do (every method gains ~0.5 nats there).
        nll_before, nll_after = before[0][1], after[0][1]
        assert nll_after < nll_before - 0.3, f"{method}: target NLL {nll_before:.3f} -> {nll_after:.3f}"
        scores = editor.evaluate([request], pre)[0]
        assert scores["rewrite_acc"] >= pre.metrics[0]["rewrite_acc"]
    elif effect == "output":
        assert after != before, f"{method} declares that its edit changes the outputs, but nothing changed"
    handle.restore()


@methods
@matrix
@dtypes
def test_restore_is_bit_exact(method: str, layout: str, dtype: str, word_tok: Any, prepared: Any) -> None:
    editor = _editor(method, layout, word_tok, prepared, dtype)
    state, outputs, owners = snapshot(editor.model), _outputs(editor), model_state.owners(editor.model)
    modules = [type(m).__name__ for m in editor.model.modules()]
    batch = REQUESTS[:1] if _single(method) else REQUESTS[:2]
    handle = editor.apply(batch)
    handle.restore()
    assert state_equal(editor.model, state)
    assert [type(m).__name__ for m in editor.model.modules()] == modules  # adapters and wrappers are gone
    assert router_of(editor.model) is None
    assert set(model_state.owners(editor.model)) <= set(owners) | CACHES_THAT_OUTLIVE_AN_EDIT
    assert _outputs(editor) == outputs


@methods
@matrix
@dtypes
def test_save_then_load_into_a_fresh_model_gives_the_same_outputs(method: str, layout: str, dtype: str, word_tok: Any,
                                                                 prepared: Any, tmp_path: Path) -> None:
    if not _info(method).contract.save_load:
        pytest.skip(f"{method} declares that its edits cannot be saved: {_info(method).contract.why}")
    editor = _editor(method, layout, word_tok, prepared, dtype)
    handle = editor.apply(REQUESTS[0])
    handle.save(tmp_path / "edit")
    edited = _outputs(editor)
    fresh = _editor(method, layout, word_tok, prepared, dtype, model=_model(layout, word_tok, dtype=dtype))
    clean_state, clean = snapshot(fresh.model), _outputs(fresh)
    loaded = load_edit(fresh.model, tmp_path / "edit")
    assert _same_outputs(_outputs(fresh), edited)
    loaded.restore()
    assert state_equal(fresh.model, clean_state) and _outputs(fresh) == clean


@methods
@matrix
@dtypes
def test_three_sequential_edits_then_restore_all(method: str, layout: str, dtype: str, word_tok: Any, prepared: Any) -> None:
    editor = _editor(method, layout, word_tok, prepared, dtype)
    state, outputs = snapshot(editor.model), _outputs(editor)
    handles = [editor.apply(request) for request in REQUESTS]
    if editor.model.config.model_type not in _info(method).contract.no_tiny_effect_on:
        assert _outputs(editor) != outputs
    restore_all(handles)
    assert state_equal(editor.model, state)
    assert router_of(editor.model) is None and _outputs(editor) == outputs


@methods
@matrix
@dtypes
def test_evaluation_changes_no_state(method: str, layout: str, dtype: str, word_tok: Any, prepared: Any, tmp_path: Path) -> None:
    editor = _editor(method, layout, word_tok, prepared, dtype)
    pre = editor.capture(REQUESTS)
    handles = [editor.apply(request) for request in REQUESTS[:2]]
    state, saved = snapshot(editor.model), _saved_bytes(handles[-1], tmp_path / "before")
    first = editor.evaluate(REQUESTS, pre)
    outputs = _outputs(editor)
    second = editor.evaluate(REQUESTS, pre)
    assert first == second and _outputs(editor) == outputs
    assert state_equal(editor.model, state)
    assert _saved_bytes(handles[-1], tmp_path / "after") == saved  # the method's own state did not move
    restore_all(handles)


class _Stop(RuntimeError):
    """Stands for the end of a process in the middle of a chunk."""


def _comparable(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A chunk's records without the timings, which differ from run to run."""
    def without_time(info: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in info.items() if "seconds" not in k}

    return [{**{k: v for k, v in r.items() if k not in ("edit_seconds", "step_seconds")},
             "edit_info": without_time(r["edit_info"])} for r in records]


# a fourth request: a chunk stopped twice, the second time after it had been continued once
CHUNK_REQUESTS = REQUESTS + [EditRequest("the color of the sky", "green", subject="sky", case_id="sky")]


@methods
def test_a_stopped_chunk_continues_from_its_checkpoint_as_if_never_stopped(method: str, word_tok: Any, prepared: Any,
                                                                           tmp_path: Path) -> None:
    """Four sequential edits, stopped after the second's checkpoint, continued by a fresh model (a new process)
    and stopped again after the third's, then continued by another: the same outputs after the fourth edit and the
    same records as an uninterrupted chunk, and every model ends restored."""
    from lmedit.checkpoint import ChunkCheckpoints
    from lmedit.protocols import Chunk, run_chunk

    chunk = Chunk(0, ((0,), (1,), (2,), (3,)))

    def run(checkpoints: ChunkCheckpoints | None, stop_at: int | None) -> tuple[Any, list[Any], bool]:
        editor = _editor(method, "llama", word_tok, prepared, "float32")
        clean, owners = snapshot(editor.model), model_state.owners(editor.model)
        seen: list[Any] = []

        def after_step(_: Chunk, done: int) -> None:
            if done == stop_at:
                raise _Stop
            if done == len(chunk.steps):
                seen.append(_outputs(editor, CHUNK_REQUESTS))

        pre = editor.capture(CHUNK_REQUESTS)
        result = None
        try:
            result = run_chunk(editor.session(seed=0), CHUNK_REQUESTS, chunk, pre, after_step=after_step,
                               checkpoints=checkpoints)
        except _Stop:
            pass
        restored = (state_equal(editor.model, clean) and router_of(editor.model) is None
                    and set(model_state.owners(editor.model)) <= set(owners) | CACHES_THAT_OUTLIVE_AN_EDIT)
        return result, seen, restored

    reference, reference_outputs, restored = run(None, None)
    assert restored
    checkpoints = ChunkCheckpoints(tmp_path / "checkpoints", {"method": method}, minutes=1e-9)
    progress = tmp_path / "checkpoints" / "chunk-0" / "progress.json"
    assert run(checkpoints, stop_at=3)[2]
    if not progress.is_file():  # the chain has state no codec writes (logged): such a chunk restarts instead
        pytest.skip(f"{method} chains are not checkpointed")
    assert json.loads(progress.read_text())["progress"]["steps_done"] == 2
    assert run(checkpoints, stop_at=4)[2]
    assert json.loads(progress.read_text())["progress"]["steps_done"] == 3
    resumed, resumed_outputs, restored = run(checkpoints, None)
    assert restored and resumed_outputs == reference_outputs
    assert _comparable(resumed.records) == _comparable(reference.records)
