"""`defai backtest`, `defai walk-forward` and `defai runs` as a user runs them: a real process on real bars."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from defai_kit.formats import find_data_dir
from test_cli import defai

BTC = find_data_dir() / "binance_spot_1h_2021-2023" / "BTCUSDT_1h.csv"


@pytest.fixture(scope="module")
def research_env(tmp_path_factory):
    "A kit home (SQLite store, Parquet bars) with BTC/USDT 1h imported, shared by the tests of this module."
    import os
    home = tmp_path_factory.mktemp("research")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEFAI_")}
    env["DEFAI_HOME"] = str(home)
    assert defai("db", "upgrade", env=env).returncode == 0
    imported = defai("data", "import", str(BTC), env=env)
    assert imported.returncode == 0, imported.stderr
    return env


def run_id(stdout: str) -> str:
    return re.search(r"^run (\w{26}):", stdout, re.M).group(1)


def test_backtest_prints_metrics_stores_the_run_and_writes_the_report(research_env, tmp_path):
    report = tmp_path / "ma.html"
    result = defai("backtest", "--strategy", "ma_cross", "--symbol", "BTC/USDT", "--timeframe", "1h",
                   "--param", "fast=12", "--param", "slow=48", "--config", "taker_fee_bps=10",
                   "--report", str(report), env=research_env)
    assert result.returncode == 0, result.stderr
    assert "backtest ma_cross(fast=12, slow=48) on binance BTC/USDT 1h" in result.stdout
    assert "Sharpe ratio" in result.stdout and "Max drawdown" in result.stdout
    assert f"report: {report}" in result.stdout and "<html" in report.read_text()[:500].lower()
    first = run_id(result.stdout)
    second = run_id(defai("backtest", "--strategy", "rsi_reversion", "--symbol", "BTC/USDT", env=research_env).stdout)
    listed = defai("runs", "list", env=research_env).stdout.splitlines()
    assert [line.split()[0] for line in listed[:2]] == [second, first]
    shown = defai("runs", "show", first, env=research_env)
    assert shown.returncode == 0 and f"run {first}:" in shown.stdout
    compared = defai("runs", "compare", first, second, env=research_env)
    assert compared.returncode == 0 and first in compared.stdout and "total_return" in compared.stdout


BAD_REQUESTS = [
    (["--strategy", "nope", "--symbol", "BTC/USDT"], "error: strategy 'nope' is unknown; known: "),
    (["--strategy", "ma_cross", "--symbol", "BTC/USDT", "--param", "fast=abc"], "error: parameter fast='abc': expected a whole number"),
    (["--strategy", "ma_cross", "--symbol", "BTC/USDT", "--param", "speed=3"], "error: strategy 'ma_cross' has no parameter 'speed'"),
    (["--strategy", "ma_cross", "--symbol", "BTC/USDT", "--config", "fee=1"], "error: backtest config fee='1': Extra inputs are not permitted"),
    (["--strategy", "ma_cross", "--symbol", "BTC/USDT", "--config", "taker_fee_bps"], "error: --config 'taker_fee_bps': write it as NAME=VALUE"),
]


def test_bad_backtest_requests_fail_with_one_line_and_store_nothing(research_env):
    before = defai("runs", "list", env=research_env).stdout
    for arguments, message in BAD_REQUESTS:
        result = defai("backtest", *arguments, env=research_env)
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith(message) and result.stderr.count("\n") == 1, result.stderr
    assert defai("runs", "list", env=research_env).stdout == before


def test_missing_bars_and_unknown_runs_are_named(research_env):
    result = defai("backtest", "--strategy", "ma_cross", "--symbol", "DOGE/USDT", env=research_env)
    assert result.returncode == 1 and "no bars stored for binance DOGE/USDT 1h" in result.stderr
    result = defai("runs", "show", "01NOSUCHRUN", env=research_env)
    assert result.returncode == 2 and "run '01NOSUCHRUN': no such run" in result.stderr


def test_walk_forward_writes_its_report_and_stores_the_run(research_env, tmp_path):
    report = tmp_path / "walk.html"
    result = defai("walk-forward", "--strategy", "ma_cross", "--symbol", "BTC/USDT", "--grid", "fast=12,24",
                   "--grid", "slow=48,96", "--start", "2023-01-01", "--in-sample", "2160", "--out-of-sample", "720",
                   "--report", str(report), env=research_env)
    assert result.returncode == 0, result.stderr
    assert "walk_forward ma_cross" in result.stdout and report.exists()
    bad = defai("walk-forward", "--strategy", "ma_cross", "--symbol", "BTC/USDT", "--grid", "speed=1,2", env=research_env)
    assert bad.returncode == 2 and "--grid speed: strategy 'ma_cross' has no such parameter" in bad.stderr


def test_strategies_lists_the_library(research_env):
    result = defai("strategies", env=research_env)
    assert result.returncode == 0
    for name in ("ma_cross", "rsi_reversion", "macd_trend", "bollinger_reversion", "donchian_breakout", "grid", "dca",
                 "pairs_spread"):
        assert re.search(rf"^{name}\b", result.stdout, re.M), name
