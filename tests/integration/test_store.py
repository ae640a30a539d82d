"""One store test suite, run against SQLite and against PostgreSQL (parity)."""

from __future__ import annotations

import asyncio
import dataclasses
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from core.domain import (
    MODULE_HEAD_BYTES,
    Proplet,
    PropletMetrics,
    Task,
    TaskEvent,
    TaskLimits,
    TaskMetrics,
    TaskState,
    new_task_id,
)
from core.store import Store
from core.store.migrate import load_migrations, migrate
from core.store.postgres import PostgresStore
from core.store.reads import TaskReader
from core.store.sqlite import SqliteStore
from core.store.writer import StoreWriter
from tests.services import create_database, drop_database


def make_task(**overrides: object) -> Task:
    now = datetime.now(UTC)
    values: dict[str, object] = dict(
        id=new_task_id(), name="add", inputs=["1", "2"], env={"K": "v"}, metadata={"site": "a", "n": 3},
        wasm_digest="sha256:" + "a" * 64, cli_args=["--x"],
        limits=TaskLimits(timeout_s=2.5, fuel=1000, memory_bytes=1 << 20), created_at=now, updated_at=now,
    )
    values.update(overrides)
    return Task(**values)  # type: ignore[arg-type]


async def write(store: Store, *ops: object) -> None:
    await store.apply(list(ops))  # type: ignore[arg-type]


async def test_task_round_trip(store: Store) -> None:
    task = make_task(results={"x": [1, 2]}, monitoring_profile={"enabled": True}, hal_storage_path="/h",
                     pinned=True, proplet_id="p1", max_retries=2, file=b"\0asm\x01\0\0\0")
    await write(store, store.op_put_module(task.wasm_digest, task.file), store.op_insert_task(task))
    got = await store.get_task(task.id)
    assert got is not None
    assert got == task
    without_file = await store.get_task(task.id, with_file=False)
    assert without_file is not None and without_file.file == b""


async def test_update_persists_every_mutable_field(store: Store) -> None:
    task = make_task()
    await write(store, store.op_insert_task(task))
    later = task.created_at + timedelta(seconds=3)
    task.state = TaskState.COMPLETED
    task.results = "42"
    task.error = ""
    task.proplet_id = "p9"
    task.attempt = 2
    task.retries = 1
    task.reason = ""
    task.queued_at = later
    task.start_time = later
    task.finish_time = later
    task.updated_at = later
    task.priority = 90
    task.inputs = ["5"]
    await write(store, store.op_update_task(task))
    assert await store.get_task(task.id) == task


async def test_state_update_writes_the_state_columns_only(store: Store) -> None:
    task = make_task()
    await write(store, store.op_insert_task(task))
    changed = task.copy()
    changed.state, changed.results, changed.attempt, changed.proplet_id = TaskState.RUNNING, [1], 3, "p2"
    changed.inputs = ["not", "stored"]  # not a state column: a transition never changes it
    await write(store, store.op_update_task_state(changed))
    got = await store.get_task(task.id)
    assert got is not None
    assert (got.state, got.results, got.attempt, got.proplet_id) == (TaskState.RUNNING, [1], 3, "p2")
    assert got.inputs == task.inputs


async def test_results_of_every_json_type(store: Store) -> None:
    for value in ("text", 7, 1.5, True, None, [1, "a"], {"k": {"n": None}}):
        task = make_task(results=value)
        await write(store, store.op_insert_task(task))
        got = await store.get_task(task.id)
        assert got is not None and got.results == value


async def test_missing_task_is_none_and_delete_counts(store: Store) -> None:
    assert await store.get_task(new_task_id()) is None
    task = make_task()
    await write(store, store.op_insert_task(task))
    assert await store.delete(store.op_delete_task(task.id)) == 1
    assert await store.delete(store.op_delete_task(task.id)) == 0


async def test_list_pagination_order_and_filters(store: Store) -> None:
    base = datetime.now(UTC)
    tasks = [make_task(created_at=base + timedelta(seconds=i), metadata={"site": "a" if i % 2 else "b", "i": i},
                       state=TaskState.RUNNING if i < 3 else TaskState.PENDING) for i in range(7)]
    await write(store, *(store.op_insert_task(t) for t in tasks))
    page = await store.list_tasks(offset=0, limit=3)
    assert page.total == 7
    assert [t.id for t in page.items] == [t.id for t in reversed(tasks)][:3]
    page2 = await store.list_tasks(offset=3, limit=3)
    assert [t.id for t in page2.items] == [t.id for t in reversed(tasks)][3:6]
    site_a = await store.list_tasks(metadata={"site": "a"})
    assert site_a.total == 3 and all(t.metadata["site"] == "a" for t in site_a.items)
    both = await store.list_tasks(metadata={"site": "a", "i": 3})
    assert [t.id for t in both.items] == [tasks[3].id]
    running = await store.list_tasks(states=[TaskState.RUNNING])
    assert running.total == 3
    counts = await store.count_tasks_by_state()
    assert counts == {TaskState.RUNNING: 3, TaskState.PENDING: 4}
    with pytest.raises(ValueError, match="metadata key"):
        await store.list_tasks(metadata={"bad key'": 1})


