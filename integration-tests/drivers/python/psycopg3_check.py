"""psycopg 3 check of pgrouter's real-driver matrix.

Covers: server-side parameter binding, prepare=True and auto-prepare (prepare_threshold,
prepared_max eviction -> DEALLOCATE), pipeline mode (with an error and recovery), COPY
FROM/TO in text and binary format, binary results, transactions, savepoints and rollback,
session settings (TimeZone, search_path, application_name) that must persist across
transactions (and be undone by ROLLBACK), errors with SQLSTATE, cancel and statement_timeout,
server-side cursors, 12 concurrent clients, and a schema change under a prepared statement.
Prints one deterministic line per check; any failure raises (traceback, non-zero exit).
"""
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import psycopg
from psycopg import errors

DSN = os.environ["PGROUTER_DSN"]
WORKERS = 12
ZONES = ["UTC", "Europe/Paris", "Asia/Tokyo", "America/New_York", "Australia/Sydney", "Asia/Kolkata"]
ITEM = "insert into items (id, name) values (%s, %s)"


def out(msg):
    print(f"psycopg3: {msg}", flush=True)


def connect(**kw):
    return psycopg.connect(DSN, **kw)


def setup():
    with connect() as conn:
        conn.execute("create table items (id int primary key, name text not null unique, price numeric(10,2),"
                     " created timestamptz)")
        conn.execute("create table copied (id int primary key, label text, amount numeric)")
        conn.execute("create schema other")
        conn.execute("create table other.marker (v text)")
        conn.execute("insert into other.marker values ('from other')")
        for w in range(WORKERS):
            conn.execute(f"create schema w{w}")
            conn.execute(f"create table w{w}.t (n int primary key, note text)")
        base = datetime(2024, 1, 1, tzinfo=timezone.utc)
        cur = conn.cursor()
        for i in range(1, 51):  # server-side binding, one execute per row
            cur.execute("insert into items values (%s, %s, %s, %s)",
                        (i, f"item{i:03d}", Decimal(i) * Decimal("1.25"), base + timedelta(hours=i)))
        conn.commit()
        count, total, latest = cur.execute("select count(*), sum(price), max(created) from items where id > %s",
                                           (10,)).fetchone()
        assert (count, total) == (40, sum(Decimal(i) * Decimal("1.25") for i in range(11, 51))), (count, total)
        names = [r[0] for r in cur.execute("select name from items where name like %s order by id desc limit %s",
                                           ("item04%", 3))]
        assert latest == base + timedelta(hours=50) and names == ["item049", "item048", "item047"]
        out(f"binding count={count} sum={total} latest={latest.astimezone(timezone.utc).isoformat()} names={names}")


def prepared():
    conns = [connect(autocommit=True) for _ in range(3)]
    total = 0
    for i in range(300):  # round robin over clients: the server connections keep changing
        row = conns[i % 3].execute("select name, price from items where id = %s", (i % 50 + 1,), prepare=True).fetchone()
        assert row[0] == f"item{i % 50 + 1:03d}", row
        total += row[1]
    for c in conns:
        c.prepare_threshold = 0
    for i in range(240):
        val = conns[i % 3].execute("select %s::int * 3 + length(%s::text)", (i, "ab" * (i % 4))).fetchone()[0]
        assert val == i * 3 + 2 * (i % 4), (i, val)
    conns[0].prepared_max = 3  # more statements than the cache: psycopg DEALLOCATEs and prepares again
    acc = 0
    for rnd in range(4):
        for k in range(8):
            for _ in range(2):
                acc += sum(c.execute(f"select {k} + %s::int /* q{k} */", (rnd,)).fetchone()[0] for c in conns[:2])
    assert acc == sum(4 * (k + rnd) for rnd in range(4) for k in range(8)), acc
    for c in conns:
        c.close()
    out(f"prepare=True executions=300 price_sum={total}; threshold=0 executions=240; prepared_max=3 acc={acc}")


def pipeline():
    with connect(autocommit=True) as conn:
        with conn.pipeline() as p:
            curs = [conn.execute("select %s::int + 1", (i,)) for i in range(50)]
            p.sync()
            vals = [c.fetchone()[0] for c in curs]
            curs = []
            for i in range(60):  # prepared statements inside a pipeline, several syncs
                curs.append(conn.execute("select %s::int * 7", (i,), prepare=True))
                if i % 20 == 19:
                    p.sync()
        pvals = [c.fetchone()[0] for c in curs]
        assert vals == list(range(1, 51)) and pvals == [i * 7 for i in range(60)]
        conn.cursor().executemany(ITEM, [(3000 + i, f"many{i}") for i in range(40)])  # runs in a pipeline
        many = conn.execute("delete from items where id >= 3000").rowcount
        try:
            with conn.pipeline():
                conn.execute(ITEM, (1000, "pipe-a"))
                conn.execute(ITEM, (1001, "item001"))
                conn.execute(ITEM, (1002, "pipe-c"))
            raise AssertionError("duplicate accepted in pipeline")
        except errors.UniqueViolation as e:
            state = e.sqlstate
        left = conn.execute("select count(*) from items where id >= 1000").fetchone()[0]
        with conn.pipeline():  # recovery: pipeline usable again, with a transaction inside
            with conn.transaction():
                conn.execute(ITEM, (1003, "pipe-d"))
                cur = conn.execute("select count(*) from items where id >= 1000")
            total = cur.fetchone()[0]
        conn.execute("delete from items where id >= 1000")
        out(f"pipeline values={sum(vals)} prepared={sum(pvals)} executemany={many} error={state} "
            f"kept_after_error={left} after_recovery={total}")


