"""docs/robustness.md is generated from the case table and must be current."""

from __future__ import annotations

from .cases import CASES, HTTP_CASES
from .table import DOC, render


def test_doc_is_generated_from_the_case_table() -> None:
    assert DOC.exists(), "run: python -m tests.robustness.table"
    assert DOC.read_text() == render(), "docs/robustness.md is out of date; run: python -m tests.robustness.table"


def test_doc_has_one_row_per_case() -> None:
    text = render()
    for case in (*CASES, *HTTP_CASES):
        assert text.count(f"| `{case.id}` |") == 1, case.id
