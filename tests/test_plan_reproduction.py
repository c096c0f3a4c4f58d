"""DeepSeek V4's published savings reproduced by the planner (docs/reproduction.md; these may fail honestly)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))  # the docs generator lives with the benchmarks
from reproduction import markdown, numbers  # noqa: E402

R = numbers()


def test_kv_ratios_with_production_formats() -> None:
    assert abs(R["deepseek-v4-pro"]["kv_ratio"] - 0.10) <= 0.015
    assert abs(R["deepseek-v4-flash"]["kv_ratio"] - 0.07) <= 0.015


@pytest.mark.parametrize(("model", "gib", "half_digit"), [("deepseek-v3.2", 83.9, 0.05), ("deepseek-v4-pro", 9.62, 0.005),
                                                          ("deepseek-v4-flash", 6.72, 0.005)])  # fmt: skip
def test_bf16_absolute_numbers(model: str, gib: float, half_digit: float) -> None:
    """The published figures, to the digits they were published with (83.875 GiB rounds to 83.9)."""
    assert abs(R[model]["kv_bf16_gib"] - gib) <= half_digit


def test_flops_ratios_within_three_points() -> None:
    assert abs(R["deepseek-v4-pro"]["flops_ratio"] - 0.27) <= 0.03
    assert abs(R["deepseek-v4-flash"]["flops_ratio"] - 0.10) <= 0.03


def test_doc_is_up_to_date() -> None:
    doc = Path(__file__).resolve().parents[1] / "docs" / "reproduction.md"
    assert doc.read_text().strip() == markdown().strip(), "regenerate: python bench/plan_reproduce.py > docs/reproduction.md"
