"""MELO on tiny random models: the edit holds, inputs far from every key are untouched bit for bit, each edit
call trains its own LoRA block (earlier blocks do not move), the vector database's add/expand/split rules
against hand-computed cases, exact undo newest first, save/load, padding and generation, the EasyEdit file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from conftest import build_tiny_gpt2, build_tiny_llama, snapshot, state_equal
from lmedit.adapters import AdapterError
from lmedit.evaluation import score_teacher_forced
from lmedit.forward import generate_greedy
from lmedit.handles import EditHandleError, restore_all
from lmedit.methods.grace import SPLIT_MARGIN
from lmedit.methods.melo import NO_BLOCK, MeloAdapter, MeloLoRALinear, MeloUndo, lora_paths
from lmedit.registry import get_method, load_edit
from lmedit.requests import EditRequest
from lmedit.spec import get_module

FACTS = [
    EditRequest("the capital of france is", "rome", case_id="france"),
    EditRequest("who wrote hamlet", "tolstoy", case_id="hamlet"),
    EditRequest("the sky color is", "green", case_id="sky"),
]
FAR = "the president plays football in london"  # its last token is in no edit prompt
INFO = get_method("MELO")


def _hparams(model: nn.Module, tok: Any, **overrides: Any):
    return INFO.load_hparams(overrides={**INFO.tiny_setup(model, tok, Path(".")), **overrides})


def _holds(model: nn.Module, tok: Any, request: EditRequest) -> bool:
    scores = score_teacher_forced(model, tok, [(request.prompt, request.target_new)], packing=False)
    return scores[0].token_accuracy == 1.0


def _logits(model: nn.Module, tok: Any, text: str) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([tok(text).input_ids])).logits


def _router(model: nn.Module) -> MeloAdapter:
    (adapter,) = [m for m in model.modules() if isinstance(m, MeloAdapter)]
    return adapter


def _block(adapter: MeloAdapter, block: int) -> list[torch.Tensor]:
    """Block ``block``'s rows of A and columns of B on every target, copied."""
    r = adapter.rank
    pairs = [adapter.lora(i) for i in range(len(adapter.targets))]
    return [t.clone() for a, b in pairs for t in (a[block * r : (block + 1) * r], b[:, block * r : (block + 1) * r])]


def _saved(handle: Any, folder: Path) -> tuple[bytes, Any, Any]:
    """The saved tensors' bytes, the database's metadata and the edit log (not the running edit counter)."""
    handle.save(folder)
    meta = json.loads((folder / "edit.json").read_text())
    return (folder / "edit.safetensors").read_bytes(), meta["state"], meta["edit_log"]


# --------------------------------------------------------------------------- the edit and what it leaves alone


def test_edit_holds_and_far_inputs_are_bit_identical(tiny_model: nn.Module, word_tok: Any) -> None:
    far_before = _logits(tiny_model, word_tok, FAR)
    prompt_before = _logits(tiny_model, word_tok, FACTS[0].prompt + " " + FACTS[0].target_new)
    assert not _holds(tiny_model, word_tok, FACTS[0])
    handle = INFO.apply(tiny_model, word_tok, [FACTS[0]], _hparams(tiny_model, word_tok))
    assert _holds(tiny_model, word_tok, FACTS[0])
    assert isinstance(get_module(tiny_model, handle.adapter.path), MeloAdapter)
    assert all(isinstance(get_module(tiny_model, p), MeloLoRALinear) for p in handle.adapter.targets)
    # far from every key: no position is routed, and the logits are the unedited model's, bit for bit
    assert torch.equal(_logits(tiny_model, word_tok, FAR), far_before)
    # causal routing: the positions before the prompt's last token are untouched too, the answer's are not
    key = len(word_tok(FACTS[0].prompt).input_ids) - 1
    prompt_after = _logits(tiny_model, word_tok, FACTS[0].prompt + " " + FACTS[0].target_new)
    assert torch.equal(prompt_after[:, :key], prompt_before[:, :key])
    assert not torch.equal(prompt_after[:, key:], prompt_before[:, key:])
    handle.restore()


def test_routing_reads_the_database(tiny_llama: nn.Module, word_tok: Any) -> None:
    handle = INFO.apply(tiny_llama, word_tok, FACTS[:2], _hparams(tiny_llama, word_tok))
    adapter = handle.adapter
    seen: list[torch.Tensor] = []
    hook = adapter.register_forward_hook(lambda m, args, out: seen.append(m._route.clone()))
    for text in (FACTS[1].prompt + " " + FACTS[1].target_new, FAR):
        tiny_llama(torch.tensor([word_tok(text).input_ids]))
    hook.remove()
    key = len(word_tok(FACTS[1].prompt).input_ids) - 1
    assert seen[0][0, :key].eq(NO_BLOCK).all() and seen[0][0, key:].eq(0).all()  # a batch edit: one block
    assert seen[1].eq(NO_BLOCK).all()
    assert adapter._route is None  # nothing of a forward pass stays behind
    handle.restore()


