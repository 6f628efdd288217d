"""The Editor: one model, one method with its hyperparameters, one evaluator.

It talks to methods only through the registry contract, so it works the
same for every method and never needs to know which one it holds.
"""

from __future__ import annotations

import dataclasses

from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from lmedit.evaluation.evaluator import EvalConfig, Evaluator, Snapshot
from lmedit.forward.tokens import check_fits_context
from lmedit.handles import EditHandle
from lmedit.limits import check_eval_memory_for
from lmedit.models import DEFAULT_MODEL, load_model
from lmedit.protocols import Chunk, EditSession
from lmedit.registry import MethodInfo, get_method, load_edit
from lmedit.requests import EditRequest
from lmedit.experiment import RetentionSettings, make_spec, run_experiment


class Editor:
    """Apply, evaluate and undo edits of one method on one model."""

    def __init__(
        self,
        model: torch.nn.Module,
        tok: Any,
        method: str,
        *,
        hparams: Any = None,
        preset: str | None = None,
        hparams_file: str | Path | None = None,
        overrides: Mapping[str, Any] | None = None,
        eval_config: EvalConfig | None = None,
        model_name: str = "custom",
    ) -> None:
        self.model = model
        self.tok = tok
        self.model_name = model_name
        self.method: MethodInfo = get_method(method)
        self.preset = preset
        self.hparams_file = str(hparams_file) if hparams_file else None
        self.hparams = hparams if hparams is not None else self.method.load_hparams(preset, hparams_file, overrides, model)
        config = eval_config or EvalConfig()
        if not self.method.packed_evaluation:
            config = dataclasses.replace(config, packing=False)
        if not self.method.cached_generation:
            config = dataclasses.replace(config, generation_cache=False)
        self.evaluator = Evaluator(tok, config)

    @classmethod
    def from_pretrained(
        cls, method: str, model: str = DEFAULT_MODEL, *, dtype: torch.dtype | str = torch.float32, device: str = "cpu", **kwargs: Any
    ) -> "Editor":
        """Load ``model`` (a preset, hub id or folder) and pick the method's preset for it when one exists."""
        loaded, tok = load_model(model, dtype=dtype, device=device)
        if "preset" not in kwargs and "hparams" not in kwargs and "hparams_file" not in kwargs:
            from lmedit.registry import list_presets

            if model in list_presets(get_method(method).name):
                kwargs["preset"] = model
        return cls(loaded, tok, method, model_name=model, **kwargs)

    def apply(self, requests: EditRequest | Sequence[EditRequest]) -> EditHandle:
        """Edit the model in place; ``handle.restore()`` undoes it exactly."""
        batch = [requests] if isinstance(requests, EditRequest) else list(requests)
        self.method.check_requests(batch)
        check_fits_context(self.model, self.tok, batch)
        return self.method.apply(self.model, self.tok, batch, self.hparams)

    def capture(self, requests: Sequence[EditRequest]) -> Snapshot:
        """Pre-edit reference for :meth:`evaluate`; call it before editing."""
        check_fits_context(self.model, self.tok, requests)
        check_eval_memory_for(self.model, self.tok, self.evaluator.config, requests)
        return self.evaluator.capture(self.model, list(requests))

    def evaluate(self, requests: Sequence[EditRequest], pre: Snapshot) -> list[dict[str, float]]:
        return self.evaluator.score(self.model, list(requests), pre)

    def load_edit(self, path: str | Path) -> EditHandle:
        """Re-apply an edit saved with ``handle.save(path)``."""
        return load_edit(self.model, path)

    def session(self, *, seed: int = 0, eval_each: bool = False) -> EditSession:
        return EditSession(self.model, self.tok, self.method, self.hparams, self.evaluator, seed=seed, eval_each=eval_each)

    def run(
        self,
        requests: Sequence[EditRequest],
        *,
        protocol: str = "single",
        T: int | None = None,
        batch_size: int = 1,
        seed: int = 0,
        eval_each: bool = False,
        out_dir: str | Path | None = None,
        show_progress: bool = True,
        data: str | None = None,
        data_sha256: str | None = None,
        offset: int = 0,
        limit: int | None = None,
        after_step: Callable[[Chunk, int], None] | None = None,
        retention: RetentionSettings | None = None,
    ) -> tuple[dict[str, Any], Path]:
        """Run a protocol over ``requests``; returns the summary and the run folder (see
        :func:`lmedit.experiment.run_experiment`).

        ``retention`` also records retention curves; ``after_step`` is called on the edited
        model after each edit step and must not change the model.
        """
        spec = make_spec(self, requests, protocol=protocol, T=T, batch_size=batch_size, seed=seed, eval_each=eval_each,
                         data=data, data_sha256=data_sha256, offset=offset, limit=limit)
        return run_experiment(self, requests, spec, out_dir, retention=retention, show_progress=show_progress,
                              after_step=after_step)
