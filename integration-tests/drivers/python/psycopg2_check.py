"""psycopg2 check of pgrouter's real-driver matrix.

Covers: execute with (client-side bound) parameters, executemany, execute_batch and
execute_values (psycopg2.extras), copy_expert in and out, named server-side cursors with
itersize inside a transaction, autocommit on/off, rollback, errors with SQLSTATE (pgcode),
set_session and SET (including a custom setting) persisting across transactions, notices,
large values, and 12 concurrent clients. Prints one deterministic line per check.
"""
import hashlib
import io
import os
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal

import psycopg2
import psycopg2.errors
import psycopg2.extensions as ext
import psycopg2.extras

DSN = os.environ["PGROUTER_DSN"]
WORKERS = 12


def out(msg):
    print(f"psycopg2: {msg}", flush=True)


def connect():
    return psycopg2.connect(DSN)


def setup():
    conn = connect()
    with conn, conn.cursor() as cur:
        cur.execute("create table accounts (id int primary key, owner text not null unique, balance numeric(12,2))")
        cur.execute("create table events (id serial primary key, account int references accounts, kind text, amount int)")
        cur.execute("create table blobs (id int primary key, data bytea)")
        cur.execute("create table work (worker int, n int, tag text, primary key (worker, n))")
    conn.close()
    out("setup done")


def params_and_batches(conn):
    with conn.cursor() as cur:
        for i in range(1, 21):
            cur.execute("insert into accounts values (%s, %s, %s)", (i, f"owner{i:02d}", Decimal(i * 100)))
        cur.executemany("insert into events (account, kind, amount) values (%s, %s, %s)",
                        [(i % 20 + 1, "deposit", i) for i in range(100)])
        psycopg2.extras.execute_batch(cur, "insert into events (account, kind, amount) values (%s, %s, %s)",
                                      [(i % 20 + 1, "fee", -(i % 7)) for i in range(200)], page_size=50)
        psycopg2.extras.execute_values(cur, "insert into events (account, kind, amount) values %s",
                                       [(i % 20 + 1, "bonus", i % 11) for i in range(300)], page_size=64)
        conn.commit()
        cur.execute("select kind, count(*), sum(amount) from events group by kind order by kind")
        rows = cur.fetchall()
        cur.execute("select owner, balance from accounts where id = any(%s) and owner like %s order by id",
                    ([3, 5, 7], "owner0%"))
        owners = cur.fetchall()
        conn.commit()
    assert [r[1] for r in rows] == [300, 100, 200], rows
    assert owners == [("owner03", Decimal("300.00")), ("owner05", Decimal("500.00")), ("owner07", Decimal("700.00"))]
    out("events " + " ".join(f"{k}:{n}:{s}" for k, n, s in rows) + f" owners={len(owners)}")


def copy(conn):
    data = io.StringIO("".join(f"{1000 + i}\t{'x' * (i % 50)}\\\\n\n" for i in range(2000)))
    with conn.cursor() as cur:
        cur.execute("create table copytest (id int primary key, payload text)")
        cur.copy_expert("copy copytest (id, payload) from stdin", data)
        conn.commit()
        buf = io.StringIO()
        cur.copy_expert("copy (select id, payload from copytest where id % 10 = 0 order by id) to stdout with csv header", buf)
        conn.commit()
        lines = buf.getvalue().splitlines()
        assert lines[0] == "id,payload" and len(lines) == 201, lines[:2]
        digest = hashlib.sha256(buf.getvalue().encode()).hexdigest()[:16]
        out(f"copy_expert in=2000 out_lines={len(lines)} sha={digest}")
        try:
            cur.copy_expert("copy copytest (id, payload) from stdin", io.StringIO("5\ta\n6\tb\n1000\tdup\n"))
            raise AssertionError("duplicate accepted in COPY")
        except psycopg2.errors.UniqueViolation as e:
            conn.rollback()
            out(f"copy duplicate pgcode={e.pgcode}")
        try:
            cur.copy_expert("copy copytest (id, payload) from stdin", io.StringIO("7\ta\nnot-a-number\tb\n"))
            raise AssertionError("bad row accepted in COPY")
        except psycopg2.errors.InvalidTextRepresentation as e:
            conn.rollback()
            out(f"copy bad input pgcode={e.pgcode}")
        cur.execute("select count(*), sum(length(payload)) from copytest")
        out("copy after errors count=%s chars=%s" % cur.fetchone())
        conn.commit()


