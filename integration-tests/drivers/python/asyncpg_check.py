"""asyncpg check of pgrouter's real-driver matrix.

asyncpg prepares every query as a named statement and caches it per connection (statement
cache on, the default), which is the hard case for a transaction-pooling proxy. Covers:
create_pool, conn.prepare() reused across transactions, fetch/fetchrow/fetchval/executemany,
cursors, copy_records_to_table and copy_from_query, transactions and savepoints with
rollback, errors with SQLSTATE, type round trips, query timeout (cancel), a small statement
cache, SET that sticks while a connection is held, 12 concurrent tasks on a pool of up to 20
connections, and a schema change under a cached statement.

`--load`: 50 tasks x 200 prepared fetches over a 20-connection pool, every result checked.
"""
import asyncio
import io
import json
import os
import sys
import uuid
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal

import asyncpg

DSN = os.environ["PGROUTER_DSN"]
WORKERS = 12


def out(msg):
    print(f"asyncpg: {msg}", flush=True)


async def init_conn(conn):
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


async def setup(pool):
    await pool.execute("""
        create table users (id int primary key, email text not null unique, score numeric(10, 2));
        create table readings (sensor int, at timestamptz, value float8, raw bytea, primary key (sensor, at));
        create table jobs (worker int, n int, note text, primary key (worker, n));
    """)
    out("setup done")


async def round_trips(conn):
    values = [
        ("int4", 42), ("int8", 2**40), ("numeric", Decimal("12345.6789")), ("text", "héllo ☃"),
        ("bytea", b"\x00\xff" * 1000), ("timestamptz", datetime(2024, 2, 29, 12, 30, tzinfo=timezone.utc)),
        ("date", date(1999, 12, 31)), ("jsonb", {"a": [1, 2, {"b": None}]}), ("int4[]", [1, 2, None, 4]),
        ("text[]", ["x", "y z", ""]), ("uuid", uuid.UUID("6b1c8b36-94a9-4bd5-8d0f-2b4e3b7e5c11")),
        ("bool", True), ("float8", 0.125), ("interval", timedelta(days=3, seconds=7)), ("text", None),
    ]
    sql = "select " + ", ".join(f"${i + 1}::{t}" for i, (t, _) in enumerate(values))
    row = await conn.fetchrow(sql, *[v for _, v in values])
    for (t, v), got in zip(values, row):
        assert got == v, (t, v, got)
    js = await conn.fetchval("select $1::json", '{"k": 1}')
    out(f"round trip types={len(values)} json={js}")


async def basics(pool):
    async with pool.acquire() as conn:
        await conn.executemany("insert into users values ($1, $2, $3)",
                               [(i, f"user{i:03d}@example.com", Decimal(i) / 3) for i in range(1, 101)])
        rows = await conn.fetch("select id, email from users where id % $1 = 0 order by id", 17)
        row = await conn.fetchrow("select count(*), sum(score) from users where email like $1", "user0%")
        val = await conn.fetchval("select max(id) from users")
        out(f"executemany+fetch rows={[r['id'] for r in rows]} count={row[0]} sum={row[1]} max={val}")
        await round_trips(conn)

        stmt = await conn.prepare("select email, score from users where id = $1")
        total = Decimal(0)
        for i in range(1, 201):  # each call is its own transaction: the server connection may change
            rec = await stmt.fetchrow(i % 100 + 1)
            assert rec["email"] == f"user{i % 100 + 1:03d}@example.com"
            total += rec["score"]
        attrs = [a.name for a in stmt.get_attributes()]
        params = [t.name for t in stmt.get_parameters()]
        out(f"prepared fetches=200 score_sum={total} attrs={attrs} params={params}")

        async with conn.transaction():
            seen = [r["id"] async for r in conn.cursor("select id from users where id > $1 order by id", 60,
                                                        prefetch=7)]
            cur = await conn.cursor("select id from users order by id desc")
            page = await cur.fetch(5)
            await cur.forward(10)
            after = await cur.fetchrow()
        assert seen == list(range(61, 101))
        out(f"cursor rows={len(seen)} page={[r[0] for r in page]} after_forward={after[0]}")


async def copying(pool):
    base = datetime(2024, 1, 1, tzinfo=timezone.utc)
    recs = [(s, base + timedelta(minutes=m), s * 1.5 + m / 4, bytes([s, m % 256])) for s in range(5) for m in range(400)]
    async with pool.acquire() as conn:
        res = await conn.copy_records_to_table("readings", records=recs, columns=["sensor", "at", "value", "raw"])
        agg = await conn.fetchrow("select count(*), sum(value), max(at) from readings")
        buf = io.BytesIO()
        res2 = await conn.copy_from_query("select sensor, value from readings where at < $1 order by sensor, at",
                                          base + timedelta(minutes=3), output=buf, format="csv")
        try:
            await conn.copy_records_to_table("readings", records=recs[:3], columns=["sensor", "at", "value", "raw"])
            raise AssertionError("duplicate accepted in COPY")
        except asyncpg.UniqueViolationError as e:
            dup = e.sqlstate
        n = await conn.fetchval("select count(*) from readings")
    assert agg[0] == 2000 and n == 2000
    out(f"copy in={res} sum={agg[1]} max={agg[2].isoformat()} out={res2} csv={buf.getvalue().decode().split()}")
    out(f"copy duplicate sqlstate={dup} rows_after={n}")


