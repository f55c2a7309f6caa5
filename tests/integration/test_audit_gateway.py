"""The audit trail through the real gateway process: record contents, secrets kept out, tamper
detection, kill -9, store outage → spool → drain, fail_closed, PostgreSQL with two workers,
checkpoint export, admin records and the auditors' view — read back with `tabiji audit …`.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.audit.batch import SEP, batches_of
from gateway.audit.checkpoint import Checkpoint, load_private_key, read_export
from gateway.audit.record import AuditRecord, chain_hash
from gateway.audit.store import CHECKPOINT_COLUMNS as CHECKPOINT_FIELDS
from gateway.audit.store import COLUMNS, checkpoint_row, record_row, row_record
from gateway.audit.store_sqlite import SqliteAuditStore
from gateway.audit.verify import verify as verify_store

from .audit_env import (
    AUDITOR,
    audit_block,
    audit_identity_env,
    burst,
    drop_triggers,
    file_bytes,
    fresh_database,
    immutable,
    query,
    requests_by_id,
    spool_files,
    sqlite_connect,
    sqlite_files,
    sqlite_locked,
    tabiji,
    verify,
)
from .conftest import Gateway, Upstream, free_port, gateway_config, raw_get, route, run_gateway

pytestmark = pytest.mark.integration

POLICIES = """\
policies:
  - name: office
    allow:
      name: from-office
      source_ip: [127.0.0.0/8]
  - name: lan
    allow:
      name: from-lan
      source_ip: [10.0.0.0/8]
