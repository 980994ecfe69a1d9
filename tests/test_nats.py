"""The execution core as three worker processes over NATS JetStream, with PostgreSQL, both real servers on
127.0.0.1: core (ledger + risk), planner and orchestrator, each `defai worker --role ROLE`. This process submits
intents the way any client does (publishing `intent.submitted` on the bus). The orchestrator is killed (SIGKILL)
before the intents arrive and a new one started once every intent is planned: the plans wait for it in the stream.
Every intent must end completed in the ledger's read models in PostgreSQL, every event must be stored exactly once
(the store holds exactly the events the JetStream stream holds), every causation chain must be whole, and a replay
of the store must equal the live read models; balances and positions are checked against hand-computed figures."""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from decimal import ROUND_DOWN, Decimal
from pathlib import Path
from typing import Callable

import orjson
import pandas as pd
import pytest
import sqlalchemy as sa

from defai_kit.events import EventEnvelope
from defai_kit.execution import FINAL_TOPICS, reconcile
from defai_kit.intents import Intent, intent_event
from defai_kit.ledger import LedgerError, compare_read_models, replay
from defai_kit.nats_bus import NatsBus
from defai_kit.store import open_store, upgrade_database
from defai_kit.venues import PaperVenue
from servers import NatsServer, WorkerProcess

PRICE, FEE = Decimal("30000"), Decimal("0.001")            # every worker's paper market: BTC/USDT at 30,000, 10 bp fee
DEPOSIT = {"USDT": Decimal("100000000"), "BTC": Decimal("1000")}
PAPER = ["--price", f"BTC/USDT={PRICE}", "--fee-bps", "10",
         *[option for asset, amount in DEPOSIT.items() for option in ("--balance", f"{asset}={amount}")]]
COUNT = 150
SINGLE = ["intent.submitted", "risk.approved", "intent.accepted", "plan.created", "exec.started",
          "exec.step_submitted", "exec.step_filled", "exec.completed"]
TWAP = SINGLE[:5] + ["exec.step_submitted", "exec.step_filled"] * 2 + ["exec.completed"]


def the_intents() -> list[Intent]:
    intents = []
    for number in range(COUNT):
        side = "sell" if number % 4 == 0 else "buy"
        quantity = f"0.0{number % 9 + 1}"
        plan = dict(plan="twap", slices=2) if number % 10 == 3 else {}
        intents.append(Intent.of(symbol="BTC/USDT", side=side, quantity=quantity, **plan))
    return intents


async def submit(url: str, intents: list[Intent], timeout: float,
                 meanwhile: Callable[[], None]) -> tuple[dict[str, str], list[dict]]:
    "Fund the paper account, publish every intent, run `meanwhile` (in a thread), collect each intent's final topic."
    finals: dict[str, str] = {}
    bus = await NatsBus(url).connect()
    try:
        for topic in FINAL_TOPICS:                          # no name: ephemeral, every final event from now on
            bus.subscribe(topic, lambda event: finals.setdefault(event.correlation_id, event.topic))
        await bus.ready()
        for asset, amount in DEPOSIT.items():
            await bus.publish(EventEnvelope.new("account.deposited", {"venue": "paper", "asset": asset,
                                                                      "amount": str(amount)}))
        for intent in intents:
            assert await bus.publish(intent_event(intent)) == 1
        await asyncio.to_thread(meanwhile)
        deadline = time.monotonic() + timeout
        while len(finals) < len(intents) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        stream = await stream_events(bus)
    finally:
        await bus.close(drain=False)                         # a failed run must not wait on what never came
    return finals, stream


async def stream_events(bus: NatsBus) -> list[dict]:
    "Every message the JetStream stream holds, read straight from the server by sequence number."
    manager = bus._jetstream._jsm
    state = (await manager.stream_info(bus.stream)).state
    return [orjson.loads((await manager.get_msg(bus.stream, sequence)).data)
            for sequence in range(state.first_seq, state.last_seq + 1)]


