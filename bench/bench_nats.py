"""The execution core at scale: three processes over NATS JetStream with PostgreSQL, against the in-process engine on
the same PostgreSQL server in the same run.

Three processes: this one is the core (the ledger, risk, and the submitting side); a planner and an orchestrator
run as `defai worker --role planner|orchestrator` processes. Throughput: intents per second through
risk -> plan -> paper fill -> ledger, every event stored in the stream and in PostgreSQL, from the first submit
until the ledger has committed the last intent's final event. Latency: submit -> `plan.created` seen back in this
process, one intent at a time (each waits for the previous to finish). nats-server and PostgreSQL run on 127.0.0.1,
started here and stopped by their PIDs.

Run: .venv/bin/python bench/bench_nats.py [--quick]   (about a minute; needs the PostgreSQL server binaries)
"""
from __future__ import annotations

import asyncio
import os
import statistics
import sys
import tempfile
import time
from decimal import Decimal
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_execution import LIMITS, latency as in_process_latency, throughput as in_process_throughput  # noqa: E402
from defai_kit.events import EventEnvelope  # noqa: E402
from defai_kit.execution import FINAL_TOPICS, RiskStage  # noqa: E402
from defai_kit.intents import Intent, intent_event  # noqa: E402
from defai_kit.ledger import Ledger, compare_read_models  # noqa: E402
from defai_kit.nats_bus import NatsBus  # noqa: E402
from defai_kit.risk import RiskEngine  # noqa: E402
from defai_kit.store import open_store, upgrade_database  # noqa: E402
from defai_kit.venues import PaperVenue  # noqa: E402
from servers import NatsServer, PostgresServer, WorkerProcess  # noqa: E402

QUICK = "--quick" in sys.argv
INTENTS = 1_000 if QUICK else 3_000
SAMPLES = 200 if QUICK else 500
WINDOW = 100                                                # intents submitted concurrently
PRICE = Decimal("30000")
PAPER = ["--price", f"BTC/USDT={PRICE}", "--balance", "USDT=10000000000", "--fee-bps", "10", "--slippage-bps", "2"]


class Core:
    "The core role in this process: ledger + risk on the NATS bus, and the submitting side."

    def __init__(self, url: str, database_url: str):
        self.engine = open_store(database_url)
        upgrade_database(self.engine)
        self.bus = NatsBus(url, client_name="bench-core")
        venue = PaperVenue("paper", {"USDT": "10000000000"}, fee_bps=10, slippage_bps=2)
        venue.update_market("BTC/USDT", PRICE)
        self.venues = {"paper": venue}
        self.final: dict[str, asyncio.Future] = {}
        self.planned: dict[str, asyncio.Future] = {}

    async def start(self) -> Core:
        self.ledger = Ledger.open(self.engine)
        self.ledger.attach(self.bus)
        RiskStage(RiskEngine(LIMITS), self.ledger.models, self.venues, {"BTC/USDT": PRICE}).attach(self.bus)
        self.ledger.models.observers.append(self._observe)           # final once the ledger has applied it
        self.bus.subscribe("plan.created", self._planned)             # ephemeral: this run's plans only
        await self.bus.ready()
        await self.bus.publish(EventEnvelope.new("account.deposited", {"venue": "paper", "asset": "USDT",
                                                                       "amount": "10000000000"}))
        return self

    def _observe(self, event: EventEnvelope) -> None:
        if event.topic in FINAL_TOPICS and (waiter := self.final.get(event.correlation_id)) and not waiter.done():
            waiter.set_result(event.topic)

    def _planned(self, event: EventEnvelope) -> None:
        if (waiter := self.planned.get(event.correlation_id)) is not None and not waiter.done():
            waiter.set_result(time.perf_counter())

    async def submit(self, intent: Intent) -> None:
        loop = asyncio.get_running_loop()
        self.final[intent.intent_id], self.planned[intent.intent_id] = loop.create_future(), loop.create_future()
        await self.bus.publish(intent_event(intent))

    async def stop(self) -> None:
        await self.bus.close(drain=False)
        await self.ledger.flush()
        self.ledger.close()


def intent() -> Intent:
    return Intent.of(symbol="BTC/USDT", side="buy", quantity="0.001", max_slippage_bps=50)


async def over_nats(url: str, database_url: str) -> tuple[float, int, list[str], list[float]]:
    core = await Core(url, database_url).start()
    intents = [intent() for _ in range(INTENTS)]
    began = time.perf_counter()
    for start in range(0, len(intents), WINDOW):           # many submitters at once, as an API or agents would be
        await asyncio.gather(*(core.submit(each) for each in intents[start:start + WINDOW]))
    outcomes = await asyncio.wait_for(asyncio.gather(*(core.final[i.intent_id] for i in intents)), 600)
    await core.ledger.flush()
    seconds = time.perf_counter() - began
    samples = []
    for _ in range(SAMPLES):
        each = intent()
        began = time.perf_counter()
        await core.submit(each)
        samples.append((await core.planned[each.intent_id] - began) * 1e3)
        await core.final[each.intent_id]
    await core.stop()
    differences = compare_read_models(core.engine)
    core.engine.dispose()
    return INTENTS / seconds, outcomes.count("exec.completed"), differences, samples


def percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered), ordered[int(len(ordered) * 0.99) - 1]


def main() -> None:
    print("== defai-kit execution over NATS JetStream: three processes, PostgreSQL ==")
    with PostgresServer() as postgres, NatsServer() as nats_server, tempfile.TemporaryDirectory() as logs:
        seconds, completed, differences = asyncio.run(in_process_throughput(postgres.create_database("inproc"), INTENTS))
        samples = sorted(asyncio.run(in_process_latency(postgres.create_database("inproc_latency"), SAMPLES)))
        in_process_rate, (in_p50, in_p99) = completed / seconds, percentiles(samples)
        print(f"in-process   {INTENTS:,} intents, one process: {in_process_rate:,.0f} intents/s "
              f"({in_process_rate * 8:,.0f} events/s); replay equals live: {not differences}; "
              f"submit -> plan.created p50 {in_p50:.2f} ms, p99 {in_p99:.2f} ms")

        database_url = postgres.create_database("nats")
        env = {k: v for k, v in os.environ.items() if not k.startswith("DEFAI_")}
        env.update(DEFAI_BUS_URL=nats_server.url, DEFAI_DATABASE_URL=database_url, DEFAI_HOME=logs,
                   DEFAI_LOG_LEVEL="WARNING")
        workers = [WorkerProcess(role, env, Path(logs), *PAPER) for role in ("planner", "orchestrator")]
        try:
            for worker in workers:
                worker.wait_ready()
            rate, completed, differences, samples = asyncio.run(over_nats(nats_server.url, database_url))
        finally:
            codes = [worker.stop() for worker in workers]
        p50, p99 = percentiles(samples)
        print(f"NATS, 3 processes ({INTENTS:,} intents): {rate:,.0f} intents/s ({rate * 8:,.0f} events/s), "
              f"{completed:,} completed; replay equals live: {not differences}; workers exited {codes}")
        print(f"NATS, 3 processes: submit -> plan.created, one at a time ({SAMPLES}): p50 {p50:.2f} ms, p99 {p99:.2f} ms")
        print(f"NATS / in-process: throughput {rate / in_process_rate:.2f}x, p50 latency {p50 / in_p50:.1f}x")


if __name__ == "__main__":
    main()
