"""Atomic result files: standard JSON (no NaN literals), nothing partial left behind."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from entropic.io import atomic_write_json, atomic_write_text


def test_json_is_standard_with_non_finite_numbers_as_null(tmp_path):
    path = atomic_write_json(tmp_path / "r.json", {"loss": math.nan, "ppl": [1.5, math.inf, np.float64(-math.inf)]})
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard literal {c}")) == {
        "loss": None,
        "ppl": [1.5, None, None],
    }


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = atomic_write_text(tmp_path / "r.txt", "old")

    class Unserializable:
        def __str__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        atomic_write_json(path, {"x": Unserializable()})
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.txt"]