def wait_for_ledger(engine: sa.Engine, count: int, states: tuple[str, ...], timeout: float) -> None:
    "Wait until the ledger has committed `count` intents in `states` (its read model in PostgreSQL)."
    deadline = time.monotonic() + timeout
    query = sa.text("SELECT count(*) FROM intents WHERE state IN :states").bindparams(sa.bindparam("states", expanding=True))
    while time.monotonic() < deadline:
        with engine.connect() as connection:
            found = connection.execute(query, {"states": list(states)}).scalar_one()
        if found >= count:
            return
        time.sleep(0.1)
    raise AssertionError(f"the ledger committed {found} of {count} intents {'/'.join(states)} within {timeout} s")


def check_chains(stored: list, intents: list[Intent]) -> None:
    "Every causation chain whole: one root, each event caused by the one before, in the journey's order."
    journeys = defaultdict(list)
    for row in stored:
        journeys[row.correlation_id].append(row)
    for intent in intents:
        events = journeys[intent.intent_id]
        caused = {row.causation_id: row for row in events}
        assert len(caused) == len(events), "two events name the same cause"
        chain, current = [], caused.pop(None)
        while current is not None:
            chain.append(current.topic)
            current = caused.pop(current.event_id, None)
        assert not caused, "an event is not on the chain from the root"
        assert chain == (TWAP if intent.plan == "twap" else SINGLE)


STOPPED_GRACEFULLY = {"core": 0, "planner": 0, "orchestrator": 0}


def stop_workers(running: list[WorkerProcess], killed: list[WorkerProcess]) -> tuple[dict, dict]:
    "Make sure the `killed` are dead, stop the `running` by SIGTERM; their exit codes and outputs, by role."
    for worker in killed:
        worker.kill()
    codes = {worker.role: worker.stop() for worker in running}
    return codes, {worker.role: worker.output() for worker in running}


@pytest.fixture
def nats_server():
    with NatsServer() as server:
        yield server


@pytest.mark.timeout(120)
def test_three_processes_over_nats(postgres, nats_server, tmp_path, kit_env):
    url = postgres.create_database(f"nats_{os.getpid()}")
    engine = open_store(url)
    upgrade_database(engine)
    env = dict(kit_env, DEFAI_BUS_URL=nats_server.url, DEFAI_DATABASE_URL=url, DEFAI_LOG_LEVEL="WARNING")
    workers = [WorkerProcess(role, env, tmp_path, *PAPER) for role in ("core", "planner", "orchestrator")]
    crashed = workers.pop()

    def orchestrator_comes_back() -> None:
        # with no orchestrator, risk and planning go on and the plans wait in the stream for the group
        wait_for_ledger(engine, COUNT, ("planned",), timeout=20)
        workers.append(WorkerProcess("orchestrator", env, tmp_path, *PAPER).wait_ready())
    try:
        for worker in [*workers, crashed]:
            worker.wait_ready()
        crashed.kill()                                        # SIGKILL: the orchestrators' group is empty now
        intents = the_intents()
        finals, stream = asyncio.run(submit(nats_server.url, intents, timeout=20, meanwhile=orchestrator_comes_back))
        wait_for_ledger(engine, COUNT, ("completed", "rejected", "failed"), timeout=20)
    finally:
        codes, outputs = stop_workers(workers, killed=[crashed])
    assert codes == STOPPED_GRACEFULLY, outputs
    assert "stopped" not in crashed.output()
    for role, output in outputs.items():                      # a graceful stop, and nothing logged above WARNING
        assert f"worker {role} stopped:" in output and '"level": "error"' not in output, output[-3000:]

    # every intent completed: what the submitter saw on the bus, and what the ledger stored in PostgreSQL
    assert finals == {intent.intent_id: "exec.completed" for intent in intents}
    with engine.connect() as connection:
        rows = {row.intent_id: row for row in connection.execute(sa.text(
            "SELECT intent_id, state, filled_quantity FROM intents"))}
        stored = connection.execute(sa.text(
            "SELECT event_id, topic, correlation_id, causation_id FROM events ORDER BY sequence")).all()
    assert set(rows) == {intent.intent_id for intent in intents}
    for intent in intents:
        assert rows[intent.intent_id].state == "completed"
        assert Decimal(rows[intent.intent_id].filled_quantity) == intent.quantity

    # every event stored exactly once: the store holds exactly what the stream holds, and the stream deduplicated
    stored_ids = [row.event_id for row in stored]
    assert len(stored_ids) == len(set(stored_ids)) == len(stream)
    assert set(stored_ids) == {event["event_id"] for event in stream}
    twaps = sum(1 for intent in intents if intent.plan == "twap")
    assert len(stored) == len(DEPOSIT) + (COUNT - twaps) * len(SINGLE) + twaps * len(TWAP)

    check_chains(stored, intents)

    # replay of the store equals the live read models, and both equal figures worked out by hand
    assert compare_read_models(engine) == []
    models = replay(engine)
    bought = sum(i.quantity for i in intents if i.side == "buy")
    sold = sum(i.quantity for i in intents if i.side == "sell")
    usdt = DEPOSIT["USDT"] - bought * PRICE * (1 + FEE) + sold * PRICE * (1 - FEE)
    assert models.portfolio.balances[("paper", "USDT")] == usdt
    assert models.portfolio.balances[("paper", "BTC")] == DEPOSIT["BTC"] + bought - sold
    with engine.connect() as connection:
        position = connection.execute(sa.text("SELECT quantity FROM positions WHERE symbol = 'BTC/USDT'")).scalar_one()
        balances = dict(connection.execute(sa.text("SELECT asset, amount FROM balances")).all())
    assert Decimal(position) == bought - sold
    assert {asset: Decimal(amount) for asset, amount in balances.items()} == {"USDT": usdt,
                                                                               "BTC": DEPOSIT["BTC"] + bought - sold}
    engine.dispose()


