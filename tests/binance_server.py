"""A local HTTP server that answers in Binance's real spot REST wire format, for testing `defai_kit.fetch`.

Exchanges cannot be reached from the test machines, so ccxt's binance API URLs are pointed at this server
(`server.api_urls`). It serves real bars (a frame read from a data file), honours `startTime`, `endTime` and
`limit` as Binance does, and can be told to fail (`fail_next`) or to hide a range of bars (`hide`).
"""
from __future__ import annotations

import json
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).parent))
from servers import free_port  # noqa: E402

INTERVAL_MS = {"1m": 60_000, "5m": 300_000, "15m": 900_000, "1h": 3_600_000, "4h": 14_400_000, "1d": 86_400_000}


def _spot_symbol(symbol: str, base: str, quote: str) -> dict:
    "One entry of /api/v3/exchangeInfo `symbols`, as Binance sends it (the fields ccxt reads)."
    return {
        "symbol": symbol, "status": "TRADING", "baseAsset": base, "baseAssetPrecision": 8, "quoteAsset": quote,
        "quotePrecision": 8, "quoteAssetPrecision": 8, "baseCommissionPrecision": 8, "quoteCommissionPrecision": 8,
        "orderTypes": ["LIMIT", "LIMIT_MAKER", "MARKET", "STOP_LOSS_LIMIT", "TAKE_PROFIT_LIMIT"],
        "icebergAllowed": True, "ocoAllowed": True, "quoteOrderQtyMarketAllowed": True, "allowTrailingStop": True,
        "cancelReplaceAllowed": True, "isSpotTradingAllowed": True, "isMarginTradingAllowed": True,
        "filters": [
            {"filterType": "PRICE_FILTER", "minPrice": "0.01000000", "maxPrice": "1000000.00000000", "tickSize": "0.01000000"},
            {"filterType": "LOT_SIZE", "minQty": "0.00001000", "maxQty": "9000.00000000", "stepSize": "0.00001000"},
            {"filterType": "NOTIONAL", "minNotional": "5.00000000", "applyMinToMarket": True,
             "maxNotional": "9000000.00000000", "applyMaxToMarket": False, "avgPriceMins": 5},
        ],
        "permissions": [], "permissionSets": [["SPOT", "MARGIN"]], "defaultSelfTradePreventionMode": "EXPIRE_MAKER",
        "allowedSelfTradePreventionModes": ["EXPIRE_TAKER", "EXPIRE_MAKER", "EXPIRE_BOTH"],
    }


@dataclass
class Request:
    "One request the server answered."
    path: str
    params: dict[str, str]
    status: int
    at: float  # time.monotonic() on arrival