def test_sequential_edits_get_their_own_blocks_and_all_hold(tiny_model: nn.Module, word_tok: Any) -> None:
    state = snapshot(tiny_model)
    hparams = _hparams(tiny_model, word_tok)
    handles = []
    for index, request in enumerate(FACTS):
        handles.append(INFO.apply(tiny_model, word_tok, [request], hparams))
        adapter = handles[-1].adapter
        assert handles[-1].info["block"] == index and adapter.n_blocks == index + 1
        assert adapter.point_block.tolist()[-1] == index and adapter.block_owners[-1] == [request.case_id]
        if index == 0:
            first_block = _block(adapter, 0)
    assert all(torch.equal(a, b) for a, b in zip(first_block, _block(adapter, 0))), "a later edit moved block 0"
    assert all(_holds(tiny_model, word_tok, request) for request in FACTS)
    assert adapter.edit_log == [f.case_id for f in FACTS]
    restore_all(handles)
    assert state_equal(tiny_model, state)
    assert not any(isinstance(m, (MeloAdapter, MeloLoRALinear)) for m in tiny_model.modules())
    assert not tiny_model._forward_hooks and not tiny_model._forward_pre_hooks


def test_undo_is_exact_newest_first(tiny_llama: nn.Module, word_tok: Any, tmp_path: Path) -> None:
    hparams = _hparams(tiny_llama, word_tok)
    first = INFO.apply(tiny_llama, word_tok, [FACTS[0]], hparams)
    saved = _saved(first, tmp_path / "one")
    outputs = _logits(tiny_llama, word_tok, FACTS[0].prompt)
    second = INFO.apply(tiny_llama, word_tok, FACTS[1:], hparams)
    with pytest.raises(EditHandleError, match="newest"):
        first.restore()
    second.restore()
    assert _saved(first, tmp_path / "again") == saved
    assert torch.equal(_logits(tiny_llama, word_tok, FACTS[0].prompt), outputs)
    first.restore()


def test_a_batch_edit_trains_one_block(tiny_llama: nn.Module, word_tok: Any) -> None:
    handle = INFO.apply(tiny_llama, word_tok, FACTS, _hparams(tiny_llama, word_tok, n_iter=40))
    assert handle.adapter.n_blocks == 1 and handle.adapter.point_block.tolist() == [0, 0, 0]
    assert handle.edit_ids == [f.case_id for f in FACTS]
    assert all(_holds(tiny_llama, word_tok, request) for request in FACTS)
    handle.restore()


def test_padding_and_generation_route_like_a_single_sequence(tiny_llama: nn.Module, word_tok: Any) -> None:
    handles = [INFO.apply(tiny_llama, word_tok, [r], _hparams(tiny_llama, word_tok)) for r in FACTS]
    pairs = [(r.prompt, r.target_new) for r in FACTS] + [(FAR, "rome")]
    together = score_teacher_forced(tiny_llama, word_tok, pairs, packing=False)
    alone = [score_teacher_forced(tiny_llama, word_tok, [pair], packing=False)[0] for pair in pairs]
    assert [s.token_accuracy for s in together] == [s.token_accuracy for s in alone]
    assert [s.token_accuracy for s in together[:3]] == [1.0, 1.0, 1.0]
    generated = generate_greedy(tiny_llama, word_tok, [r.prompt for r in FACTS], [1, 1, 1], use_cache=False)
    assert [word_tok.decode(g).strip() for g in generated] == [r.target_new for r in FACTS]
    restore_all(handles)


def test_cached_decoding_routes_as_feeding_the_whole_sequence(tiny_llama: nn.Module, word_tok: Any) -> None:
    """Each cached step carries its row's block: several tokens decoded with the cache equal uncached decoding."""
    handles = [INFO.apply(tiny_llama, word_tok, [r], _hparams(tiny_llama, word_tok)) for r in FACTS]
    prompts = [r.prompt for r in FACTS] + [FAR, "the capital of france is the"]
    uncached = generate_greedy(tiny_llama, word_tok, prompts, [6] * len(prompts), use_cache=False)
    cached = generate_greedy(tiny_llama, word_tok, prompts, [6] * len(prompts), use_cache=True)
    assert [list(c) for c in cached] == [list(u) for u in uncached]
    assert [word_tok.decode(g[:1]).strip() for g in cached[:3]] == [r.target_new for r in FACTS]
    # without the carried block a cached step would fall back to the unedited model after the first token
    router = _router(tiny_llama)
    original = router._carried
    router._carried = lambda batch, device: torch.full((batch,), NO_BLOCK, dtype=torch.long, device=device)
    try:
        dropped = generate_greedy(tiny_llama, word_tok, prompts, [6] * len(prompts), use_cache=True)
    finally:
        router._carried = original
    assert [list(c) for c in dropped] != [list(u) for u in uncached]
    assert INFO.cached_generation
    restore_all(handles)


