"""`python -m bench._session STORE_URL PUBLIC_HOST`: put one signed-in session into a gateway's
state store and print its cookie id, for the proxy bench's authenticated case.

Run as a subprocess (bench/proxy.py never imports gateway): it goes through the gateway's own
SessionManager, exactly as a completed OIDC login would, so the record is what a login writes.
"""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import dataclass

from gateway.identity.sessions import SessionManager
from gateway.state.factory import open_state_store

LIFETIME = 12 * 3600.0
IDLE_TIMEOUT = 3600.0


@dataclass(frozen=True)
class BenchLogin:
    """The facts a completed OIDC login hands the session (sessions.LoginFacts)."""

    issuer: str = "https://idp.bench.invalid"
    subject: str = "bench-user-0001"
    email: str | None = "bench.user@town.example"
    email_verified: bool = True
    name: str | None = "ベンチ 太郎"
    groups: tuple[str, ...] = ("staff", "kikaku")
    groups_overage: bool = False
    amr: tuple[str, ...] = ("pwd",)
    acr: str | None = None
    sid: str | None = None
    id_token: str | None = None
    refresh_token: str | None = None  # no refresh: the bench never talks to a provider


async def create(store_url: str, public_host: str) -> str:
    """A new main session on `public_host`; returns the cookie id."""
    store = open_state_store(store_url)
    await store.open()
    try:
        sessions = SessionManager(
            store, public_host=public_host, lifetime=LIFETIME, idle_timeout=IDLE_TIMEOUT
        )
        cookie_id, _ = await sessions.create_main(BenchLogin(), "bench", time.time())
        await sessions.drain()
        return cookie_id
    finally:
        await store.close()


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m bench._session STORE_URL PUBLIC_HOST", file=sys.stderr)
        return 2
    print(asyncio.run(create(argv[0], argv[1])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
