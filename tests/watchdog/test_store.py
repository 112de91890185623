"""The SQLite store: what it acknowledged survives a SIGKILL, the audit log only grows, filters work."""

from __future__ import annotations

import math
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading

import pytest

from gradwatch.watchdog.alert import Alert, AlertState
from gradwatch.watchdog.schema import Registration
from gradwatch.watchdog.store import SCHEMA_VERSION, Store, StoreError


def alert(rule="GradientExplosion", run="r1", layer="fc1.weight", state=AlertState.FIRING, active_at=100.0) -> Alert:
    return Alert(
        rule=rule,
        labels=(("alertname", rule), ("layer", layer), ("run", run)),
        annotations={"summary": "norm too high"},
        state=state,
        value=float("nan"),
        active_at=active_at,
        fired_at=active_at + 60 if state == AlertState.FIRING else None,
    )


def registration(run="r1", rank=0, step=0) -> Registration:
    return Registration(run=run, rank=rank, world_size=2, metrics_url=f"http://127.0.0.1:900{rank}/metrics", step=step, pid=42)


def test_everything_survives_reopening(tmp_path):
    path = tmp_path / "w.db"
    with Store(path) as s:
        s.register_run(registration(step=10), now=1.0)
        s.touch_run("r1", 0, now=2.0, step=15)
        s.replace_alerts([alert()])
        s.append_audit("alert.firing", time=3.0, run="r1", rule="GradientExplosion", details={"value": 960.0})
        s.record_deliveries("slack", [("fp1", "firing", 160.0)], sent_at=4.0)
    with Store(path) as s:
        [run] = s.runs()
        assert (run.run, run.rank, run.world_size, run.last_seen, run.last_step, run.stale) == ("r1", 0, 2, 2.0, 15, False)
        assert run.metrics_url == "http://127.0.0.1:9000/metrics" and run.registered_at == 1.0
        [restored] = s.alerts()
        assert restored.labels == alert().labels and restored.state == AlertState.FIRING
        assert restored.fired_at == 160.0 and math.isnan(restored.value)
        assert restored.fingerprint == alert().fingerprint
        [entry] = s.audit()
        assert (entry.kind, entry.run, entry.details) == ("alert.firing", "r1", {"value": 960.0})
        delivery = s.deliveries("slack", ["fp1", "other"])[("fp1", "firing")]
        assert (delivery.episode, delivery.sent_at) == (160.0, 4.0)


def test_file_store_uses_wal(tmp_path):
    with Store(tmp_path / "w.db") as s:
        assert s.journal_mode == "wal"
    conn = sqlite3.connect(tmp_path / "w.db")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"  # persistent in the file
    conn.close()


WRITER = textwrap.dedent(
    """
    import sys
    from gradwatch.watchdog.store import Store
    store = Store(sys.argv[1])
    i = 0
    while True:
        i += 1
        entry_id = store.append_audit("command.decided", time=float(i), run="r1", details={"n": i})
        print(entry_id, flush=True)  # acknowledged: the call returned
    """
)


def test_acknowledged_writes_survive_sigkill(tmp_path):
    path = tmp_path / "w.db"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        acknowledged = [int(writer.stdout.readline()) for _ in range(50)]
    finally:
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait(10)
    assert writer.returncode == -signal.SIGKILL
    with Store(path) as s:
        stored = {e.id for e in s.audit(limit=10_000)}
    assert set(acknowledged) <= stored


def test_audit_log_is_append_only_in_append_order(tmp_path):
    with Store(tmp_path / "w.db") as s:
        ids = [s.append_audit("notify.sent", time=t, details={"i": i}) for i, t in enumerate([5.0, 1.0, 3.0])]
        assert ids == sorted(ids)
        assert [e.details["i"] for e in s.audit()] == [0, 1, 2]  # append order, not time order
    conn = sqlite3.connect(tmp_path / "w.db")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        conn.execute("UPDATE audit SET kind='x.y'")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        conn.execute("DELETE FROM audit")
    conn.close()


