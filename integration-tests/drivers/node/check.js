// node-postgres (pg 8.16.3) check for pgrouter's real-driver matrix.
//
// Run with `node check.js`; the connection comes from PGHOST/PGPORT/PGUSER/PGPASSWORD/
// PGDATABASE, which pg reads by itself. The database must start empty. Covers:
//  - pg.Pool (max 12) with 12 concurrent workers, each checking its own results;
//  - named prepared statements ({name, text, values}) run many times from many clients,
//    the same name + text on every client, the same name with a different text per client,
//    a name first parsed inside a rolled-back transaction, a name whose execution fails,
//    a name whose Parse fails and is then reused with valid text;
//  - unnamed parameterized queries, BEGIN/COMMIT/ROLLBACK, a unique violation (err.code)
//    and an error inside a transaction (25P02 afterwards), each followed by further use;
//  - type round trips (int, bigint as string, numeric, text, bytea, timestamptz, json,
//    jsonb, arrays, NULL, boolean);
//  - session state on a checked-out client: SET TimeZone / search_path / application_name,
//    a custom setting (SET app.worker), SET SESSION CHARACTERISTICS, SET undone by ROLLBACK,
//    SET LOCAL, RESET ALL, startup parameters (application_name, options -c); and that no
//    client ever sees settings another client left behind;
//  - 50000-row results (concurrently), rowMode 'array', and a portal read in chunks
//    (Query `rows`: Execute with a row limit + Flush, Sync only at the end).
// Prints one deterministic line per check. A failed phase prints "phase X FAILED" and its
// stack on stderr, the other phases still run, and the exit code is 1.
'use strict';
const assert = require('assert/strict');
const { Pool, Client, Query } = require('pg');

const WORKERS = 12;
const pool = new Pool({ max: WORKERS });
// Work "in between" comes from a separate pool, so a worker holding a client of `pool` never
// waits for another client of `pool` (which could deadlock when all of them are held).
const other = new Pool({ max: 2 });
for (const p of [pool, other]) p.on('error', (err) => { console.error('idle client error:', err); process.exitCode = 1; });
// A hang (a reply that never comes) must fail the run rather than stall it.
setTimeout(() => { console.error('node check: still running after 55 s, giving up'); process.exit(1); }, 55000).unref();
const out = (line) => console.log('node: ' + line);
const range = (n) => Array.from({ length: n }, (_, i) => i);

// Like Promise.all, but waits for every worker before reporting the first failure, so no
// worker of a failed phase is still running when the next phase starts.
async function all(promises) {
  const settled = await Promise.allSettled(promises);
  const failed = settled.find((r) => r.status === 'rejected');
  if (failed) throw failed.reason;
  return settled.map((r) => r.value);
}

async function withClient(fn) {
  const c = await pool.connect();
  try {
    const result = await fn(c);
    c.release();
    return result;
  } catch (err) { c.release(err); throw err; } // a failed client is discarded, never reused
}

async function expectError(promise, code) {
  try { await promise; } catch (err) { assert.equal(err.code, code, `expected ${code}, got ${err.code}: ${err.message}`); return err; }
  assert.fail(`expected error ${code}, the statement succeeded`);
}

async function setup() {
  await pool.query(`
    CREATE TABLE items (id serial PRIMARY KEY, worker int NOT NULL, k text NOT NULL UNIQUE, v int NOT NULL);
    CREATE SCHEMA alt;
    CREATE TABLE public.probe (which text); INSERT INTO public.probe VALUES ('public');
    CREATE TABLE alt.probe (which text); INSERT INTO alt.probe VALUES ('alt');`);
  out('setup done');
}

