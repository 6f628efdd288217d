"""What WISE's stored memories cost at evaluation time: one scoring pass with k retrievable memories.

Inside a shard (``save_freq`` edits) an edit's training cost does not depend on how many edits came
before; ``lmedit reproduce wise-table`` measures that along the chunk. What grows with T is the number
of stored memories (one per ``save_freq`` edits, fewer after merging): WISE-Retrieve runs the wrapped
layer once per memory on every forward pass. This script inserts a WISE adapter with k memories
(copies of the layer's weight with a small perturbation, so routing really computes every memory)
and times the same teacher-forced scoring of the first zsRE items for each k. Not a test.

    python scripts/wise_routing_cost.py --data ../shared/data/zsre/zsre_mend_eval_portability_gpt4.json --limit 50
"""

from __future__ import annotations

import argparse
import time

import torch

from lmedit.adapters import ensure_adapter, remove_adapter
from lmedit.data import load_requests
from lmedit.evaluation.evaluator import EvalConfig, Evaluator
from lmedit.methods.wise import WiseAdapter, WiseHyperParams, _hidden_act
from lmedit.models import load_model
from lmedit.registry import preset_path


def timed_capture(model, evaluator: Evaluator, requests, repeats: int) -> float:
    """Best of ``repeats`` wall times of one full scoring pass (rewrite, rephrase, locality, portability)."""
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        evaluator.capture(model, requests)
        best = min(best, time.perf_counter() - started)
    return best


def with_memories(model, hparams: WiseHyperParams, k: int, generator: torch.Generator) -> WiseAdapter:
    """A WISE adapter holding k perturbed memories and an edited side memory, as after k * save_freq edits."""
    path = hparams.site_path(model)
    adapter = ensure_adapter(model, path, WiseAdapter,
                             lambda original: WiseAdapter(original, path, hparams.structure(), _hidden_act(model)))
    base = adapter.original.weight.detach()

    def perturbed() -> torch.Tensor:
        return base + 1e-3 * torch.randn(base.shape, generator=generator)

    adapter.side = perturbed()
    adapter.side_min_act = 1.0
    adapter.memories = [perturbed() for _ in range(k)]
    adapter.memory_min_act = [1.0] * k
    adapter.edit_log = [f"edit-{i}" for i in range(max(k, 1))]  # routing runs only once the adapter holds edits
    return adapter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", required=True)
    parser.add_argument("--limit", type=int, default=50)
    parser.add_argument("--memories", default="0,1,2,4,8,16")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    model, tok = load_model(args.model)
    hparams = WiseHyperParams.from_yaml(preset_path("WISE", args.model))
    requests = load_requests(args.data, limit=args.limit)
    evaluator = Evaluator(tok, EvalConfig(mode="teacher", packing=False))  # WISE is scored unpacked
    generator = torch.Generator().manual_seed(0)
    unedited = timed_capture(model, evaluator, requests, args.repeats)
    print(f"{len(requests)} requests; unedited model, no adapter: {unedited:.2f} s")
    print("| memories | seconds | vs no adapter |")
    print("|---|---|---|")
    for k in (int(v) for v in args.memories.split(",")):
        adapter = with_memories(model, hparams, k, generator)
        try:
            seconds = timed_capture(model, evaluator, requests, args.repeats)
        finally:
            remove_adapter(model, adapter)
        print(f"| {k} | {seconds:.2f} | {seconds / unedited:.2f}x |")


if __name__ == "__main__":
    main()