def named_cursors(conn):
    total = fetched = 0
    with conn.cursor(name="big_scan") as cur:
        cur.itersize = 333
        cur.execute("select g, md5(g::text) from generate_series(1, 5000) g order by g")
        for g, h in cur:
            assert len(h) == 32
            total += g
            fetched += 1
    with conn.cursor(name="scroller", scrollable=True) as cur:
        cur.execute("select id, owner from accounts order by id")
        first = cur.fetchmany(3)
        cur.scroll(10, mode="absolute")
        tenth = cur.fetchone()
        cur.scroll(-2)
        back = cur.fetchone()
    conn.commit()
    assert (fetched, total) == (5000, 5000 * 5001 // 2)
    assert [r[0] for r in first] == [1, 2, 3] and tenth[0] == 11 and back[0] == 10, (first, tenth, back)
    out(f"named cursor rows={fetched} sum={total} scroll={tenth[1]},{back[1]}")


def transactions(conn):
    with conn.cursor() as cur:
        cur.execute("update accounts set balance = balance - 50 where id = 1")
        cur.execute("update accounts set balance = balance + 50 where id = 2")
        conn.rollback()
        cur.execute("select balance from accounts where id in (1, 2) order by id")
        assert [r[0] for r in cur.fetchall()] == [Decimal(100), Decimal(200)]
        conn.commit()
        try:
            cur.execute("insert into accounts values (99, 'owner01', 0)")
            raise AssertionError("duplicate accepted")
        except psycopg2.errors.UniqueViolation as e:
            unique = f"{e.pgcode} {e.diag.constraint_name}"
            conn.rollback()
        try:
            cur.execute("insert into events (account, kind, amount) values (12345, 'orphan', 1)")
            raise AssertionError("orphan accepted")
        except psycopg2.IntegrityError as e:
            fk = e.pgcode
            conn.rollback()
        cur.execute("savepoint s1")
        cur.execute("insert into accounts values (50, 'owner50', 5)")
        cur.execute("rollback to savepoint s1")
        cur.execute("insert into accounts values (51, 'owner51', 5)")
        conn.commit()
        cur.execute("select string_agg(owner, ',' order by id) from accounts where id >= 50")
        kept = cur.fetchone()[0]
        conn.commit()
        out(f"transactions unique={unique} fk={fk} savepoint kept={kept}")

        conn.autocommit = True
        cur.execute("insert into accounts values (60, 'auto60', 1)")
        try:
            cur.execute("insert into accounts values (60, 'auto60b', 1)")
        except psycopg2.errors.UniqueViolation as e:
            auto_err = e.pgcode
        cur.execute("select count(*) from accounts where id = 60")
        auto_count = cur.fetchone()[0]
        assert conn.get_transaction_status() == ext.TRANSACTION_STATUS_IDLE
        conn.autocommit = False
        out(f"autocommit insert kept={auto_count} error={auto_err}")


def session(conn):
    conn.notices.clear()
    with conn.cursor() as cur:
        cur.execute("set search_path to side, public")
        cur.execute("set myapp.tenant = 'tenant-7'")
        conn.commit()
        conn.set_session(isolation_level="REPEATABLE READ", readonly=True)
        cur.execute("show transaction_isolation")
        iso = cur.fetchone()[0]
        cur.execute("show transaction_read_only")
        ro = cur.fetchone()[0]
        try:
            cur.execute("insert into accounts values (70, 'ro', 1)")
        except psycopg2.errors.ReadOnlySqlTransaction as e:
            ro_err = e.pgcode
        conn.rollback()
        conn.set_session(isolation_level="DEFAULT", readonly="DEFAULT")
        vals = set()
        for _ in range(8):
            cur.execute("select current_setting('search_path'), current_setting('myapp.tenant'),"
                        " current_setting('transaction_isolation')")
            vals.add(cur.fetchone())
            conn.commit()
        assert len(vals) == 1, vals
        cur.execute("do $$ begin raise notice 'hello from %', current_setting('myapp.tenant'); end $$")
        conn.commit()
        notices = [n.strip() for n in conn.notices]
        out(f"session iso={iso} ro={ro} ro_err={ro_err} persisted={sorted(vals)[0]} notices={notices}")
        blob = bytes(range(256)) * 8192  # 2 MiB
        cur.execute("insert into blobs values (1, %s)", (psycopg2.Binary(blob),))
        cur.execute("select data, length(data), md5(data) from blobs where id = 1")
        back, ln, md5 = cur.fetchone()
        conn.commit()
        assert bytes(back) == blob and md5 == hashlib.md5(blob).hexdigest()
        out(f"large bytea length={ln} md5={md5}")


def worker(w):
    conn = connect()
    try:
        with conn.cursor() as cur:
            cur.execute("set application_name = %s", (f"p2-worker-{w}",))
            cur.execute("set myapp.worker = %s", (str(w),))
            cur.execute("set statement_timeout = %s", (f"{10 + w}s",))
            conn.commit()
            for tx in range(5):
                psycopg2.extras.execute_values(cur, "insert into work (worker, n, tag) values %s",
                                               [(w, tx * 10 + k, f"w{w}") for k in range(10)])
                cur.execute("select current_setting('application_name'), current_setting('myapp.worker'),"
                            " current_setting('statement_timeout'), count(*) from work where worker = %s", (w,))
                an, mw, st, cnt = cur.fetchone()
                assert (an, mw, st, cnt) == (f"p2-worker-{w}", str(w), f"{10 + w}s", (tx + 1) * 10), (w, an, mw, st, cnt)
                conn.commit()
            with conn.cursor(name=f"scan_{w}") as nc:
                nc.itersize = 7
                nc.execute("select n from work where worker = %s order by n", (w,))
                ns = [r[0] for r in nc]
            conn.commit()
            assert ns == list(range(50))
        return f"worker {w:02d} rows={len(ns)} sum={sum(ns)}"
    finally:
        conn.close()


def main():
    setup()
    conn = connect()
    params_and_batches(conn)
    copy(conn)
    named_cursors(conn)
    transactions(conn)
    session(conn)
    conn.close()
    with ThreadPoolExecutor(WORKERS) as ex:
        for line in sorted(ex.map(worker, range(WORKERS))):
            out(line)
    out("ok")


if __name__ == "__main__":
    main()