def test_audit_filters_and_paging():
    with Store(":memory:") as s:
        s.append_audit("alert.firing", time=10.0, run="a", rule="R", fingerprint="f1")
        s.append_audit("notify.sent", time=11.0, run="a", rule="R", fingerprint="f1", details={"notifier": "slack"})
        s.append_audit("notify.failed", time=12.0, run="b", rule="R", fingerprint="f2")
        s.append_audit("alert.resolved", time=13.0, run="a", rule="R", fingerprint="f1")
        s.append_audit("command.decided", time=14.0, run="b")

        def kinds(**filters):
            return [e.kind for e in s.audit(**filters)]

        assert kinds(run="a") == ["alert.firing", "notify.sent", "alert.resolved"]
        assert kinds(kind="notify.") == ["notify.sent", "notify.failed"]
        assert kinds(kind="notify.sent") == ["notify.sent"]
        assert kinds(kind="notify") == []  # exact unless it ends with "."
        assert kinds(since=12.0, until=14.0) == ["notify.failed", "alert.resolved"]
        assert kinds(fingerprint="f2") == ["notify.failed"]
        assert kinds(limit=2, newest_first=True) == ["command.decided", "alert.resolved"]
        first_page = s.audit(limit=2)
        assert kinds(after_id=first_page[-1].id, limit=2) == ["notify.failed", "alert.resolved"]
        assert [e.kind for e in s.alert_history(run="a")] == ["alert.resolved", "alert.firing"]
        with pytest.raises(ValueError, match="area.event"):
            s.append_audit("sent", time=1.0)


def test_concurrent_appends_from_threads_all_land(tmp_path):
    with Store(tmp_path / "w.db", synchronous="NORMAL") as s:

        def work(n: int) -> None:
            for i in range(50):
                s.append_audit("notify.sent", time=float(i), run=f"r{n}")

        threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        entries = s.audit(limit=1000)
        assert len(entries) == 400 and len({e.id for e in entries}) == 400
        assert len(s.audit(run="r3", limit=1000)) == 50


def test_replace_alerts_keeps_exactly_the_current_set():
    with Store(":memory:") as s:
        s.replace_alerts([alert(layer="a"), alert(layer="b", state=AlertState.PENDING, active_at=50.0), alert(rule="Vanishing", run="r2")])
        assert [a.label("layer") for a in s.alerts()] == ["b", "a", "fc1.weight"]  # oldest first
        assert [a.label("layer") for a in s.alerts(state=AlertState.PENDING)] == ["b"]
        assert [a.rule for a in s.alerts(run="r2")] == ["Vanishing"]
        s.replace_alerts([alert(layer="c")], rule="GradientExplosion")  # one rule's set only
        assert sorted(a.label("layer") for a in s.alerts()) == ["c", "fc1.weight"]
        s.replace_alerts([])
        assert s.alerts() == []


def test_runs_registration_liveness_and_staleness():
    with Store(":memory:") as s:
        s.register_run(registration(rank=0), now=1.0)
        s.register_run(registration(rank=1), now=1.0)
        assert s.set_stale("r1", 1)
        assert [r.rank for r in s.runs(include_stale=False)] == [0]
        assert s.touch_run("r1", 1, now=5.0, step=7)  # seen again: no longer stale
        assert s.runs(rank=1)[0].stale is False and s.runs(rank=1)[0].last_step == 7
        assert not s.touch_run("nope", 0, now=5.0)
        again = s.register_run(registration(rank=0, step=100), now=9.0)  # a resumed trainer
        assert (again.registered_at, again.last_step) == (9.0, 100)
        assert s.remove_run("r1") == 2 and s.runs() == []


def test_schema_is_versioned_and_a_newer_file_is_refused(tmp_path):
    with Store(tmp_path / "w.db") as s:
        assert s.schema_version == SCHEMA_VERSION
    conn = sqlite3.connect(tmp_path / "w.db")
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="upgrade gradwatch"):
        Store(tmp_path / "w.db")
