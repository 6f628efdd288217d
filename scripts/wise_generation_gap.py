"""Why WISE scores lower by generation than by teacher forcing: routing, or the first answer token?

After n sequential WISE edits (the model's preset), each edit's prompt is run alone (what the first
generation step sees) and with its target appended (what teacher forcing sees). For each it reports
whether the edit's own memory is routed, its deviation over its threshold, whether the first answer
token is the argmax, and the teacher-forced accuracy of the later answer tokens. Not a test.

    python scripts/wise_generation_gap.py --data ../shared/data/zsre/zsre_mend_eval_portability_gpt4.json \
        --irrelevant-file ../shared/data/wise/hallucination/hallucination-train.json --edits 10
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

import torch

from lmedit.data import load_requests
from lmedit.handles import restore_all
from lmedit.models import load_model
from lmedit.registry import get_method
from lmedit.spec import get_module


def routed_memory(model: torch.nn.Module, tok: Any, adapter: Any, text: str) -> tuple[int | None, list[float], int]:
    """The memory WISE-Retrieve picks for ``text``, each memory's Δ over its threshold, and the last position's argmax."""
    captured: dict[str, torch.Tensor] = {}
    hook = adapter.register_forward_hook(lambda module, args, out: captured.__setitem__("x", args[0].detach()))
    try:
        with torch.no_grad():
            logits = model(tok(text, return_tensors="pt").input_ids).logits[0, -1]
    finally:
        hook.remove()
    x = captured["x"] if captured["x"].dim() == 3 else captured["x"][None]
    deviations = [(float(dev[0]), threshold) for dev, threshold in adapter.memory_deviations(x)]
    over = [dev / threshold for dev, threshold in deviations]
    above = [i for i, r in enumerate(over) if r > 1]  # routing takes a memory strictly above its threshold
    return (max(above, key=lambda i: deviations[i][0]) if above else None), over, int(logits.argmax())


def answer_token_hits(model: torch.nn.Module, tok: Any, prompt: str, target: str) -> tuple[bool, list[bool]]:
    """Teacher-forced argmax hits on the answer tokens: the first one, and the rest."""
    prompt_ids, full = tok(prompt).input_ids, tok(prompt + " " + target).input_ids
    with torch.no_grad():
        predicted = model(torch.tensor([full])).logits[0].argmax(-1)
    hits = [int(predicted[i - 1]) == full[i] for i in range(len(prompt_ids), len(full))]
    return hits[0], hits[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--irrelevant-file", default=None)
    parser.add_argument("--edits", type=int, default=10)
    parser.add_argument("--offset", type=int, default=0)
    parser.add_argument("--model", default="smollm2-135m")
    args = parser.parse_args()

    model, tok = load_model(args.model)
    requests = load_requests(args.data, limit=args.edits, offset=args.offset)
    info = get_method("WISE")
    overrides = {"irrelevant_file": args.irrelevant_file} if args.irrelevant_file else {}
    hparams = info.load_hparams(preset=args.model, overrides=overrides)
    handles = [info.apply(model, tok, [request], hparams) for request in requests]
    try:
        adapter = get_module(model, hparams.site_path(model))
        if len(adapter.memories) != len(requests):
            raise SystemExit("this diagnostic expects one stored memory per edit (save_freq: 1)")
        rows = []
        for k, request in enumerate(requests):
            alone, alone_over, first = routed_memory(model, tok, adapter, request.prompt)
            full, full_over, _ = routed_memory(model, tok, adapter, request.prompt + " " + request.target_new)
            first_hit, later_hits = answer_token_hits(model, tok, request.prompt, request.target_new)
            rows.append({"own_alone": alone == k, "own_full": full == k, "over_alone": alone_over[k],
                         "over_full": full_over[k], "first": first_hit, "later": later_hits})
    finally:
        restore_all(handles)
    later = [hit for row in rows for hit in row["later"]]
    print(f"{len(rows)} sequential edits, one memory each")
    print("own memory routed:           prompt alone", statistics.mean(r["own_alone"] for r in rows),
          "| prompt + target", statistics.mean(r["own_full"] for r in rows))
    print("own memory Δ / threshold:    prompt alone", round(statistics.median(r["over_alone"] for r in rows), 2),
          "| prompt + target", round(statistics.median(r["over_full"] for r in rows), 2), "(medians)")
    print("first answer token is argmax:", statistics.mean(r["first"] for r in rows))
    print("later answer tokens argmax:  ", round(statistics.mean(later), 3) if later else "-", f"({len(later)} tokens)")


if __name__ == "__main__":
    main()