async def test_an_id_prefix_filter_matches_the_start_of_the_id_on_both_backends(store: Store) -> None:
    # What `propeller tasks get 1a2b3c4d` resolves the console's 8-character ids through.
    ids = ["1a2b3c4d-0000-4000-8000-000000000001", "1a2b3c4d-0000-4000-8000-000000000002",
           "1a2b3c4f-0000-4000-8000-000000000003", "1a2b3c3f-0000-4000-8000-000000000004",
           "fa2b3c4d-0000-4000-8000-000000000005"]
    await write(store, *(store.op_insert_task(make_task(id=i)) for i in ids))

    async def matching(prefix: str) -> list[str]:
        return sorted(t.id for t in (await store.list_tasks(id_prefix=prefix)).items)

    assert await matching("1a2b3c4d") == ids[:2]
    assert await matching("1A2B3C4D-0000-4000-8000-000000000002") == [ids[1]]
    assert await matching("1a2b3c4d-") == ids[:2]
    assert await matching("1a2b3c4") == ids[:3]
    assert await matching("1a2b3c") == sorted(ids[:4])
    assert await matching("f") == [ids[4]]
    assert await matching("1a2b3c4e") == []
    assert (await store.list_tasks(id_prefix="1a2b", limit=1)).total == 4
    for bad in ("1a2%", "1a2_", "xyz", "1" * 37):
        with pytest.raises(ValueError, match="id prefix"):
            await store.list_tasks(id_prefix=bad)


async def test_a_metadata_filter_is_json_containment_on_both_backends(store: Store) -> None:
    """The filter is a JSON object the metadata must contain (PostgreSQL's `@>`). SQLite compared
    json_extract() with the value: true matched 1 and 1 matched true, null matched nothing, and a
    nested object or array matched only the same text, not a metadata value that contains it."""
    metas = {"true": {"f": True}, "one": {"f": 1}, "one.0": {"f": 1.0}, "null": {"f": None}, "none": {},
             "obj": {"f": {"a": 1, "b": 2}}, "obj_rev": {"f": {"b": 2, "a": 1}}, "list": {"f": ["a", "b"]},
             "deep": {"f": [{"k\"é": None, "x": [1, [2, 3]]}]}, "str": {"f": "1"}, "empty": {"f": ""}}
    names = {}
    for name, metadata in metas.items():
        task = make_task(metadata=metadata)
        names[task.id] = name
        await write(store, store.op_insert_task(task))
    for flt, expected in (
        ({"f": True}, ["true"]), ({"f": 1}, ["one", "one.0"]), ({"f": 1.0}, ["one", "one.0"]),
        ({"f": None}, ["null"]), ({"f": ""}, ["empty"]), ({"f": "1"}, ["str"]),
        ({"f": {"a": 1}}, ["obj", "obj_rev"]), ({"f": {"b": 2, "a": 1}}, ["obj", "obj_rev"]),
        ({"f": {}}, ["obj", "obj_rev"]),
        ({"f": ["b"]}, ["list"]), ({"f": ["a", "b", "c"]}, []), ({"f": "a"}, []),
        ({"f": [{"k\"é": None}]}, ["deep"]), ({"f": [{"x": [[3]]}]}, ["deep"]), ({"f": [{"x": [3]}]}, []),
    ):
        page = await store.list_tasks(metadata=flt)
        assert sorted(names[t.id] for t in page.items) == sorted(expected), flt
        assert page.total == len(expected), flt
    # Nesting is bounded the same on both (SQLite's parser overflows past about eight levels).
    deep: object = "x"
    for i in range(5):
        deep = [deep, {"c": True}] if i % 2 else {"a": deep, "b": [True]}  # six levels
    assert (await store.list_tasks(metadata={"f": deep, "g": deep})).total == 0
    with pytest.raises(ValueError, match="nest at most 6"):
        await store.list_tasks(metadata={"f": [deep]})


async def test_active_tasks_are_the_dispatcher_state(store: Store) -> None:
    queued = make_task(queued_at=datetime.now(UTC))
    idle = make_task()
    running = make_task(state=TaskState.RUNNING)
    done = make_task(state=TaskState.COMPLETED)
    await write(store, *(store.op_insert_task(t) for t in (queued, idle, running, done)))
    assert {t.id for t in await store.active_tasks()} == {queued.id, running.id}


async def test_events_in_order(store: Store) -> None:
    task = make_task()
    now = datetime.now(UTC)
    events = [TaskEvent(task.id, s, now + timedelta(milliseconds=i), i, "p", f"d{i}")
              for i, s in enumerate([TaskState.PENDING, TaskState.SCHEDULED, TaskState.RUNNING, TaskState.COMPLETED])]
    await write(store, store.op_insert_task(task), *(store.op_task_event(e) for e in events))
    assert await store.task_events(task.id) == events