def submitted_steps(engine: sa.Engine) -> set[str]:
    "The intents with an `exec.step_submitted` in the store."
    with engine.connect() as connection:
        return set(connection.execute(sa.text(
            "SELECT correlation_id FROM events WHERE topic = 'exec.step_submitted'")).scalars())


def journalled_orders(journal: Path) -> list[str]:
    "The client order ids in the paper venue's journal, read while an orchestrator may be appending to it."
    lines = journal.read_text().splitlines() if journal.exists() else []
    records = [orjson.loads(line) for line in lines if line.endswith("}")]
    return [record["request"]["client_order_id"] for record in records if record["kind"] == "order"]


def handed_over_intents(twap_interval: float) -> list[Intent]:
    "Two single orders and a TWAP whose second slice is due `twap_interval` seconds after its plan."
    return [Intent.of(symbol="BTC/USDT", side="buy", quantity="0.01"),
            Intent.of(symbol="BTC/USDT", side="sell", quantity="0.02"),
            Intent.of(symbol="BTC/USDT", side="buy", quantity="0.04", plan="twap", slices=2,
                      interval_seconds=twap_interval)]


def check_handed_over(engine: sa.Engine, journal: Path, intents: list[Intent], finals: dict[str, str],
                      outputs: dict[str, str]) -> None:
    "Every order sent once, every journey whole with each event once, and the ledger, its replay and the venue agree."
    for role, output in outputs.items():                  # nothing refused by the ledger, nothing above WARNING
        assert '"level": "error"' not in output and "refused" not in output, output[-3000:]
    assert finals == {intent.intent_id: "exec.completed" for intent in intents}
    steps = [f"{intent.intent_id}-s{number}" for intent in intents for number in range(1, intent.slices + 1)]
    assert sorted(journalled_orders(journal)) == sorted(steps)        # the two orchestrators' journal, in turn
    with engine.connect() as connection:
        stored = connection.execute(sa.text(
            "SELECT event_id, topic, correlation_id, causation_id FROM events ORDER BY sequence")).all()
    check_chains(stored, intents)
    assert compare_read_models(engine) == []
    models = replay(engine)
    bought, sold = (sum(i.quantity for i in intents if i.side == side) * PRICE for side in ("buy", "sell"))
    assert models.portfolio.balances[("paper", "USDT")] == DEPOSIT["USDT"] - bought * (1 + FEE) + sold * (1 - FEE)
    assert asyncio.run(reconcile(models, PaperVenue("paper", journal=journal))) == []


