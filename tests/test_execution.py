"""The execution core on each backend (SQLite and a real PostgreSQL server on 127.0.0.1): the whole flow on paper,
replay equal to live (its raw reading of the store equal to the checked one), a ledger opening from its tables
equal to both (and an old store replayed once), a burst whose large batches a forked copy of the process writes,
and a duplicated delivery that changes nothing."""
from __future__ import annotations

import asyncio
from decimal import Decimal

import sqlalchemy as sa

from defai_kit.events import EventEnvelope
from defai_kit.execution import ExecutionEngine
from defai_kit.ledger import (INTENTS, Ledger, compare_read_models, open_read_models, rebuild_read_models, replay,
                              stored_trading_events)
from defai_kit.ledger_queries import read_intent, read_intents, read_positions
from defai_kit.risk import RiskEngine, RiskLimits
from defai_kit.store import EventStore, open_store, upgrade_database
from defai_kit.venues import PaperVenue


async def run_flow(url: str) -> ExecutionEngine:
    engine = open_store(url)
    upgrade_database(engine)
    venue = PaperVenue("paper", {"USDT": "1000000", "BTC": "5"}, fee_bps=10, slippage_bps=3, impact_coefficient="0.1")
    venue.update_market("BTC/USDT", "42000.5", quote_volume="50000000")
    risk = RiskEngine(RiskLimits.of(max_notional="50000"))
    core = ExecutionEngine(engine, {"paper": venue}, risk=risk)
    async with core:
        await core.fund("paper", "USDT", "1000000")
        await core.fund("paper", "BTC", "5")
        ids = []
        for number in range(60):
            side = "buy" if number % 3 else "sell"
            quantity = "2" if number % 17 == 0 else f"0.{number % 9 + 1}"      # 2 BTC breaks max_notional
            plan = dict(plan="twap", slices=2) if number % 10 == 0 else {}
            ids.append(await core.submit_intent(symbol="BTC/USDT", side=side, quantity=quantity, **plan))
        for intent_id in ids:
            await core.wait(intent_id)
    return core


def test_flow_replay_equals_live(database_url):
    core = asyncio.run(run_flow(database_url))
    with core.engine.connect() as connection:
        states = list(connection.execute(sa.select(INTENTS.c.state)).scalars())
    assert states.count("rejected") == 4 and states.count("completed") == 56, states
    assert core.ledger.models.intents == {} and len(core.ledger.models.ended) == 60   # written, then let go
    assert compare_read_models(core.engine) == []
    rebuilt = replay(core.engine)
    for table in ("balances", "positions", "position_lots", "risk_memory", "risk_accounts"):   # what live models hold
        assert rebuilt.rows(table) == core.ledger.models.rows(table), table
    # a ledger opening on this store reads its live state from the tables: equal to the live one and to a replay's
    rebuilt.keep_only_live()
    assert open_read_models(core.engine).live_state() == core.ledger.models.live_state() == rebuilt.live_state()
    # a store whose tables do not say how far they go (written before migration 0007) is replayed once, and rewritten
    with core.engine.begin() as connection:
        connection.execute(sa.text("UPDATE ledger_writer SET applied_through = NULL"))
        connection.execute(sa.text("DELETE FROM risk_accounts"))
    assert compare_read_models(core.engine) == ["risk_accounts paper: missing"]
    Ledger.open(core.engine).close()
    assert compare_read_models(core.engine) == []
    # the tables read back (what `defai ledger` and /v1/intents, /v1/positions show): the position is what the
    # completed intents filled, its open lots add up to it, and each journey's fills to its intent
    listed = read_intents(core.engine, limit=1000)
    assert len(listed) == 60 and [row["intent_id"] for row in listed] == sorted(row["intent_id"] for row in listed)[::-1]
    filled = sum(Decimal(row["filled_quantity"]) * (1 if row["side"] == "buy" else -1) for row in listed)
    [position] = read_positions(core.engine, marks={"BTC/USDT": "42000.5"}, lots=True)
    assert Decimal(position["quantity"]) == filled == sum(Decimal(lot["quantity"]) for lot in position["lots"])
    assert Decimal(position["unrealized_pnl"]) == filled * (Decimal("42000.5") - Decimal(position["average_cost"]))
    journey = read_intent(core.engine, listed[0]["intent_id"])
    assert sum(Decimal(fill["quantity"]) for fill in journey["fills"]) == Decimal(journey["intent"]["filled_quantity"])
    # the ledger's balances agree with the venue's own, to the last digit
    venue_balances = asyncio.run(core.venues["paper"].balances())
    ledger_balances = {asset: amount for (venue, asset), amount in core.ledger.models.portfolio.balances.items()}
    assert ledger_balances == venue_balances
    assert rebuild_read_models(core.engine)["intents"] == 60
    assert compare_read_models(core.engine) == []
    # replay reads the driver's rows raw (JSON text through msgspec); they equal the store's checked reading
    read_back = list(stored_trading_events(core.engine, batch=50))
    checked = {event.event_id: event for event in EventStore(core.engine).read()}
    assert len(read_back) == len(checked) > 400
    assert read_back == [checked[event.event_id] for event in read_back]