async def _count(store: Store, sql: str) -> int:
    async with store.connection() as conn:
        return int((await conn.fetch(sql))[0][0])


async def test_a_module_is_stored_once_and_forgotten_with_the_last_task_that_has_it(store: Store) -> None:
    module = b"\0asm" + random.randbytes(200_000)
    digest = "sha256:" + "b" * 64
    first, second = make_task(file=module, wasm_digest=digest), make_task(file=module, wasm_digest=digest)
    await write(store, *(op for t in (first, second)
                         for op in (store.op_put_module(digest, module), store.op_insert_task(t))))
    assert await store.file_by_digest(digest) == module
    assert await store.file_by_digest("sha256:" + "c" * 64) is None
    # Its size and first bytes (header and imports), for placement, without the module.
    assert await store.module_heads([digest, "sha256:" + "c" * 64]) == {
        digest: (len(module), module[:MODULE_HEAD_BYTES])}
    got = await store.get_task(first.id)
    assert got is not None and got.file == module
    assert await _count(store, "SELECT COUNT(*) FROM modules") == 1
    # Not in the tasks' rows, which every state change writes again.
    assert await _count(store, "SELECT COUNT(*) FROM tasks WHERE file IS NOT NULL") == 0
    # A digest beside an image_url pins bytes fetched from elsewhere: the stored module is not its file.
    pinned = make_task(file=b"", image_url="registry.local/app:1", wasm_digest=digest)
    await write(store, store.op_insert_task(pinned))
    got = await store.get_task(pinned.id)
    assert got is not None and got.file == b""
    await write(store, store.op_delete_task(first.id), store.op_forget_module(digest))
    assert await store.file_by_digest(digest) == module, "the second task still has it"
    await write(store, store.op_delete_task(second.id), store.op_delete_task(pinned.id),
                store.op_forget_module(digest))
    assert await store.file_by_digest(digest) is None


async def test_replacing_a_module_forgets_the_old_one_only_when_no_task_has_it(store: Store) -> None:
    old, new = b"\0asm" + b"o" * 100, b"\0asm" + b"n" * 100
    old_digest, new_digest = "sha256:" + "d" * 64, "sha256:" + "e" * 64
    shared, alone = make_task(file=old, wasm_digest=old_digest), make_task(file=old, wasm_digest=old_digest)
    await write(store, store.op_put_module(old_digest, old), store.op_insert_task(shared), store.op_insert_task(alone))
    shared.file, shared.wasm_digest = new, new_digest
    await write(store, *store.ops_set_task_module(shared, old_digest))
    assert await store.file_by_digest(old_digest) == old and await store.file_by_digest(new_digest) == new
    alone.file, alone.wasm_digest = b"", ""  # the module removed: none stored, the old one goes
    await write(store, *store.ops_set_task_module(alone, old_digest))
    assert await store.file_by_digest(old_digest) is None
    got = await store.get_task(shared.id)
    assert got is not None and (got.file, got.wasm_digest) == (new, new_digest)


async def test_migration_6_moves_the_modules_out_of_the_task_rows(store: Store) -> None:
    module = b"\0asm" + b"m" * 5000
    digest = "sha256:" + "f" * 64
    a, b = make_task(file=b"", wasm_digest=digest), make_task(file=b"", wasm_digest=digest)
    await write(store, store.op_insert_task(a), store.op_insert_task(b))
    async with store.transaction() as conn:
        # The rows as migration 6 finds them: each task with its copy of the module.
        await conn.execute("UPDATE tasks SET file = ? WHERE wasm_digest = ?", (module, digest))
        await conn.execute("DELETE FROM schema_migrations WHERE id = ?", ("6_modules",))
    assert await migrate(store) == ["6_modules"]
    assert await store.file_by_digest(digest) == module
    for task in (a, b):
        got = await store.get_task(task.id)
        assert got is not None and got.file == module
    assert await _count(store, "SELECT COUNT(*) FROM modules") == 1
    assert await _count(store, "SELECT COUNT(*) FROM tasks WHERE file IS NOT NULL") == 0


async def test_proplets_upsert_and_delete(store: Store) -> None:
    now = datetime.now(UTC)
    p = Proplet(id="p1", name="brave-otter", metadata={"os": "linux"}, namespace="default",
                alive_history=[now - timedelta(seconds=1), now], online=True, created_at=now)
    await write(store, store.op_upsert_proplet(p, now))
    p.metadata = {"os": "zephyr"}
    p.online = False
    p.offline_reason = "Last Will"
    await write(store, store.op_upsert_proplet(p, now))
    got = await store.get_proplet("p1")
    assert got is not None
    assert (got.metadata, got.online, got.offline_reason, got.alive_history) == (
        {"os": "zephyr"}, False, "Last Will", p.alive_history)
    assert [x.id for x in await store.all_proplets()] == ["p1"]
    await write(store, store.op_delete_proplet("p1"))
    assert await store.get_proplet("p1") is None


