"""Interoperability with other adapter libraries' formats."""