"""
BEARER = "Bearer eyJhbGciOiJFUzI1NiJ9.c2VjcmV0LWJlYXJlcg.QmVhcmVyU2lnbmF0dXJl"
COOKIE_VALUE = "sEcReTcOoKiE0123456789abcdefXYZ"
QUERY_TOKEN = "qUeRyToKeN98765zyx"
BASIC = "Basic dXNlcjpwYXNzd29yZC1zZWNyZXQ="
SECRETS = (BEARER.split()[1], COOKIE_VALUE, QUERY_TOKEN, BASIC.split()[1])


def _policy_dir(directory: Path, text: str = POLICIES) -> Path:
    policy_dir = directory / "policies"
    policy_dir.mkdir(exist_ok=True)
    (policy_dir / "policies.yaml").write_text(text, "utf-8")
    return policy_dir


def _builder(directory: Path, upstream: Upstream, **audit: Any) -> Callable[[int], dict[str, Any]]:
    """Routes for every kind of outcome, the policy directory and an audit section."""
    policy_dir = _policy_dir(directory)
    dead = free_port()

    def build(port: int) -> dict[str, Any]:
        frm = f"http://127.0.0.1:{port}"
        to = f"http://127.0.0.1:{upstream.port}"
        return gateway_config(
            port,
            [
                route("withquery", frm + "/withquery", to, public=True, audit_query=True),
                route("office", frm + "/office", to, policy="office"),
                route("lan", frm + "/lan", to, policy="lan"),
                route("dead", frm + "/dead", f"http://127.0.0.1:{dead}", public=True),
                route("root", frm, to, public=True),
            ],
            policies={"dir": str(policy_dir), "watch": "poll", "poll_interval": "200ms"},
            audit=audit_block(directory, **audit),
        )

    return build


def _rid(response: Any) -> str:
    """The X-Request-Id of an httpx or raw response."""
    value = response.headers.get("x-request-id")
    assert value, "every response carries X-Request-Id"
    return str(value)


def _wait(condition: Callable[[], bool], seconds: float = 15.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


# -- 1. record contents ------------------------------------------------------------------------


def test_records_of_every_outcome(upstream: Upstream, tmp_path: Path) -> None:
    """Allow (public and policy), deny, upstream error, malformed target and unknown host each
    leave one record with what happened; query strings only where opted in, secrets never."""
    with run_gateway(tmp_path, _builder(tmp_path, upstream)) as gw:
        sent: dict[str, str] = {}
        with httpx.Client(base_url=gw.origin, timeout=10) as client:
            r = client.get(
                f"/withquery/page?token={QUERY_TOKEN}&page=2",
                headers={"Authorization": BEARER, "Cookie": f"tabiji_session={COOKIE_VALUE}"},
            )
            assert r.status_code == 200
            sent["query"] = _rid(r)
            r = client.post(
                "/plain/x?token=abc&page=3", content=b"hello", headers={"Authorization": BASIC}
            )
            assert r.status_code == 200
            sent["plain"] = _rid(r)
            r = client.get("/office/x")
            assert r.status_code == 200
            sent["office"] = _rid(r)
            r = client.get("/lan/x")
            assert r.status_code == 403
            sent["lan"] = _rid(r)
            r = client.get("/dead/x")
            assert r.status_code == 502
            sent["dead"] = _rid(r)
        raw = raw_get(gw.port, "/a%2fb")
        assert raw.status == 400
        sent["slash"] = _rid(raw)
        raw = raw_get(gw.port, "/x", host="nowhere.example")
        assert raw.status == 404
        sent["host"] = _rid(raw)
        # NEL (a C1 control) and RLO (a bidi override) percent-encoded in path and query.
        r = httpx.get(gw.url("/withquery/%C2%85%E2%80%AEx?q=%0d%0aA%E2%80%AE"), timeout=10)
        assert r.status_code == 200
        sent["controls"] = _rid(r)
        # A Host header with obs-text bytes (RFC 9110 §5.5): 0x85 is NEL, a C1 control.
        raw = raw_get(gw.port, "/x", host="evil\x85\x9b.example")
        sent["host-controls"] = _rid(raw)
        assert gw.stop() == 0  # SIGTERM: a graceful stop flushes the batch

    listed = query(gw.config_path, "--kind", "request")
    per_request = Counter(r["request_id"] for r in listed)
    assert all(per_request[request_id] == 1 for request_id in sent.values()), per_request
    records = {r["request_id"]: r for r in listed}
    for name, request_id in sent.items():
        record = records[request_id]
        if name != "host-controls":  # test_refused_before_routing_keeps_method_path_and_client
            assert record["client_ip"] == "127.0.0.1", name
        assert record["latency_us"] > 0
        assert record["kind"] == "request"

    q = records[sent["query"]]
    assert (q["method"], q["host"], q["path"]) == ("GET", gw.host, "/withquery/page")
    assert (q["decision"], q["reasons"], q["status"], q["route"]) == ("allow", [], 200, "withquery")
    assert q["query"] is not None
    assert "page=2" in q["query"]
    assert QUERY_TOKEN not in q["query"]
    assert q["policy_hash"]
    assert q["rule"]
    assert q["bytes_out"] > 0

    plain = records[sent["plain"]]
    assert (plain["method"], plain["path"], plain["query"]) == ("POST", "/plain/x", None)
    assert plain["bytes_in"] == 5

    office = records[sent["office"]]
    assert (office["decision"], office["rule"], office["route"]) == (
        "allow",
        "from-office",
        "office",
    )
    assert office["policy_hash"] == q["policy_hash"]

    lan = records[sent["lan"]]
    assert (lan["decision"], lan["status"], lan["rule"]) == ("deny", 403, None)
    assert "source-ip-not-allowed" in lan["reasons"]
    assert lan["path"] == "/lan/x"
    assert lan["policy_hash"] == q["policy_hash"]

    dead = records[sent["dead"]]
    assert (dead["decision"], dead["status"]) == ("error", 502)
    assert "upstream-unavailable" in dead["reasons"]

    slash = records[sent["slash"]]
    assert slash["status"] == 400
    assert slash["decision"] in ("deny", "error")
    assert slash["reasons"] == ["target-encoded-slash"]

    host = records[sent["host"]]
    assert (host["status"], host["host"], host["reasons"]) == (
        404,
        "nowhere.example",
        ["route-not-found"],
    )

    controls = records[sent["controls"]]
    odd_host = records[sent["host-controls"]]["host"]
    assert controls["path"].startswith("/withquery/")
    assert controls["query"].startswith("q=")
    for value in (controls["path"], controls["query"], odd_host):
        assert value.isprintable(), f"an unescaped control character: {value!r}"

    # Secrets: nowhere in the DB file's bytes, in an export, or in the gateway's log.
    export = tmp_path / "export.jsonl"
    done = tabiji(gw.config_path, "audit", "export", "--format", "jsonl", "-o", str(export))
    assert done.returncode == 0, done.stderr
    haystacks = {
        "db": file_bytes(*sqlite_files(tmp_path / "audit.db")),
        "export": export.read_bytes(),
        "log": gw.stderr().encode(),
    }
    for where, data in haystacks.items():
        assert data, where
        for secret in SECRETS:
            assert secret.encode() not in data, f"{secret!r} in the {where}"


def test_refused_before_routing_keeps_method_path_and_client(
    upstream: Upstream, tmp_path: Path
) -> None:
    """A request refused before a route was found still records its method, its client IP and,
    when the target parsed, its normalised path (the issue: for every decision)."""
    with run_gateway(tmp_path, _builder(tmp_path, upstream)) as gw:
        unknown = _rid(raw_get(gw.port, "/some/page", host="nowhere.example", method="DELETE"))
        malformed = _rid(raw_get(gw.port, "/a%2fb", method="PUT"))
        bad_host = _rid(raw_get(gw.port, "/x", host="evil\x85.example"))
        assert gw.stop() == 0
    records = requests_by_id(gw.config_path)
    assert records[bad_host]["client_ip"] == "127.0.0.1"
    assert (records[unknown]["method"], records[unknown]["path"]) == ("DELETE", "/some/page")
    assert records[malformed]["method"] == "PUT"


# -- 2. verify and tampering -------------------------------------------------------------------


def test_verify_passes_then_names_an_edited_record(upstream: Upstream, tmp_path: Path) -> None:
    """`tabiji audit verify` passes on the gateway's store; after root drops the triggers and
    edits a record's status it exits 1 naming that record."""
    with run_gateway(tmp_path, _builder(tmp_path, upstream)) as gw:
        with httpx.Client(base_url=gw.origin, timeout=10) as client:
            ids = [_rid(client.get(f"/page/{i}")) for i in range(6)]
        assert gw.stop() == 0
    ok = verify(gw.config_path)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("OK:")

    target = requests_by_id(gw.config_path)[ids[3]]
    conn = sqlite_connect(tmp_path / "audit.db")
    try:
        drop_triggers(conn)
        conn.execute(
            "UPDATE audit_records SET status = 403 WHERE chain_id = ? AND seq = ?",
            (target["chain_id"], target["seq"]),
        )
    finally:
        conn.close()
    bad = verify(gw.config_path)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert f"chain {target['chain_id']} seq {target['seq']}: edited" in bad.stderr


