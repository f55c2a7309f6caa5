"""Policy hot reload: a clean set is swapped in whole; a broken one leaves the last good set."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from gateway.decide import PolicyHolder
from gateway.policy_reload import RELOAD_STAMP, PolicyReloader
from policies.loader import load_policy_dir

GOOD = """\
policies:
  - name: app
    allow:
      source_ip: [198.51.100.0/24]
"""
CHANGED = GOOD.replace("198.51.100.0/24", "203.0.113.0/24")


class Counted:
    """Collects the results the reloader counts (the metric's labels)."""

    def __init__(self) -> None:
        self.results: list[str] = []

    def __call__(self, result: str) -> None:
        self.results.append(result)


def make_reloader(directory: Path, *, use_events: bool = True) -> tuple[PolicyReloader, Counted]:
    (directory / "policies.yaml").write_text(GOOD, encoding="utf-8")
    counted = Counted()
    reloader = PolicyReloader(
        directory=directory,
        holder=PolicyHolder(load_policy_dir(directory)),
        required=frozenset({"app"}),
        poll_interval=0.1,
        use_events=use_events,
        count=counted,
    )
    return reloader, counted


async def wait_for_hash_change(reloader: PolicyReloader, old: str, seconds: float = 10) -> bool:
    for _ in range(int(seconds / 0.05)):
        if reloader.holder.current.content_hash != old:
            return True
        await asyncio.sleep(0.05)
    return False


@pytest.mark.anyio
async def test_clean_change_is_swapped_in(tmp_path: Path) -> None:
    """A valid edit replaces the set in force and is counted as applied."""
    reloader, counted = make_reloader(tmp_path)
    old = reloader.holder.current
    (tmp_path / "policies.yaml").write_text(CHANGED, encoding="utf-8")
    assert await reloader.reload()
    assert reloader.holder.current.content_hash != old.content_hash
    assert counted.results == ["applied"]
    assert reloader.readiness() == (True, f"serving {reloader.holder.current.content_hash[:16]}")


@pytest.mark.anyio
async def test_broken_file_keeps_the_last_good_set(tmp_path: Path) -> None:
    """A file that does not lint is refused; the old set stays and readyz shows the error."""
    reloader, counted = make_reloader(tmp_path)
    old = reloader.holder.current
    (tmp_path / "policies.yaml").write_text(GOOD + "    gruop: staff\n", encoding="utf-8")
    assert not await reloader.reload()
    assert reloader.holder.current is old
    assert counted.results == ["rejected"]
    ok, detail = reloader.readiness()
    assert ok
    assert "last reload refused" in detail
    assert "policies.yaml:5" in detail


@pytest.mark.anyio
async def test_set_without_a_routed_policy_is_refused(tmp_path: Path) -> None:
    """Removing a policy a route still names would deny everyone silently: refused instead."""
    reloader, counted = make_reloader(tmp_path)
    old = reloader.holder.current
    (tmp_path / "policies.yaml").write_text(GOOD.replace("name: app", "name: other"), "utf-8")
    assert not await reloader.reload()
    assert reloader.holder.current is old
    assert reloader.last_error == "routes name policies the new set lacks: app"
    assert counted.results == ["rejected"]


@pytest.mark.anyio
async def test_unchanged_content_is_not_a_swap(tmp_path: Path) -> None:
    """Re-saving identical content (even with new comments) keeps the same set object."""
    reloader, counted = make_reloader(tmp_path)
    old = reloader.holder.current
    (tmp_path / "policies.yaml").write_text("# 再保存\n" + GOOD, encoding="utf-8")
    assert await reloader.reload()
    assert reloader.holder.current is old
    assert counted.results == ["unchanged"]


@pytest.mark.anyio
@pytest.mark.parametrize("use_events", [True, False], ids=["file-events", "polling"])
async def test_watcher_picks_up_an_edit(tmp_path: Path, use_events: bool) -> None:
    """The running watcher (file events, or polling) reloads after a file changes."""
    reloader, _ = make_reloader(tmp_path, use_events=use_events)
    old = reloader.holder.current.content_hash
    await reloader.start()
    try:
        await asyncio.sleep(0.3)  # let the watcher settle before the edit
        (tmp_path / "policies.yaml").write_text(CHANGED, encoding="utf-8")
        assert await wait_for_hash_change(reloader, old)
    finally:
        await reloader.stop()


@pytest.mark.anyio
async def test_reload_stamp_triggers_a_reload(tmp_path: Path) -> None:
    """`tabiji reload` touches the stamp; watchers reload even if they missed the edit itself."""
    reloader, counted = make_reloader(tmp_path)
    await reloader.start()
    try:
        await asyncio.sleep(0.3)
        (tmp_path / RELOAD_STAMP).write_text("x\n", encoding="utf-8")
        for _ in range(200):
            if counted.results:
                break
            await asyncio.sleep(0.05)
        assert counted.results == ["unchanged"]
    finally:
        await reloader.stop()


@pytest.mark.anyio
async def test_reloads_and_refusals_are_audit_records(tmp_path: Path) -> None:
    """A swapped-in set records old and new hash; a refused one records the error and the hash
    that stays in force (a change of policy is evidence an auditor needs)."""
    (tmp_path / "policies.yaml").write_text(GOOD, encoding="utf-8")
    recorded: list[tuple[str, dict[str, object]]] = []
    reloader = PolicyReloader(
        directory=tmp_path,
        holder=PolicyHolder(load_policy_dir(tmp_path)),
        required=frozenset({"app"}),
        poll_interval=0.1,
        count=Counted(),
        audit=lambda action, detail: recorded.append((action, dict(detail))),
    )
    old = reloader.holder.current.content_hash
    (tmp_path / "policies.yaml").write_text(CHANGED, encoding="utf-8")
    assert await reloader.reload()
    new = reloader.holder.current.content_hash
    (tmp_path / "policies.yaml").write_text(GOOD + "    gruop: staff\n", encoding="utf-8")
    assert not await reloader.reload()
    assert [action for action, _ in recorded] == ["policy.reload", "policy.reload-refused"]
    assert recorded[0][1]["old_hash"] == old
    assert recorded[0][1]["new_hash"] == new
    assert recorded[1][1]["hash"] == new
    assert "policies.yaml:5" in str(recorded[1][1]["error"])


def _kubelet_publish(directory: Path, version: str, text: str) -> None:
    """Publish a ConfigMap version the way kubelet's atomic writer does: a new timestamped
    directory, a `..data_tmp` symlink to it renamed over `..data`; the files link into `..data`."""
    versioned = directory / f"..{version}"
    versioned.mkdir()
    (versioned / "policies.yaml").write_text(text, encoding="utf-8")
    tmp_link = directory / "..data_tmp"
    tmp_link.symlink_to(versioned.name)
    tmp_link.rename(directory / "..data")
    link = directory / "policies.yaml"
    if not link.is_symlink():
        link.symlink_to("..data/policies.yaml")


@pytest.mark.anyio
@pytest.mark.parametrize("use_events", [True, False], ids=["file-events", "polling"])
async def test_watcher_follows_a_kubernetes_configmap_update(
    tmp_path: Path, use_events: bool
) -> None:
    """A ConfigMap update (kubelet swaps the `..data` symlink; no policy file's name changes) is
    picked up by the file-event watcher as well as by polling."""
    _kubelet_publish(tmp_path, "v1", GOOD)
    reloader = PolicyReloader(
        directory=tmp_path,
        holder=PolicyHolder(load_policy_dir(tmp_path)),
        required=frozenset({"app"}),
        poll_interval=0.1,
        use_events=use_events,
        count=Counted(),
    )
    old = reloader.holder.current.content_hash
    await reloader.start()
    try:
        await asyncio.sleep(0.3)  # let the watcher settle before the update
        _kubelet_publish(tmp_path, "v2", CHANGED)
        assert await wait_for_hash_change(reloader, old)
    finally:
        await reloader.stop()
