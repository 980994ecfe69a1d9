"""Spine benchmark: event ids, envelopes, the in-process bus, and the event store vs a naive baseline.

Run: .venv/bin/python bench/bench_events.py   (about 30 s; starts a throwaway PostgreSQL on 127.0.0.1 if installed)
"""
from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from defai_kit.bus import InProcessBus  # noqa: E402
from defai_kit.events import EventEnvelope, new_event_id  # noqa: E402
from defai_kit.store import EventRecord, EventStore, open_store, upgrade_database  # noqa: E402


def rate(count: int, seconds: float) -> str:
    return f"{count / seconds:>12,.0f}/s"


def bench_ids_and_envelopes(n: int = 100_000) -> None:
    from ulid import ULID
    began = time.perf_counter()
    for _ in range(n):
        new_event_id()
    ids = time.perf_counter() - began
    began = time.perf_counter()
    for _ in range(n):
        str(ULID())
    reference = time.perf_counter() - began
    began = time.perf_counter()
    events = [EventEnvelope.new("exec.step_filled", {"qty": "0.5", "price": "42000.1"}) for _ in range(n)]
    made = time.perf_counter() - began
    began = time.perf_counter()
    for event in events:
        EventEnvelope.from_json(event.to_json())
    trip = time.perf_counter() - began
    print(f"event ids (monotonic ULID)        {rate(n, ids)}   vs python-ulid str(ULID()) {rate(n, reference)}"
          f"  => {reference / ids:.1f}x")
    print(f"envelopes made                    {rate(n, made)}")
    print(f"JSON round trips                  {rate(n, trip)}")


async def bench_bus(n: int = 100_000) -> None:
    latencies: list[float] = []
    sent_at: dict[str, float] = {}
    async with InProcessBus(queue_size=10_000) as bus:
        bus.subscribe("exec.*", lambda e: latencies.append(time.perf_counter() - sent_at[e.event_id]))
        events = [EventEnvelope.new("exec.step_filled", {"n": i}) for i in range(n)]
        began = time.perf_counter()
        for event in events:
            sent_at[event.event_id] = time.perf_counter()
            await bus.publish(event)
        await bus.drain()
        elapsed = time.perf_counter() - began
    latencies.sort()
    p50, p99 = latencies[len(latencies) // 2] * 1e6, latencies[int(len(latencies) * 0.99)] * 1e6
    print(f"bus publish -> handler, flooded   {rate(n, elapsed)}   latency p50 {p50:,.0f} us, p99 {p99:,.0f} us"
          " (queueing behind up to 10,000 earlier events)")
    # One event at a time: the bus's own publish-to-handler latency.
    latencies.clear()
    async with InProcessBus() as bus:
        arrived = asyncio.Event()
        def handler(event: EventEnvelope) -> None:
            latencies.append(time.perf_counter() - sent_at[event.event_id])
            arrived.set()
        bus.subscribe("exec.*", handler)
        for i in range(10_000):
            event = EventEnvelope.new("exec.step_filled", {"n": i})
            arrived.clear()
            sent_at[event.event_id] = time.perf_counter()
            await bus.publish(event)
            await arrived.wait()
    latencies.sort()
    p50, p99 = latencies[len(latencies) // 2] * 1e6, latencies[int(len(latencies) * 0.99)] * 1e6
    print(f"bus publish -> handler, one by one                 latency p50 {p50:,.1f} us, p99 {p99:,.1f} us")


def bench_store(url: str, label: str, n: int = 20_000) -> None:
    engine = open_store(url)
    upgrade_database(engine)
    events = [EventEnvelope.new("exec.step_filled", {"qty": "0.5", "n": i}) for i in range(n)]
    store = EventStore(engine)
    began = time.perf_counter()
    for start in range(0, n, 1_000):
        store.append(events[start:start + 1_000])
    batched = time.perf_counter() - began
    # Naive baseline: one ORM transaction per event, as a first implementation would write it.
    naive_events = [EventEnvelope.new("exec.step_filled", {"qty": "0.5", "n": i}) for i in range(n // 10)]
    began = time.perf_counter()
    for event in naive_events:
        with sa.orm.Session(engine) as session:
            session.add(EventRecord(**event.model_dump()))
            session.commit()
    naive = time.perf_counter() - began
    batched_rate, naive_rate = n / batched, len(naive_events) / naive
    print(f"event store append, {label:<10}    {batched_rate:>12,.0f}/s batched by 1,000   "
          f"vs naive one transaction per event {naive_rate:,.0f}/s  => {batched_rate / naive_rate:,.1f}x")
    engine.dispose()


def main() -> None:
    print("== defai-kit spine benchmark ==")
    bench_ids_and_envelopes()
    asyncio.run(bench_bus())
    with tempfile.TemporaryDirectory() as folder:
        bench_store(f"sqlite:///{folder}/bench.db", "SQLite")
    try:
        from servers import PostgresServer
        with PostgresServer() as server:
            bench_store(server.create_database("bench"), "PostgreSQL")
    except RuntimeError as exc:
        print(f"PostgreSQL skipped: {exc}")


if __name__ == "__main__":
    main()
