"""``StateReport.describe``: each list of keys is cut after ``limit`` entries and says how many were left out.

Truth by counting: with ``n`` entries and limit ``L``, the text shows ``min(n, L)`` of them and ends with
``and n − L more`` exactly when ``n > L`` (both sides of the boundary, for missing, unexpected and mis-shaped keys).
"""

from __future__ import annotations

import re

import pytest

from lightning_adapters.core.report import StateReport


@pytest.mark.parametrize("n", [2, 3, 4, 6])
@pytest.mark.parametrize("kind", ["missing", "unexpected", "misshaped"])
def test_describe_cuts_each_list_at_the_limit_and_counts_the_rest(kind, n):
    keys = [f"k{i}" for i in range(n)]
    if kind == "misshaped":
        report = StateReport(misshaped={k: ((1, 2), (2, 1)) for k in keys})
    else:
        report = StateReport(**{kind: keys})
    text = report.describe(limit=3)
    shown = re.findall(r"k\d", text)
    assert shown == keys[: min(n, 3)], text
    more = re.findall(r" and (\d+) more", text)
    assert more == ([str(n - 3)] if n > 3 else []), text