// Named statements from 12 concurrent workers; each round checks out a (possibly different)
// pooled client, so every client meets every statement name.
const INS = 'INSERT INTO items (worker, k, v) VALUES ($1, $2, $3) RETURNING v';
const WSUM = 'SELECT count(*)::int AS n, coalesce(sum(v), 0)::int AS s FROM items WHERE worker = $1';
async function namedWorker(w) {
  let runs = 0, sum = 0;
  for (let round = 0; round < 5; round++) {
    await withClient(async (c) => {
      for (let i = 0; i < 4; i++) {
        const v = w * 100 + runs;
        const ins = await c.query({ name: 'ins_item', text: INS, values: [w, `w${w}-${runs}`, v] });
        assert.equal(ins.rows[0].v, v);
        runs++; sum += v;
        const r = await c.query({ name: 'worker_sum', text: WSUM, values: [w] });
        assert.deepEqual(r.rows[0], { n: runs, s: sum });
      }
    });
    const d = await pool.query({ name: 'double', text: 'SELECT $1::int * 2 AS d', values: [w + round] });
    assert.equal(d.rows[0].d, 2 * (w + round));
  }
  return `named worker ${w} runs=${runs} sum=${sum}`;
}

// One dedicated client per worker: same statement name, different text on each client.
async function sameNameWorker(w) {
  const c = new Client();
  await c.connect();
  try {
    let acc = 0;
    for (let i = 0; i < 15; i++) {
      const r = await c.query({ name: 'per_client', text: `SELECT $1::int + ${w} AS r, 'w${w}' AS tag`, values: [i] });
      assert.deepEqual(r.rows[0], { r: i + w, tag: `w${w}` });
      acc += r.rows[0].r;
    }
    return `same-name worker ${w} acc=${acc}`;
  } finally { await c.end(); }
}

// Transactions and errors on one checked-out client per worker.
async function txWorker(w) {
  return withClient(async (c) => {
    await c.query('BEGIN');
    await c.query(INS, [w, `tx${w}-commit`, 1]);
    await c.query('COMMIT');
    await c.query('BEGIN');
    await c.query(INS, [w, `tx${w}-rollback`, 2]);
    const inside = await c.query("SELECT count(*)::int AS n FROM items WHERE k LIKE $1", [`tx${w}-%`]);
    assert.equal(inside.rows[0].n, 2);
    await c.query('ROLLBACK');
    const after = await c.query("SELECT count(*)::int AS n FROM items WHERE k LIKE $1", [`tx${w}-%`]);
    assert.equal(after.rows[0].n, 1);
    // unique violation outside a transaction, then the client keeps working
    const dup = await expectError(c.query(INS, [w, `tx${w}-commit`, 3]), '23505');
    assert.equal(dup.constraint, 'items_k_key');
    // the same through the named statement (parsed already on this client or not)
    await expectError(c.query({ name: 'ins_item', text: INS, values: [w, `tx${w}-commit`, 4] }), '23505');
    await c.query({ name: 'ins_item', text: INS, values: [w, `tx${w}-named`, 5] });
    // error inside a transaction: the rest of it fails with 25P02 until ROLLBACK
    await c.query('BEGIN');
    await c.query(INS, [w, `tx${w}-lost`, 6]);
    await expectError(c.query(INS, [w, `tx${w}-commit`, 7]), '23505');
    await expectError(c.query('SELECT 1'), '25P02');
    await c.query('ROLLBACK');
    // a name first parsed inside a rolled-back transaction survives it (statements are not transactional)
    await c.query('BEGIN');
    const t1 = await c.query({ name: `in_tx_${w}`, text: "SELECT $1::text || '!' AS t", values: [`a${w}`] });
    await c.query('ROLLBACK');
    const t2 = await c.query({ name: `in_tx_${w}`, text: "SELECT $1::text || '!' AS t", values: [`b${w}`] });
    assert.deepEqual([t1.rows[0].t, t2.rows[0].t], [`a${w}!`, `b${w}!`]);
    // a Parse that fails leaves the name free for a valid statement
    await expectError(c.query({ name: `bad_${w}`, text: 'SELEC 1' }), '42601');
    const ok = await c.query({ name: `bad_${w}`, text: 'SELECT 1 AS one' });
    assert.equal(ok.rows[0].one, 1);
    const fin = await c.query("SELECT string_agg(k || '=' || v, ',' ORDER BY k) AS s FROM items WHERE k LIKE $1", [`tx${w}-%`]);
    return `tx worker ${w} ${fin.rows[0].s} dup=${dup.code}`;
  });
}