async def run_burst(url: str, count: int, fork_from: int) -> ExecutionEngine:
    "`count` intents submitted at once, every batch of `fork_from` events or more written by a forked child."
    engine = open_store(url)
    upgrade_database(engine)
    venue = PaperVenue("paper", {"USDT": "100000000"}, fee_bps=10, slippage_bps=2)
    venue.update_market("BTC/USDT", "30000", quote_volume="1000000000")
    core = ExecutionEngine(engine, {"paper": venue}, risk=RiskEngine(RiskLimits.of(max_notional="1000000")))
    async with core:
        core.ledger.fork_from = fork_from
        await core.fund("paper", "USDT", "100000000")
        ids = [await core.submit_intent(symbol="BTC/USDT", side="buy", quantity="0.01") for _ in range(count)]
        for intent_id in ids:
            await core.wait(intent_id)
    return core


def test_forked_writer_replay_equals_live(database_url):
    core = asyncio.run(run_burst(database_url, 400, fork_from=200))
    assert core.ledger.forked >= 1, (core.ledger.forked, core.ledger.batches)
    with core.engine.connect() as connection:
        states = list(connection.execute(sa.select(INTENTS.c.state)).scalars())
    assert states == ["completed"] * 400
    assert EventStore(core.engine).count() == 1 + 400 * 8
    assert compare_read_models(core.engine) == []
    assert compare_read_models(core.engine, core.ledger.models) == []      # balances, positions, lots, risk's rows
    [position] = read_positions(core.engine, marks={"BTC/USDT": "30000"}, lots=True)
    assert Decimal(position["quantity"]) == Decimal("4.00") and len(position["lots"]) == 400


def test_duplicate_delivery_changes_nothing(database_url):
    core = asyncio.run(run_flow(database_url))
    events = EventStore(core.engine).read()
    with core.engine.connect() as connection:
        before = connection.execute(sa.select(INTENTS).order_by(INTENTS.c.intent_id)).all()
    ledger = Ledger.open(core.engine)
    applied = ledger.write(events[:50] + events[-50:])           # every one of them already stored
    assert applied == [] and ledger.duplicates == 100
    with core.engine.connect() as connection:
        after = connection.execute(sa.select(INTENTS).order_by(INTENTS.c.intent_id)).all()
    assert before == after
    assert EventStore(core.engine).count() == len(events)
    # a fill re-delivered under a new event id is an illegal move for a completed intent: refused, nothing changes
    fill = next(e for e in events if e.topic == "exec.step_filled")
    completed = next(e for e in events if e.topic == "exec.completed" and e.correlation_id == fill.correlation_id)
    again = EventEnvelope.new("exec.step_filled", fill.payload, caused_by=completed)
    assert ledger.write([again]) == [] and ledger.models.counts["refused"] == 1
    assert compare_read_models(core.engine, ledger.models) == []
    assert ledger.models.portfolio.balances[("paper", "BTC")] == core.ledger.models.portfolio.balances[("paper", "BTC")]
    assert isinstance(ledger.models.portfolio.balances[("paper", "BTC")], Decimal)
