"""Where trained checkpoints live: ``$LMEDIT_HOME/checkpoints/<method>/<model>/``."""

from __future__ import annotations

from pathlib import Path


def model_slug(model: str) -> str:
    """A folder name for a model preset, hub id or local path."""
    return model.strip("/").replace("/", "--") or "model"


def default_checkpoint_dir(method: str, model: str) -> Path:
    from lmedit.models import lmedit_home

    return lmedit_home() / "checkpoints" / method / model_slug(model)


def resolve_archive(archive: str) -> Path:
    """Expand ``{lmedit_home}`` (the presets' spelling), ``~`` and environment variables in an archive path."""
    import os

    from lmedit.models import lmedit_home

    return Path(os.path.expandvars(archive.replace("{lmedit_home}", str(lmedit_home())))).expanduser()
