"""Generation behind IKE's demonstrations: each prompt prefilled whole against the shared start prefilled once.

Edits the model with IKE for each of the first N requests in turn and, on
each edited model, generates the evaluator's probes (``--eval-mode
generate``) and the ``qa`` suite's answers twice each way, back to back in
one process: with packing off (every prompt generated whole) and on (a start
that several prompts share is prefilled once, see docs/evaluation.md).
Prints the mean seconds of each way and whether the tokens are identical.
Not a test: compare the two ways, not runs on different days.

    python scripts/bench_shared_prefix.py --data ../shared/data/knowedit/ZsRE/ZsRE-test-all.json --limit 6

``--one-at-a-time`` also answers the ``qa`` probes one prompt at a time
(EasyEdit's way, no padding and no sharing) and counts the answers that each
batched way changes against it: in half precision the layouts round apart.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from lmedit.data import load_requests
from lmedit.editor import Editor
from lmedit.evaluation import EvalConfig, Evaluator
from lmedit.evaluation.suites import SuiteContext, build_suite
from lmedit.evaluation.suites.qa import qa_probes
from lmedit.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", required=True, help="benchmark file (e.g. KnowEdit's ZsRE test file)")
    parser.add_argument("--limit", type=int, default=6)
    parser.add_argument("--train-file", default="counterfact/counterfact-train.json",
                        help="IKE's demonstration pool (as in `lmedit reproduce knowedit-table`)")
    parser.add_argument("--repeats", type=int, default=2, help="timed passes of each way per item")
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16: in half precision a group "
                        "whose cached start rounds apart from a full pass is generated whole")
    parser.add_argument("--one-at-a-time", action="store_true",
                        help="count the qa answers each way changes against answering one prompt at a time")
    args = parser.parse_args()

    model, tok = load_model(args.model, dtype=args.dtype)
    requests = load_requests(args.data, limit=args.limit)
    editor = Editor(model, tok, "IKE", overrides={"train_file": args.train_file})
    qa = build_suite("qa:context=question,max_new_tokens=10")
    qa_alone = build_suite("qa:context=question,max_new_tokens=10,batch_size=1")  # EasyEdit's one prompt at a time
    seconds = {(way, part): 0.0 for way in (False, True) for part in ("generate", "qa")}
    outputs: dict[bool, list[Any]] = {False: [], True: []}
    changed = {False: 0, True: 0}  # qa answers that differ from the one-at-a-time answer, per way
    for request in requests:
        handle = editor.apply([request])
        try:
            if args.one_at_a_time:
                probes = qa_probes([request])
                alone = qa_alone.answers(model, tok, probes, SuiteContext(packing=False))
                for shared in (False, True):
                    batched = qa.answers(model, tok, probes, SuiteContext(packing=shared))
                    changed[shared] += sum(a != b for a, b in zip(alone, batched))
            for _ in range(args.repeats):
                for shared in (False, True):
                    evaluator = Evaluator(tok, EvalConfig(mode="generate", packing=shared))
                    started = time.perf_counter()
                    generated = [o.generated for o in evaluator.run_probes(model, evaluator.probes([request]))]
                    seconds[shared, "generate"] += time.perf_counter() - started
                    started = time.perf_counter()
                    answers = qa.answers(model, tok, qa_probes([request]), SuiteContext(packing=shared))
                    seconds[shared, "qa"] += time.perf_counter() - started
                    outputs[shared].append((generated, answers))
        finally:
            handle.restore()
    probes = sum(len(Evaluator(tok).probes([r])) for r in requests)
    print(f"{len(requests)} items, {probes} probes, {args.dtype}, torch threads {torch.get_num_threads()}; "
          f"mean seconds of {args.repeats} passes:")
    for part in ("generate", "qa"):
        whole, shared = seconds[False, part] / args.repeats, seconds[True, part] / args.repeats
        print(f"  {part:8s} whole {whole:7.1f}   shared start {shared:7.1f}   {whole / shared:.1f}x")
    print("identical tokens and answers:", outputs[False] == outputs[True])
    if args.one_at_a_time:
        n = sum(len(qa_probes([r])) for r in requests)
        print(f"qa answers that differ from one prompt at a time: whole {changed[False]} of {n}, "
              f"shared start {changed[True]} of {n}")


if __name__ == "__main__":
    main()
