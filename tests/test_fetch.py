"""`defai_kit.fetch` against a local server speaking Binance's real wire format, serving real BTC/USDT bars."""
from __future__ import annotations

import os
import tempfile

import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from defai_kit.bars import DataError, find_gaps
from defai_kit.fetch import FetchReport, fetch_bars, fetch_into_store, make_exchange
from defai_kit.formats import find_data_dir, read_bars

sys.path.insert(0, str(Path(__file__).parent))
from binance_server import BinanceServer  # noqa: E402
from defai_kit.bar_store import ParquetBarStore  # noqa: E402

HOUR = pd.Timedelta(hours=1)
SYMBOL = "BTC/USDT"


@pytest.fixture(scope="module")
def file_bars() -> pd.DataFrame:
    "Real Binance BTC/USDT 1h bars, 2021-2023, with the exchange's real outage hours missing."
    try:
        data = find_data_dir()
    except DataError as missing:
        pytest.skip(f"needs the real market data: {missing}")
    return read_bars(data / "binance_spot_1h_2021-2023" / "BTCUSDT_1h.csv").frame


@pytest.fixture
def server(file_bars):
    with BinanceServer({"BTCUSDT": file_bars}) as running:
        yield running


@pytest.fixture
def exchange(server):
    return make_exchange("binance", api_urls=server.api_urls, rate_limit_ms=1)


def window(file_bars: pd.DataFrame, hours: int, offset_hours: int = 0) -> tuple[pd.Timestamp, pd.Timestamp]:
    since = file_bars.index[0] + offset_hours * HOUR
    return since, since + hours * HOUR


def expected(file_bars: pd.DataFrame, since: pd.Timestamp, until: pd.Timestamp) -> pd.DataFrame:
    return file_bars.loc[since:until - HOUR]