class BinanceServer:
    "Binance spot REST on 127.0.0.1: exchangeInfo and klines for real bars of one or more symbols."

    def __init__(self, bars: dict[str, pd.DataFrame], interval: str = "1h") -> None:
        self.interval = interval
        self.klines = {symbol: self._kline_rows(frame) for symbol, frame in bars.items()}
        self.requests: list[Request] = []
        self.failures: list[tuple[int, dict[str, str]]] = []  # (status, headers) for coming klines requests
        self.answer_first = 0  # klines requests to answer normally before the failures start
        self.hidden: list[tuple[int, int]] = []  # [start, end) in ms: bars the server leaves out
        self.lock = threading.Lock()
        self.port = free_port()
        self.httpd: ThreadingHTTPServer | None = None

    def _kline_rows(self, frame: pd.DataFrame) -> tuple[np.ndarray, list[list]]:
        "Open times (ms) and the 12-field kline arrays Binance sends, built from a bar frame."
        step = INTERVAL_MS[self.interval]
        opens = frame.index.as_unit("ms").asi8
        rows = []
        for open_ms, bar in zip(opens, frame.itertuples(index=False)):
            volume = bar.volume
            quote_volume = volume * bar.close
            rows.append([int(open_ms), f"{bar.open:.8f}", f"{bar.high:.8f}", f"{bar.low:.8f}", f"{bar.close:.8f}",
                         f"{volume:.8f}", int(open_ms) + step - 1, f"{quote_volume:.8f}", 1000,
                         f"{volume / 2:.8f}", f"{quote_volume / 2:.8f}", "0"])
        return opens, rows

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_urls(self) -> dict[str, str]:
        "ccxt binance `urls['api']` entries pointed here: spot (public) and the futures market lists ccxt loads."
        return {"public": f"{self.url}/api/v3", "private": f"{self.url}/api/v3", "v1": f"{self.url}/api/v1",
                "fapiPublic": f"{self.url}/fapi/v1", "dapiPublic": f"{self.url}/dapi/v1",
                "sapi": f"{self.url}/sapi/v1"}

    def fail_next(self, status: int, times: int = 1, retry_after: int | None = None, after: int = 0) -> None:
        "After `after` normal answers, answer `times` klines requests with HTTP `status` (and Retry-After seconds)."
        headers = {} if retry_after is None else {"Retry-After": str(retry_after)}
        with self.lock:
            self.failures += [(status, headers)] * times
            self.answer_first = after

    def hide(self, start: pd.Timestamp, end: pd.Timestamp) -> None:
        "Leave out the bars opening in [start, end), as if the exchange had none there."
        self.hidden.append((pd.Timestamp(start).value // 1_000_000, pd.Timestamp(end).value // 1_000_000))

    def kline_requests(self) -> list[Request]:
        "The klines requests answered so far, in order."
        return [r for r in self.requests if r.path.endswith("/klines")]

    def answer(self, path: str, params: dict[str, str]) -> tuple[int, object, dict[str, str]]:
        "Status, JSON body and headers for one GET."
        if path in ("/api/v3/exchangeInfo", "/fapi/v1/exchangeInfo", "/dapi/v1/exchangeInfo"):
            symbols = [_spot_symbol(s, s[:-4], s[-4:]) for s in self.klines] if path.startswith("/api/") else []
            return 200, {"timezone": "UTC", "serverTime": int(time.time() * 1000), "rateLimits": [],
                         "exchangeFilters": [], "symbols": symbols}, {}
        if path == "/api/v3/klines":
            with self.lock:
                if self.failures and self.answer_first > 0:
                    self.answer_first -= 1
                elif self.failures:
                    status, headers = self.failures.pop(0)
                    if status == 429:  # Binance's own words for both
                        return status, {"code": -1003, "msg": "Too many requests; please use the websocket for "
                                        "live updates to avoid bans."}, headers
                    return status, {"code": -1001, "msg": "Internal error; unable to process your request. "
                                    "Please try again."}, headers
            return self._klines(params)
        return 404, {"code": -1, "msg": f"no route {path}"}, {}

    def _klines(self, params: dict[str, str]) -> tuple[int, object, dict[str, str]]:
        if params.get("symbol") not in self.klines:
            return 400, {"code": -1121, "msg": "Invalid symbol."}, {}
        if params.get("interval") != self.interval:
            return 400, {"code": -1120, "msg": "Invalid interval."}, {}
        limit = min(int(params.get("limit", 500)), 1000)
        opens, rows = self.klines[params["symbol"]]
        start = int(params.get("startTime", 0))
        end = int(params.get("endTime", 2**62))
        first = int(np.searchsorted(opens, start, side="left"))
        page = []
        for index in range(first, len(rows)):
            if opens[index] > end or len(page) == limit:
                break
            if not any(low <= opens[index] < high for low, high in self.hidden):
                page.append(rows[index])
        return 200, page, {}

    def start(self) -> BinanceServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                url = urlparse(self.path)
                params = {k: v[-1] for k, v in parse_qs(url.query).items()}
                arrived = time.monotonic()
                status, body, headers = server.answer(url.path, params)
                with server.lock:
                    server.requests.append(Request(url.path, params, status, arrived))
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json;charset=UTF-8")
                self.send_header("Content-Length", str(len(data)))
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.httpd = None

    def __enter__(self) -> BinanceServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