async def test_metrics_pagination_retention_and_unknown_owner(store: Store) -> None:
    now = datetime.now(UTC)
    await write(store, store.op_upsert_proplet(Proplet(id="p1", name="n", created_at=now), now))
    task = make_task()
    await write(store, store.op_insert_task(task))
    samples = [PropletMetrics("p1", "default", now + timedelta(seconds=i), {"percent": i}, {"rss_bytes": i})
               for i in range(5)]
    await write(store, *(store.op_proplet_metrics(m) for m in samples))
    # Metrics of an unknown proplet or task are dropped, not an error.
    await write(store, store.op_proplet_metrics(PropletMetrics("ghost", "", now, {}, {})),
                store.op_task_metrics(TaskMetrics(new_task_id(), "p1", now, {})))
    await write(store, *(store.op_task_metrics(TaskMetrics(task.id, "p1", now + timedelta(seconds=i), {"i": i}))
                         for i in range(3)))
    page = await store.list_proplet_metrics("p1", 0, 2)
    assert page.total == 5 and [m.cpu_metrics["percent"] for m in page.items] == [4, 3]
    assert (await store.list_task_metrics(task.id, 0, 10)).total == 3
    deleted = await store.prune_metrics(keep=2)
    assert deleted == 3 + 1
    assert (await store.list_proplet_metrics("p1", 0, 10)).total == 2
    assert [m.metrics["i"] for m in (await store.list_task_metrics(task.id, 0, 10)).items] == [2, 1]


async def test_deleting_a_task_deletes_its_events_and_metrics(store: Store) -> None:
    now = datetime.now(UTC)
    task = make_task()
    await write(store, store.op_insert_task(task), store.op_task_event(TaskEvent(task.id, TaskState.PENDING, now)),
                store.op_task_metrics(TaskMetrics(task.id, "p", now, {})))
    await write(store, store.op_delete_task(task.id))
    assert await store.task_events(task.id) == []
    assert (await store.list_task_metrics(task.id, 0, 10)).total == 0


async def test_migrations_are_idempotent_and_heal(store: Store) -> None:
    assert await migrate(store) == []
    # A database whose tables exist but whose tracking rows are gone (half-applied, or created by
    # hand) heals: the runner re-applies, every statement is IF NOT EXISTS.
    async with store.transaction() as conn:
        await conn.execute("DELETE FROM schema_migrations")
    assert await migrate(store) == [m.id for m in load_migrations(store.dialect)]
    assert await migrate(store) == []


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_managers_starting_together_apply_each_migration_once(backend: str, tmp_path: Path) -> None:
    """Four managers migrate one fresh database at once: none fails and each migration is applied by
    exactly one of them (PostgreSQL's concurrent CREATE TABLE IF NOT EXISTS failed all but one)."""
    db = None
    if backend == "sqlite":
        stores: list[Store] = [SqliteStore(tmp_path / "shared.db") for _ in range(4)]
    else:
        db = await create_database()
        stores = [PostgresStore(db.dsn) for _ in range(4)]
    for s in stores:
        await s.open()
    try:
        results = await asyncio.gather(*(migrate(s) for s in stores), return_exceptions=True)
        assert not [r for r in results if isinstance(r, BaseException)], results
        applied = [m for r in results for m in r]  # type: ignore[union-attr]
        assert sorted(applied) == sorted(m.id for m in load_migrations(backend))
        assert await migrate(stores[0]) == []
    finally:
        for s in stores:
            await s.close()
        if db is not None:
            await drop_database(db)


async def test_a_batch_is_planned_by_phase_with_deletes_as_barriers(store: Store) -> None:
    """Interleaved statements are grouped, superseded updates dropped, and the result is the same
    as running them one by one."""
    now = datetime.now(UTC)
    a, b = make_task(), make_task()
    ops = [store.op_insert_task(a), store.op_task_event(TaskEvent(a.id, TaskState.PENDING, now))]
    for i in range(5):
        a.attempt = i
        ops += [store.op_update_task(a), store.op_task_event(TaskEvent(a.id, TaskState.RUNNING, now, i))]
    ops += [store.op_insert_task(b), store.op_delete_task(b.id), store.op_insert_task(b)]
    from core.store.base import plan
    groups = plan(ops)
    assert [len(g) for g in groups] == [2, 1, 6, 1, 1]  # inserts, last update, events, delete, insert
    await store.apply(ops)
    got = await store.get_task(a.id)
    assert got is not None and got.attempt == 4
    assert [e.attempt for e in await store.task_events(a.id)] == [0, 0, 1, 2, 3, 4]
    assert await store.get_task(b.id) is not None


