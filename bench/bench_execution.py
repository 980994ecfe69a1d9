"""Execution-core benchmark: intents per second through risk -> plan -> paper fill -> ledger with every event
persisted, on SQLite and PostgreSQL; the same burst with every batch stored by the ledger's writer thread (no batch
written by a forked copy, as before 2026-12-07) and with a naive ledger (one database transaction per event), in the
same run; the same sustained, with a client keeping 1,000 intents open (it submits the next as the oldest is
stored), again against the writer thread alone; the pre-chain latency, submit -> plan.created, p50 and p99; and an
agent runner's trading tick (start an engine, one intent, stop) on the store the runs left: opening the ledger from
its tables, against replaying the whole store (as every start did before 2026-12-06) and against going on from the
last tick's ledger. Last, once, the ceiling the flow itself sets: the same burst with nothing written (no rows
built, no SQL), on a throwaway store.

Run: .venv/bin/python bench/bench_execution.py [--quick]   (about a minute; starts a throwaway PostgreSQL on
127.0.0.1 when its binaries are installed)
"""
from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from decimal import Decimal
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from defai_kit.events import EventEnvelope  # noqa: E402
from defai_kit.execution import ExecutionEngine  # noqa: E402
from defai_kit.intents import Intent  # noqa: E402
import defai_kit.ledger as ledger_module  # noqa: E402
import sqlalchemy as sa  # noqa: E402
from defai_kit.ledger import INTENTS as INTENT_ROWS, Ledger, compare_read_models, replay  # noqa: E402
from defai_kit.risk import RiskEngine, RiskLimits  # noqa: E402
from defai_kit.store import EventStore, open_store, upgrade_database  # noqa: E402
from defai_kit.venues import PaperVenue  # noqa: E402

QUICK = "--quick" in sys.argv
INTENTS = 2_000 if QUICK else 10_000
IN_FLIGHT = 1_000                    # the sustained run: a client that keeps this many intents open
LIMITS = RiskLimits.of(max_notional="1000000", max_slippage_bps="100", max_position="100000000",
                       max_gross_exposure="1000000000", allowed_venues=["paper"], allowed_assets=["BTC", "USDT"],
                       rate_limit=10_000_000)


class NaiveLedger(Ledger):
    "The baseline: every event in its own transaction, written the moment it arrives."

    def receive(self, event: EventEnvelope) -> None:
        self.write([event])


def make_core(url: str, naive: bool = False, since: Ledger | None = None) -> ExecutionEngine:
    engine = open_store(url)
    upgrade_database(engine)
    venue = PaperVenue("paper", {"USDT": "10000000000", "BTC": "0"}, fee_bps=10, slippage_bps=2)
    venue.update_market("BTC/USDT", Decimal("30000"), quote_volume=Decimal("1000000000"))
    core = ExecutionEngine(engine, {"paper": venue}, risk=RiskEngine(LIMITS), poll_seconds=0.001, since=since)
    core.update_mark("BTC/USDT", Decimal("30000"))
    if naive:
        original = Ledger.open
        Ledger.open = classmethod(lambda cls, engine, **_: NaiveLedger(engine))   # this process only
        core._restore = lambda: setattr(Ledger, "open", original)
    return core


@contextmanager
def thread_writer_only():
    "Every batch stored by the ledger's writer thread, as before 2026-12-07 (no batch written by a forked copy)."
    forking = ledger_module.CAN_FORK
    ledger_module.CAN_FORK = False                     # read as each ledger opens; this process only
    try:
        yield
    finally:
        ledger_module.CAN_FORK = forking


async def timed_burst(core: ExecutionEngine, count: int,
                      in_flight: int | None = None) -> tuple[list[Intent], float, list[dict]]:
    "`count` intents through `core`, sent at once or keeping `in_flight` open: the intents, seconds, their final rows."
    intents = [Intent.of(symbol="BTC/USDT", side="buy", quantity="0.001", max_slippage_bps=50) for _ in range(count)]
    in_flight = in_flight or count
    ended = []
    async with core:
        await core.fund("paper", "USDT", "10000000000")
        began = time.perf_counter()
        for number, intent in enumerate(intents):
            if number >= in_flight:
                ended.append(await core.wait(intents[number - in_flight].intent_id, timeout=600))
            await core.submit_intent(intent)
        for intent in intents[-in_flight:]:
            ended.append(await core.wait(intent.intent_id, timeout=600))
        seconds = time.perf_counter() - began
    return intents, seconds, ended


async def throughput(url: str, count: int, naive: bool = False,
                     in_flight: int | None = None) -> tuple[float, int, list[str]]:
    "`count` intents sent at once, or by a client keeping `in_flight` open (the next sent as the oldest is stored)."
    core = make_core(url, naive)
    intents, seconds, _ = await timed_burst(core, count, in_flight)
    if naive:
        core._restore()
    with core.engine.connect() as connection:                 # ended intents leave the ledger's memory: read the table
        states = dict(connection.execute(sa.select(INTENT_ROWS.c.intent_id, INTENT_ROWS.c.state)).all())
    completed = sum(1 for intent in intents if states[intent.intent_id] == "completed")
    differences = compare_read_models(core.engine)
    core.engine.dispose()
    return seconds, completed, differences


