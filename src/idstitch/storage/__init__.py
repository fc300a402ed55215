"""Stores: the Store protocol and its adapters (SQLite default, memory for benchmarks and tests)."""
