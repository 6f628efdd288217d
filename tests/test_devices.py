"""--device / --dtype checks, placement of a loaded model, and the memory figure a run records."""

from __future__ import annotations

import json

import pytest
import torch

from lmedit.devices import PlacementError, dtype_of, peak_memory_bytes, resolve_placement


def test_dtypes_and_their_short_names() -> None:
    assert dtype_of("bf16") is torch.bfloat16 and dtype_of("float16") is torch.float16 and dtype_of("FP32") is torch.float32
    assert dtype_of(torch.bfloat16) is torch.bfloat16
    with pytest.raises(PlacementError, match="unknown dtype 'int8'"):
        dtype_of("int8")
    with pytest.raises(PlacementError, match="not supported"):
        dtype_of(torch.float64)


def test_cpu_and_auto_without_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_placement("cpu", "bfloat16").device == "cpu"
    auto = resolve_placement("auto", "float16")
    assert auto.device == "cpu" and auto.device_map is None and auto.dtype_name == "float16"
    with pytest.raises(PlacementError, match="no usable CUDA device.*--device cpu"):
        resolve_placement("cuda", "float32")
    with pytest.raises(PlacementError, match="unknown device 'tpu'"):
        resolve_placement("tpu")


def test_gpu_index_and_bfloat16_support_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "Tesla V100")
    assert resolve_placement("cuda", "float16").device == "cuda:0"
    assert resolve_placement("cuda:1", "float32").device == "cuda:1"
    with pytest.raises(PlacementError, match="has 2 GPU"):
        resolve_placement("cuda:2")
    with pytest.raises(PlacementError, match="must be a number"):
        resolve_placement("cuda:x")
    with pytest.raises(PlacementError, match="V100 cannot compute in bfloat16"):
        resolve_placement("cuda", "bfloat16")
    auto = resolve_placement("auto", "float16")
    assert auto.device_map == "auto"


def test_a_tiny_model_loads_in_the_dtype_asked(tmp_path, word_tok) -> None:
    from conftest import build_tiny_llama
    from lmedit.models import load_model

    build_tiny_llama(len(word_tok)).save_pretrained(tmp_path / "m")
    word_tok.save_pretrained(tmp_path / "m")
    model, _ = load_model(str(tmp_path / "m"), dtype="bf16", device="auto")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {p.device.type for p in model.parameters()} == {"cpu"}


def test_peak_memory_is_the_process_peak() -> None:
    """Two processes started from this (large) test process, one touching 1000 MiB more: the figure tells them
    apart (ru_maxrss alone would report the parent's peak for both) and stays at the peak after a free."""
    import subprocess
    import sys

    script = ("import torch; from lmedit.devices import peak_memory_bytes\n"
              "block = torch.empty({n} * 2**20, dtype=torch.uint8); block.fill_(1)\n"
              "assert int(block[::4096].sum()) == {n} * 256; del block\n"
              "print(peak_memory_bytes()['cpu_peak_rss_bytes'])")
    small, large = (int(subprocess.run([sys.executable, "-c", script.format(n=n)], capture_output=True, text=True,
                                       check=True).stdout.split()[-1]) for n in (1, 1000))
    assert large - small > 600 * 2**20  # the import alone can peak a few hundred MiB above the steady state
    assert peak_memory_bytes()["cpu_peak_rss_bytes"] > 0 and "cuda_peak_allocated_bytes" not in peak_memory_bytes()


def test_a_run_records_dtype_and_peak_memory_and_refuses_to_resume_in_another_dtype(tmp_path, word_tok) -> None:
    from conftest import build_tiny_llama
    from lmedit.editor import Editor
    from lmedit.requests import EditRequest
    from lmedit.runner import RunError

    requests = [EditRequest("the capital of france", "rome")]
    folder = tmp_path / "run"
    editor = Editor(build_tiny_llama(len(word_tok)).to(torch.bfloat16), word_tok, "FT-M",
                    overrides={"layers": [1], "num_steps": 1})
    summary, _ = editor.run(requests, out_dir=folder, show_progress=False)
    config = json.loads((folder / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["extra"]["placement"]["device"] == "cpu"
    assert summary["memory"]["cpu_peak_rss_bytes"] > 0
    assert json.loads((folder / "summary.json").read_text())["memory"] == summary["memory"]
    float32 = Editor(build_tiny_llama(len(word_tok)), word_tok, "FT-M", overrides={"layers": [1], "num_steps": 1})
    with pytest.raises(RunError, match="differs in dtype"):
        float32.run(requests, out_dir=folder, show_progress=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_half_precision_runs_take_the_pre_edit_reference_in_each_chunks_own_batches(tmp_path, word_tok, dtype) -> None:
    """bfloat16 answers depend on batch shapes; pre and post must be scored in the same batches (float32: one capture)."""
    from conftest import build_tiny_llama
    from lmedit.editor import Editor
    from lmedit.evaluation.evaluator import Evaluator
    from lmedit.requests import EditRequest

    requests = [EditRequest(p, "rome", locality={"n": [("who wrote hamlet", "tolstoy")]}) for p in
                ("the capital of france", "the sport of the king", "the mother tongue of tolstoy")]
    editor = Editor(build_tiny_llama(len(word_tok)).to(dtype), word_tok, "FT-M", overrides={"layers": [1], "num_steps": 1})
    calls: list[int] = []
    original = Evaluator.capture

    def spy(self, model, batch, *args, **kwargs):
        calls.append(len(batch))
        return original(self, model, batch, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Evaluator, "capture", spy)
        editor.run(requests, out_dir=tmp_path / "run", show_progress=False)
    assert calls == ([1, 1, 1] if dtype == torch.bfloat16 else [3])