def handed_over_setting(postgres, nats_server, tmp_path, kit_env, name: str):
    "A fresh database, the workers' environment (acknowledgements wait 2 s) and the paper venue's journal."
    url = postgres.create_database(f"{name}_{os.getpid()}")
    engine = open_store(url)
    upgrade_database(engine)
    env = dict(kit_env, DEFAI_BUS_URL=nats_server.url, DEFAI_DATABASE_URL=url, DEFAI_LOG_LEVEL="WARNING",
               DEFAI_BUS_ACK_WAIT_SECONDS="2")
    journal = tmp_path / "paper.jsonl"
    return engine, env, journal, [*PAPER, "--journal", str(journal)]


@pytest.mark.timeout(120)
def test_orchestrator_killed_mid_plan_resumes_on_another(postgres, nats_server, tmp_path, kit_env):
    """An orchestrator is killed (SIGKILL) with its plans half done: every first order is at the venue and unfilled
    (its paper orders take an hour to arrive), and a TWAP's second slice is not due yet. Nothing acknowledged the
    plans, so after DEFAI_BUS_ACK_WAIT_SECONDS the stream hands them to a new orchestrator on the same venue
    journal, as a restarted pod would be. It must resume each plan from the store: ask the venue for the orders
    already sent (now filled) and send only the slice still due."""
    engine, env, journal, venue_options = handed_over_setting(postgres, nats_server, tmp_path, kit_env, "killed")
    intents = handed_over_intents(twap_interval=4)
    workers = [WorkerProcess(role, env, tmp_path, *PAPER) for role in ("core", "planner")]
    doomed = WorkerProcess("orchestrator", env, tmp_path, *venue_options, "--latency-seconds", "3600")

    def killed_mid_plan_then_replaced() -> None:
        deadline = time.monotonic() + 20
        while submitted_steps(engine) != {intent.intent_id for intent in intents}:
            assert time.monotonic() < deadline, "the first orchestrator did not submit every first order"
            time.sleep(0.02)
        doomed.kill()
        workers.append(WorkerProcess("orchestrator", env, tmp_path, *venue_options).wait_ready())
    try:
        for worker in [*workers, doomed]:
            worker.wait_ready()
        finals, _ = asyncio.run(submit(nats_server.url, intents, timeout=30, meanwhile=killed_mid_plan_then_replaced))
        wait_for_ledger(engine, len(intents), ("completed", "rejected", "failed"), timeout=20)
    finally:
        codes, outputs = stop_workers(workers, killed=[doomed])
    assert codes == STOPPED_GRACEFULLY, outputs
    assert "stopped" not in doomed.output()
    check_handed_over(engine, journal, intents, finals, outputs)
    engine.dispose()