async def test_group_commit_batches_and_keeps_order(store: Store) -> None:
    import asyncio

    writer = StoreWriter(store)
    loop_task = asyncio.create_task(writer.run())
    try:
        task = make_task()
        await writer.write(store.op_insert_task(task))
        futures = []
        for i in range(200):
            task.attempt = i
            futures.append(await writer.enqueue(store.op_update_task(task)))
        await asyncio.gather(*futures)
        got = await store.get_task(task.id)
        assert got is not None and got.attempt == 199
        assert writer.stats.largest_batch > 1, "concurrent writes should share a transaction"
        # A failing write is isolated: the others in its batch still commit.
        # Another task under a stored id (the same insert repeated is a no-op: a retried batch).
        clash = dataclasses.replace(task, created_at=task.created_at + timedelta(seconds=1))
        bad = await writer.enqueue(store.op_insert_task(clash))  # duplicate primary key
        other = make_task()
        good = await writer.enqueue(store.op_insert_task(other))
        await good
        with pytest.raises(Exception, match="refused a write"):
            await bad
        assert await store.get_task(other.id) is not None
    finally:
        loop_task.cancel()


async def test_many_tasks_are_read_in_one_query_without_their_modules(store: Store) -> None:
    tasks = [make_task(name=f"t{i}") for i in range(3)]
    await write(store, *(store.op_insert_task(t) for t in tasks))
    got = await store.get_tasks([tasks[2].id, "no-such-task", tasks[0].id])
    assert set(got) == {tasks[0].id, tasks[2].id}
    assert got[tasks[2].id] == dataclasses.replace(tasks[2], file=b"")
    assert got[tasks[0].id] == dataclasses.replace(tasks[0], file=b"")
    assert await store.get_tasks([]) == {}


async def test_reads_asked_for_together_share_a_query(store: Store) -> None:
    import asyncio

    tasks = [make_task(name=f"t{i}") for i in range(50)]
    await write(store, *(store.op_insert_task(t) for t in tasks))
    reader = TaskReader(store, max_batch=20)
    wanted = [t.id for t in tasks] + [tasks[0].id, "no-such-task"]
    got = await asyncio.gather(*(reader.get(task_id) for task_id in wanted))
    assert [t.name if t else None for t in got] == [f"t{i}" for i in range(50)] + ["t0", None]
    assert got[0] is not got[50], "two reads of one task must not share (and mutate) one object"
    assert reader.stats.reads == 51 and reader.stats.queries == 3 and reader.stats.largest_batch == 20
    # A lone read still answers, in a query of its own.
    one = await reader.get(tasks[7].id)
    assert one is not None and one.name == "t7" and reader.stats.queries == 4


async def test_a_failing_batched_read_fails_each_waiting_read(store: Store) -> None:
    import asyncio

    reader = TaskReader(store)
    await store.close()
    results = await asyncio.gather(reader.get("a"), reader.get("b"), return_exceptions=True)
    assert all(isinstance(r, Exception) for r in results), results
    await store.open()  # the fixture closes it again
    assert await reader.get("a") is None  # the reader is usable after a failure


async def test_a_barrier_for_old_writes_waits_only_while_they_are_queued(store: Store) -> None:
    import asyncio

    writer = StoreWriter(store)
    task = make_task()
    await writer.submit(store.op_insert_task(task))
    queued = writer.queued_entries
    waiting = asyncio.create_task(writer.barrier_for(queued))
    await asyncio.sleep(0.05)
    assert not waiting.done(), "the insert is not committed: the writer is not running yet"
    loop_task = asyncio.create_task(writer.run())
    try:
        await asyncio.wait_for(waiting, 5)
        assert await store.get_task(task.id) is not None
        # Writes queued after the ones waited for do not hold the barrier up.
        await writer.write()
        assert writer.finished_entries >= queued
        before = writer.stats.batches
        await writer.barrier_for(queued)
        assert writer.stats.batches == before, "nothing was pending: no commit should be made"
    finally:
        loop_task.cancel()


async def test_both_backends_have_the_same_schema(tmp_path: Path, pg_dsn: str) -> None:
    sqlite = SqliteStore(tmp_path / "a.db")
    pg = PostgresStore(pg_dsn)
    for s in (sqlite, pg):
        await s.open()
        await migrate(s)
    try:
        a, b = await sqlite.schema(), await pg.schema()
    finally:
        await sqlite.close()
        await pg.close()
    assert a.keys() == b.keys()
    for table in a:
        assert a[table]["columns"] == b[table]["columns"], table
        # PostgreSQL has one extra GIN index on metadata for the @> filter.
        assert set(a[table]["indexes"]) <= set(b[table]["indexes"]), table
    assert [m.id for m in load_migrations("sqlite")] == [m.id for m in load_migrations("postgres")]