async function types() {
  const ts = new Date(Date.UTC(2024, 1, 29, 23, 59, 58, 123));
  const sql = `SELECT $1::int AS i, $2::bigint AS b, $3::numeric AS n, $4::text AS t, $5::bytea AS by,
    $6::timestamptz AS ts, $7::json AS j, $8::jsonb AS jb, $9::int[] AS ia, $10::text[] AS ta,
    $11::int AS nul, $12::boolean AS bo, $13::float8 AS f,
    9223372036854775807::bigint AS bmax, '-0.000001'::numeric AS nsmall, '\\x00ff10'::bytea AS blit,
    to_char($6::timestamptz AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.MS') AS tsutc,
    ARRAY[[1,2],[3,4]] AS a2, ARRAY[true,false,NULL] AS ba, '{"k":[1,null,"x"]}'::jsonb -> 'k' AS jpath`;
  const values = [-42, '9007199254740993', '12345.678901234567890', 'héllo ✓ "q" \\ \'', Buffer.from([0, 1, 2, 255, 254]),
    ts, { b: [1, 2], a: 'x' }, { z: true, a: 'x' }, [1, -2, 3], ['a', 'b c', null, '"q"'], null, true, 0.5];
  const lines = [];
  for (const mode of ['unnamed', 'named', 'named']) {
    const r = await pool.query(mode === 'named' ? { name: 'types', text: sql, values } : { text: sql, values });
    const row = r.rows[0];
    assert.equal(row.i, -42); assert.equal(row.b, '9007199254740993'); assert.equal(row.n, '12345.678901234567890');
    assert.equal(row.t, values[3]); assert.equal(row.by.toString('hex'), '000102fffe');
    assert.equal(row.ts.getTime(), ts.getTime()); assert.equal(row.tsutc, '2024-02-29 23:59:58.123');
    assert.deepEqual(row.j, values[6]); assert.deepEqual(row.jb, { a: 'x', z: true });
    assert.deepEqual(row.ia, [1, -2, 3]); assert.deepEqual(row.ta, ['a', 'b c', null, '"q"']);
    assert.equal(row.nul, null); assert.equal(row.bo, true); assert.equal(row.f, 0.5);
    assert.equal(row.bmax, '9223372036854775807'); assert.equal(row.nsmall, '-0.000001');
    assert.equal(row.blit.toString('hex'), '00ff10'); assert.deepEqual(row.a2, [[1, 2], [3, 4]]);
    assert.deepEqual(row.ba, [true, false, null]); assert.deepEqual(row.jpath, [1, null, 'x']);
    lines.push(`types ${mode} i=${row.i} b=${row.b} n=${row.n} by=${row.by.toString('hex')} ts=${row.ts.toISOString()} ` +
      `j=${JSON.stringify(row.j)} jb=${JSON.stringify(row.jb)} ia=${JSON.stringify(row.ia)} ta=${JSON.stringify(row.ta)} ` +
      `nul=${row.nul} bo=${row.bo} f=${row.f} a2=${JSON.stringify(row.a2)} fields=${r.fields.map((f) => f.name).join(',')}`);
  }
  lines.forEach(out);
}

// Session settings on a checked-out client, with 10 clients doing it at once.
const ZONES = ['UTC', 'America/New_York', 'Asia/Tokyo', 'Europe/Berlin', 'Australia/Adelaide',
  'America/Sao_Paulo', 'Asia/Kolkata', 'Pacific/Auckland', 'Africa/Cairo', 'America/Anchorage'];
const PROBE = `SELECT current_setting('TimeZone') AS tz, current_setting('application_name') AS app,
  (SELECT which FROM probe) AS which, to_char('2024-01-15 12:00:00+00'::timestamptz, 'YYYY-MM-DD HH24:MI TZH:TZM') AS local`;
