"""Market data benchmark: bulk import and aligned reads, against the naive pandas baselines, in one run.

Run: .venv/bin/python bench/bench_data.py   (about a minute; needs ../shared/data)

Files are built from real bars in ../shared/data. The 1,000,000-row files repeat the real 1-minute BTC perp bars
(45,031 of them) one after another in time, so values are real and the series is long enough to measure.
"""
from __future__ import annotations

import resource
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from defai_kit.bar_store import ParquetBarStore, SqlBarStore, load_bars_aligned
from defai_kit.data_import import import_bars
from defai_kit.formats import find_data_dir, read_bars
from defai_kit.store import open_store, upgrade_database

DATA = find_data_dir()
ROWS = 1_000_000


def timed(action) -> float:
    began = time.perf_counter()
    action()
    return time.perf_counter() - began


def big_files(folder: Path) -> dict[str, Path]:
    "One million real 1m bars as CSV, feather and parquet (the 45,031-bar perp series repeated in time)."
    perp = read_bars(DATA / "nautilus/btc-perp-20211231-20220201_1m.csv").frame
    copies, span = -(-ROWS // len(perp)), perp.index[-1] - perp.index[0] + pd.Timedelta(minutes=1)
    frame = pd.concat([perp.set_axis(perp.index + span * n) for n in range(copies)]).iloc[:ROWS]
    table = frame.rename_axis("date").reset_index()
    paths = {"csv": folder / "BTCUSDT_1m.csv", "feather": folder / "BTCUSDT_1m.feather",
             "parquet": folder / "BTCUSDT_1m.parquet"}
    table.to_csv(paths["csv"], index=False)
    table.to_feather(paths["feather"])
    table.to_parquet(paths["parquet"])
    return paths


def bench_import(folder: Path) -> None:
    print(f"== bulk import, {ROWS:,} 1m bars into the default store (Parquet beside SQLite) ==")
    paths = big_files(folder)
    for kind, path in paths.items():
        store = ParquetBarStore(folder / f"kit-{kind}")
        seconds = timed(lambda: import_bars(path, exchange="binance", store=store))
        naive_db = folder / f"naive-{kind}.db"
        read = {"csv": pd.read_csv, "feather": pd.read_feather, "parquet": pd.read_parquet}[kind]
        def naive() -> None:
            with sqlite3.connect(naive_db) as connection:
                read(path).to_sql("bars", connection, if_exists="replace", index=False)
        naive_seconds = timed(naive)
        print(f"{kind:<8} kit import {ROWS / seconds:>12,.0f} rows/s (read, clean, validate, upsert)   "
              f"naive pandas read + to_sql(SQLite) {ROWS / naive_seconds:>10,.0f} rows/s   => {naive_seconds / seconds:.1f}x")
    table_store = SqlBarStore(open_store(f"sqlite:///{folder / 'table.db'}"))
    upgrade_database(table_store.engine)
    seconds = timed(lambda: import_bars(paths["feather"], exchange="binance", store=table_store))
    print(f"feather  into SQLite's bars table instead: {ROWS / seconds:,.0f} rows/s (why bars live in Parquet by default)")


def bench_read(folder: Path) -> None:
    names = ["BTC", "ETH", "SOL", "BNB", "XRP", "DOGE"]
    frames = {f"{n}/USDT": read_bars(DATA / f"binance_spot_1h_2021-2023/{n}USDT_1h.csv").frame for n in names}
    for n in range(4):  # four more 3-year series, copies of real ones under other names, to make ten
        frames[f"COPY{n}/USDT"] = frames[f"{names[n]}/USDT"]
    store = ParquetBarStore(folder / "read")
    naive_db = folder / "read-naive.db"
    with sqlite3.connect(naive_db) as connection:
        for symbol, frame in frames.items():
            store.upsert("binance", symbol, "1h", frame)
            frame.assign(symbol=symbol).reset_index().to_sql("bars", connection, if_exists="append", index=False)
        connection.execute("CREATE INDEX by_symbol ON bars(symbol, time)")
    symbols, total = list(frames), sum(len(f) for f in frames.values())
    load_bars_aligned("binance", symbols, "1h", store=store)  # warm the file cache, as a research session would
    best = min(timed(lambda: load_bars_aligned("binance", symbols, "1h", store=store)) for _ in range(5))
    def naive() -> None:
        with sqlite3.connect(naive_db) as connection:
            table = pd.read_sql("SELECT * FROM bars", connection, parse_dates=["time"])
        table.pivot(index="time", columns="symbol")
    naive_best = min(timed(naive) for _ in range(3))
    print(f"== read: 10 symbols x 3 years of 1h bars ({total:,} bars) into one aligned frame ==")
    print(f"kit load_bars_aligned {best * 1000:>8.0f} ms   naive pandas read_sql + pivot {naive_best * 1000:>8.0f} ms"
          f"   => {naive_best / best:.1f}x   (goal < 500 ms)")


def bench_memory() -> None:
    largest = max((p for p in DATA.rglob("*") if p.suffix in (".csv", ".feather", ".json", ".gz", ".zip")
                   and "hftbacktest" not in str(p) and "onchain" not in str(p) and "trades" not in p.name
                   and "tardis" not in str(p) and "orderflow" not in str(p) and "kraken" not in str(p)
                   and "lean" not in str(p) and "bybit" not in str(p) and "depth" not in p.name
                   and "quotes" not in p.name and "funding" not in p.name and "mark" not in p.name),
                  key=lambda p: p.stat().st_size)
    with tempfile.TemporaryDirectory() as home:
        # The child reports its own peak: RUSAGE_CHILDREN would also count the parent's pages a child holds
        # between fork and exec.
        code = ("import resource, sys; from defai_kit.data_import import import_bars;"
                "from defai_kit.bar_store import ParquetBarStore;"
                f"import_bars(sys.argv[1], store=ParquetBarStore({home!r}));"
                "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
        child = subprocess.run([sys.executable, "-c", code, str(largest)], check=True, capture_output=True, text=True)
    peak = int(child.stdout.split()[-1]) / 1024
    print(f"== memory: importing the largest bar file, {largest.name} ({largest.stat().st_size / 1e6:.1f} MB) ==")
    print(f"peak RSS of the importing process {peak:,.0f} MB (Python, pandas, Arrow and SQLAlchemy included: "
          "about 150 MB before reading a byte)")


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        bench_import(Path(folder))
        bench_read(Path(folder))
    bench_memory()


if __name__ == "__main__":
    main()
