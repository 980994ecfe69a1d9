"""The bar store's promises on every backend: Parquet (the default), SQLite's table, and a real PostgreSQL."""
from __future__ import annotations

import multiprocessing

import numpy as np
import pandas as pd
import pytest

from defai_kit.bar_store import ParquetBarStore, SqlBarStore, UpsertReport, load_bars_aligned, open_bar_store
from defai_kit.formats import find_data_dir, read_bars
from defai_kit.settings import Settings
from defai_kit.store import open_store, upgrade_database

BTC = read_bars(find_data_dir() / "binance_spot_1h_2021-2023/BTCUSDT_1h.csv").frame


@pytest.fixture(params=["parquet", "sqlite", "postgresql"])
def bar_store(request, tmp_path):
    if request.param == "parquet":
        return ParquetBarStore(tmp_path / "bars")
    url = f"sqlite:///{tmp_path / 'kit.db'}" if request.param == "sqlite" else \
        request.getfixturevalue("postgres").create_database(f"bars_{tmp_path.name[-20:].replace('-', '_')}")
    engine = open_store(url)
    upgrade_database(engine)
    return SqlBarStore(engine)


def test_store_once(bar_store):
    assert bar_store.upsert("binance", "BTC/USDT", "1h", BTC) == UpsertReport(inserted=23_988)
    assert bar_store.upsert("binance", "BTC/USDT", "1h", BTC) == UpsertReport(unchanged=23_988)
    stored = bar_store.load("binance", "BTC/USDT", "1h")
    pd.testing.assert_frame_equal(stored, BTC, check_freq=False)  # exact: every value, every time


def test_updates_are_counted_and_applied(bar_store):
    bar_store.upsert("binance", "BTC/USDT", "1h", BTC.iloc[:1000])
    changed = BTC.iloc[900:1100].copy()
    changed.loc[changed.index[:5], "volume"] = 0.0
    assert bar_store.upsert("binance", "BTC/USDT", "1h", changed) == UpsertReport(100, 5, 95)
    assert (bar_store.load("binance", "BTC/USDT", "1h", changed.index[0], changed.index[4])["volume"] == 0).all()
    assert bar_store.last_time("binance", "BTC/USDT", "1h") == BTC.index[1099]


def test_series_are_kept_apart(bar_store):
    bar_store.upsert("binance", "BTC/USDT", "1h", BTC.iloc[:100])
    bar_store.upsert("binance", "BTC/USDT", "4h", BTC.iloc[:100:4])
    bar_store.upsert("coinbase", "BTC/USD", "1h", BTC.iloc[:50])
    assert [(s.exchange, s.symbol, s.timeframe, s.bars) for s in bar_store.series()] == [
        ("binance", "BTC/USDT", "1h", 100), ("binance", "BTC/USDT", "4h", 25), ("coinbase", "BTC/USD", "1h", 50)]
    assert bar_store.last_time("kraken", "BTC/USD", "1h") is None


def test_aligned_read_matches_each_series(bar_store):
    eth = read_bars(find_data_dir() / "binance_spot_1h_2021-2023/ETHUSDT_1h.csv").frame
    bar_store.upsert("binance", "BTC/USDT", "1h", BTC)
    bar_store.upsert("binance", "ETH/USDT", "1h", eth)
    aligned = load_bars_aligned("binance", ["BTC/USDT", "ETH/USDT"], "1h", store=bar_store)
    assert aligned.index.equals(BTC.index.union(eth.index))
    for symbol, frame in (("BTC/USDT", BTC), ("ETH/USDT", eth)):
        np.testing.assert_array_equal(aligned["close"][symbol].dropna().to_numpy(), frame["close"].to_numpy())


def _upsert_from_process(root: str, start: int) -> None:
    ParquetBarStore(root).upsert("binance", "BTC/USDT", "1h", BTC.iloc[start:start + 12_000])


def test_two_processes_writing_one_series_lose_nothing(tmp_path):
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_upsert_from_process, args=(str(tmp_path), start)) for start in (0, 11_988)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
        assert worker.exitcode == 0
    pd.testing.assert_frame_equal(ParquetBarStore(tmp_path).load("binance", "BTC/USDT", "1h"), BTC, check_freq=False)


def test_settings_choose_the_store(tmp_path, postgres):
    assert isinstance(open_bar_store(Settings(_env_file=None, home=tmp_path)), ParquetBarStore)
    url = postgres.create_database("choose_store")
    upgrade_database(open_store(url))
    assert isinstance(open_bar_store(Settings(_env_file=None, database_url=url)), SqlBarStore)