def copy():
    with connect() as conn:
        cur = conn.cursor()
        with cur.copy("copy copied (id, label, amount) from stdin") as cp:
            for i in range(1000):
                cp.write_row((i, f"row {i}\twith tab", Decimal(i) / 4))
        with cur.copy("copy copied (id, label, amount) from stdin (format binary)") as cp:
            cp.set_types(["int4", "text", "numeric"])
            for i in range(1000, 1500):
                cp.write_row((i, f"bin {i}", Decimal(i) / 8))
        conn.commit()
        n, s, ln = cur.execute("select count(*), sum(amount), sum(length(label)) from copied").fetchone()
        query = "copy (select id, label, amount from copied where id % 100 = 7 order by id) to stdout"
        with cur.copy(query) as cp:
            rows = list(cp.rows())
        with cur.copy(query + " (format binary)") as cp:
            cp.set_types(["int4", "text", "numeric"])
            brows = list(cp.rows())
        conn.commit()
        assert rows[0] == ("7", "row 7\twith tab", "1.75") and [tuple(map(str, r)) for r in brows] == rows
        out(f"copy in rows={n} sum={s} label_chars={ln}; out text={len(rows)} binary={len(brows)} last={brows[-1]}")
        try:  # duplicate key inside COPY: the whole COPY fails, the connection stays usable
            with cur.copy("copy copied (id, label) from stdin") as cp:
                for i in range(5000, 5010):
                    cp.write_row((i, "x"))
                cp.write_row((3, "dup"))
            raise AssertionError("duplicate accepted in COPY")
        except errors.UniqueViolation as e:
            conn.rollback()
            dup = e.sqlstate
        n = conn.execute("select count(*) from copied where id >= 5000").fetchone()[0]
        conn.commit()
        out(f"copy duplicate sqlstate={dup} rows_kept={n}")


def binary_and_transactions():
    with connect() as conn:
        cur = conn.cursor(binary=True)
        row = cur.execute("select %s::int8, %s::numeric, %s::text, %s::bytea, %s::float8, %s::bool,"
                          " '2024-02-29 13:45:00+00'::timestamptz, array[1,2,3]::int4[], null::text,"
                          " '{\"a\": [1, 2]}'::jsonb, '6b1c8b36-94a9-4bd5-8d0f-2b4e3b7e5c11'::uuid",
                          (2**40, Decimal("12345.678"), "héllo", b"\x00\x01\xff", 0.5, True)).fetchone()
        assert row[:6] == (2**40, Decimal("12345.678"), "héllo", b"\x00\x01\xff", 0.5, True), row
        assert row[6] == datetime(2024, 2, 29, 13, 45, tzinfo=timezone.utc) and row[7:10] == ([1, 2, 3], None, {"a": [1, 2]})
        assert str(row[10]) == "6b1c8b36-94a9-4bd5-8d0f-2b4e3b7e5c11"
        rs = cur.execute("select id, price from items where id <= %s order by id", (5,)).fetchall()
        conn.commit()
        out(f"binary results types=11 items={len(rs)} sum={sum(r[1] for r in rs)}")
        with conn.transaction():
            conn.execute(ITEM, (2000, "tx-keep"))
            try:
                with conn.transaction():  # savepoint
                    conn.execute(ITEM, (2001, "tx-inner"))
                    conn.execute(ITEM, (2002, "item002"))
            except errors.UniqueViolation as e:
                inner = e.sqlstate
            with conn.transaction():
                conn.execute(ITEM, (2003, "tx-inner-ok"))
                raise psycopg.Rollback()
        with conn.transaction():
            conn.execute(ITEM, (2004, "tx-rolled"))
            raise psycopg.Rollback()
        conn.execute(ITEM, (2005, "tx-explicit"))
        conn.rollback()
        names = [r[0] for r in conn.execute("select name from items where id >= 2000 order by id")]
        conn.commit()
        try:
            conn.execute(ITEM, (1, "dup"))
        except errors.UniqueViolation as e:
            err = f"{e.sqlstate} {e.diag.constraint_name}"
            conn.rollback()
        assert names == ["tx-keep"] and conn.execute("select 41 + 1").fetchone()[0] == 42, names
        conn.commit()
        out(f"transactions kept={names} savepoint error={inner} unique error={err}")


