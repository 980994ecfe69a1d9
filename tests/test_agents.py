"""Agents across processes, on each backend (an SQLite file and a real PostgreSQL server on 127.0.0.1): two runner
processes racing for one agent's bar trade it once, and the audit table shows who ticked and who skipped; live mode
is refused from the command line with exit code 2 and nothing written."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from decimal import ROUND_DOWN, Decimal
from pathlib import Path

import numpy as np
import pandas as pd
import sqlalchemy as sa

from defai_kit.agents import (AGENT_TICKS, AgentConfig, AgentStore, LiveTradingRefused, agent_account,
                              agent_positions, bars_hash, paper_journal, tick_agent)
from defai_kit.bar_store import open_bar_store
from defai_kit.formats import find_data_dir, read_bars
from defai_kit.ledger import compare_read_models
from defai_kit.settings import Settings
from defai_kit.store import EventStore, open_store, upgrade_database
from defai_kit.strategy import signals
from binance_server import BinanceServer

BTC = read_bars(find_data_dir() / "binance_spot_1h_2021-2023/BTCUSDT_1h.csv").frame
DEFAI = Path(sys.executable).parent / "defai"

# A runner process: import everything, say it is ready, wait for the go file, then `defai agent tick ID`, so that
# both processes reach the database at the same moment (Python's start-up alone takes a second or two here).
RUNNER = """
import sys, time
from pathlib import Path
import defai_kit.agents
from defai_kit.cli import run
folder = Path(sys.argv[2])
(folder / f"ready-{sys.argv[3]}").touch()
while not (folder / "go").exists():
    time.sleep(0.002)