# -- 3. kill -9 during a write burst -----------------------------------------------------------


@pytest.mark.parametrize("durability", ["batched", "durable"])
def test_kill_9_during_a_write_burst(upstream: Upstream, tmp_path: Path, durability: str) -> None:
    """After kill -9 mid-burst `verify` passes on what was committed; in durable mode every
    request that got a response has its record."""
    with run_gateway(tmp_path, _builder(tmp_path, upstream, durability=durability)) as gw:
        with burst(gw.url("/burst/x")) as load:
            assert _wait(lambda: len(load.seen) >= 150), "the burst did not get going"
            gw.process.send_signal(signal.SIGKILL)
            gw.process.wait(10)
        seen = set(load.seen)
    assert gw.process.returncode == -signal.SIGKILL
    done = verify(gw.config_path)
    assert done.returncode == 0, done.stdout + done.stderr
    records = requests_by_id(gw.config_path)
    assert records, "nothing was committed before the kill"
    if durability == "durable":
        assert not seen - set(records), "a request was answered without its record committed"
    else:
        assert set(records) & seen


# -- 4. store outage → spool → drain; fail_closed ----------------------------------------------


def _audit_check(gw: Gateway) -> str:
    ready = httpx.get(gw.url("/.tabiji/readyz"), timeout=10)
    detail: str = ready.json()["checks"]["audit"]["detail"]
    return detail


def test_store_outage_spools_and_drains_without_loss(upstream: Upstream, tmp_path: Path) -> None:
    """While the SQLite store is locked the gateway keeps answering and spools; when it is
    released the spool drains: every request has its record and the chain verifies."""
    db = tmp_path / "audit.db"
    with run_gateway(tmp_path, _builder(tmp_path, upstream)) as gw:
        with httpx.Client(base_url=gw.origin, timeout=10) as client:
            ids = [_rid(client.get(f"/before/{i}")) for i in range(3)]
            with sqlite_locked(db):
                for i in range(20):
                    response = client.get(f"/during/{i}")
                    assert response.status_code == 200  # batched: the outage is not the user's
                    ids.append(_rid(response))
                assert _wait(
                    lambda: any(p.stat().st_size > 0 for p in spool_files(tmp_path)), 20
                ), "nothing was spooled while the store was locked"
                assert "spooling" in _audit_check(gw)
            assert _wait(lambda: all(p.stat().st_size == 0 for p in spool_files(tmp_path)), 20)
            ids += [_rid(client.get(f"/after/{i}")) for i in range(3)]
        assert _wait(lambda: "spooling" not in _audit_check(gw))
        assert gw.stop() == 0
    records = requests_by_id(gw.config_path)
    assert not set(ids) - set(records), "records lost across the outage"
    done = verify(gw.config_path)
    assert done.returncode == 0, done.stdout + done.stderr


