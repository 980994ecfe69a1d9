"""The store on both backends: SQLite and a real PostgreSQL server."""
from __future__ import annotations

import multiprocessing
from datetime import datetime, timezone

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from defai_kit.events import EventEnvelope
from defai_kit.store import (EventStore, StoreError, database_state, head_revision, hypertables, open_store,
                             read_snapshot, timescale_available, upgrade_database)


@pytest.fixture
def engine(database_url):
    engine = open_store(database_url)
    yield engine
    engine.dispose()


def test_upgrade_creates_schema_once(engine):
    assert upgrade_database(engine) == ["0001", "0002", "0003", "0004", "0005", "0006", "0007", "0008"]
    assert upgrade_database(engine) == []
    tables = set(sa.inspect(engine).get_table_names())
    assert {"events", "bars", "alembic_version"} <= tables
    state = database_state(engine)
    assert state.up_to_date and state.revision == head_revision()
    assert state.tables == {name: 0 for name in ("agent_ticks", "agents", "backtest_runs", "balances", "bars", "events",
                                                  "fills", "intents", "ledger_writer", "orders", "plans",
                                                  "position_lots", "positions", "risk_accounts", "risk_memory")}


def test_time_series_tables_stay_plain_without_timescale(engine):
    upgrade_database(engine)
    with engine.connect() as connection:
        assert timescale_available(connection) is False  # Debian's PostgreSQL has no TimescaleDB
        assert hypertables(connection) == []
        if connection.dialect.name == "postgresql":
            kind = connection.execute(sa.text("SELECT relkind FROM pg_class WHERE relname = 'bars'")).scalar()
            assert kind == "r"  # an ordinary table


def test_event_store_round_trip_is_exact_and_ordered(engine):
    upgrade_database(engine)
    store = EventStore(engine)
    root = EventEnvelope.new("intent.submitted", {"symbol": "ETH/USDT", "amount": "1.25", "nested": {"k": [1, 2]}})
    chain = [root]
    for topic in ["risk.approved", "intent.accepted", "plan.created", "exec.started", "exec.step_submitted",
                  "exec.step_filled", "exec.completed"]:
        chain.append(EventEnvelope.new(topic, {"step": len(chain)}, caused_by=chain[-1]))
    assert store.append(reversed(chain)) == len(chain)  # written out of order ...
    assert store.read() == chain                         # ... read back in the order they were made
    assert store.read(correlation_id=root.correlation_id, topic="exec.*") == chain[4:]
    assert [e.timestamp.tzinfo is not None for e in store.read()] == [True] * len(chain)


def test_duplicates_change_nothing(engine):
    upgrade_database(engine)
    store = EventStore(engine)
    events = [EventEnvelope.new("system.heartbeat", {"n": n}) for n in range(100)]
    assert store.append(events) == 100
    assert store.append(events[::2] + [EventEnvelope.new("system.heartbeat", {"n": 100})]) == 1
    assert store.count() == 101


def test_a_bad_batch_writes_nothing(engine):
    upgrade_database(engine)
    store = EventStore(engine)
    good = EventEnvelope.new("system.heartbeat", {})
    unstorable = EventEnvelope.model_construct(**{**good.model_dump(), "event_id": "01ZZZZZZZZZZZZZZZZZZZZZZZZ",
                                                  "payload": {"value": object()}})
    with pytest.raises(StoreError, match=r"events not stored \(none of the 2\)"):
        store.append([good, unstorable])
    assert store.count() == 0


def _append_from_process(url: str, events_json: list[bytes]) -> None:
    engine = open_store(url)
    EventStore(engine).append(EventEnvelope.from_json(raw) for raw in events_json)


def test_concurrent_writers_from_two_processes_store_each_event_once(engine, database_url):
    upgrade_database(engine)
    events = [EventEnvelope.new("system.heartbeat", {"n": n}).to_json() for n in range(500)]
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_append_from_process, args=(database_url, events)) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
        assert worker.exitcode == 0
    assert EventStore(engine).count() == 500


def test_unreachable_database_is_one_clear_line(postgres):
    with pytest.raises(StoreError) as error:
        open_store(f"postgresql://defai:pw@127.0.0.1:{postgres.port + 1}/nowhere")
    message = str(error.value)
    assert "\n" not in message and "pw@" not in message
    assert message.startswith(f"database unreachable at postgresql://defai:***@127.0.0.1:{postgres.port + 1}/nowhere")


def test_migration_0008_moves_position_lots_into_rows_and_back(engine):
    # positions written the old way (lots as one JSON list) become one row per lot, numbered 1 up, and come back
    upgrade_database(engine, "0007")
    old = sa.table("positions", *(sa.column(name) for name in ("venue", "symbol", "quantity", "average_cost",
                                                                "realized_pnl", "fifo_realized_pnl", "fees")),
                   sa.column("lots", sa.JSON().with_variant(postgresql.JSONB(), "postgresql")),
                   sa.column("updated_at", sa.DateTime(timezone=True)))
    amounts = dict(average_cost="105", realized_pnl="0", fifo_realized_pnl="0", fees="0")
    moment = datetime(2024, 1, 1, tzinfo=timezone.utc)
    with engine.begin() as connection:
        connection.execute(old.insert(), [
            dict(venue="paper:a", symbol="BTC/USDT", quantity="-1.5", lots=[["-1", "100"], ["-0.5", "115"]], **amounts,
                 updated_at=moment),
            dict(venue="paper:a", symbol="ETH/USDT", quantity="0", lots=[], **amounts, updated_at=moment)])
        connection.execute(sa.text("INSERT INTO ledger_writer (name, applied_through) VALUES ('ledger', 7)"))
    assert upgrade_database(engine) == ["0008"]
    with engine.connect() as connection:
        lots = connection.execute(sa.text("SELECT symbol, lot, quantity, price FROM position_lots ORDER BY lot")).all()
        counts = dict(connection.execute(sa.text("SELECT symbol, lots_opened FROM positions")).all())
        watermark = connection.execute(sa.text("SELECT applied_through FROM ledger_writer")).scalar()
    assert [tuple(row) for row in lots] == [("BTC/USDT", 1, "-1", "100"), ("BTC/USDT", 2, "-0.5", "115")]
    assert (counts, watermark) == ({"BTC/USDT": 2, "ETH/USDT": 0}, None)     # the next ledger replays the store once
    from alembic.operations import Operations
    from alembic.runtime.migration import MigrationContext
    from defai_kit.migrations import m0008_position_lots
    with engine.begin() as connection, Operations.context(MigrationContext.configure(connection)):
        m0008_position_lots.downgrade()
    with engine.connect() as connection:
        assert dict(connection.execute(sa.select(old.c.symbol, old.c.lots)).all()) == {
            "BTC/USDT": [["-1", "100"], ["-0.5", "115"]], "ETH/USDT": []}


def test_read_snapshot_sees_one_committed_state(engine):
    # what a ledger commits while a snapshot reads stays unseen until the snapshot ends, on both backends
    upgrade_database(engine)
    insert = sa.text("INSERT INTO balances (venue, asset, amount, updated_at) VALUES (:venue, 'USDT', '1', :moment)")
    moment = datetime(2024, 1, 1, tzinfo=timezone.utc)
    count = sa.text("SELECT count(*) FROM balances")
    with read_snapshot(engine) as connection:
        assert connection.execute(count).scalar() == 0
        with engine.begin() as writer:
            writer.execute(insert, {"venue": "paper", "moment": moment})
        assert connection.execute(count).scalar() == 0
    with engine.connect() as connection:
        assert connection.execute(count).scalar() == 1
