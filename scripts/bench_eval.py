"""Evaluation throughput on the embedded model: batched scoring against one prompt at a time.

Scores the same probes (rewrite, rephrase, portability and locality prompts
of the first N requests) three ways in one process: packed batches (the
default), length-sorted left-padded batches, and one prompt per forward
pass. Reports tokens per second, the speed-ups, and how far the batched
results are from the one-at-a-time ones. Not a test: run it on an idle
machine.

    python scripts/bench_eval.py --data ../shared/data/zsre/zsre_mend_eval_portability_gpt4.json --limit 50
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from lmedit.data import load_requests
from lmedit.evaluation import EvalConfig, Evaluator, score_teacher_forced
from lmedit.forward import generate_greedy
from lmedit.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default=None, help="benchmark file (default: the demo set)")
    parser.add_argument("--limit", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=128, help="sequences per batched forward pass")
    parser.add_argument("--max-batch-tokens", type=int, default=2048, help="tokens per batched forward pass")
    parser.add_argument("--repeats", type=int, default=2, help="timed repetitions of each mode (best is kept)")
    parser.add_argument("--generate", action="store_true",
                        help="also time greedy generation of len(answer) tokens (the *_gen_* metrics)")
    parser.add_argument("--generate-batch-size", type=int, default=32)
    args = parser.parse_args()

    model, tok = load_model(args.model)
    requests = load_requests(args.data, limit=args.limit)
    probes = Evaluator(tok, EvalConfig()).probes(requests)
    pairs = [(p.prompt, p.answer) for p in probes]
    tokens = sum(len(tok(f"{p} {a}").input_ids) for p, a in pairs)

    modes = {
        "packed": dict(batch_size=args.batch_size, max_batch_tokens=args.max_batch_tokens, packing=True),
        "padded": dict(batch_size=args.batch_size, max_batch_tokens=args.max_batch_tokens, packing=False),
        "one_at_a_time": dict(batch_size=1),
    }
    score_teacher_forced(model, tok, pairs[:16], batch_size=16)  # warm-up
    timings, scores = {}, {}
    for name, options in modes.items():
        best = float("inf")
        for _ in range(args.repeats):
            started = time.perf_counter()
            scores[name] = score_teacher_forced(model, tok, pairs, **options)
            best = min(best, time.perf_counter() - started)
        timings[name] = {"seconds": round(best, 3), "probes_per_second": round(len(pairs) / best, 1),
                         "tokens_per_second": round(tokens / best, 1)}
    reference = scores["one_at_a_time"]
    for name in ("packed", "padded"):
        timings[name]["speedup"] = round(timings["one_at_a_time"]["seconds"] / timings[name]["seconds"], 2)
        timings[name]["same_argmax_tokens"] = _agreement(scores[name], reference)
        timings[name]["max_logprob_difference"] = _max_difference(scores[name], reference)
    if args.generate:
        timings["generation"] = _time_generation(model, tok, pairs, args)
    report = {"model": args.model, "requests": len(requests), "probes": len(pairs), "tokens": tokens,
              "threads": torch.get_num_threads(), **timings}
    print(json.dumps(report, indent=2))


def _time_generation(model, tok, pairs, args) -> dict:
    answers = [len(tok(f"{p} {a}").input_ids) - len(tok(p).input_ids) for p, a in pairs]
    prompts = [p for p, _ in pairs]
    result, outputs = {"new_tokens": sum(answers)}, {}
    for name, batch_size in (("batched", args.generate_batch_size), ("one_at_a_time", 1)):
        best = float("inf")
        for _ in range(args.repeats):
            started = time.perf_counter()
            outputs[name] = generate_greedy(model, tok, prompts, answers, batch_size=batch_size)
            best = min(best, time.perf_counter() - started)
        result[name] = {"seconds": round(best, 3), "probes_per_second": round(len(prompts) / best, 1)}
    result["speedup"] = round(result["one_at_a_time"]["seconds"] / result["batched"]["seconds"], 2)
    tokens = [(a, b) for x, y in zip(outputs["batched"], outputs["one_at_a_time"]) for a, b in zip(x, y)]
    result["same_tokens"] = sum(a == b for a, b in tokens) / max(len(tokens), 1)
    return result


def _agreement(scores, reference) -> float:
    pairs = [(a, b) for s, r in zip(scores, reference) for a, b in zip(s.predicted_ids, r.predicted_ids)]
    return sum(a == b for a, b in pairs) / len(pairs)


def _max_difference(scores, reference) -> float:
    return max(abs(a - b) for s, r in zip(scores, reference) for a, b in zip(s.target_logprobs, r.target_logprobs))


if __name__ == "__main__":
    main()
