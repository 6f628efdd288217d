"""Evaluation throughput on the embedded model: padded batches against one prompt at a time.

Scores the same probes (rewrite, rephrase, portability and locality prompts
of the first N zsRE requests) both ways in one process and reports probes
per second and the speed-up. Not a test: run it on an idle machine.

    python scripts/bench_eval.py --data ../shared/data/zsre/zsre_mend_eval_portability_gpt4.json --limit 50
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from lmedit.data import load_requests
from lmedit.evaluation import EvalConfig, Evaluator, score_teacher_forced
from lmedit.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default=None, help="benchmark file (default: the demo set)")
    parser.add_argument("--limit", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2, help="timed repetitions of each mode (best is kept)")
    args = parser.parse_args()

    model, tok = load_model(args.model)
    requests = load_requests(args.data, limit=args.limit)
    probes = Evaluator(tok, EvalConfig()).probes(requests)
    pairs = [(p.prompt, p.answer) for p in probes]
    tokens = sum(len(tok(f"{p} {a}").input_ids) for p, a in pairs)

    score_teacher_forced(model, tok, pairs[:8], batch_size=8)  # warm-up
    timings = {}
    for name, batch_size in (("batched", args.batch_size), ("one_at_a_time", 1)):
        best = float("inf")
        for _ in range(args.repeats):
            started = time.perf_counter()
            scores = score_teacher_forced(model, tok, pairs, batch_size=batch_size)
            best = min(best, time.perf_counter() - started)
        timings[name] = {"seconds": best, "probes_per_second": len(pairs) / best, "tokens_per_second": tokens / best,
                         "accuracy_checksum": sum(s.token_accuracy for s in scores)}
    assert timings["batched"]["accuracy_checksum"] == timings["one_at_a_time"]["accuracy_checksum"], \
        "batched and one-at-a-time scoring disagree"
    report = {
        "model": args.model, "requests": len(requests), "probes": len(pairs), "tokens": tokens,
        "threads": torch.get_num_threads(), "batch_size": args.batch_size, **timings,
        "speedup": timings["one_at_a_time"]["seconds"] / timings["batched"]["seconds"],
        "seconds_per_request_batched": timings["batched"]["seconds"] / len(requests),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
