"""Seconds per edit against the edit's GEMM floor, per method (issue 14's cost table). Not a test.

For each method, ``--edits`` zsRE requests are edited one after another and
kept (as in the sequential protocol), then restored; seconds per edit is the
mean over all but the first (which also builds adapters, templates and
caches). One more edit is then run under a dispatch mode that records every
matrix product (mm, addmm, bmm, baddbmm) with its shapes. Each distinct shape
is timed alone on this machine, its operands in cache, best of several
repeats; the floor is the sum over the recorded products of those times: what
the edit's matrix products cost at the rate this CPU reaches for their shapes,
with no Python, no element-wise work and no memory traffic beyond the cache.
``after / floor`` is how far the edit is from it.

    OMP_NUM_THREADS=1 python scripts/edit_cost.py --data ../shared/data/zsre/zsre_mend_eval_portability_gpt4.json \\
        --irrelevant-file ../shared/data/wise/hallucination/hallucination-train.json --methods FT-L,WISE --edits 5

Wall time drifts with the load on the machine; ``cpu_seconds_per_edit`` (the
process's CPU time, one thread) drifts less when other jobs share the cores.
Compare two trees back to back (``PYTHONPATH=<tree>/src``), one process at a
time.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lmedit.data import load_requests
from lmedit.editor import Editor
from lmedit.models import load_model
from lmedit.registry import get_method

aten = torch.ops.aten
STREAM_BYTES = 64 << 20  # distinct weights cycled through for the streamed rate: well past a 4 MB L2
PRODUCTS = {aten.mm.default: "mm", aten.addmm.default: "addmm", aten.bmm.default: "bmm", aten.baddbmm.default: "baddbmm"}


class ProductRecorder(TorchDispatchMode):
    """Counts every matrix product by (kind, operand shapes, dtype)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[tuple[Any, ...]] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - the dispatch protocol
        kind = PRODUCTS.get(func)
        if kind is not None:
            a, b = (args[1], args[2]) if kind in ("addmm", "baddbmm") else (args[0], args[1])
            self.counts[(kind, tuple(a.shape), tuple(b.shape), str(a.dtype))] += 1
        return func(*args, **(kwargs or {}))


def product_flops(key: tuple[Any, ...]) -> int:
    _, a, b, _ = key
    batch = a[0] if len(a) == 3 else 1
    return 2 * batch * a[-2] * a[-1] * b[-1]


def product_seconds(key: tuple[Any, ...], streamed: bool, budget: float = 0.05) -> float:
    """Time of one product of these shapes on this machine.

    ``streamed=False``: the best time with both operands in cache. ``streamed=True``:
    the mean time while cycling through enough distinct right-hand operands to
    overflow the L2 cache, as a model's weights do (a rerun block's weights are
    14 MB, SmolLM2's LM head 113 MB): the rate the CPU reaches when it has to
    fetch the weight for every product.
    """
    kind, a_shape, b_shape, dtype = key
    dtype = getattr(torch, dtype.replace("torch.", ""))
    a = torch.randn(a_shape).to(dtype)
    b_bytes = max(1, torch.Size(b_shape).numel() * a.element_size())
    copies = max(1, -(-STREAM_BYTES // b_bytes)) if streamed else 1
    bs = [torch.randn(b_shape).to(dtype) for _ in range(copies)]
    op = torch.bmm if len(a_shape) == 3 else torch.mm
    for b in bs:
        op(a, b)
    best, started = float("inf"), time.perf_counter()
    while time.perf_counter() - started < budget or best == float("inf"):
        t = time.perf_counter()
        for b in bs:
            op(a, b)
        best = min(best, (time.perf_counter() - t) / len(bs))
    return best


def measure(editor: Editor, requests: list[Any]) -> dict[str, Any]:
    torch.manual_seed(0)
    handles, seconds, cpu_seconds = [], [], []
    for request in requests[:-1]:
        started, cpu_started = time.perf_counter(), time.process_time()
        handles.append(editor.apply([request]))
        seconds.append(time.perf_counter() - started)
        cpu_seconds.append(time.process_time() - cpu_started)
    recorder = ProductRecorder()
    with recorder:
        handles.append(editor.apply([requests[-1]]))
    for handle in reversed(handles):
        handle.restore()
    floor = sum(count * product_seconds(key, streamed=True) for key, count in recorder.counts.items())
    cached_floor = sum(count * product_seconds(key, streamed=False) for key, count in recorder.counts.items())
    gflop = sum(count * product_flops(key) for key, count in recorder.counts.items()) / 1e9
    per_edit = sum(seconds[1:]) / max(1, len(seconds) - 1)
    cpu_per_edit = sum(cpu_seconds[1:]) / max(1, len(cpu_seconds) - 1)
    return {"seconds_per_edit": round(per_edit, 3), "edit_seconds": [round(s, 2) for s in seconds],
            "cpu_seconds_per_edit": round(cpu_per_edit, 3),
            "gemm_gflop": round(gflop, 2), "gemm_floor_seconds": round(floor, 3),
            "over_floor": round(per_edit / floor, 2) if floor else None,
            "in_cache_floor_seconds": round(cached_floor, 3),
            "achieved_gflops": round(gflop / per_edit, 1) if per_edit else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", required=True)
    parser.add_argument("--irrelevant-file", help="WISE's unrelated prompts (its *-train.json)")
    parser.add_argument("--methods", default="FT-L,FT-M,MEMIT,AlphaEdit,GRACE,DEFER,WISE")
    parser.add_argument("--edits", type=int, default=5, help="timed edits per method (the first is not averaged)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", help="also write the rows as JSON lines here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    requests = load_requests(args.data)[: args.edits + 1]
    model, tok = load_model(args.model)
    for method in args.methods.split(","):
        takes_irrelevant = "irrelevant_file" in get_method(method).hparams_class.field_names()
        overrides = {"irrelevant_file": args.irrelevant_file} if takes_irrelevant and args.irrelevant_file else {}
        editor = Editor(model, tok, method, preset=args.model, overrides=overrides)
        row = {"method": method, **measure(editor, requests)}
        print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "a", encoding="utf-8") as out:
                out.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