def session_settings():
    noise = connect(autocommit=True)  # another client using the pool in between
    with connect() as conn:
        conn.execute("set TimeZone to 'Asia/Tokyo'")
        conn.execute("set search_path to other, public")
        conn.execute("set application_name to 'psycopg3-check'")
        conn.commit()
        seen = set()
        for i in range(10):
            noise.execute("select pg_sleep(0)")
            seen.add(conn.execute("select current_setting('TimeZone'), current_setting('search_path'),"
                                  " current_setting('application_name'), (select v from marker),"
                                  " '2024-06-01 12:00:00+00'::timestamptz::text").fetchone())
            conn.commit()
        assert len(seen) == 1, seen
        out(f"session persisted {seen.pop()}")
        conn.execute("set TimeZone to 'America/New_York'")
        conn.rollback()  # SET inside a rolled back transaction is undone
        with conn.transaction():
            conn.execute("set local TimeZone to 'Europe/Paris'")
            local = conn.execute("show TimeZone").fetchone()[0]
        after = conn.execute("show TimeZone").fetchone()[0]
        conn.execute("reset search_path")
        conn.commit()
        sp = conn.execute("show search_path").fetchone()[0]
        conn.commit()
        out(f"session rollback/local tz_local={local} tz_after={after} search_path_reset={sp}")
    noise.close()


def cancel_and_cursors():
    with connect(autocommit=True) as conn:
        timer = threading.Timer(0.3, conn.cancel_safe)
        timer.start()
        try:
            conn.execute("select pg_sleep(10)")
            raise AssertionError("not cancelled")
        except errors.QueryCanceled as e:
            cancelled = e.sqlstate
        timer.join()
        conn.execute("set statement_timeout = '200ms'")
        try:
            conn.execute("select pg_sleep(5)")
            raise AssertionError("no statement timeout")
        except errors.QueryCanceled as e:
            timed_out = e.sqlstate
        conn.execute("reset statement_timeout")
        with conn.transaction(), conn.cursor(name="scan") as cur:  # server-side cursor: DECLARE + FETCH
            cur.itersize = 16
            ids = [r[0] for r in cur.execute("select id, name from items where id > %s order by id", (5,))]
        with conn.transaction():  # an empty transaction
            pass
        out(f"cancel sqlstate={cancelled} statement_timeout sqlstate={timed_out} named cursor rows={len(ids)}")


def worker(w):
    zone = ZONES[w % len(ZONES)]
    with connect(application_name=f"worker-{w}") as conn:
        conn.execute(f"set search_path to w{w}")
        conn.execute(f"set TimeZone to '{zone}'")
        conn.commit()
        conn.prepare_threshold = 1
        for tx in range(6):
            for k in range(5):
                conn.execute("insert into t (n, note) values (%s, %s)", (tx * 5 + k, f"w{w}-{tx * 5 + k}"))
            settings = conn.execute("select current_setting('TimeZone'), current_setting('search_path'),"
                                    " current_setting('application_name')").fetchone()
            assert settings == (zone, f"w{w}", f"worker-{w}"), (w, tx, settings)
            ts = conn.execute("select '2024-06-01 12:00:00+00'::timestamptz").fetchone()[0]
            assert str(ts.tzinfo) == zone and conn.info.parameter_status("TimeZone") == zone, (w, ts)
            cnt, notes = conn.execute("select count(*), string_agg(note, ',' order by n) from t where n <= %s",
                                      (tx * 5 + 4,), prepare=True).fetchone()
            assert cnt == tx * 5 + 5 and notes.split(",")[-1] == f"w{w}-{tx * 5 + 4}", (w, cnt, notes)
            conn.commit()
        total = conn.execute("select sum(n) from t").fetchone()[0]
        conn.commit()
        return f"worker {w:02d} tz={zone} rows=30 sum={total} local_noon={ts.isoformat()}"


def schema_change():
    """ALTER TABLE under a prepared statement (psycopg then DEALLOCATEs all); tenant schemas."""
    with connect(autocommit=True) as conn:
        conn.execute("create table evolving (x int)")
        conn.execute("insert into evolving values (1)")
        before = [conn.execute("select * from evolving where x = %s", (1,), prepare=True).fetchone() for _ in range(3)]
        conn.execute("alter table evolving add column y text default 'y'")
        after = [conn.execute("select * from evolving where x = %s", (1,), prepare=True).fetchone() for _ in range(3)]
        out(f"schema change prepared before={before[0]} after={after}")
        # schema-per-tenant: the same statement text resolves to differently shaped tables
        conn.execute("create schema ta; create table ta.t (x int); insert into ta.t values (1)")
        conn.execute("create schema tb; create table tb.t (x int, y text); insert into tb.t values (2, 'b')")
    tenants = [connect(autocommit=True, options=f"-c search_path={s}") for s in ("ta", "tb")]
    rows = [[c.execute("select * from t where x > %s", (0,), prepare=True).fetchall() for c in tenants]
            for _ in range(3)]
    for c in tenants:
        c.close()
    out(f"schema per tenant prepared rows={rows}")


def main():
    setup()
    prepared()
    pipeline()
    copy()
    binary_and_transactions()
    session_settings()
    cancel_and_cursors()
    with ThreadPoolExecutor(WORKERS) as ex:
        for line in sorted(ex.map(worker, range(WORKERS))):
            out(line)
    schema_change()
    out("ok")


if __name__ == "__main__":
    main()
