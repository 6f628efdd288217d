"""Finding the standard benchmark files and corpora that live beside a checkout, never at a fixed path.

The project's shared folder holds ``data/`` (benchmark files) and ``corpus/``
(text for key statistics). A user points at it with ``$LMEDIT_SHARED_DATA``
(the ``data`` folder) or ``$LMEDIT_CORPUS_DIR`` (the ``corpus`` folder);
otherwise ``shared/<kind>/`` is looked up in the current folder and its parents,
which finds ``../shared/...`` from inside a checkout.
"""

from __future__ import annotations

import os
from pathlib import Path

SHARED_DATA_ENV = "LMEDIT_SHARED_DATA"
CORPUS_DIR_ENV = "LMEDIT_CORPUS_DIR"
_ENV_OF_KIND = {"data": SHARED_DATA_ENV, "corpus": CORPUS_DIR_ENV}


def find_shared(relative: str | Path, *, kind: str = "data", cwd: Path | None = None) -> Path | None:
    """``$<env>/<relative>``, else ``shared/<kind>/<relative>`` in ``cwd`` or a parent; None when not found."""
    if kind not in _ENV_OF_KIND:
        raise ValueError(f"kind must be one of {', '.join(_ENV_OF_KIND)}, got {kind!r}")
    env = os.environ.get(_ENV_OF_KIND[kind])
    if env and (Path(env).expanduser() / relative).exists():
        return Path(env).expanduser() / relative
    start = (cwd or Path.cwd()).resolve()
    for folder in (start, *start.parents):
        path = folder / "shared" / kind / relative
        if path.exists():
            return path
    return None


def find_shared_file(relative: str | Path, *, cwd: Path | None = None) -> Path | None:
    """A benchmark file under the shared data folder (see :func:`find_shared`)."""
    found = find_shared(relative, kind="data", cwd=cwd)
    return found if found is not None and found.is_file() else None


def shared_hint(relative: str | Path, kind: str = "data") -> str:
    """How to tell lmedit where a missing shared file is, for error messages."""
    return (f"{relative} was not found in ${_ENV_OF_KIND[kind]} nor in shared/{kind}/ of the current folder or a "
            f"parent (from a checkout: ../shared/{kind}/{relative})")
