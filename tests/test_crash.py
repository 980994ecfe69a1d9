"""Crash safety with a real process: an engine is killed (SIGKILL) after `exec.step_submitted` is stored and before
the order fills; a new engine on the same store and venue journal resumes the step by asking the venue, and the
order is sent exactly once. On SQLite and on a real PostgreSQL server."""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
from decimal import Decimal
from pathlib import Path

from defai_kit.execution import ExecutionEngine, reconcile
from defai_kit.store import open_store
from defai_kit.venues import PaperVenue

PRICE = "42000.5"

# The process that dies: it submits one intent, says READY once the write-ahead record is in the store (and, for
# "at_venue", once the venue has journalled the order), then waits to be killed.
DOOMED = textwrap.dedent("""
    import asyncio, sys
    from defai_kit.execution import ExecutionEngine
    from defai_kit.store import EventStore, open_store, upgrade_database
    from defai_kit.venues import PaperVenue

    url, journal, moment = sys.argv[1:4]

    class NeverSends(PaperVenue):
        async def submit(self, built):
            await asyncio.Event().wait()      # killed before the order leaves

    async def main():
        store = open_store(url)
        upgrade_database(store)
        kind = PaperVenue if moment == "at_venue" else NeverSends
        venue = kind("paper", {"USDT": "100000"}, latency_seconds=3600, journal=journal)
        venue.update_market("BTC/USDT", "%s")
        core = await ExecutionEngine(store, {"paper": venue}).start()
        await core.fund("paper", "USDT", "100000")
        intent_id = await core.submit_intent(symbol="BTC/USDT", side="buy", quantity="0.25")
        while True:
            topics = [e.topic for e in EventStore(store).read(correlation_id=intent_id)]
            if "exec.step_submitted" in topics and (moment != "at_venue" or venue._orders):
                break
            await asyncio.sleep(0.01)
        print("READY", intent_id, flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())
""" % PRICE)


def run_until_killed(url: str, journal: Path, moment: str) -> str:
    process = subprocess.Popen([sys.executable, "-c", DOOMED, url, str(journal), moment], stdout=subprocess.PIPE,
                               text=True, env={**os.environ, "DEFAI_LOG_LEVEL": "ERROR"})
    try:
        line = process.stdout.readline()
        assert line.startswith("READY"), line
        return line.split()[1]
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)


async def restart(url: str, journal: Path, intent_id: str):
    venue = PaperVenue("paper", journal=journal)          # orders and balances come back from the journal
    venue.update_market("BTC/USDT", PRICE)
    async with ExecutionEngine(open_store(url), {"paper": venue}) as core:
        row = await core.wait(intent_id)
        differences = await reconcile(core.ledger.models, venue)
    return core, venue, row, differences


def check_resumed(url: str, tmp_path: Path, moment: str) -> None:
    journal = tmp_path / "paper.jsonl"
    intent_id = run_until_killed(url, journal, moment)
    before = [r for r in PaperVenue("paper", journal=journal).journal.records() if r["kind"] == "order"]
    assert len(before) == (1 if moment == "at_venue" else 0)
    core, venue, row, differences = asyncio.run(restart(url, journal, intent_id))
    assert core.resumed == [intent_id]
    assert (row["state"], row["filled_quantity"]) == ("completed", Decimal("0.25"))
    orders = [r for r in venue.journal.records() if r["kind"] == "order"]
    assert [r["request"]["client_order_id"] for r in orders] == [f"{intent_id}-s1"]      # sent once, ever
    topics = [e.topic for e in core.trail(intent_id)]
    assert topics.count("exec.step_submitted") == 1 and topics.count("exec.step_filled") == 1
    assert topics[-1] == "exec.completed"
    assert differences == []                               # the ledger and the venue agree after the restart


def test_killed_after_the_venue_got_the_order(database_url, tmp_path):
    check_resumed(database_url, tmp_path, "at_venue")


def test_killed_before_the_order_left(database_url, tmp_path):
    check_resumed(database_url, tmp_path, "before_send")
