"""The result outbox: an append-only log that keeps results until the manager confirms them."""

from __future__ import annotations

import os
from pathlib import Path

from core import protocol
from core.protocol import ResultMessage
from proplet import outbox as outbox_module
from proplet.outbox import Outbox


def result(task: str, attempt: int = 1, value: str = "3") -> ResultMessage:
    return ResultMessage(task, "p-1", value, "", attempt, "", "2026-11-24T10:00:00Z")


def test_results_survive_a_restart_until_acknowledged(tmp_path: Path) -> None:
    box = Outbox(tmp_path)
    for i in range(5):
        box.put(result(f"t{i}"))
    assert box.ack("t1", 1) and box.ack("t3", 1)
    box.close()  # no flush or rename needed: each record is already in the file

    again = Outbox(tmp_path)
    assert sorted(again.task_ids()) == ["t0", "t2", "t4"]
    assert again.get("t2", 1) == result("t2")
    # After a reconnect every waiting result is due at once.
    assert sorted(r.task_id for r in again.due(reconnected=True)) == ["t0", "t2", "t4"]


def test_a_process_killed_without_closing_keeps_its_results(tmp_path: Path) -> None:
    # A killed process never reaches close(): the records were written by then or not at all.
    box = Outbox(tmp_path)
    box.put(result("kept"))
    box.put(result("confirmed"))
    box.ack("confirmed", 1)
    assert [r.task_id for r in Outbox(tmp_path).due(reconnected=True)] == ["kept"]


