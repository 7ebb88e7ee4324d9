"""Suite-wide checks of the test runner itself."""

from __future__ import annotations

import pytest

_SCATTERED = (
    "pytest-xdist did not tag this xdist_group test with its group (its node id has no '@<group>'), so "
    "--dist loadgroup scatters the group over the workers; install the pytest version pyproject.toml's dev extra "
    "allows (pytest 9.2 keeps node ids where pytest-xdist 3.8 does not look)"
)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Flag the tests of an ``xdist_group`` that ``--dist loadgroup`` would scatter.

    Tests of a group share a worker on purpose (README commands that read what earlier ones wrote, process tests
    that must not run two at a time). pytest-xdist marks them by appending ``@<group>`` to each node id; if a
    pytest/xdist pair stops honouring that, they are spread over the workers and would fail in ways that have
    nothing to do with the code under test. They fail at setup instead, saying why.
    """
    if not getattr(config.option, "loadgroup", False):
        return
    for item in items:
        if item.get_closest_marker("xdist_group") and "@" not in item.nodeid:
            item.stash[_scattered_key] = True


_scattered_key = pytest.StashKey[bool]()


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.stash.get(_scattered_key, False):
        pytest.fail(_SCATTERED, pytrace=False)