async def test_a_write_given_up_while_the_queue_is_full_is_not_counted(store: Store) -> None:
    import asyncio

    writer = StoreWriter(store, max_queue=1)
    await writer.submit(store.op_insert_task(make_task()))
    blocked = asyncio.create_task(writer.submit(store.op_insert_task(make_task())))
    await asyncio.sleep(0.05)
    assert not blocked.done(), "the queue is full and the writer is not running: the producer waits"
    blocked.cancel()
    with pytest.raises(asyncio.CancelledError):
        await blocked
    assert writer.backlog == 1 and writer.queued_entries == 1
    loop_task = asyncio.create_task(writer.run())
    try:
        await asyncio.wait_for(writer.wait_idle(), 5)  # would wait for ever on the phantom entry
        assert writer.finished_entries == writer.queued_entries == 1
    finally:
        loop_task.cancel()


async def test_an_action_after_a_commit_runs_before_its_waiters_resume_and_not_after_a_failure(store: Store) -> None:
    """The dispatcher sends a start from `then`: it must leave before the API call whose write shared
    the commit resumes, and never for a write the store refused."""
    import asyncio

    writer = StoreWriter(store)
    loop_task = asyncio.create_task(writer.run())
    order: list[str] = []
    try:
        task = make_task()
        api_write = await writer.enqueue(store.op_insert_task(task))
        dispatch = await writer.enqueue(store.op_update_task(task), then=lambda: order.append("then"))

        async def api_waiter() -> None:
            await api_write
            order.append("waiter")

        await asyncio.gather(api_waiter(), dispatch)
        assert order == ["then", "waiter"]
        clash = dataclasses.replace(task, created_at=task.created_at + timedelta(seconds=1))  # another task, same id
        duplicate = await writer.enqueue(store.op_insert_task(clash), then=lambda: order.append("refused"))
        with pytest.raises(Exception, match="refused a write"):
            await duplicate
        assert "refused" not in order
    finally:
        loop_task.cancel()


def _reopened(store: Store) -> Store:
    """Another store on the same database, as a manager run before this one had."""
    return SqliteStore(store.path) if isinstance(store, SqliteStore) else PostgresStore(store.dsn)  # type: ignore[attr-defined]


async def _samples(store: Store, table: str, column: str) -> dict[str, list[tuple[datetime, int]]]:
    async with store.connection() as conn:
        rows = await conn.fetch(f"SELECT {column}, timestamp, id FROM {table}")
    out: dict[str, list[tuple[datetime, int]]] = {}
    for owner, ts, row_id in rows:
        out.setdefault(owner, []).append((store.ts_out(ts), row_id))  # type: ignore[arg-type]
    return out


def _newest(samples: dict[str, list[tuple[datetime, int]]], keep: int) -> dict[str, set[int]]:
    return {owner: {i for _, i in sorted(rows, reverse=True)[:keep]} for owner, rows in samples.items()}