@dataclass
class FailClosed:
    """What happened around an audit outage with durable + fail_closed."""

    statuses: list[int]  # of the requests sent while nothing could be written
    codes: list[str]
    refused: list[str]  # their request ids
    forwarded: list[str]  # what the upstream received of them
    before: str
    recovered: bool
    records: list[dict[str, Any]]  # every request record afterwards, newest first
    verify: subprocess.CompletedProcess[str]


@pytest.fixture(scope="module")
def fail_closed(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> FailClosed:
    """A durable, fail_closed gateway; requests while the store is locked and the spool is
    immutable; then both restored."""
    directory = tmp_path_factory.mktemp("fail-closed")
    build = _builder(directory, upstream, durability="durable", fail_closed=True)
    with run_gateway(directory, build) as gw:
        with httpx.Client(base_url=gw.origin, timeout=30) as client:
            before = client.get("/before")
            assert before.status_code == 200
            [spool] = spool_files(directory)  # the writer's own spool, open since start-up
            statuses, codes, refused = [], [], []
            with immutable(spool), sqlite_locked(directory / "audit.db"):
                for i in range(2):
                    response = client.get(
                        f"/closed-during/{i}", headers={"Accept": "application/json"}
                    )
                    statuses.append(response.status_code)
                    codes.append(
                        response.json().get("error", "") if response.status_code >= 400 else ""
                    )
                    refused.append(_rid(response))
                forwarded = upstream.received("/closed-during/")
            recovered = _wait(lambda: client.get("/after").status_code == 200, 20)
        assert gw.stop() == 0
    return FailClosed(
        statuses,
        codes,
        refused,
        forwarded,
        _rid(before),
        recovered,
        query(gw.config_path, "--kind", "request"),
        verify(gw.config_path),
    )


def test_fail_closed_refuses_while_no_record_can_be_written(fail_closed: FailClosed) -> None:
    """durable + fail_closed: with the store locked and the spool unwritable the gateway answers
    503 audit-unavailable and forwards nothing; once they return it serves again, the refusals
    are on record and the chain verifies."""
    assert fail_closed.statuses == [503, 503]
    assert fail_closed.codes == ["audit-unavailable"] * 2
    assert fail_closed.forwarded == [], "forwarded without a record"
    assert fail_closed.recovered, "the gateway did not serve again after the outage"
    ids = {r["request_id"] for r in fail_closed.records}
    assert fail_closed.before in ids
    for request_id in fail_closed.refused:
        mine = [r for r in fail_closed.records if r["request_id"] == request_id]
        assert any(r["status"] == 503 and "audit-unavailable" in r["reasons"] for r in mine), mine
    assert fail_closed.verify.returncode == 0, fail_closed.verify.stdout + fail_closed.verify.stderr


def test_fail_closed_refusal_is_recorded_once(fail_closed: FailClosed) -> None:
    """Each request refused with audit-unavailable has exactly one refusal record."""
    for request_id in fail_closed.refused:
        refusals = [
            r for r in fail_closed.records if r["request_id"] == request_id and r["status"] == 503
        ]
        assert len(refusals) == 1, refusals


# -- 5. PostgreSQL, two workers ------------------------------------------------------------------


def test_postgres_store_with_two_workers(upstream: Upstream, tmp_path: Path) -> None:
    """With PostgreSQL as the store and two workers: every request is recorded, a policy reload
    is recorded by each worker in its own chain, and verify walks both chains."""
    with fresh_database() as url:
        with run_gateway(tmp_path, _builder(tmp_path, upstream, store=url), workers=2) as gw:
            # Healthy means one worker answers; the reload below must reach both running.
            assert _wait(lambda: gw.stderr().count("Application startup complete") == 2)
            ids: list[str] = []

            def one(i: int) -> None:
                with httpx.Client(timeout=10) as client:  # a fresh connection each
                    ids.append(_rid(client.get(gw.url(f"/pg/{i}"))))

            threads = [threading.Thread(target=one, args=(i,)) for i in range(24)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(20)
            policy = tmp_path / "policies" / "policies.yaml"
            policy.write_text(POLICIES.replace("10.0.0.0/8", "10.0.0.0/16"), "utf-8")
            applied = tabiji(gw.config_path, "reload")
            assert applied.returncode == 0, applied.stderr

            def reloads() -> list[dict[str, Any]]:
                found = query(gw.config_path, "--kind", "admin", "--text", "policy.reload")
                return [r for r in found if r["action"] == "policy.reload"]

            assert _wait(lambda: len(reloads()) >= 2, 20), "not every worker recorded the reload"
            assert gw.stop() == 0
        assert len(ids) == 24
        records = requests_by_id(gw.config_path)
        assert not set(ids) - set(records)
        worker_chains = {r["chain_id"] for r in reloads()}
        assert len(worker_chains) == 2
        assert {r["chain_id"] for r in records.values()} <= worker_chains
        done = verify(gw.config_path, "--json")
        assert done.returncode == 0, done.stdout + done.stderr
        report = json.loads(done.stdout)
        assert report["ok"]
        assert report["chains_checked"] >= 2


# -- 6. checkpoint export ----------------------------------------------------------------------


def _rehash_rewrite(db: Path, chain_id: str, seq: int, key_file: Path) -> None:
    """What root with the signing key can do: change record `seq`, re-hash the rest of its
    chain and replace the chain's checkpoints in the DB with freshly signed ones."""
    key = load_private_key(key_file)
    conn = sqlite_connect(db)
    try:
        drop_triggers(conn)
        columns = ", ".join(COLUMNS)
        old = [
            row_record(row)
            for row in conn.execute(
                f"SELECT {columns} FROM audit_records WHERE chain_id = ? ORDER BY seq",  # noqa: S608  # constant column names
                (chain_id,),
            )
        ]
        new: list[AuditRecord] = []
        for record in old:
            event = record.event.evolve(status=299) if record.seq == seq else record.event
            prev = new[-1].hash if new else record.prev_hash
            new.append(
                AuditRecord(
                    event=event,
                    chain_id=chain_id,
                    seq=record.seq,
                    prev_hash=prev,
                    hash=chain_hash(prev, chain_id, record.seq, event),
                )
            )
        heads = {r.seq: r.hash for r in new}
        checkpoints = [
            Checkpoint.from_dict(dict(zip(CHECKPOINT_FIELDS, row, strict=True)))
            for row in conn.execute(
                f"SELECT {', '.join(CHECKPOINT_FIELDS)} FROM audit_checkpoints WHERE chain_id = ?",  # noqa: S608  # constant column names
                (chain_id,),
            )
        ]
        conn.execute("BEGIN")
        conn.execute("DELETE FROM audit_records WHERE chain_id = ?", (chain_id,))
        marks = ", ".join("?" * len(COLUMNS))
        conn.executemany(
            f"INSERT INTO audit_records ({columns}) VALUES ({marks})",  # noqa: S608  # constant columns
            [record_row(r) for r in new],
        )
        # The append-only log holds the same records: rewritten to match (same row ids, so
        # they stay marked as indexed).
        log_ids = [
            row[0]
            for row in conn.execute(
                "SELECT id FROM audit_log WHERE chain_id = ? ORDER BY first_seq", (chain_id,)
            )
        ]
        conn.execute("DELETE FROM audit_log WHERE chain_id = ?", (chain_id,))
        for log_id, batch in zip(log_ids, batches_of(new), strict=False):
            conn.execute(
                "INSERT INTO audit_log (id, chain_id, first_seq, last_seq, count, prev_hash,"
                " hashes, body) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    log_id,
                    chain_id,
                    batch.first_seq,
                    batch.last_seq,
                    len(batch),
                    batch.prev_hash,
                    b"".join(batch.digests),
                    SEP.join(batch.canon),
                ),
            )
        conn.execute("DELETE FROM audit_checkpoints WHERE chain_id = ?", (chain_id,))
        for cp in checkpoints:
            resigned = Checkpoint(
                chain_id, cp.seq, heads[cp.seq], cp.time_us, cp.count, cp.kind
            ).signed(key)
            marks = ", ".join("?" * len(CHECKPOINT_FIELDS))
            conn.execute(
                f"INSERT INTO audit_checkpoints ({', '.join(CHECKPOINT_FIELDS)}) VALUES ({marks})",  # noqa: S608  # constant columns
                checkpoint_row(resigned),
            )
        conn.execute("COMMIT")
    finally:
        conn.close()


def test_checkpoint_export_catches_a_rehashed_rewrite(upstream: Upstream, tmp_path: Path) -> None:
    """Signed checkpoints reach the export file while the gateway runs and at shutdown; a
    rewrite re-hashed and re-signed in the DB fools the DB alone, but verify with the export
    (the auditors' copy) exits 1."""
    export = tmp_path / "checkpoints.jsonl"
    build = _builder(tmp_path, upstream, checkpoint_interval="1s")
    with run_gateway(tmp_path, build) as gw:
        first = _rid(httpx.get(gw.url("/cp/1"), timeout=10))

        def periodic() -> list[Checkpoint]:
            if not export.exists():
                return []
            return [c for c in read_export(export) if c is not None and c.kind == "periodic"]

        assert _wait(lambda: len(periodic()) >= 1), "no checkpoint exported while running"
        time.sleep(1.1)  # past checkpoint_interval: the next flush with news checkpoints again
        httpx.get(gw.url("/cp/2"), timeout=10)
        assert _wait(lambda: len(periodic()) >= 2), "no second checkpoint after the interval"
        assert gw.stop() == 0
    chain_id = requests_by_id(gw.config_path)[first]["chain_id"]
    lines = [c for c in read_export(export) if c is not None and c.chain_id == chain_id]
    public = load_private_key(tmp_path / "audit-key.pem").public_key()
    assert lines
    assert all(c.signature_ok(public) for c in lines)
    assert lines[-1].kind == "close"
    assert lines[-1].seq == 2
    assert verify(gw.config_path).returncode == 0

    _rehash_rewrite(tmp_path / "audit.db", chain_id, 1, tmp_path / "audit-key.pem")

    async def db_only() -> bool:
        store = SqliteAuditStore(tmp_path / "audit.db")
        await store.open()
        try:
            return (await verify_store(store, public, None)).ok
        finally:
            await store.close()

    assert asyncio.run(db_only()), "the rewrite is not self-consistent: the test proves nothing"
    bad = verify(gw.config_path)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert f"chain {chain_id} seq 1: rewritten" in bad.stderr


# -- 7, 8. admin records and the auditors' view --------------------------------------------------

AUDIT_POLICIES = {
    "policies": [
        {"name": "signed-in", "allow": {"authenticated": True}},
        {"name": "auditors", "allow": {"name": "auditor-group", "group": ["auditors"]}},
    ]
}


def test_auditors_view_and_admin_records(upstream: Upstream, tmp_path: Path) -> None:
    """/.tabiji/audit sends a stranger to log in, shows an auditor the trail and refuses other
    staff; the auditor's look and `tabiji sessions revoke` are records; verify passes."""
    with audit_identity_env(
        tmp_path,
        upstream,
        policies=AUDIT_POLICIES,
        audit=lambda port: audit_block(tmp_path, view_policy="auditors"),
    ) as env:
        with env.client() as stranger:
            anonymous = stranger.get(env.p + "/.tabiji/audit")
        with env.client() as auditor:
            shown = env.login(auditor, env.p + "/.tabiji/audit", AUDITOR.username)
        with env.client() as staff:
            refused = env.login(staff, env.p + "/.tabiji/audit", "suzuki")
            # On a route host the view would share an origin — and the session cookie — with that
            # application, whose scripts could then read the trail: it answers on P only.
            elsewhere = staff.get(env.h + "/.tabiji/audit")
        revoke = env.cli("sessions", "revoke", "--user", "suzuki@town.example.jp")
        assert env.gateway.stop() == 0
    assert anonymous.status_code == 302
    # Same host, relative: never an origin taken from the Host header.
    assert anonymous.headers["location"] == "/.tabiji/login?rd=%2F.tabiji%2Faudit"
    assert shown.status_code == 200
    assert refused.status_code == 403
    assert elsewhere.status_code == 404
    assert revoke.returncode == 0, revoke.stderr

    config = env.gateway.config_path
    revokes = [r for r in query(config, "--kind", "admin") if r["action"] == "session.revoke"]
    assert len(revokes) == 1
    assert revokes[0]["detail"]["user"] == "suzuki@town.example.jp"
    assert revokes[0]["actor"]
    views = query(config, "--kind", "view")
    assert any(r["actor"] == AUDITOR.email and r["action"] == "audit.view" for r in views), views
    done = verify(config)
    assert done.returncode == 0, done.stdout + done.stderr
