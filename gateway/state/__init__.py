"""Shared state (sessions, single-use values, revocations): SQLite or Redis. No gateway.settings."""
