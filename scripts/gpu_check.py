"""Every method once on the embedded models in each half precision, on a device: what a lent GPU must show.

Per (model, dtype): the pre-edit teacher-forced scores of the packed evaluator against the
float32 CPU scores of the same requests; then per method one edit of the first request: seconds,
peak memory, rewrite before -> after, and whether restore gave back every weight bit for bit.
Runs on the CPU as well (``--device cpu``), which is how it is tested where there is no GPU.

    python scripts/gpu_check.py --device cuda                       # what scripts/gpu_check.sh runs
    python scripts/gpu_check.py --device cpu --dtypes bfloat16 --limit 2 --methods FT-M,GRACE
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

METHODS = ("FT-L", "FT-M", "LoRA", "ROME", "MEMIT", "AlphaEdit", "GRACE", "DEFER", "WISE", "IKE")
ZSRE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "zsre" / "zsre_mend_eval_portability_gpt4.json"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtypes", default="bfloat16,float16")
    parser.add_argument("--models", default="smollm2-135m,gemma3-270m")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--limit", type=int, default=8, help="requests scored against the float32 CPU reference")
    args = parser.parse_args()

    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    from lmedit.data import load_requests
    from lmedit.devices import resolve_placement
    from lmedit.models import ModelLoadError

    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, devices: "
          + (", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())) or "none"))
    for dtype in args.dtypes.split(","):
        resolve_placement(args.device, dtype)  # a device or dtype this machine lacks stops here
    requests = load_requests(ZSRE if ZSRE.is_file() else None, limit=args.limit)
    print(f"data: {ZSRE if ZSRE.is_file() else 'the demo set'}, {len(requests)} requests")
    failures = 0
    for model_name in args.models.split(","):
        try:
            reference = pre_scores(model_name, "cpu", "float32", requests)
        except ModelLoadError as exc:
            print(f"{model_name}: skipped ({exc})")
            continue
        for dtype in args.dtypes.split(","):
            failures += check(model_name, args.device, dtype, requests, reference, args.methods.split(","))
    print("GPU CHECK " + ("PASSED" if failures == 0 else f"FAILED ({failures} problems)"))
    return 1 if failures else 0


def pre_scores(model_name: str, device: str, dtype: str, requests: list, loaded: tuple | None = None
               ) -> list[dict[str, float]]:
    from lmedit.editor import Editor
    from lmedit.models import load_model

    model, tok = loaded or load_model(model_name, device=device, dtype=dtype)
    return Editor(model, tok, "FT-M").capture(requests).metrics


def check(model_name: str, device: str, dtype: str, requests: list, reference: list[dict[str, float]],
          methods: list[str]) -> int:
    """One load per (model, dtype): every method edits and restores that one model (restore is checked bit for bit)."""
    from lmedit.editor import Editor
    from lmedit.models import load_model
    from lmedit.registry import get_method, list_presets

    failures = 0
    model, tok = load_model(model_name, device=device, dtype=dtype)
    scores = pre_scores(model_name, device, dtype, requests, (model, tok))
    for key in ("rewrite_acc", "locality_acc"):
        ours = [s[key] for s in scores if key in s]
        theirs = [s[key] for s in reference if key in s]
        gap = max((abs(a - b) for a, b in zip(ours, theirs)), default=0.0)
        mean_gap = abs(sum(ours) - sum(theirs)) / max(len(ours), 1)
        verdict = "ok" if mean_gap <= 0.05 else "DIFFERS"
        failures += verdict != "ok"
        print(f"{model_name} {dtype} on {device}: pre-edit {key} vs float32 CPU: mean {mean_gap:.3f}, "
              f"largest per request {gap:.3f} [{verdict}]")
    print(f"{'method':<10} {'s/edit':>7} {'peak MiB':>9} {'rewrite':>14}  restore")
    for method in methods:
        if model_name not in list_presets(get_method(method).name):
            print(f"{method:<10} no preset for {model_name}")
            continue
        try:
            problem = one_edit(Editor(model, tok, method, preset=model_name, model_name=model_name), requests[0])
        except Exception as exc:  # one method's failure is reported, the others still run
            problem = 1
            print(f"{method:<10} FAILED: {type(exc).__name__}: {exc}")
        if problem:  # the model may be left changed: the next method starts from a fresh load
            model, tok = load_model(model_name, device=device, dtype=dtype)
        failures += problem
    return failures


def one_edit(editor, request) -> int:
    device = next(editor.model.parameters()).device
    state = {k: v.detach().clone() for k, v in editor.model.state_dict().items()}
    pre = editor.capture([request])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    handle = editor.apply(request)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:  # the process's peak resident set so far (not reset per method)
        from lmedit.devices import peak_memory_bytes

        peak = peak_memory_bytes()["cpu_peak_rss_bytes"] / 2**20
    post = editor.evaluate([request], pre)[0]
    handle.restore()
    exact = all(torch.equal(v, state[k]) for k, v in editor.model.state_dict().items()) and state.keys() == editor.model.state_dict().keys()
    finite = all(torch.isfinite(v).all() for v in editor.model.state_dict().values() if v.is_floating_point())
    print(f"{editor.method.name:<10} {seconds:7.2f} {peak:9.0f} {pre.metrics[0]['rewrite_acc']:6.3f} -> {post['rewrite_acc']:.3f}"
          f"  {'bit-exact' if exact else 'CHANGED'}{'' if finite else ' NON-FINITE'}")
    return int(not exact or not finite)


if __name__ == "__main__":
    sys.exit(main())