async def test_pruning_keeps_the_newest_samples_of_every_proplet_and_task(store: Store) -> None:
    """The newest `keep` samples (by timestamp, then row id) of each owner stay: on a store's first
    prune those of every owner, written by an earlier run too; then those of owners that got samples
    since. An owner with more to delete than one statement takes (PRUNE_CHUNK) is pruned to the end."""
    from core.store.base import PRUNE_CHUNK

    keep, now, rng = 3, datetime.now(UTC), random.Random(20261206)
    proplets = [Proplet(id=f"p{i}", name="n", created_at=now) for i in range(3)]
    tasks = [make_task() for _ in range(3)]
    await write(store, *(store.op_upsert_proplet(p, now) for p in proplets), *(store.op_insert_task(t) for t in tasks))
    counts = [1, keep, 2 * PRUNE_CHUNK + 50]

    def stamp(n: int) -> datetime:  # out of order, and repeated: ties go to the later row
        return now + timedelta(seconds=rng.randrange(n // 3 + 1))

    earlier = _reopened(store)
    await earlier.open()
    try:
        await write(earlier, *(earlier.op_proplet_metrics(PropletMetrics(p.id, "", stamp(n), {"i": k}, {}))
                               for p, n in zip(proplets, counts, strict=True) for k in range(n)))
        await write(earlier, *(earlier.op_task_metrics(TaskMetrics(t.id, "p0", stamp(n), {"i": k}))
                               for t, n in zip(tasks, counts, strict=True) for k in range(n)))
    finally:
        await earlier.close()
    tables = (("proplet_metrics", "proplet_id"), ("task_metrics", "task_id"))
    before = {t: await _samples(store, t, c) for t, c in tables}

    assert await store.prune_metrics(keep) == 2 * (counts[2] - keep)
    for table, column in tables:
        assert {o: set(ids) for o, ids in _newest(await _samples(store, table, column), 99).items()} \
            == _newest(before[table], keep)
    assert await store.prune_metrics(keep) == 0

    later = now + timedelta(hours=1)
    await write(store, *(store.op_proplet_metrics(PropletMetrics("p0", "", later, {}, {})) for _ in range(2)),
                *(store.op_task_metrics(TaskMetrics(tasks[2].id, "p0", later, {})) for _ in range(2)))
    before = {t: await _samples(store, t, c) for t, c in tables}
    assert await store.prune_metrics(keep) == 2  # p0 has 3 samples now; the task two more than kept
    for table, column in tables:
        assert {o: set(ids) for o, ids in _newest(await _samples(store, table, column), 99).items()} \
            == _newest(before[table], keep)
    assert [m.timestamp for m in (await store.list_task_metrics(tasks[2].id, 0, 10)).items][:2] == [later, later]


async def test_pruning_many_owners_keeps_each_ones_newest_across_statements(store: Store) -> None:
    """Owners below, at and just above `keep`, and ones with more to delete than a statement takes
    (PRUNE_CHUNK) between them, samples sharing timestamps (the newer row id stays): a statement
    that reaches PRUNE_CHUNK in the middle of its owners leaves no owner before that one half done,
    nor one after it untouched."""
    from core.store.base import PRUNE_CHUNK

    keep, now, rng = 4, datetime.now(UTC), random.Random(61206)
    pattern = [0, 1, keep - 1, keep, keep + 1, PRUNE_CHUNK + keep + 3, 2, 2 * PRUNE_CHUNK + keep + 1, keep + 7]
    counts = pattern * 3
    proplets = [Proplet(id=f"p{i:02d}", name="n", created_at=now) for i in range(len(counts))]
    tasks = [make_task() for _ in counts]
    await write(store, *(store.op_upsert_proplet(p, now) for p in proplets), *(store.op_insert_task(t) for t in tasks))
    # Three samples a second, written out of order: ids do not follow timestamps, and ties are many.
    proplet_samples = [(p.id, k) for p, n in zip(proplets, counts, strict=True) for k in range(n)]
    task_samples = [(t.id, k) for t, n in zip(tasks, counts, strict=True) for k in range(n)]
    rng.shuffle(proplet_samples)
    rng.shuffle(task_samples)
    await write(store, *(store.op_proplet_metrics(PropletMetrics(o, "", now + timedelta(seconds=k // 3), {}, {}))
                         for o, k in proplet_samples),
                *(store.op_task_metrics(TaskMetrics(o, "p00", now + timedelta(seconds=k // 3), {}))
                  for o, k in task_samples))
    tables = (("proplet_metrics", "proplet_id"), ("task_metrics", "task_id"))
    before = {t: await _samples(store, t, c) for t, c in tables}

    assert await store.prune_metrics(keep) == 2 * sum(max(0, n - keep) for n in counts)
    for table, column in tables:
        assert {o: set(ids) for o, ids in _newest(await _samples(store, table, column), 10**6).items()} \
            == _newest(before[table], keep)


async def test_a_first_prune_on_postgres_takes_a_statement_for_many_owners_not_one_each(
        pg_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A store's first prune looks at every task and proplet. A statement per owner was a round trip
    each, 3.6 s for 20,200 owners (benchmarks/bench_prune.py); every statement sent to the server,
    BEGIN and COMMIT included, is counted here."""
    from core.store import postgres

    sent: list[str] = []
    init_connection = postgres._init_connection

    async def counted(conn: object) -> None:
        await init_connection(conn)  # type: ignore[arg-type]
        conn.add_query_logger(lambda record: sent.append(record.query))  # type: ignore[attr-defined]

    monkeypatch.setattr(postgres, "_init_connection", counted)
    store = PostgresStore(pg_dsn)
    await store.open()
    try:
        await migrate(store)
        owners, now = 1000, datetime.now(UTC)
        tasks = [make_task() for _ in range(owners)]
        await write(store, *(store.op_insert_task(t) for t in tasks))
        await write(store, *(store.op_task_metrics(TaskMetrics(t.id, "p", now + timedelta(seconds=k), {}))
                             for t in tasks[::10] for k in range(3)))
        sent.clear()
        assert await store.prune_metrics(2) == owners // 10
        assert len(sent) < owners // 10, f"{len(sent)} statements for {owners} owners"
        assert all(p.total == 2 for p in [await store.list_task_metrics(t.id, 0, 5) for t in tasks[::10]])
    finally:
        await store.close()


async def test_a_write_during_a_long_prune_on_sqlite_waits_for_a_slice_of_it_not_all(tmp_path: Path) -> None:
    """A prune on SQLite holds the one connection only a slice at a time, so a write that comes during
    a long prune is committed before the prune ends. (One DELETE over the whole table held it, and
    with it every write, for the whole prune: 1.3 s with 1.2 million samples.)"""
    store = SqliteStore(tmp_path / "store.db")
    await store.open()
    try:
        await migrate(store)
        task, now = make_task(), datetime.now(UTC)
        await write(store, store.op_insert_task(task))
        assert await store.prune_metrics(1) == 0  # the first, which also reads every proplet and task
        await write(store, *(store.op_task_metrics(TaskMetrics(task.id, "p", now + timedelta(seconds=i), {}))
                             for i in range(40_000)))
        pruning = asyncio.create_task(store.prune_metrics(1))
        await asyncio.sleep(0)  # the prune runs to its first statement, which holds the connection
        assert store._lock.locked()
        await write(store, store.op_task_event(TaskEvent(task.id, TaskState.PENDING, now)))
        assert not pruning.done(), "the write waited for the whole prune"
        assert await pruning == 39_999
        assert [e.state for e in await store.task_events(task.id)] == [TaskState.PENDING]
    finally:
        await store.close()


async def test_a_slow_migration_or_upkeep_statement_on_postgres_is_not_a_lost_connection(
        pg_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Migrations and pruning may run longer than ANSWER_TIMEOUT (the hot path's bound for a silent
    connection): a migration that took longer was killed and reported as "no answer within 10 s; the
    connection was given up as lost", and could never be applied. They get MAINTENANCE_TIMEOUT; one
    that takes longer still is cancelled by the server and said so."""
    from core.store import postgres
    from core.store.base import StoreError, StoreUnavailable
    from core.store.migrate import Migration

    monkeypatch.setattr(postgres, "ANSWER_TIMEOUT", 0.5)
    monkeypatch.setattr(postgres, "MAINTENANCE_TIMEOUT", 2.0)
    store = PostgresStore(pg_dsn)
    await store.open()
    try:
        await migrate(store)
        assert await store.apply_migration(Migration("9001_slow_index_build", 9001, "SELECT pg_sleep(1.0);"))
        assert "9001_slow_index_build" in await store.applied_migrations()

        with pytest.raises(StoreError) as raised:
            async with store.maintenance("pruning metrics") as conn:
                await conn.execute("SELECT pg_sleep(4)")
        message = str(raised.value)
        assert message.startswith("Pruning metrics did not finish within 2 s on the database"), message
        assert "statement timeout" in message and "lost" not in message, message
        assert not isinstance(raised.value, StoreUnavailable)
        async with store.connection() as conn:  # the store works on
            assert (await conn.fetch("SELECT 1"))[0][0] == 1

        # The hot path keeps its bound: a statement that gets no answer is given up, and says so (in a
        # transaction on a pool's connection it said "cannot call Connection.is_closed()").
        with pytest.raises(StoreUnavailable, match=r"no answer within 0\.5 s"):
            async with store.connection() as conn:
                await conn.fetch("SELECT pg_sleep(2)")
        with pytest.raises(postgres.NoAnswer, match=r"no answer within 0\.5 s; the connection was given up as lost"):
            async with store.transaction() as conn:
                await conn.execute("SELECT pg_sleep(2)")
    finally:
        await store.close()


async def _plan(store: Store, sql: str, params: tuple[object, ...]) -> str:
    async with store.connection() as conn:
        rows = await conn.fetch("EXPLAIN QUERY PLAN " + sql, params)
    return "\n".join(str(tuple(row)) for row in rows)


async def _task_indexes(store: Store) -> set[str]:
    sql = ("SELECT indexname FROM pg_indexes WHERE tablename = 'tasks'" if store.dialect == "postgres" else
           "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'tasks'")
    async with store.connection() as conn:
        return {row[0] for row in await conn.fetch(sql)}


async def test_a_page_of_one_state_or_one_proplet_is_read_in_order_from_an_index(store: Store) -> None:
    # With an index on the state alone, every task of that state was read and sorted for each page:
    # 0.27 s for a page of 100 among 300,000 completed tasks on SQLite, 1.1 ms with migration 7.
    start = datetime.now(UTC)
    tasks = [make_task(state=TaskState.FAILED if i % 20 == 0 else TaskState.COMPLETED, proplet_id=f"p{i % 4}",
                       created_at=start + timedelta(seconds=i)) for i in range(2000)]
    await write(store, *(store.op_insert_task(t) for t in tasks))
    page = await store.list_tasks(states=[TaskState.COMPLETED], limit=100, offset=10)
    completed = [t.id for t in reversed(tasks) if t.state is TaskState.COMPLETED]
    assert page.total == 1900 and [t.id for t in page.items] == completed[10:110]
    page = await store.list_tasks(proplet_id="p1", limit=5)
    assert [t.id for t in page.items] == [t.id for t in reversed(tasks) if t.proplet_id == "p1"][:5]

    indexes = await _task_indexes(store)
    assert {"idx_tasks_state_newest", "idx_tasks_proplet_newest"} <= indexes
    assert not {"idx_tasks_state", "idx_tasks_proplet_id"} & indexes  # replaced: one index to update, not two
    if store.dialect == "sqlite":  # PostgreSQL weighs its choices by the table's statistics
        for column, value in (("state", int(TaskState.COMPLETED)), ("proplet_id", "p1")):
            sql = f"SELECT id FROM tasks WHERE {column} = ? ORDER BY created_at DESC, id LIMIT ? OFFSET ?"
            plan = await _plan(store, sql, (value, 100, 10))
            assert f"idx_tasks_{'state' if column == 'state' else 'proplet'}_newest" in plan, plan
            assert "TEMP B-TREE" not in plan, plan
