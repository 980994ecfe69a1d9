"""Fixtures shared by the integration tests: a real PostgreSQL server and a store URL on each backend."""
from __future__ import annotations

import itertools
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from servers import PostgresServer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
_database_numbers = itertools.count()


@pytest.fixture(scope="session")
def postgres():
    "One PostgreSQL server for the whole run, on 127.0.0.1, stopped at the end."
    with PostgresServer() as server:
        yield server


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path):
    "A fresh, empty database URL on each backend: an SQLite file, and a new database on the real server."
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'defai.db'}"
    server = request.getfixturevalue("postgres")
    return server.create_database(f"test_{os.getpid()}_{next(_database_numbers)}")


@pytest.fixture
def kit_env(tmp_path):
    "Environment for running the `defai` CLI in isolation: its own home, no .env from the project."
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEFAI_")}
    env["DEFAI_HOME"] = str(tmp_path / "home")
    return env
