"""Papermill pipelines run as a scheduler runs them: parameters injected, executed top to bottom."""
from __future__ import annotations

from pathlib import Path

import nbformat
import papermill
import pytest

from defai_kit.store import EventStore, open_store

PIPELINES = Path(__file__).resolve().parents[1] / "pipelines"


@pytest.mark.parametrize("notebook", sorted(PIPELINES.glob("*.ipynb")), ids=lambda p: p.stem)
def test_every_pipeline_has_a_parameters_cell_and_imports_only_the_kit(notebook):
    cells = nbformat.read(notebook, as_version=4).cells
    assert any("parameters" in cell.metadata.get("tags", []) for cell in cells)
    imports = [line for cell in cells if cell.cell_type == "code" for line in cell.source.splitlines()
               if line.startswith(("import ", "from "))]
    assert all(line.split()[1].split(".")[0] == "defai_kit" for line in imports), imports


def test_kit_state_pipeline_on_both_backends(tmp_path, database_url):
    output = tmp_path / "out.ipynb"
    papermill.execute_notebook(str(PIPELINES / "kit_state.ipynb"), str(output), kernel_name="python3",
                               parameters={"home": str(tmp_path), "database_url": database_url}, progress_bar=False)
    text = "".join(o.get("text", "") for c in nbformat.read(output, as_version=4).cells for o in c.get("outputs", []))
    assert "applied migrations: ['0001']" in text
    assert "paper trading (live trading off)" in text
    heartbeats = EventStore(open_store(database_url)).read(topic="system.heartbeat")
    assert [e.payload["job"] for e in heartbeats] == ["kit_state"]