async function setWorker(w, defaults) {
  return withClient(async (c) => {
    const tz = ZONES[w], app = `drv-node-${w}`, which = w % 2 ? 'alt' : 'public';
    await c.query(`SET TimeZone TO '${tz}'`);
    await c.query(`SET application_name = '${app}'`);
    if (w % 2) await c.query('SET search_path TO alt, public');
    let local;
    for (let i = 0; i < 6; i++) {
      const r = i % 2 ? await c.query({ name: 'probe', text: PROBE }) : await c.query(PROBE + ' WHERE $1::int >= 0', [i]);
      assert.deepEqual([r.rows[0].tz, r.rows[0].app, r.rows[0].which], [tz, app, which]);
      local = r.rows[0].local;
      const s = await c.query({ name: 'show_tz', text: 'SHOW TimeZone' });
      assert.equal(s.rows[0].TimeZone, tz);
      if (i === 2) { // SET inside a rolled-back transaction is undone
        await c.query('BEGIN');
        await c.query("SET TimeZone TO 'Asia/Kathmandu'");
        assert.equal((await c.query('SHOW TimeZone')).rows[0].TimeZone, 'Asia/Kathmandu');
        await c.query('ROLLBACK');
      }
      if (i === 4) { // SET LOCAL lasts only for its transaction
        await c.query('BEGIN');
        await c.query("SET LOCAL search_path TO pg_catalog");
        assert.equal((await c.query('SHOW search_path')).rows[0].search_path, 'pg_catalog');
        await c.query('COMMIT');
      }
    }
    await c.query('RESET ALL');
    const r = await c.query(PROBE);
    assert.deepEqual([r.rows[0].tz, r.rows[0].app, r.rows[0].which], [defaults.tz, defaults.app, 'public']);
    return `set worker ${w} tz=${tz} app=${app} which=${which} local=${local} reset=ok`;
  });
}

async function longResults() {
  const one = await pool.query('SELECT n FROM generate_series(1, 50000) AS n');
  const sum = one.rows.reduce((a, r) => a + r.n, 0);
  assert.equal(one.rows.length, 50000); assert.equal(sum, 50000 * 50001 / 2);
  out(`long result rows=${one.rows.length} sum=${sum}`);
  const res = await all(range(10).map(async (w) => {
    const n = 50000 + w;
    const r = await pool.query({ text: 'SELECT n, md5(n::text) AS h FROM generate_series(1, $1::int) AS n', values: [n], rowMode: 'array' });
    assert.equal(r.rows.length, n);
    assert.equal(r.rows.reduce((a, row) => a + row[0], 0), n * (n + 1) / 2);
    return `long worker ${w} rows=${r.rows.length} last=${r.rows[n - 1][1]}`;
  }));
  res.forEach(out);
  const big = await pool.query("SELECT repeat('x', 3000000) AS s");
  assert.equal(big.rows[0].s.length, 3000000);
  out(`big value length=${big.rows[0].s.length}`);
}

async function rowModeArray() {
  for (const name of [undefined, 'arr', 'arr']) {
    const r = await pool.query({ name, text: 'SELECT $1::int AS a, $2::text AS b, NULL::int AS c, k FROM items WHERE worker = $1 ORDER BY k LIMIT 3', values: [3, 'x'], rowMode: 'array' });
    assert.ok(Array.isArray(r.rows[0]));
    out(`rowMode array ${name || 'unnamed'} fields=${r.fields.map((f) => f.name).join(',')} rows=${JSON.stringify(r.rows)}`);
  }
}

function chunked(client, config) {
  return new Promise((resolve, reject) => {
    const q = new Query(config);
    let count = 0, sum = 0;
    q.on('row', (row) => { count++; sum += row.n; });
    q.on('error', reject);
    q.on('end', () => resolve(`rows=${count} sum=${sum}`));
    client.query(q);
  });
}

async function portalChunks() {
  const res = await all(range(10).map((w) => withClient(async (c) => {
    const a = await chunked(c, { text: 'SELECT n FROM generate_series(1, $1::int) AS n', values: [1000 + w], rows: 97 });
    const after = await c.query('SELECT 1 AS one');
    assert.equal(after.rows[0].one, 1);
    return `portal worker ${w} ${a}`;
  })));
  res.forEach(out);
}

// A session setting made on a checked-out client must hold for its later transactions while
// other clients run theirs (and so move it between server connections).
async function stickySetting(label, setSql, probeSql, want) {
  const res = await all(range(10).map((w) => withClient(async (c) => {
    await c.query(setSql(w));
    const seen = [];
    for (let i = 0; i < 8; i++) {
      const r = await c.query({ text: probeSql, rowMode: 'array' });
      seen.push(r.rows[0][0]);
      if (i % 3 === 2) await other.query('SELECT count(*) FROM items'); // another client in between
    }
    assert.deepEqual(seen, Array(8).fill(want(w)), `${label} worker ${w}`);
    await c.query('RESET ALL');
    return `${label} worker ${w} kept ${want(w)}`;
  })));
  res.forEach(out);
}