# --------------------------------------------------------------------------- the vector database


def _database(init_radius: float = 1.0) -> MeloAdapter:
    config = {"key_from": "input", "num_block": 4, "num_rank_per_block": 1, "init_radius": init_radius}
    return MeloAdapter(nn.Linear(2, 2), "layer", [], config)


def _place(adapter: MeloAdapter, key: list[float], label: tuple[int, ...], block: int, undo: MeloUndo) -> str:
    return adapter.place(torch.tensor(key), label, block, f"e{block}", 1.0, undo)


def _undo(adapter: MeloAdapter, block: int) -> MeloUndo:
    adapter.edit_log.append(f"e{block}")
    return MeloUndo([f"e{block}"], len(adapter.labels), len(adapter.point_keys), adapter.n_blocks)


def test_database_adds_expands_and_splits_as_melo_does() -> None:
    db = _database()
    assert _place(db, [0.0, 0.0], (5,), 0, _undo(db, 0)) == "added"
    # far (distance 3 > radius 1 + init_radius 1): a new cluster
    assert _place(db, [3.0, 0.0], (6,), 1, _undo(db, 1)) == "added"
    assert db.radii.tolist() == [1.0, 1.0]
    # same label within reach: a new point of the cluster, centre = mean, radius = max(spread, init_radius)
    assert _place(db, [0.0, 1.6], (5,), 2, _undo(db, 2)) == "expanded"
    assert db.centers[0].tolist() == pytest.approx([0.0, 0.8])
    assert float(db.radii[0]) == pytest.approx(1.0)
    assert db.point_cluster.tolist() == [0, 1, 0] and db.point_block.tolist() == [0, 1, 2]
    # a query routes to the nearest point of its cluster: block 2 near (0, 1.6), block 0 near the origin
    route = db.route(torch.tensor([[[0.1, 1.5], [0.0, 0.1], [9.0, 9.0]]]))
    assert route.tolist() == [[2, 0, 0]]  # the far position routes nowhere itself but follows the latest routed one
    # a different label within reach: split the radii at half the distance; points now outside are forgotten
    undo = _undo(db, 3)
    before = db.state_tensors()
    before = {k: v.clone() for k, v in before.items()}
    assert _place(db, [0.0, -0.5], (7,), 3, undo) == "split"
    distance = 1.3  # from the centre (0, 0.8)
    assert float(db.radii[0]) == pytest.approx(distance / 2 - SPLIT_MARGIN)
    assert float(db.radii[2]) == pytest.approx(distance / 2 + SPLIT_MARGIN)
    assert db.point_alive.tolist() == [False, True, False, True, True]  # both old points lie 0.8 > 0.65 from it
    assert db.point_block.tolist()[-1] == NO_BLOCK  # the emptied cluster keeps its centre, routed to no block
    assert undo.forgotten == [0, 2] and 0 in undo.modified
    db.undo(undo)
    assert all(torch.equal(before[k], v) for k, v in db.state_tensors().items())
    assert db.labels == [(5,), (6,)] and db.edit_log == ["e0", "e1", "e2"]


def test_out_of_blocks_is_refused_and_leaves_the_model_as_it_was(tiny_llama: nn.Module, word_tok: Any) -> None:
    hparams = _hparams(tiny_llama, word_tok, num_block=2, n_iter=2)
    handles = [INFO.apply(tiny_llama, word_tok, [r], hparams) for r in FACTS[:2]]
    state = snapshot(tiny_llama)
    with pytest.raises(AdapterError, match="all 2 blocks"):
        INFO.apply(tiny_llama, word_tok, [FACTS[2]], hparams)
    assert state_equal(tiny_llama, state)
    restore_all(handles)


def test_a_sequence_longer_than_the_blocks_is_refused_before_any_edit(tiny_llama: nn.Module, word_tok: Any) -> None:
    """A T=1000 run with EasyEdit's 350 blocks used to fail at edit 351, after the pre-edit scoring and 350 edits."""
    from lmedit.evaluation import Evaluator
    from lmedit.protocols import EditSession, ProtocolError, plan_chunks

    state = snapshot(tiny_llama)
    session = EditSession(tiny_llama, word_tok, INFO, _hparams(tiny_llama, word_tok, num_block=2), Evaluator(word_tok))
    with pytest.raises(ProtocolError, match=r"at most 2 edit calls.*makes 3: num_block is 2"):
        session.check(FACTS, plan_chunks(3, "sequential", T=3))
    session.check(FACTS, plan_chunks(3, "sequential", T=2))  # chunks of 2 and 1 calls fit
    session.check(FACTS, plan_chunks(3, "sequential", T=3, batch_size=2))  # two calls: one block each
    assert state_equal(tiny_llama, state)