@pytest.mark.timeout(150)
def test_handed_over_plan_waits_for_a_lagging_ledger(postgres, nats_server, tmp_path, kit_env):
    """The race the resume must not lose. The ledger's process is frozen (SIGSTOP) while an orchestrator takes the
    plans, sends the first orders and is killed: what it published is in the stream, not in the store. The new
    orchestrator gets the plans again while the ledger is still frozen. Read now, the stored journeys would end at
    `plan.created` and the plans would run again: a second `exec.started`, refused by the ledger, and the intents
    stuck. It must wait until the ledger, thawed (SIGCONT), has stored what the stream holds, then resume."""
    engine, env, journal, venue_options = handed_over_setting(postgres, nats_server, tmp_path, kit_env, "lagging")
    intents = handed_over_intents(twap_interval=8)
    workers = [WorkerProcess(role, env, tmp_path, *PAPER) for role in ("core", "planner")]
    core = workers[0]
    earlier = WorkerProcess("orchestrator", env, tmp_path, *PAPER)     # made the group; stopped: the plans wait
    orchestrators: list[WorkerProcess] = []

    def ledger_frozen_while_orchestrator_dies() -> None:
        wait_for_ledger(engine, len(intents), ("planned",), timeout=20)
        os.kill(core.process.pid, signal.SIGSTOP)
        try:
            doomed = WorkerProcess("orchestrator", env, tmp_path, *venue_options, "--latency-seconds", "3600")
            orchestrators.append(doomed.wait_ready())
            deadline = time.monotonic() + 20
            while len(journalled_orders(journal)) < len(intents):    # every first order at the venue
                assert time.monotonic() < deadline, "the first orchestrator did not send every first order"
                time.sleep(0.02)
            time.sleep(0.3)                                            # and its exec.step_submitted in the stream
            doomed.kill()
            orchestrators.append(WorkerProcess("orchestrator", env, tmp_path, *venue_options).wait_ready())
            time.sleep(2 + 1.5)               # past the acknowledgement wait: the new one has the plans, and waits
            assert submitted_steps(engine) == set()                   # the store never saw the first orchestrator
        finally:
            os.kill(core.process.pid, signal.SIGCONT)
    try:
        for worker in [*workers, earlier]:
            worker.wait_ready()
        assert earlier.stop() == 0
        finals, _ = asyncio.run(submit(nats_server.url, intents, timeout=40,
                                       meanwhile=ledger_frozen_while_orchestrator_dies))
        wait_for_ledger(engine, len(intents), ("completed", "rejected", "failed"), timeout=20)
    finally:
        os.kill(core.process.pid, signal.SIGCONT)
        codes, outputs = stop_workers([*workers, *orchestrators[1:]], killed=orchestrators[:1])
    assert codes == STOPPED_GRACEFULLY, outputs
    check_handed_over(engine, journal, intents, finals, outputs)
    engine.dispose()