// Settings are checked again on fresh work: nothing set by an earlier client may show up.
const DEFAULTS = `SELECT current_setting('TimeZone'), current_setting('search_path'), current_setting('application_name'),
  current_setting('default_transaction_isolation'), coalesce(nullif(current_setting('app.worker', true), ''), '-')`;
async function noLeaks(defaults) {
  const res = await all(range(10).map(async (w) => {
    for (let i = 0; i < 5; i++) {
      const r = await pool.query({ text: DEFAULTS, rowMode: 'array' });
      assert.deepEqual(r.rows[0], defaults, `worker ${w} sees settings left behind`);
    }
  }));
  out(`no settings left behind: ${res.length} workers saw ${defaults.join(' | ')}`);
}

// Startup parameters are settings too: they must hold on every server connection used.
async function startupParams() {
  const p = new Pool({ max: 10, application_name: 'drv-node-startup', options: '-c search_path=alt,public -c TimeZone=Asia/Tokyo' });
  try {
    const want = ['drv-node-startup', 'Asia/Tokyo', 'alt'];
    await all(range(10).map(async (w) => {
      for (let i = 0; i < 4; i++) {
        const r = await p.query({ text: "SELECT current_setting('application_name'), current_setting('TimeZone'), (SELECT which FROM probe)", rowMode: 'array' });
        assert.deepEqual(r.rows[0], want, `startup worker ${w}`);
        await other.query('SELECT 1'); // another client in between
      }
    }));
    out(`startup parameters held on 10 clients: ${want.join(' | ')}`);
  } finally { await p.end(); }
}

let failures = 0;
async function phase(name, fn) {
  try {
    await fn();
  } catch (err) {
    failures++;
    console.log(`node: phase ${name} FAILED`);
    console.error(`node: phase ${name} failed:`, err && err.stack ? err.stack : err);
  }
}

async function main() {
  await setup();
  const defaults = (await pool.query({ text: DEFAULTS, rowMode: 'array' })).rows[0];
  await phase('named statements', async () => {
    (await all(range(WORKERS).map(namedWorker))).forEach(out);
    const tot = await pool.query('SELECT count(*)::int AS n, sum(v)::int AS s FROM items');
    out(`named statements total rows=${tot.rows[0].n} sum=${tot.rows[0].s}`);
  });
  await phase('same name', async () => (await all(range(10).map(sameNameWorker))).forEach(out));
  await phase('transactions', async () => (await all(range(WORKERS).map(txWorker))).forEach(out));
  await phase('types', types);
  await phase('session settings', async () => {
    const d = await pool.query("SELECT current_setting('TimeZone') AS tz, current_setting('application_name') AS app");
    (await all(range(10).map((w) => setWorker(w, d.rows[0])))).forEach(out);
  });
  await phase('custom setting', () => stickySetting('custom setting', (w) => `SET app.worker = 'w${w}'`,
    "SELECT current_setting('app.worker', true)", (w) => `w${w}`));
  const levels = ['serializable', 'repeatable read', 'read committed'];
  await phase('session characteristics', () => stickySetting('session characteristics',
    (w) => `SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL ${levels[w % 3].toUpperCase()}`,
    "SELECT current_setting('transaction_isolation')", (w) => levels[w % 3]));
  await phase('startup parameters', startupParams);
  await phase('no leaks', () => noLeaks(defaults));
  await phase('long results', longResults);
  await phase('rowMode array', rowModeArray);
  await phase('portal chunks', portalChunks);
  const fin = await pool.query('SELECT count(*)::int AS n, sum(v)::int AS s FROM items');
  out(`final items rows=${fin.rows[0].n} sum=${fin.rows[0].s}`);
  if (failures) throw new Error(`${failures} phase(s) failed`);
}

main().then(() => out('all checks passed'), (err) => {
  console.error('node check failed:', err && err.stack ? err.stack : err);
  process.exitCode = 1;
}).finally(() => Promise.all([pool.end(), other.end()]));
