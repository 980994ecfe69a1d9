"""Papermill pipelines run as a scheduler runs them: parameters injected, executed top to bottom."""
from __future__ import annotations

from pathlib import Path

import nbformat
import papermill
import pytest

from defai_kit.formats import find_data_dir
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
    assert "applied migrations: ['0001', '0002', '0003', '0004', '0005', '0006', '0007', '0008']" in text
    assert "paper trading (live trading off)" in text
    heartbeats = EventStore(open_store(database_url)).read(topic="system.heartbeat")
    assert [e.payload["job"] for e in heartbeats] == ["kit_state"]


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)  # SQLite: the runs notebook covers it
def test_backtest_pipeline_stores_a_run_and_writes_its_report(tmp_path, database_url):
    from defai_kit.bar_store import open_bar_store
    from defai_kit.data_import import import_bars
    from defai_kit.runs import RunStore
    from defai_kit.settings import load_settings
    from defai_kit.store import upgrade_database

    settings = load_settings(home=str(tmp_path), database_url=database_url)
    engine = open_store(settings.store_url)
    upgrade_database(engine)
    import_bars(find_data_dir() / "binance_spot_1h_2021-2023" / "ETHUSDT_1h.csv", store=open_bar_store(settings, engine))
    report = tmp_path / "reports" / "rsi.html"
    output = tmp_path / "out.ipynb"
    papermill.execute_notebook(
        str(PIPELINES / "backtest.ipynb"), str(output), kernel_name="python3", progress_bar=False,
        parameters={"home": str(tmp_path), "database_url": database_url, "strategy": "rsi_reversion",
                    "symbols": ["ETH/USDT"], "report": str(report), "start": "2023-01-01"})
    runs = RunStore(engine).list()
    assert [(r.strategy, r.symbols, r.kind) for r in runs] == [("rsi_reversion", ["ETH/USDT"], "backtest")]
    assert runs[0].start.year == 2023 and runs[0].report_path == str(report) and report.stat().st_size > 100_000
    text = "".join(o.get("text", "") for c in nbformat.read(output, as_version=4).cells for o in c.get("outputs", []))
    assert f"run {runs[0].run_id}" in text
