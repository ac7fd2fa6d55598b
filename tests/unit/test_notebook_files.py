"""The notebooks as files: valid nbformat, as Jupyter and the notebook tests read them."""

from __future__ import annotations

import warnings
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[2] / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_notebook_validates_without_a_warning(path):
    # nbformat 4.5 requires an id on every cell; a missing one is a warning today, an error later
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        book = nbformat.read(path, as_version=4)
        nbformat.validate(book)
    ids = [cell["id"] for cell in book.cells]
    assert len(set(ids)) == len(ids)


def test_the_notebooks_are_there():
    assert {p.name for p in NOTEBOOKS} == {"privacy_budget_planning.ipynb", "run_analysis.ipynb"}
