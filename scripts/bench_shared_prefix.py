"""Generation behind IKE's demonstrations: each prompt prefilled whole against the shared start prefilled once.

Edits the model with IKE for each of the first N requests in turn and, on
each edited model, generates the evaluator's probes (``--eval-mode
generate``) and the ``qa`` suite's answers twice each way, back to back in
one process: with packing off (every prompt generated whole) and on (a start
that several prompts share is prefilled once, see docs/evaluation.md).
Prints the mean seconds of each way and whether the tokens are identical.
Not a test: compare the two ways, not runs on different days.

    python scripts/bench_shared_prefix.py --data ../shared/data/knowedit/ZsRE/ZsRE-test-all.json --limit 6
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
    args = parser.parse_args()

    model, tok = load_model(args.model)
    requests = load_requests(args.data, limit=args.limit)
    editor = Editor(model, tok, "IKE", overrides={"train_file": args.train_file})
    qa = build_suite("qa:context=question,max_new_tokens=10")
    seconds = {(way, part): 0.0 for way in (False, True) for part in ("generate", "qa")}
    outputs: dict[bool, list[Any]] = {False: [], True: []}
    for request in requests:
        handle = editor.apply([request])
        try:
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
    print(f"{len(requests)} items, {probes} probes, torch threads {torch.get_num_threads()}; "
          f"mean seconds of {args.repeats} passes:")
    for part in ("generate", "qa"):
        whole, shared = seconds[False, part] / args.repeats, seconds[True, part] / args.repeats
        print(f"  {part:8s} whole {whole:7.1f}   shared start {shared:7.1f}   {whole / shared:.1f}x")
    print("identical tokens and answers:", outputs[False] == outputs[True])


if __name__ == "__main__":
    main()
