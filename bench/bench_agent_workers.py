"""An agent's trading tick two ways, on one PostgreSQL store, with nats-server, both on 127.0.0.1: through the
runner's own execution engine (DEFAI_AGENT_EXECUTION=engine, the default), and through the three `defai worker`
processes over NATS JetStream (DEFAI_AGENT_EXECUTION=workers). Every tick is a new agent's first on real Binance
BTC/USDT hours, on a bar where ma_cross enters long: the newest closed bars read, the signal, the account funded,
one buy to completion, the tick audited. The engine ticks run first (a core worker would hold the store's ledger),
each going on from the last tick's ledger as a long-running scheduler does.

Run: .venv/bin/python bench/bench_agent_workers.py [--quick]   (about a minute; needs the PostgreSQL server binaries)
"""
from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from defai_kit.agents import AgentConfig, AgentStore, tick_agent  # noqa: E402
from defai_kit.bar_store import open_bar_store  # noqa: E402
from defai_kit.formats import find_data_dir, read_bars  # noqa: E402
from defai_kit.ledger import compare_read_models  # noqa: E402
from defai_kit.settings import Settings  # noqa: E402
from defai_kit.store import open_store, upgrade_database  # noqa: E402
from defai_kit.strategy import signals  # noqa: E402
from servers import NatsServer, PostgresServer, WorkerProcess  # noqa: E402

QUICK = "--quick" in sys.argv
TICKS = 5 if QUICK else 15
AGENT = dict(strategy="ma_cross", params={"fast": 12, "slow": 48}, symbols=["BTC/USDT"], lookback=300)


def entry_bars() -> pd.DataFrame:
    "Real BTC/USDT hours up to a bar on which ma_cross 12/48 enters long."
    btc = read_bars(find_data_dir() / "binance_spot_1h_2021-2023/BTCUSDT_1h.csv").frame
    entries = signals(AgentConfig.of(agent_id="x", **AGENT).make_strategy(), btc.iloc[:3000])["enter_long"]
    bar = btc.index.get_loc(entries[entries].index[5])
    return btc.iloc[bar - 400: bar + 1]


def ticks(settings: Settings, engine, prefix: str) -> list[float]:
    "Seconds of each tick, one new agent each; every one must trade."
    agents, seconds = AgentStore(engine, settings), []
    for number in range(TICKS):
        agent_id = f"{prefix}-{number}"
        agents.create(agent_id=agent_id, **AGENT)
        agents.start(agent_id)
        began = time.perf_counter()
        result = tick_agent(agent_id, settings=settings, engine=engine)
        seconds.append(time.perf_counter() - began)
        assert [intent["state"] for intent in result.intents] == ["completed"], result
    return seconds


def summary(seconds: list[float]) -> str:
    ordered = sorted(seconds)
    return f"median {statistics.median(ordered):.3f} s, slowest {ordered[-1]:.3f} s"


def main() -> None:
    print("== defai-kit: an agent's trading tick, own engine vs the NATS workers (PostgreSQL) ==")
    with PostgresServer() as postgres, NatsServer() as nats_server, tempfile.TemporaryDirectory() as home:
        url = postgres.create_database("agents")
        env = {k: v for k, v in os.environ.items() if not k.startswith("DEFAI_")}
        env.update(DEFAI_BUS_URL=nats_server.url, DEFAI_DATABASE_URL=url, DEFAI_HOME=home, DEFAI_LOG_LEVEL="WARNING")
        engine = open_store(url)
        upgrade_database(engine)
        plain = Settings(_env_file=None, home=home, database_url=url)
        open_bar_store(plain, engine).upsert("binance", "BTC/USDT", "1h", entry_bars())
        own = ticks(plain, engine, "engine")
        workers = [WorkerProcess(role, env, Path(home)) for role in ("core", "planner", "orchestrator")]
        try:
            for worker in workers:
                worker.wait_ready()
            through = ticks(Settings(_env_file=None, home=home, database_url=url, bus_url=nats_server.url,
                                     agent_execution="workers"), engine, "workers")
        finally:
            codes = [worker.stop() for worker in workers]
        assert codes == [0, 0, 0], codes
        same = not compare_read_models(engine)
        engine.dispose()
    print(f"own engine   {TICKS} ticks, each a new agent's first trade: {summary(own)}")
    print(f"workers      {TICKS} ticks, the same over NATS (3 worker processes): {summary(through)}  "
          f"=> {statistics.median(through) / statistics.median(own):.1f}x the own engine's median; "
          f"replay equals live: {same}")


if __name__ == "__main__":
    main()