async def transactions(pool):
    async with pool.acquire() as conn:
        async with conn.transaction():
            await conn.execute("insert into users values (500, 'tx-keep', 1)")
            try:
                async with conn.transaction():  # savepoint
                    await conn.execute("insert into users values (501, 'tx-inner', 1)")
                    await conn.execute("insert into users values (502, 'user001@example.com', 1)")
            except asyncpg.UniqueViolationError as e:
                inner = e.sqlstate
        try:
            async with conn.transaction(isolation="serializable"):
                await conn.execute("insert into users values (503, 'tx-gone', 1)")
                raise RuntimeError("abort")
        except RuntimeError:
            pass
        tr = conn.transaction()
        await tr.start()
        await conn.execute("update users set score = 0")
        await tr.rollback()
        kept = await conn.fetch("select email from users where id >= 500 order by id")
        zero = await conn.fetchval("select count(*) from users where score = 0")
        try:
            await conn.execute("insert into users values (1, 'dup', 0)")
        except asyncpg.UniqueViolationError as e:
            err = f"{e.sqlstate} {e.constraint_name}"
        try:
            await conn.fetchval("select 1 / $1::int", 0)
        except asyncpg.DivisionByZeroError as e:
            div = e.sqlstate
        assert await conn.fetchval("select 40 + $1::int", 2) == 42
        out(f"transactions kept={[r[0] for r in kept]} zero_scores={zero} inner={inner} unique={err} div={div}")


async def timeouts_and_cache():
    conn = await asyncpg.connect(DSN, statement_cache_size=3)  # a small cache: statements get closed
    try:
        acc = 0
        for rnd in range(4):
            for k in range(10):
                acc += await conn.fetchval(f"select {k} + $1::int", rnd)
        assert acc == sum(k + rnd for rnd in range(4) for k in range(10))
        try:
            await conn.fetch("select pg_sleep(5)", timeout=0.3)  # asyncpg cancels the query
            raise AssertionError("no timeout")
        except asyncio.TimeoutError:
            pass
        after = await conn.fetchval("select 6 * $1::int", 7)
    finally:
        await conn.close()
    out(f"statement_cache_size=3 acc={acc} timeout then {after}")


async def schema_change(pool):
    """ALTER TABLE under a cached statement: asyncpg re-prepares it after the server's error."""
    async with pool.acquire() as conn:
        await conn.execute("create table evolving (x int); insert into evolving values (1)")
        before = [tuple(r) for r in await conn.fetch("select * from evolving")]
        await conn.execute("alter table evolving add column y text default 'y'")
        after = [[tuple(r) for r in await conn.fetch("select * from evolving")] for _ in range(3)]
    out(f"schema change cached statement before={before} after={after}")


async def worker(pool, w):
    async with pool.acquire() as conn:
        await conn.execute(f"set application_name = 'apg-{w}'")
        await conn.execute("select set_config('work_mem', $1, false)", f"{1000 + w * 10}kB")
        stmt = await conn.prepare("select count(*), coalesce(sum(n), 0) from jobs where worker = $1")
        for tx in range(6):
            async with conn.transaction():
                await conn.executemany("insert into jobs values ($1, $2, $3)",
                                       [(w, tx * 5 + k, f"w{w}") for k in range(5)])
                app, wm = await conn.fetchrow("select current_setting('application_name'), current_setting('work_mem')")
                assert (app, wm) == (f"apg-{w}", f"{1000 + w * 10}kB"), (w, app, wm)
            cnt, s = await stmt.fetchrow(w)
            assert cnt == (tx + 1) * 5, (w, cnt)
            await asyncio.sleep(0)
        doubled = [await conn.fetchval("select $1::int * 2", i) for i in range(20)]
        assert doubled == [i * 2 for i in range(20)]
    return f"worker {w:02d} jobs={cnt} sum={s}"


async def main():
    pool = await asyncpg.create_pool(DSN, min_size=2, max_size=20, init=init_conn)
    try:
        await setup(pool)
        await basics(pool)
        await copying(pool)
        await transactions(pool)
        await timeouts_and_cache()
        results = await asyncio.gather(*(worker(pool, w) for w in range(WORKERS)))
        for line in sorted(results):
            out(line)
        total = await pool.fetchrow("select count(*), count(distinct worker) from jobs")
        out(f"jobs total={total[0]} workers={total[1]}")
        await schema_change(pool)
    finally:
        await pool.close()
    out("ok")


async def load(tasks=50, per_task=200, chunk=20):
    pool = await asyncpg.create_pool(DSN, min_size=1, max_size=20)
    problems = []

    async def task(t):
        fetches = 0
        for c in range(per_task // chunk):
            async with pool.acquire() as conn:
                stmt = await conn.prepare("select $1::int * 3, $2::text || '!'")
                for k in range(chunk):
                    i = t * per_task + c * chunk + k
                    try:
                        if k % 2:
                            row = await conn.fetchrow("select $1::int * 2, $2::text || 'x'", i, f"t{t}")
                            want = (i * 2, f"t{t}x")
                        else:
                            row = await stmt.fetchrow(i, f"s{i}")
                            want = (i * 3, f"s{i}!")
                        fetches += 1
                        if tuple(row) != want:
                            problems.append(("wrong", t, i, tuple(row), want))
                    except Exception as e:  # noqa: BLE001 - counted and reported
                        problems.append(("error", t, i, type(e).__name__, str(e)))
        return fetches

    try:
        counts = await asyncio.gather(*(task(t) for t in range(tasks)))
    finally:
        await pool.close()
    errors = sum(1 for p in problems if p[0] == "error")
    wrong = sum(1 for p in problems if p[0] == "wrong")
    print(f"load: fetches={sum(counts)} errors={errors} wrong={wrong}", flush=True)
    for p in problems[:20]:
        print(f"load problem: {p}", file=sys.stderr)
    if problems or sum(counts) != tasks * per_task:
        sys.exit(1)


if __name__ == "__main__":
    asyncio.run(load() if "--load" in sys.argv[1:] else main())