sys.exit(run(["agent", "tick", sys.argv[1]]))
"""


def entry_bar() -> int:
    "The position in BTC of a bar on which ma_cross 12/48 enters long."
    entries = signals(AgentConfig.of(agent_id="x", strategy="ma_cross", params={"fast": 12, "slow": 48},
                                     symbols=["BTC/USDT"]).make_strategy(), BTC.iloc[:3000])["enter_long"]
    return BTC.index.get_loc(entries[entries].index[5])


def race(agent_ids: tuple[str, str], env: dict[str, str], folder: Path) -> list[subprocess.CompletedProcess]:
    "Two runner processes at once, the first ticking `agent_ids[0]`, the second `agent_ids[1]`; their results."
    runners = [subprocess.Popen([sys.executable, "-c", RUNNER, agent_id, str(folder), str(number)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for number, agent_id in enumerate(agent_ids, start=1)]
    deadline = time.monotonic() + 60
    while not all((folder / f"ready-{number}").exists() for number in (1, 2)):
        assert time.monotonic() < deadline and all(r.poll() is None for r in runners), [r.communicate() for r in runners]
        time.sleep(0.01)
    (folder / "go").touch()
    return [subprocess.CompletedProcess(r.args, r.wait(timeout=60), *r.communicate()) for r in runners]


def running_agents(database_url: str, kit_env: dict[str, str], *agent_ids: str, bars: bool = True):
    "A store (with BTC bars up to an entry bar) and an ma_cross agent running under each id; settings, engine, bar."
    kit_env["DEFAI_DATABASE_URL"] = database_url
    settings = Settings(_env_file=None, home=kit_env["DEFAI_HOME"], database_url=database_url)
    engine = open_store(database_url)
    upgrade_database(engine)
    bar = entry_bar()
    if bars:
        open_bar_store(settings, engine).upsert("binance", "BTC/USDT", "1h", BTC.iloc[bar - 400: bar + 1])
    agents = AgentStore(engine, settings)
    for agent_id in agent_ids:
        agents.create(AgentConfig.of(agent_id=agent_id, strategy="ma_cross", params={"fast": 12, "slow": 48},
                                     symbols=["BTC/USDT"], lookback=300))
        agents.start(agent_id)
    return settings, engine, bar


def test_two_runner_processes_trade_a_bar_once(database_url, kit_env, tmp_path):
    settings, engine, bar = running_agents(database_url, kit_env, "race-btc")
    config = AgentStore(engine, settings).get("race-btc").config

    results = race(("race-btc", "race-btc"), kit_env, tmp_path)
    assert [r.returncode for r in results] == [0, 0], [r.stderr for r in results]
    heads = sorted(r.stdout.splitlines()[0].split(": ")[1] for r in results)      # "skipped ...", "ticked ..."
    assert [head.split()[0] for head in heads] == ["skipped", "ticked"], [r.stdout for r in results]
    assert heads[1] == f"ticked the bar of {BTC.index[bar]:%Y-%m-%d %H:%M}"

    with engine.connect() as connection:
        rows = connection.execute(sa.select(AGENT_TICKS).where(AGENT_TICKS.c.agent_id == "race-btc")).mappings().all()
    assert sorted(row["outcome"] for row in rows) == ["skipped", "ticked"]
    assert len({row["runner"] for row in rows}) == 2                       # two processes, two runner names
    ticked = next(row for row in rows if row["outcome"] == "ticked")
    skipped = next(row for row in rows if row["outcome"] == "skipped")
    # the loser found the lease taken, or (if the winner was already done) the bar's slot ticked
    assert skipped["reason"].startswith(("another runner holds the agent's lease", "ticked already by")), skipped["reason"]
    assert ticked["data_hash"] == bars_hash({"BTC/USDT": BTC.iloc[bar - 299: bar + 1]})
    assert [intent["state"] for intent in ticked["intents"]] == ["completed"]

    # one buy in the ledger, priced at the bar's close: 1,000 USDT / close, to 1e-12
    bought = (Decimal(1000) / Decimal(repr(float(BTC["close"].iloc[bar])))).quantize(Decimal("1e-12"), ROUND_DOWN)
    assert agent_positions(engine, config) == {"BTC/USDT": bought}
    assert [e.correlation_id for e in EventStore(engine).read(topic="agent.ticked")] == [ticked["tick_id"]]
    journal = paper_journal(settings, config).read_text().splitlines()
    assert sum('"kind":"order"' in line for line in journal) == 1

    # ticking again, in this process, finds the bar taken
    again = tick_agent("race-btc", settings=settings, engine=engine)
    assert (again.outcome, again.reason) == ("skipped", f"ticked already by {ticked['tick_id']} (ticked)")
    assert agent_positions(engine, config) == {"BTC/USDT": bought}

    # the ledger's account of the agent and its paper venue's journal agree, from the command line
    reconciled = defai("reconcile", env=kit_env)
    agreed = "race-btc: the ledger and the paper:race-btc account agree\n"
    assert (reconciled.returncode, reconciled.stdout) == (0, agreed)
    engine.dispose()


LONGEST_ID = "second-btc-" + "x" * 53            # 64 characters, the most an agent id may have


def test_two_runner_processes_ticking_two_agents_share_one_ledger(database_url, kit_env, tmp_path):
    "Two agents ticked at the same moment by two processes: one ledger writes at a time (the store's writer lease),"
    " so both trade, the ledger's numbering has no gap or clash, and a replay equals the tables. Each trades its own"
    " ledger account, `paper:<agent id>` (70 characters for the longest id: migration 0006 widened the columns)."
    settings, engine, bar = running_agents(database_url, kit_env, "first-btc", LONGEST_ID)
    results = race(("first-btc", LONGEST_ID), kit_env, tmp_path)
    assert [r.returncode for r in results] == [0, 0], [r.stderr for r in results]
    ticked = f"ticked the bar of {BTC.index[bar]:%Y-%m-%d %H:%M}"
    assert [r.stdout.splitlines()[0].split(": ")[1] for r in results] == [ticked, ticked], [r.stdout for r in results]
    with engine.connect() as connection:
        sequences = connection.execute(sa.text("SELECT sequence FROM events WHERE sequence IS NOT NULL "
                                               "ORDER BY sequence")).scalars().all()
    assert sequences == list(range(1, len(sequences) + 1))
    assert compare_read_models(engine) == []
    with engine.connect() as connection:
        balances = connection.execute(sa.text("SELECT venue, asset, amount FROM balances")).all()
    held = {(venue, asset): Decimal(amount) for venue, asset, amount in balances}
    assert {venue for venue, _ in held} == {"paper:first-btc", f"paper:{LONGEST_ID}"}
    for agent_id in ("first-btc", LONGEST_ID):
        config = AgentStore(engine, settings).get(agent_id).config
        account = agent_account(engine, config)                # from the agent's trades, another path
        assert held[(config.account, "USDT")] == account["cash"] < Decimal(10_000)
        assert {"BTC/USDT": held[(config.account, "BTC")]} == agent_positions(engine, config) == account["positions"]
    engine.dispose()


def defai(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([str(DEFAI), *args], env=env, capture_output=True, text=True, timeout=120)


def test_live_mode_is_refused_from_the_command_line(kit_env):
    database = f"sqlite:///{kit_env['DEFAI_HOME']}/defai.db"
    upgrade_database(open_store(database))
    create = ("agent", "create", "live-btc", "--strategy", "ma_cross", "--symbol", "BTC/USDT", "--mode", "live")
    refused = defai(*create, env=kit_env)
    assert (refused.returncode, refused.stdout) == (2, "")
    assert refused.stderr == ("error: agent mode='live': live trading is off; set DEFAI_LIVE_TRADING=true to allow "
                              "it, or use mode paper\n")
    live = {**kit_env, "DEFAI_LIVE_TRADING": "true"}
    refused = defai(*create, env=live)
    assert (refused.returncode, refused.stderr) == (2, "error: agent mode='live': venue 'paper' is a paper venue and "
                                                       "cannot trade live; use mode paper\n")
    agents = AgentStore(open_store(database), Settings(_env_file=None, home=kit_env["DEFAI_HOME"]))
    assert agents.list() == []                                             # nothing was written
    agents.create(agent_id="paper-btc", strategy="ma_cross", symbols=["BTC/USDT"])
    live_agents = AgentStore(agents.engine, Settings(_env_file=None, home=kit_env["DEFAI_HOME"], live_trading=True))
    try:
        live_agents.update("paper-btc", {"mode": "live"})
    except LiveTradingRefused as refusal:
        assert (str(refusal).count("\n"), refusal.exit_code, refusal.field) == (0, 2, "mode")
    else:
        raise AssertionError("a paper agent was switched to live on a paper venue")
    assert (agents.get("paper-btc").version, agents.get("paper-btc").config.mode) == (1, "paper")


def test_a_bar_slot_is_claimed_once(database_url):
    "The partial unique index of migration 0004 holds on both backends: one acting tick per agent and bar."
    from datetime import datetime, timezone
    from defai_kit.agents import _insert_tick
    engine = open_store(database_url)
    upgrade_database(engine)
    bar, now = datetime(2024, 1, 1, tzinfo=timezone.utc), datetime.now(timezone.utc)
    row = lambda tick_id, outcome, agent="a": dict(tick_id=tick_id, agent_id=agent, bar_time=bar, ticked_at=now,
                                                   outcome=outcome, reason="", runner="test")
    assert _insert_tick(engine, row("t1", "ticking"))
    assert not _insert_tick(engine, row("t2", "ticked"))              # the slot is taken
    assert _insert_tick(engine, row("t3", "skipped")) and _insert_tick(engine, row("t4", "failed"))
    assert _insert_tick(engine, row("t5", "ticked", agent="b"))       # another agent's slot
    with engine.connect() as connection:
        assert connection.execute(sa.select(sa.func.count()).select_from(AGENT_TICKS)).scalar_one() == 4
    engine.dispose()


def test_the_runner_fetches_the_newest_bars_then_trades(database_url, kit_env):
    """`defai agent run --once --fetch` on a store with no bars at all. Exchanges cannot be reached from here, so the
    agent's exchange (binance) is a local server on 127.0.0.1 answering in Binance's REST format, serving the real
    BTC/USDT hours up to an entry bar, moved in time to end at the last hour that has closed. The runner fetches them
    through ccxt, ticks the newest and enters; the stored bars equal the served ones, value for value."""
    settings, engine, bar = running_agents(database_url, kit_env, "fetch-btc", bars=False)
    last_closed = pd.Timestamp.now(tz="UTC").floor("h") - pd.Timedelta(hours=1)
    served = BTC.iloc[max(bar - 799, 0): bar + 1].copy()
    served.index = served.index + (last_closed - served.index[-1])
    with BinanceServer({"BTCUSDT": served}) as server:
        urls = [f"--api-url={name}={url}" for name, url in server.api_urls.items()]
        result = subprocess.run([str(DEFAI), "agent", "run", "--once", "--fetch", *urls], env=kit_env,
                                capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert "fetch-btc: ticked the bar of" in result.stdout, result.stdout

    stored = open_bar_store(settings, engine).load("binance", "BTC/USDT", "1h")
    span = last_closed - stored.index[0]                                   # twice the lookback, back from now
    assert stored.index[-1] == last_closed and pd.Timedelta(hours=300) <= span < pd.Timedelta(hours=600), span
    assert stored.index.equals(served.loc[stored.index[0]:].index)          # every served hour since, none missing
    columns = ["open", "high", "low", "close", "volume"]
    assert np.array_equal(stored[columns].to_numpy(), served.loc[stored.index, columns].to_numpy())
    tick = AgentStore(engine, settings).ticks("fetch-btc")[0]
    assert (tick["outcome"], pd.Timestamp(tick["bar_time"])) == ("ticked", last_closed)
    assert tick["data_hash"] == bars_hash({"BTC/USDT": served.iloc[-300:]})   # it decided on the served bars
    assert [decision["action"] for decision in tick["decisions"]] == ["enter"]
    assert [intent["state"] for intent in tick["intents"]] == ["completed"]
    engine.dispose()


def test_sigterm_stops_the_runner_after_the_tick_in_progress(kit_env, tmp_path):
    """Docker stops the scheduler (`defai agent run`) with SIGTERM. Sent while a tick is fetching its bars (the
    exchange, a local server in Binance's REST format, has asked the runner to retry in 3 s), the tick still
    completes: the agent enters and the audit says ticked. Then the runner exits 0 and says so, without waiting out
    its pause. Killed mid-tick instead, it would leave the bar's slot claimed and the trade half told."""
    settings, engine, bar = running_agents(f"sqlite:///{tmp_path / 'defai.db'}", kit_env, "term-btc", bars=False)
    last_closed = pd.Timestamp.now(tz="UTC").floor("h") - pd.Timedelta(hours=1)
    served = BTC.iloc[max(bar - 799, 0): bar + 1].copy()
    served.index = served.index + (last_closed - served.index[-1])
    with BinanceServer({"BTCUSDT": served}) as server:
        server.fail_next(429, retry_after=3)
        urls = [f"--api-url={name}={url}" for name, url in server.api_urls.items()]
        runner = subprocess.Popen([str(DEFAI), "agent", "run", "--fetch", *urls, "--heartbeat", str(tmp_path / "alive")],
                                  env=kit_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while not server.kline_requests():                   # the first one is answered 429: the tick is waiting
            assert time.monotonic() < deadline and runner.poll() is None, runner.communicate()
            time.sleep(0.01)
        runner.send_signal(signal.SIGTERM)
        began = time.monotonic()
        out, err = runner.communicate(timeout=60)
    assert runner.returncode == 0, (runner.returncode, err)
    lines = out.splitlines()
    assert lines[0].startswith("tick-") and "term-btc: ticked the bar of" in lines[0], out
    assert lines[-1] == "stopped" and time.monotonic() - began < 30, out     # the pause (up to 60 s) was cut short
    tick = AgentStore(engine, settings).ticks("term-btc")
    assert [(t["outcome"], pd.Timestamp(t["bar_time"])) for t in tick] == [("ticked", last_closed)]
    assert [intent["state"] for intent in tick[0]["intents"]] == ["completed"]
    assert server.kline_requests()[0].status == 429 and len(server.kline_requests()) >= 2       # it waited, then retried
    engine.dispose()
