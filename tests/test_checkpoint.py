"""Chunk checkpoints (lmedit.checkpoint): written whole or not at all, never loaded into another run."""

from __future__ import annotations

import os

import torch

from conftest import snapshot, state_equal
from lmedit.checkpoint import _CODECS, ChunkCheckpoints, ChunkProgress, register_session_codec
from lmedit.handles import EditHandle, WeightSnapshotHandle, keep_first_copies, restore_all
from lmedit.locate.core import session_state

STEPS = ((0,), (1,), (2,))
NAME = "model.layers.1.mlp.down_proj.weight"


def _edit(model: torch.nn.Module, amount: float) -> WeightSnapshotHandle:
    handle = WeightSnapshotHandle("FT-L", model, [NAME])
    with torch.no_grad():
        dict(model.named_parameters())[NAME].add_(amount)
    return handle


def test_a_checkpoint_holds_the_edited_weights_and_undoes_to_the_original(tiny_llama, tmp_path):
    clean = snapshot(tiny_llama)
    handles = [_edit(tiny_llama, 0.5)]
    edited = snapshot(tiny_llama)
    checkpoints = ChunkCheckpoints(tmp_path, {"method": "FT-L"}, minutes=1.0)
    assert checkpoints.save(tiny_llama, handles, 0, STEPS, ChunkProgress(steps_done=1, step_info={0: {"loss": 0.25}}))
    restore_all(handles)
    loaded, progress = checkpoints.load(tiny_llama, 0, STEPS)
    assert state_equal(tiny_llama, edited) and progress.steps_done == 1 and progress.step_info == {0: {"loss": 0.25}}
    later = _edit(tiny_llama, 0.25)
    keep_first_copies(loaded, later)  # the continued chain still keeps one copy per weight, not one per edit
    assert later.released_names == [NAME]
    restore_all(loaded + [later])
    assert state_equal(tiny_llama, clean)


def test_a_stop_between_the_two_renames_keeps_the_previous_checkpoint(tiny_llama, tmp_path):
    checkpoints = ChunkCheckpoints(tmp_path, {"method": "FT-L"})
    handles = [_edit(tiny_llama, 0.5)]
    checkpoints.save(tiny_llama, handles, 0, STEPS, ChunkProgress(steps_done=1))
    restore_all(handles)
    final = checkpoints.path(0)
    os.replace(final, final.with_name("chunk-0.old"))  # the new one had not yet taken its place
    (tmp_path / "chunk-0.partial").mkdir()  # and was half written
    loaded, progress = checkpoints.load(tiny_llama, 0, STEPS)
    assert progress.steps_done == 1 and sorted(p.name for p in tmp_path.iterdir()) == ["chunk-0"]
    restore_all(loaded)


def test_a_checkpoint_of_another_run_or_plan_is_not_loaded(tiny_llama, tmp_path, caplog):
    clean = snapshot(tiny_llama)
    handles = [_edit(tiny_llama, 0.5)]
    ChunkCheckpoints(tmp_path, {"method": "FT-L", "seed": 0}).save(tiny_llama, handles, 0, STEPS, ChunkProgress(1))
    restore_all(handles)
    assert ChunkCheckpoints(tmp_path, {"method": "FT-L", "seed": 1}).load(tiny_llama, 0, STEPS) is None
    assert ChunkCheckpoints(tmp_path, {"method": "FT-L", "seed": 0}).load(tiny_llama, 0, STEPS[:2]) is None
    assert state_equal(tiny_llama, clean) and "belongs to another run" in caplog.text


def test_a_checkpoint_written_before_a_hyperparameter_existed_is_loaded(tiny_llama, tmp_path):
    """The stored identity lacks a field added since; it ran as the field's default, so it is the same run."""
    from lmedit.registry import get_method

    hparams = get_method("FT-L").hparams_class().to_dict()
    older = {k: v for k, v in hparams.items() if k != "norm_constraint"}
    handles = [_edit(tiny_llama, 0.5)]
    ChunkCheckpoints(tmp_path, {"method": "FT-L", "hparams": older}).save(tiny_llama, handles, 0, STEPS,
                                                                           ChunkProgress(1))
    restore_all(handles)
    loaded, progress = ChunkCheckpoints(tmp_path, {"method": "FT-L", "hparams": hparams}).load(tiny_llama, 0, STEPS)
    assert progress.steps_done == 1
    restore_all(loaded)


class _Opaque(EditHandle):
    def _restore(self) -> None:
        pass


def test_a_chain_with_state_no_codec_writes_is_not_checkpointed(tiny_llama, tmp_path, caplog):
    checkpoints = ChunkCheckpoints(tmp_path, {"method": "X"})
    assert not checkpoints.save(tiny_llama, [_Opaque("X")], 0, STEPS, ChunkProgress(1))
    handles = [_edit(tiny_llama, 0.5)]
    session_state(tiny_llama)["unknown-cache"] = 1
    try:
        assert not checkpoints.save(tiny_llama, handles, 0, STEPS, ChunkProgress(1))
        register_session_codec("unknown-cache", cache=True)  # declared a cache: left out, the chain is written
        assert checkpoints.save(tiny_llama, handles, 0, STEPS, ChunkProgress(1))
    finally:
        session_state(tiny_llama).pop("unknown-cache")
        _CODECS.pop("unknown-cache", None)
        restore_all(handles)
    assert not list(tmp_path.glob("*.partial")) and caplog.text.count("are not checkpointed") == 1
