"""PEFT is the numerical oracle for these tests; skip the folder cleanly if it is not installed."""

import pytest

pytest.importorskip("peft")