def test_lora_targets_must_sit_above_the_router(tiny_llama: nn.Module, word_tok: Any) -> None:
    state = snapshot(tiny_llama)
    with pytest.raises(AdapterError, match="above the router"):
        INFO.apply(tiny_llama, word_tok, [FACTS[0]], _hparams(tiny_llama, word_tok, layer=1, lora_layers=[0, 2]))
    assert state_equal(tiny_llama, state)
    assert sorted(lora_paths(tiny_llama, _hparams(tiny_llama, word_tok))) == [
        "model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj", "model.layers.2.mlp.gate_proj",
        "model.layers.2.mlp.up_proj"]


def test_save_load_in_a_fresh_model(tiny_gpt2: nn.Module, word_tok: Any, tmp_path: Path) -> None:
    hparams = _hparams(tiny_gpt2, word_tok)
    handles = [INFO.apply(tiny_gpt2, word_tok, [r], hparams) for r in FACTS[:2]]
    handles[-1].save(tmp_path / "edit")
    texts = [FACTS[0].prompt + " rome", FACTS[1].prompt + " tolstoy", FAR]
    edited = [_logits(tiny_gpt2, word_tok, t) for t in texts]
    fresh = build_tiny_gpt2(len(word_tok))
    clean = snapshot(fresh)
    loaded = load_edit(fresh, tmp_path / "edit")
    assert all(torch.allclose(_logits(fresh, word_tok, t), e, atol=1e-6) for t, e in zip(texts, edited))
    assert _router(fresh).edit_log == ["france", "hamlet"]
    # a further edit on the loaded model uses the next block
    more = INFO.apply(fresh, word_tok, [FACTS[2]], hparams)
    assert more.info["block"] == 2 and _holds(fresh, word_tok, FACTS[2]) and _holds(fresh, word_tok, FACTS[0])
    more.restore()
    loaded.restore()
    assert state_equal(fresh, clean)
    restore_all(handles)


def test_easyedit_file_edits_a_tiny_model(tmp_path: Path, word_tok: Any) -> None:
    from test_easyedit_hparams import FILES

    from lmedit.editor import Editor

    model = build_tiny_llama(len(word_tok), layers=3)
    path = tmp_path / "melo.yaml"
    path.write_text(FILES["MELO"].replace("init_radius: 0.5", "init_radius: 0.001"))  # a tiny model's small keys
    editor = Editor(model, word_tok, "MELO", hparams_file=path)
    assert editor.hparams.key_from == "output" and editor.hparams.num_block == 350
    handle = editor.apply(FACTS[0])
    assert handle.adapter.targets == ["model.layers.1.mlp.up_proj", "model.layers.2.mlp.up_proj"]
    assert _holds(model, word_tok, FACTS[0])
    handle.restore()
    wrong = FILES["MELO"].replace("model.layers.2.mlp.up_proj", "model.layers.2.mlp.fc_in")
    path.write_text(wrong)
    with pytest.raises(ValueError, match="target_modules.*fc_in"):
        Editor(model, word_tok, "MELO", hparams_file=path)


def test_a_failed_edit_leaves_the_model_as_it_was(tiny_llama: nn.Module, word_tok: Any, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import lmedit.methods.melo as melo

    state = snapshot(tiny_llama)
    hparams = _hparams(tiny_llama, word_tok)
    real = melo._train_block

    def failing(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("interrupted")

    monkeypatch.setattr(melo, "_train_block", failing)
    with pytest.raises(RuntimeError, match="interrupted"):
        INFO.apply(tiny_llama, word_tok, [FACTS[0]], hparams)
    assert state_equal(tiny_llama, state) and not tiny_llama._forward_pre_hooks
    assert not any(isinstance(m, (MeloAdapter, MeloLoRALinear)) for m in tiny_llama.modules())
    monkeypatch.setattr(melo, "_train_block", real)
    first = INFO.apply(tiny_llama, word_tok, [FACTS[0]], hparams)
    saved = _saved(first, tmp_path / "one")
    monkeypatch.setattr(melo, "_train_block", failing)
    with pytest.raises(RuntimeError, match="interrupted"):
        INFO.apply(tiny_llama, word_tok, [FACTS[1]], hparams)  # its key was placed, then taken out again
    assert _saved(first, tmp_path / "again") == saved and _holds(tiny_llama, word_tok, FACTS[0])
    first.restore()
    assert state_equal(tiny_llama, state)
