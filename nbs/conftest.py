"""Notebooks that read the real market data are skipped, with the reason, on a machine that has none."""
from __future__ import annotations

from functools import cache
from pathlib import Path

import pytest

from defai_kit.bars import DataError
from defai_kit.formats import find_data_dir


@cache
def _reads_real_data(notebook: Path) -> bool:
    return "find_data_dir" in notebook.read_text() or "capture_dir" in notebook.read_text()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        find_data_dir()
        return
    except DataError as missing:
        skip = pytest.mark.skip(reason=f"needs the real market data: {missing}")
    for item in items:
        if item.path.suffix == ".ipynb" and _reads_real_data(item.path):
            item.add_marker(skip)