@pytest.mark.timeout(180)
def test_agents_trade_through_the_workers(postgres, nats_server, tmp_path, kit_env):
    """With DEFAI_AGENT_EXECUTION=workers a tick publishes its intents for the three worker processes instead of
    opening the store's ledger (which the core worker holds): the workers serve each agent's paper account, priced at
    the bar the tick acted on, and check it under its own risk limits; the fill, the ledger and the journal agree."""
    from test_agents import BTC, running_agents                 # BTC hours up to a bar where ma_cross enters long
    from defai_kit.agents import AgentStore, agent_positions, agent_risk, paper_journal, rearm_agent, tick_agent
    from defai_kit.bar_store import open_bar_store
    from defai_kit.settings import Settings

    url = postgres.create_database(f"agents_nats_{os.getpid()}")
    env = dict(kit_env, DEFAI_BUS_URL=nats_server.url, DEFAI_DATABASE_URL=url, DEFAI_LOG_LEVEL="WARNING")
    _, engine, bar = running_agents(url, env, "nats-btc")
    agents = AgentStore(engine)
    agents.create(agent_id="nats-capped", strategy="ma_cross", params={"fast": 12, "slow": 48}, symbols=["BTC/USDT"],
                  lookback=300, risk_limits={"max_notional": "500"})        # its 1,000 USDT entry is too large
    agents.start("nats-capped")
    settings = Settings(_env_file=None, home=env["DEFAI_HOME"], database_url=url, bus_url=nats_server.url,
                        agent_execution="workers")
    workers = [WorkerProcess(role, env, tmp_path) for role in ("core", "planner", "orchestrator")]
    try:
        for worker in workers:
            worker.wait_ready()
        began = time.monotonic()                # the runner's own engine cannot have the ledger: it says so at once
        with pytest.raises(LedgerError, match="a core worker holds this store's writer lease"):
            tick_agent("nats-btc", settings=Settings(_env_file=None, home=env["DEFAI_HOME"], database_url=url),
                       engine=engine)
        assert time.monotonic() - began < 10
        ticked = subprocess.run([str(Path(sys.executable).parent / "defai"), "agent", "tick", "nats-capped"],
                                env=dict(env, DEFAI_AGENT_EXECUTION="workers"), capture_output=True, text=True)
        assert ticked.returncode == 0 and "nats-capped: ticked the bar of" in ticked.stdout.splitlines()[0], ticked
        assert "-> rejected, max_notional: intent notional" in ticked.stdout, ticked.stdout
        capped = next(tick for tick in agents.ticks("nats-capped") if tick["outcome"] == "ticked")
        # the next bar is stored before nats-btc's tick of the entry bar: the workers must still fill at the entry bar
        open_bar_store(settings, engine).upsert("binance", "BTC/USDT", "1h", BTC.iloc[bar + 1: bar + 2])
        at_entry = BTC.index[bar] + pd.Timedelta(minutes=61)
        traded = tick_agent("nats-btc", settings=settings, engine=engine, now=at_entry)
        again = tick_agent("nats-btc", settings=settings, engine=engine, now=at_entry)
        rearmed = rearm_agent("nats-capped", reason="limit reviewed", by="risk desk", settings=settings, engine=engine)
    finally:
        codes, outputs = stop_workers(workers, killed=[])
    assert codes == STOPPED_GRACEFULLY, outputs
    for role, output in outputs.items():
        assert f"worker {role} stopped:" in output and '"level": "error"' not in output, output[-3000:]

    # the tick traded through the workers: completed, at the close of the bar it acted on, the 10 bp fee on top
    assert (traded.outcome, [intent["state"] for intent in traded.intents]) == ("ticked", ["completed"])
    close = Decimal(repr(float(BTC["close"].iloc[bar])))
    assert close != Decimal(repr(float(BTC["close"].iloc[bar + 1])))     # the bar that closed since would show
    bought = (Decimal(1000) / close).quantize(Decimal("1e-12"), ROUND_DOWN)
    config = agents.get("nats-btc").config
    assert agent_positions(engine, config) == {"BTC/USDT": bought}
    with engine.connect() as connection:
        fill = connection.execute(sa.text("SELECT venue, quantity, price, fee, filled_at FROM fills")).one()
        journey = connection.execute(sa.text("SELECT event_id, topic, correlation_id, causation_id FROM events "
                                             "WHERE correlation_id = :intent"), {"intent": traded.intents[0]["intent_id"]}).all()
        balances = dict(connection.execute(sa.text("SELECT asset, amount FROM balances WHERE venue = 'paper:nats-btc'")).all())
    assert (fill.venue, Decimal(fill.quantity), Decimal(fill.price)) == ("paper:nats-btc", bought, close)
    assert Decimal(fill.fee) == bought * close / 1000
    assert fill.filled_at == (BTC.index[bar] + pd.Timedelta(hours=1)).to_pydatetime()     # when the bar closed
    check_chains(journey, [Intent.of(intent_id=traded.intents[0]["intent_id"], symbol="BTC/USDT", side="buy", quantity=1)])
    assert {asset: Decimal(amount) for asset, amount in balances.items()} == {
        "USDT": config.initial_cash - bought * close * Decimal("1.001"), "BTC": bought}

    # the capped agent's own limit held in the core worker; the bar is not traded twice; the re-arm was stored
    assert [(i["state"], i["reason_code"]) for i in capped["intents"]] == [("rejected", "max_notional")]   # from the CLI
    assert (again.outcome, again.reason) == ("skipped", f"ticked already by {traded.tick_id} (ticked)")
    assert agent_risk(engine, agents.get("nats-capped").config) == rearmed.payload["memory"]

    # the workers' ledger equals a replay, and each agent's journal agrees with it (`defai reconcile`)
    assert compare_read_models(engine) == []
    assert sum('"kind":"order"' in line for line in paper_journal(settings, config).read_text().splitlines()) == 1
    reconciled = subprocess.run([str(Path(sys.executable).parent / "defai"), "reconcile"], env=env,
                                capture_output=True, text=True)
    assert (reconciled.returncode, reconciled.stdout.splitlines()) == (0, [
        "nats-btc: the ledger and the paper:nats-btc account agree",
        "nats-capped: the ledger and the paper:nats-capped account agree"]), reconciled.stderr
    engine.dispose()