def test_pagination_matches_the_file_value_for_value(file_bars, server, exchange):
    since, until = window(file_bars, 2500)
    report = FetchReport("binance", SYMBOL, "1h")
    bars = fetch_bars("binance", SYMBOL, "1h", since, until, exchange=exchange, page_limit=1000, report=report)
    pd.testing.assert_frame_equal(bars, expected(file_bars, since, until))
    requests = server.kline_requests()
    assert (report.pages, report.requests, len(requests)) == (3, 3, 3)
    assert [r.params["limit"] for r in requests] == ["1000"] * 3
    starts = [int(r.params["startTime"]) for r in requests]
    assert starts[0] == since.value // 1_000_000
    # each page starts one hour after the last bar of the one before
    assert starts[1:] == [bars.index[999].value // 1_000_000 + 3_600_000, bars.index[1999].value // 1_000_000 + 3_600_000]
    assert report.gaps == find_gaps(bars.index, "1h") and len(report.gaps) == 2  # the real outages in those months


def test_429_then_success_honours_retry_after(file_bars, server, exchange):
    since, until = window(file_bars, 48)
    server.fail_next(429, retry_after=1)
    report = FetchReport("binance", SYMBOL, "1h")
    bars = fetch_bars("binance", SYMBOL, "1h", since, until, exchange=exchange, retry_delay=0.001, report=report)
    pd.testing.assert_frame_equal(bars, expected(file_bars, since, until))
    assert (report.retries, report.retry_waits, report.requests) == (1, [1.0], 2)
    assert [r.status for r in server.kline_requests()] == [429, 200]


def test_429_without_retry_after_backs_off_exponentially(file_bars, server, exchange):
    since, until = window(file_bars, 48)
    server.fail_next(429, times=3)
    report = FetchReport("binance", SYMBOL, "1h")
    bars = fetch_bars("binance", SYMBOL, "1h", since, until, exchange=exchange, retry_delay=0.01, report=report)
    assert len(bars) == 48
    assert report.retry_waits == [0.01, 0.02, 0.04]


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_5xx_then_success(file_bars, server, exchange, status):
    since, until = window(file_bars, 300)
    server.fail_next(status, after=1)  # the second page fails once
    report = FetchReport("binance", SYMBOL, "1h")
    bars = fetch_bars("binance", SYMBOL, "1h", since, until, exchange=exchange, page_limit=200, retry_delay=0.001,
                      report=report)
    pd.testing.assert_frame_equal(bars, expected(file_bars, since, until))
    assert (report.pages, report.retries) == (2, 1)
    assert [r.status for r in server.kline_requests()] == [200, status, 200]


def test_gives_up_after_max_retries_with_a_clear_error(file_bars, server, exchange):
    since, until = window(file_bars, 48)
    server.fail_next(500, times=10)
    with pytest.raises(DataError, match=r"binance BTC/USDT 1h: gave up after 2 retries .*try again later"):
        fetch_bars("binance", SYMBOL, "1h", since, until, exchange=exchange, max_retries=2, retry_delay=0.001)
    assert len(server.kline_requests()) == 3


def test_a_gap_longer_than_a_page_is_paged_past_and_reported(file_bars, server, exchange):
    since, until = window(file_bars, 4000)
    hole_start, hole_end = since + 1100 * HOUR, since + 2600 * HOUR  # 1,500 hours, more than a page
    server.hide(hole_start, hole_end)
    store = ParquetBarStore(tempfile.mkdtemp())
    report = fetch_into_store(store, "binance", SYMBOL, "1h", since, until, exchange=exchange, page_limit=1000)
    served = expected(file_bars, since, until)
    served = served[(served.index < hole_start) | (served.index >= hole_end)]
    pd.testing.assert_frame_equal(store.load("binance", SYMBOL, "1h"), served)
    assert report.last == served.index[-1]
    assert report.gaps == find_gaps(served.index, "1h")
    big = [g for g in report.gaps if g.missing >= 1500]
    assert len(big) == 1 and big[0].before >= hole_end and big[0].after < hole_start
    assert len(report.gaps) > 1  # the file's real outage hours are reported too


def test_resume_after_an_interruption_continues_after_the_last_stored_bar(file_bars, server, exchange):
    since, until = window(file_bars, 3000)
    store = ParquetBarStore(tempfile.mkdtemp())
    server.fail_next(500, times=5, after=2)  # two pages arrive, then the exchange goes down
    with pytest.raises(DataError, match="gave up after 1 retries"):
        fetch_into_store(store, "binance", SYMBOL, "1h", since, until, exchange=exchange, page_limit=500,
                         max_retries=1, retry_delay=0.001)
    kept = store.load("binance", SYMBOL, "1h")
    assert len(kept) == 1000  # both pages were written before the failure
    last_stored = store.last_time("binance", SYMBOL, "1h")
    server.failures.clear()
    before = len(server.kline_requests())

    report = fetch_into_store(store, "binance", SYMBOL, "1h", since, until, exchange=exchange, page_limit=500)
    again = server.kline_requests()[before:]
    assert report.resumed_after == last_stored
    assert int(again[0].params["startTime"]) == (last_stored + HOUR).value // 1_000_000
    assert all(int(r.params["startTime"]) > last_stored.value // 1_000_000 for r in again)  # no old page refetched
    assert (report.inserted, report.updated, report.unchanged) == (report.fetched, 0, 0)
    stored = store.load("binance", SYMBOL, "1h")
    assert stored.index.is_unique
    pd.testing.assert_frame_equal(stored, expected(file_bars, since, until))
    assert len(kept) + report.fetched == len(stored)


def test_incremental_rerun_fetches_nothing_when_up_to_date(file_bars, server, exchange):
    since, until = window(file_bars, 1200)
    store = ParquetBarStore(tempfile.mkdtemp())
    fetch_into_store(store, "binance", SYMBOL, "1h", since, until, exchange=exchange)
    before = len(server.kline_requests())
    same = fetch_into_store(store, "binance", SYMBOL, "1h", since, until, exchange=exchange)
    assert (same.requests, same.fetched, same.inserted, same.updated) == (0, 0, 0, 0)
    assert len(server.kline_requests()) == before

    later = fetch_into_store(store, "binance", SYMBOL, "1h", since, until + 24 * HOUR, exchange=exchange)
    assert (later.requests, later.fetched, later.inserted) == (1, 24, 24)
    pd.testing.assert_frame_equal(store.load("binance", SYMBOL, "1h"), expected(file_bars, since, until + 24 * HOUR))


def test_rerun_to_now_asks_once_and_stores_nothing_new(file_bars, server, exchange):
    since = file_bars.index[-100]
    store = ParquetBarStore(tempfile.mkdtemp())
    first = fetch_into_store(store, "binance", SYMBOL, "1h", since, exchange=exchange)  # until now
    assert first.fetched == 100 and first.last == file_bars.index[-1]
    again = fetch_into_store(store, "binance", SYMBOL, "1h", since, exchange=exchange)
    assert (again.requests, again.fetched, again.inserted, again.gaps) == (1, 0, 0, [])
    assert again.resumed_after == file_bars.index[-1]


def test_bad_symbol_unknown_exchange_and_timeframe_are_clear_errors(file_bars, server, exchange):
    since = file_bars.index[0]
    with pytest.raises(DataError, match=r"binance: no market 'FOO/USDT'; write symbols as ccxt does"):
        fetch_bars("binance", "FOO/USDT", "1h", since, exchange=exchange)
    with pytest.raises(DataError, match=r"did you mean BTC/USDT"):
        fetch_bars("binance", "btc/usdt", "1h", since, exchange=exchange)
    with pytest.raises(DataError, match=r"unknown exchange 'binanse'.*did you mean binance"):
        fetch_bars("binanse", SYMBOL, "1h", since)
    with pytest.raises(DataError, match=r"unknown exchange 'nope'"):
        make_exchange("nope")
    with pytest.raises(DataError, match=r"binance: no '7h' bars; it has"):
        fetch_bars("binance", SYMBOL, "7h", since, exchange=exchange)
    with pytest.raises(DataError, match=r"exchange 'kraken' asked for, but the exchange object given is 'binance'"):
        fetch_into_store(ParquetBarStore(tempfile.mkdtemp()), "kraken", SYMBOL, "1h", since, exchange=exchange)
    assert server.kline_requests() == []


def test_invalid_bars_from_the_exchange_are_refused(file_bars):
    broken = file_bars.iloc[:300].copy()
    bad_time = broken.index[250]
    broken.loc[bad_time, "high"] = broken.loc[bad_time, "low"] - 1  # high below low: impossible
    store = ParquetBarStore(tempfile.mkdtemp())
    with BinanceServer({"BTCUSDT": broken}) as server:
        exchange = make_exchange("binance", api_urls=server.api_urls, rate_limit_ms=1)
        with pytest.raises(DataError, match=re.escape(f"binance BTC/USDT 1h: the exchange sent an invalid bar at "
                                                      f"{bad_time} (high is below open or close); the page holding it")):
            fetch_into_store(store, "binance", SYMBOL, "1h", broken.index[0], exchange=exchange, page_limit=200)
    assert len(store.load("binance", SYMBOL, "1h")) == 200  # the good first page is kept, the bad one refused


def test_requests_are_spaced_by_ccxt_rate_limiter(file_bars, server):
    # ccxt's binance rates spot klines at cost 0.4 (request weight 2), so it keeps 0.4 x rateLimit = 40 ms between them
    exchange = make_exchange("binance", api_urls=server.api_urls, rate_limit_ms=100)
    assert (exchange.enableRateLimit, exchange.rateLimit) == (True, 100)
    since, until = window(file_bars, 300)
    bars = fetch_bars("binance", SYMBOL, "1h", since, until, exchange=exchange, page_limit=50)
    assert len(bars) == 300
    arrivals = np.array([r.at for r in server.kline_requests()])
    assert len(arrivals) == 6
    # a lower bound only (ccxt sleeps to guarantee it), with slack for millisecond clock rounding and socket latency
    assert np.diff(arrivals).min() >= 0.030


def test_fetch_into_the_real_parquet_bar_store(file_bars, server, exchange, tmp_path):
    store = ParquetBarStore(tmp_path / "bars")
    since, until = window(file_bars, 1500)
    first = fetch_into_store(store, "binance", SYMBOL, "1h", since, since + 700 * HOUR, exchange=exchange)
    second = fetch_into_store(store, "binance", SYMBOL, "1h", since, until, exchange=exchange)
    assert second.resumed_after == first.last
    assert first.inserted + second.inserted == len(expected(file_bars, since, until))
    pd.testing.assert_frame_equal(store.load("binance", SYMBOL, "1h"), expected(file_bars, since, until),
                                  check_freq=False)


def test_cli_fetch_resumes_and_reports(server, file_bars, tmp_path):
    "`defai data fetch` against the local Binance-format server: a real process, then a resumed re-run."
    from test_cli import defai
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEFAI_")}
    env["DEFAI_HOME"] = str(tmp_path)
    since, until = str(file_bars.index[0]), str(file_bars.index[2_499] + HOUR)
    urls = [f"--api-url={name}={url}" for name, url in server.api_urls.items()]
    first = defai("data", "fetch", "--exchange", "binance", "--symbol", SYMBOL, "--since", since, "--until", until,
                  *urls, env=env)
    assert first.returncode == 0, first.stderr
    assert "2,500 bars fetched" in first.stdout and "2,500 inserted" in first.stdout
    again = defai("data", "fetch", "--exchange", "binance", "--symbol", SYMBOL, "--since", since, "--until", until,
                  *urls, env=env)
    assert again.returncode == 0 and "0 bars fetched" in again.stdout, again.stdout
    bad = defai("data", "fetch", "--exchange", "binance", "--symbol", SYMBOL, "--since", since, "--api-url", "nope",
                env=env)
    assert bad.returncode == 1 and bad.stderr == "error: --api-url: expected NAME=URL, got 'nope'\n"