async def latency(url: str, count: int) -> list[float]:
    "submit -> plan.created, one intent at a time (the flow is otherwise idle)."
    core = make_core(url)
    seen: dict[str, float] = {}
    async with core:
        await core.fund("paper", "USDT", "10000000000")
        core.bus.subscribe("plan.created", lambda event: seen.setdefault(event.correlation_id, time.perf_counter()))
        samples = []
        for _ in range(count):
            intent = Intent.of(symbol="BTC/USDT", side="buy", quantity="0.001")
            began = time.perf_counter()
            await core.submit_intent(intent)
            await core.wait(intent.intent_id)
            samples.append((seen[intent.intent_id] - began) * 1e3)
    core.engine.dispose()
    return samples


def replaying_it_all(engine):
    "How every ledger opened before 2026-12-06: a replay of the whole store, every intent kept."
    return replay(engine)


async def trading_ticks(url: str, count: int, start: str) -> float:
    "Median seconds of a runner's trading tick: start an engine, one intent to completion, stop."
    samples, last = [], None
    opening = ledger_module.open_read_models
    if start == "replaying":
        ledger_module.open_read_models = replaying_it_all
    try:
        for _ in range(count):
            began = time.perf_counter()
            core = make_core(url, since=last if start == "going on" else None)
            async with core:
                await core.wait(await core.submit_intent(symbol="BTC/USDT", side="buy", quantity="0.001"))
            samples.append(time.perf_counter() - began)
            last = core.ledger
            core.engine.dispose()
    finally:
        ledger_module.open_read_models = opening
    return statistics.median(samples[1:] if start == "going on" else samples)   # going on: the first tick opens


async def in_memory_only(url: str, count: int) -> float:
    "The burst with the ledger's writes taken out (no rows built, no SQL): what the flow's own Python allows."
    writing, row_building = Ledger._store, ledger_module._Statements.model_rows
    Ledger._store = lambda self, batch, changed, parked=None: len(batch)        # this process only, restored below
    ledger_module._Statements.model_rows = lambda self, models, changed: {}
    try:
        core = make_core(url)
        with thread_writer_only():                        # nothing to write: no child to fork for it
            _, seconds, ended = await timed_burst(core, count)
        core.engine.dispose()
    finally:
        Ledger._store, ledger_module._Statements.model_rows = writing, row_building
    return sum(1 for row in ended if row["state"] == "completed") / seconds


def run(url: str, label: str) -> None:
    seconds, completed, differences = asyncio.run(throughput(url, INTENTS))
    naive_count = INTENTS // 5
    naive_seconds, naive_completed, _ = asyncio.run(throughput(url, naive_count, naive=True))
    rate, naive_rate = completed / seconds, naive_completed / naive_seconds
    print(f"{label:<10} {INTENTS:,} intents, every event stored: {rate:>8,.0f} intents/s "
          f"({rate * 8:,.0f} events/s); replay equals live: {not differences}")
    with thread_writer_only():
        thread_seconds, thread_completed, thread_differences = asyncio.run(throughput(url, INTENTS))
    thread_rate = thread_completed / thread_seconds
    print(f"{label:<10} the same, every batch stored by the writer thread (before 2026-12-07): {thread_rate:>8,.0f} "
          f"intents/s; replay equals live: {not thread_differences}  => forked writer {rate / thread_rate:,.2f}x")
    print(f"{label:<10} naive ledger, one transaction per event ({naive_count:,} intents): {naive_rate:,.0f} intents/s"
          f"  => {rate / naive_rate:,.1f}x")
    steady_seconds, steady_completed, steady_differences = asyncio.run(throughput(url, INTENTS, in_flight=IN_FLIGHT))
    with thread_writer_only():
        thread_steady_seconds, thread_steady_completed, _ = asyncio.run(throughput(url, INTENTS, in_flight=IN_FLIGHT))
    steady_rate, thread_steady_rate = steady_completed / steady_seconds, thread_steady_completed / thread_steady_seconds
    print(f"{label:<10} sustained, {IN_FLIGHT:,} intents in flight ({INTENTS:,} intents): "
          f"{steady_rate:>8,.0f} intents/s; replay equals live: {not steady_differences}; writer thread only "
          f"{thread_steady_rate:,.0f} intents/s  => {steady_rate / thread_steady_rate:,.2f}x")
    samples = sorted(asyncio.run(latency(url, 200 if QUICK else 1_000)))
    p50, p99 = statistics.median(samples), samples[int(len(samples) * 0.99) - 1]
    print(f"{label:<10} submit -> plan.created, one at a time: p50 {p50:.3f} ms, p99 {p99:.3f} ms")
    history = EventStore(open_store(url)).count()
    replaying, opening, going_on = (asyncio.run(trading_ticks(url, 3, start))
                                    for start in ("replaying", "opening", "going on"))
    print(f"{label:<10} a runner's trading tick on a store of {history:,} events: opening from the tables "
          f"{opening:.3f} s, replaying it all {replaying:.3f} s ({replaying / opening:,.0f}x), going on from the last "
          f"tick's ledger {going_on:.3f} s")


def main() -> None:
    print("== defai-kit execution benchmark ==")
    with tempfile.TemporaryDirectory() as folder:
        run(f"sqlite:///{folder}/bench.db", "SQLite")
        ceiling = asyncio.run(in_memory_only(f"sqlite:///{folder}/nothing-written.db", INTENTS))
        print(f"the flow alone, {INTENTS:,} intents with nothing written (no rows, no SQL): {ceiling:>8,.0f} intents/s, "
              "the most any writer could leave it")
    try:
        from servers import PostgresServer
        with PostgresServer() as server:
            run(server.create_database("bench"), "PostgreSQL")
    except RuntimeError as exc:
        print(f"PostgreSQL skipped: {exc}")


if __name__ == "__main__":
    main()
