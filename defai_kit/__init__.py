"""Jupyter-first research-to-production kit for AI-driven crypto and DeFi trading

Modules:

- `defai_kit.migrations.m0001_initial`: The first schema: `events` (the append-only event store) and `bars` (OHLCV), with bars a hypertable where TimescaleDB is present."""

__version__ = "0.1.0"