def test_a_torn_last_record_is_skipped_and_the_rest_kept(tmp_path: Path) -> None:
    box = Outbox(tmp_path)
    box.put(result("whole"))
    box.close()
    record = b"R " + protocol.encode_result(result("torn"))
    with open(tmp_path / outbox_module.LOG_NAME, "ab") as f:
        f.write(record[: len(record) // 2])  # a crash in the middle of a write

    again = Outbox(tmp_path)
    assert again.task_ids() == ("whole",)
    again.put(result("next"))
    assert sorted(Outbox(tmp_path).task_ids()) == ["next", "whole"]


def test_the_log_is_emptied_once_everything_is_confirmed(tmp_path: Path) -> None:
    box = Outbox(tmp_path)
    for i in range(100):
        box.put(result(f"t{i}"))
    assert os.path.getsize(box.path) > 0
    for i in range(100):
        box.ack(f"t{i}", 1)
    assert os.path.getsize(box.path) == 0
    assert len(box) == 0 and box.acknowledged == 100


def test_a_log_grown_with_confirmed_results_is_rewritten(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(outbox_module, "COMPACT_AT_BYTES", 20_000)
    box = Outbox(tmp_path)
    box.put(result("waiting", value="x" * 100))
    for i in range(400):  # always one entry left: never emptied, only rewritten
        box.put(result(f"t{i}"))
        box.ack(f"t{i}", 1)
    assert os.path.getsize(box.path) < 20_000
    assert Outbox(tmp_path).task_ids() == ("waiting",)


def test_results_written_one_file_each_by_an_older_proplet_are_taken_over(tmp_path: Path) -> None:
    (tmp_path / "old.1.json").write_bytes(protocol.encode_result(result("old")))
    (tmp_path / "broken.1.json").write_bytes(b"{not json")
    (tmp_path / "half.1.tmp").write_bytes(b"{")
    box = Outbox(tmp_path)
    assert box.task_ids() == ("old",)
    assert sorted(p.name for p in tmp_path.iterdir()) == [outbox_module.LOG_NAME]
    box.close()
    assert Outbox(tmp_path).task_ids() == ("old",)


def test_without_acknowledgements_entries_expire_instead_of_piling_up(tmp_path: Path) -> None:
    # Upstream's manager never acknowledges: results are sent once and forgotten after the TTL.
    box = Outbox(tmp_path, unconfirmed_ttl=0.0)
    box.put(result("a"))
    box.put(result("b"))
    assert list(box.due()) == []
    assert len(box) == 0
    assert Outbox(tmp_path).task_ids() == ()


def test_ack_without_attempt_matches_the_only_entry(tmp_path: Path) -> None:
    box = Outbox(tmp_path)
    box.put(result("t", attempt=3))
    assert not box.ack("other", 0)
    assert box.ack("t", 0)
    assert len(box) == 0


def test_full_outbox_and_fsync_mode(tmp_path: Path) -> None:
    box = Outbox(tmp_path, max_entries=2, fsync=True)
    box.put(result("a"))
    assert not box.full
    box.put(result("b"))
    assert box.full
    box.close()
    assert sorted(Outbox(tmp_path).task_ids()) == ["a", "b"]


def test_the_outbox_is_full_by_bytes_too_counting_results_the_disk_refused(tmp_path: Path) -> None:
    """Before: only the count bounded it (100,000 by default), and each waiting result is held in
    memory: with 1 MiB of output each, a manager away for a while let a proplet hold gigabytes.
    Now it is full once its results weigh `max_bytes`, whether or not the log could keep them;
    confirmed results free their room, and a restart counts what it loaded."""
    box = Outbox(tmp_path, max_bytes=3 * 1024 * 1024)
    for name in "ab":
        box.put(result(name, value="x" * (1024 * 1024)))
    assert not box.full
    box.close()  # the descriptor is gone: the next write fails, the result stays in memory
    box.put(result("c", value="x" * (1024 * 1024)))
    assert box.write_failures == 1 and box.full
    assert box.ack("c", 1) and not box.full
    assert Outbox(tmp_path, max_bytes=2 * 1024 * 1024).full  # a and b, loaded from the log
    assert not Outbox(tmp_path, max_bytes=3 * 1024 * 1024).full


def test_a_write_that_fails_keeps_the_result_in_memory_and_counts_it(tmp_path: Path) -> None:
    box = Outbox(tmp_path)
    box.close()  # the descriptor is gone: every write fails with EBADF
    box.put(result("in-memory"))
    assert box.write_failures == 1
    assert box.get("in-memory", 1) == result("in-memory")


def test_a_record_cut_short_by_a_full_disk_does_not_swallow_the_next_one(tmp_path: Path, monkeypatch) -> None:
    box = Outbox(tmp_path)
    real_write = os.write
    calls = {"n": 0}

    def disk_full_once(fd: int, data: bytes) -> int:
        calls["n"] += 1
        if calls["n"] == 1:
            real_write(fd, bytes(data[:10]))  # part of the record reached the disk
            raise OSError(28, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(outbox_module.os, "write", disk_full_once)
    box.put(result("cut"))
    box.put(result("whole"))
    monkeypatch.undo()
    assert box.write_failures == 1
    # After a restart only what reached the disk whole is there.
    assert Outbox(tmp_path).task_ids() == ("whole",)


def test_a_restart_does_not_forget_that_the_manager_acknowledges(tmp_path: Path) -> None:
    # Whether acknowledgements come was known only in memory: after a restart the proplet sent its
    # waiting results once (on connect) and dropped them after the TTL, like results for upstream's
    # manager. A send lost then (the manager not yet subscribed after a site-wide power cut) lost
    # the result, and the task ran again or failed.
    box = Outbox(tmp_path, resend_after=0.0, unconfirmed_ttl=0.0)
    box.put(result("confirmed"))
    assert box.ack("confirmed", 1)
    box.put(result("waiting"))
    box.close()

    again = Outbox(tmp_path, resend_after=0.0, unconfirmed_ttl=0.0)
    assert [r.task_id for r in again.due(reconnected=True)] == ["waiting"]  # lost on the way
    assert [r.task_id for r in again.due()] == ["waiting"]
    assert again.get("waiting", 1) == result("waiting")


def test_told_the_manager_acknowledges_before_any_acknowledgement_results_wait_for_one(tmp_path: Path) -> None:
    # A start with an attempt says so (only this project's manager numbers attempts). Learnt from the
    # first acknowledgement only, a proplet's first result, finished while the broker was away, was
    # sent once on the reconnect, lost when the manager had not subscribed again yet, and never sent
    # again: its task failed as lost.
    box = Outbox(tmp_path, resend_after=0.0, unconfirmed_ttl=0.0)
    box.put(result("first"))
    box.manager_acknowledges()
    assert [r.task_id for r in box.due(reconnected=True)] == ["first"]  # lost on the way
    assert [r.task_id for r in box.due()] == ["first"]  # the timer sends it again, it does not expire
    assert Outbox(tmp_path).acks_seen  # remembered, as an acknowledgement is
