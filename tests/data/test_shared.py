"""Finding shared benchmark files and corpora: by environment variable, else shared/<kind> here or in a parent."""

from __future__ import annotations

import pytest

from lmedit.data.shared import find_shared, find_shared_file, shared_hint


@pytest.fixture
def checkout(tmp_path, monkeypatch):
    """<root>/shared/{data,corpus} beside <root>/checkout, as a project's checkout sits beside its shared folder."""
    monkeypatch.delenv("LMEDIT_SHARED_DATA", raising=False)
    monkeypatch.delenv("LMEDIT_CORPUS_DIR", raising=False)
    (tmp_path / "shared" / "data" / "zsre").mkdir(parents=True)
    (tmp_path / "shared" / "data" / "zsre" / "file.json").write_text("[]")
    (tmp_path / "shared" / "corpus" / "wiki").mkdir(parents=True)
    (tmp_path / "checkout").mkdir()
    return tmp_path


def test_found_from_inside_a_checkout_beside_shared(checkout):
    assert find_shared_file("zsre/file.json", cwd=checkout / "checkout") == checkout / "shared/data/zsre/file.json"
    assert find_shared("wiki", kind="corpus", cwd=checkout / "checkout") == checkout / "shared/corpus/wiki"
    assert find_shared_file("zsre/missing.json", cwd=checkout / "checkout") is None
    assert find_shared_file("zsre", cwd=checkout / "checkout") is None  # a folder is not a file


def test_environment_variable_comes_first(checkout, tmp_path_factory, monkeypatch):
    other = tmp_path_factory.mktemp("elsewhere")
    (other / "zsre").mkdir()
    (other / "zsre" / "file.json").write_text("[]")
    monkeypatch.setenv("LMEDIT_SHARED_DATA", str(other))
    assert find_shared_file("zsre/file.json", cwd=checkout / "checkout") == other / "zsre" / "file.json"


def test_bad_kind_and_hint():
    with pytest.raises(ValueError, match="kind must be one of"):
        find_shared("x", kind="models")
    assert "../shared/data/zsre/file.json" in shared_hint("zsre/file.json")
