// pgjdbc (42.5.x) check for pgrouter's real-driver matrix.
//   javac -d /tmp/jout -cp /usr/share/java/postgresql.jar JdbcCheck.java
//   java -cp /tmp/jout:/usr/share/java/postgresql.jar JdbcCheck
// Connects with PGHOST, PGPORT, PGDATABASE, PGUSER, PGPASSWORD to an empty database. Covers:
// PreparedStatements past prepareThreshold (unnamed, then server-side S_n with binary results),
// with prepareThreshold=1 and with no statement cache (Parse/Close of S_n on every use);
// multi-statement execute with an error; batches of hundreds of rows with and without
// reWriteBatchedInserts, a failing row (BatchUpdateException, rollback, reuse), autocommit
// on/off; getGeneratedKeys; types (int, long, BigDecimal, String, byte[], Timestamp in UTC,
// boolean, createArrayOf, NULLs) read by column index; setFetchSize (portal read in chunks);
// CopyManager copyIn/copyOut; savepoints and autosave=always; setQueryTimeout (CancelRequest);
// a plan invalidated by ALTER TABLE (pgjdbc re-prepares it); session state (SET, setSchema,
// setReadOnly, setTransactionIsolation); 10-12 threads, each with its own Connection.
// Each phase has its own connection(s); a failed phase is reported (stdout line + stack trace
// on stderr) and the rest still run; exit status 1 if any failed.
import java.io.StringReader;
import java.io.StringWriter;
import java.math.BigDecimal;
import java.sql.*;
import java.time.Instant;
import java.time.OffsetDateTime;
import java.util.*;
import java.util.concurrent.*;
import java.util.stream.Collectors;
import org.postgresql.PGConnection;
import org.postgresql.PGStatement;
import org.postgresql.copy.CopyManager;

public class JdbcCheck {
    static final Instant TS = Instant.parse("2024-02-29T23:59:58.123456Z");
    static int failures = 0;

    interface Body { void run(Connection c) throws Exception; }
    interface Work { String run(int t) throws Exception; }

    public static void main(String[] args) {
        Thread watchdog = new Thread(() -> { // a reply that never comes must fail the run, not stall it
            try { Thread.sleep(55_000); } catch (InterruptedException e) { return; }
            System.err.println("jdbc: still running after 55 s, giving up");
            Runtime.getRuntime().halt(1);
        });
        watchdog.setDaemon(true);
        watchdog.start();
        phase("setup", "", JdbcCheck::setup);
        phase("prepare threshold", "", c -> out(threshold(c, "default") + " " + threshold(c, "default-again")));
        phase("prepareThreshold=1", "prepareThreshold=1", c -> out(threshold(c, "prepareThreshold=1")));
        phase("statement cache 0", "preparedStatementCacheQueries=0&prepareThreshold=1", c -> out(threshold(c, "cache=0")));
        phase("multi-statement", "", JdbcCheck::multiStatement);
        phase("batches", "", c -> out(batches(c, "plain", 100)));
        phase("rewritten batches", "reWriteBatchedInserts=true", c -> out(batches(c, "rewrite", 200)));
        phase("generated keys", "", JdbcCheck::generatedKeys);
        phase("fetchSize and autocommit batch", "", JdbcCheck::cursorAndAutocommitBatch);
        phase("copy", "", JdbcCheck::copy);
        phase("savepoints", "autosave=always", JdbcCheck::savepoints);
        phase("query timeout", "", JdbcCheck::queryTimeout);
        phase("stale plan", "", JdbcCheck::stalePlan);
        phase("session state", "", c -> concurrent("session", 10, JdbcCheck::sessionWorker));
        phase("transaction isolation", "", c -> concurrent("isolation", 10, JdbcCheck::isolationWorker));
        phase("workers", "", c -> concurrent("worker", 12, JdbcCheck::worker));
        phase("final", "", c -> out("final items=" + query1(c, "SELECT count(*) || ' sum=' || sum(v) FROM items")
                + " copy_t=" + query1(c, "SELECT count(*) || ' sum=' || sum(a) FROM copy_t")));
        if (failures > 0) {
            System.err.println("jdbc: " + failures + " phase(s) failed");
            System.exit(1);
        }
        out("all checks passed");
        System.exit(0);
    }

    static void phase(String name, String params, Body body) {
        try (Connection c = connect(params)) {
            body.run(c);
        } catch (Throwable t) {
            failures++;
            out("phase " + name + " FAILED");
            System.err.println("jdbc: phase " + name + " failed:");
            t.printStackTrace();
        }
    }

    static Connection connect(String params) throws SQLException {
        Map<String, String> env = System.getenv();
        String url = "jdbc:postgresql://" + env.get("PGHOST") + ":" + env.get("PGPORT") + "/" + env.get("PGDATABASE")
                + (params.isEmpty() ? "" : "?" + params);
        return DriverManager.getConnection(url, env.get("PGUSER"), env.get("PGPASSWORD"));
    }

    static void out(String s) { System.out.println("jdbc: " + s); }
    static Calendar utc() { return Calendar.getInstance(TimeZone.getTimeZone("UTC")); }
    static String hex(byte[] b) { return HexFormat.of().formatHex(b); }

    static void eq(Object want, Object got, String what) {
        if (!Objects.equals(want, got)) throw new AssertionError(what + ": want <" + want + "> got <" + got + ">");
    }

    static void exec(Connection c, String sql) throws SQLException {
        try (Statement s = c.createStatement()) { s.execute(sql); }
    }

    static String query1(Connection c, String sql) throws SQLException {
        try (Statement s = c.createStatement(); ResultSet rs = s.executeQuery(sql)) {
            if (!rs.next()) throw new AssertionError("no row from " + sql);
            return rs.getString(1);
        }
    }

    // Runs work(0..n-1) on n threads at once; once all are done, prints their results in thread
    // order, or throws the first failure.
    static void concurrent(String label, int n, Work work) throws Exception {
        ExecutorService pool = Executors.newFixedThreadPool(n);
        List<Future<String>> results = new ArrayList<>();
        for (int t = 0; t < n; t++) {
            final int id = t;
            results.add(pool.submit(() -> work.run(id)));
        }
        pool.shutdown();
        if (!pool.awaitTermination(50, TimeUnit.SECONDS)) throw new TimeoutException(label + " threads still running");
        List<String> lines = new ArrayList<>();
        for (Future<String> f : results) lines.add(label + " " + f.get());
        lines.forEach(JdbcCheck::out);
    }

    static void setup(Connection c) throws SQLException {
        exec(c, "CREATE TABLE items (id bigserial PRIMARY KEY, grp int NOT NULL, k text NOT NULL UNIQUE, v int NOT NULL);"
                + "CREATE TABLE gk (id serial PRIMARY KEY, name text);"
                + "CREATE TABLE copy_t (a int PRIMARY KEY, b text); CREATE TABLE wide (a int); INSERT INTO wide VALUES (1);"
                + "CREATE SCHEMA alt; CREATE TABLE alt.probe (which text); INSERT INTO alt.probe VALUES ('alt');"
                + "CREATE TABLE public.probe (which text); INSERT INTO public.probe VALUES ('public')");
        out("setup done");
    }

    // One PreparedStatement run 12 times with every type, read by column index; records when
    // pgjdbc switches to a server-side statement (and binary results).
    static String threshold(Connection c, String label) throws SQLException {
        StringBuilder flags = new StringBuilder();
        String last = null;
        try (PreparedStatement ps = c.prepareStatement("SELECT ?::int + 1, ?::bigint * 2, ?::numeric * 2, ?::text || '!', ?::bytea,"
                + " ?::timestamptz, ?::boolean, ?::float8, ?::int, ?::int[], ?::text[], ?::timestamptz, ?::bigint")) {
            for (int i = 0; i < 12; i++) {
                BigDecimal d = new BigDecimal("-123456789012345.654321").add(BigDecimal.valueOf(i));
                byte[] b = {(byte) i, (byte) 0xff, 0};
                ps.setInt(1, i); ps.setLong(2, (1L << 40) + i); ps.setBigDecimal(3, d); ps.setString(4, "héllo ✓ \"q\" \\ '" + i);
                ps.setBytes(5, b); ps.setTimestamp(6, Timestamp.from(TS.plusSeconds(i)), utc()); ps.setBoolean(7, i % 2 == 0);
                ps.setDouble(8, i / 8.0); ps.setNull(9, Types.INTEGER);
                ps.setArray(10, c.createArrayOf("int4", new Integer[] {i, null, -3}));
                ps.setArray(11, c.createArrayOf("text", new String[] {"a" + i, "b c", null, "{}"}));
                ps.setNull(12, Types.TIMESTAMP_WITH_TIMEZONE); ps.setObject(13, Long.MAX_VALUE - i);
                try (ResultSet rs = ps.executeQuery()) {
                    if (!rs.next()) throw new AssertionError("no row");
                    eq(i + 1, rs.getInt(1), "int"); eq(((1L << 40) + i) * 2, rs.getLong(2), "bigint");
                    eq(d.multiply(BigDecimal.valueOf(2)), rs.getBigDecimal(3), "numeric");
                    eq("héllo ✓ \"q\" \\ '" + i + "!", rs.getString(4), "text"); eq(hex(b), hex(rs.getBytes(5)), "bytea");
                    eq(TS.plusSeconds(i), rs.getTimestamp(6, utc()).toInstant(), "timestamptz");
                    eq(TS.plusSeconds(i), rs.getObject(6, OffsetDateTime.class).toInstant(), "OffsetDateTime");
                    eq(i % 2 == 0, rs.getBoolean(7), "boolean"); eq(i / 8.0, rs.getDouble(8), "float8");
                    eq(0, rs.getInt(9), "null int"); eq(true, rs.wasNull(), "wasNull");
                    eq(Arrays.asList(i, null, -3), Arrays.asList((Integer[]) rs.getArray(10).getArray()), "int[]");
                    eq(Arrays.asList("a" + i, "b c", null, "{}"), Arrays.asList((String[]) rs.getArray(11).getArray()), "text[]");
                    eq(null, rs.getTimestamp(12), "null timestamptz"); eq(Long.MAX_VALUE - i, rs.getObject(13), "long object");
                    last = rs.getBigDecimal(3).toPlainString() + "," + rs.getTimestamp(6, utc()).toInstant() + "," + rs.getString(4);
                    if (rs.next()) throw new AssertionError("extra row");
                }
                flags.append(ps.unwrap(PGStatement.class).isUseServerPrepare() ? 'S' : 'u');
            }
        }
        return "threshold " + label + " runs=12 server=" + flags + " last=" + last;
    }

    // Several statements in one execute (one pipeline, one implicit transaction); an error inside.
    static void multiStatement(Connection c) throws SQLException {
        exec(c, "INSERT INTO items (grp, k, v) VALUES (1, 'm1', 1); INSERT INTO items (grp, k, v) VALUES (1, 'm2', 2)");
        try {
            exec(c, "INSERT INTO items (grp, k, v) VALUES (1, 'm3', 3); INSERT INTO items (grp, k, v) VALUES (1, 'm1', 4);"
                    + " INSERT INTO items (grp, k, v) VALUES (1, 'm5', 5)");
            throw new AssertionError("duplicate accepted");
        } catch (SQLException e) {
            eq("23505", e.getSQLState(), "multi-statement error");
        }
        out("multi-statement rows=" + query1(c, "SELECT string_agg(k, ',' ORDER BY k) FROM items WHERE grp = 1")
                + " then=" + query1(c, "SELECT 42"));
    }

    static String summary(int[] counts) {
        return "n=" + counts.length + " counts="
                + Arrays.stream(counts).boxed().collect(Collectors.groupingBy(x -> x, TreeMap::new, Collectors.counting()));
    }

    static void addRows(PreparedStatement ps, int grp, String prefix, int n, int failAt, String dup) throws SQLException {
        for (int i = 0; i < n; i++) {
            ps.setInt(1, grp); ps.setString(2, i == failAt ? dup : prefix + i); ps.setInt(3, i); ps.addBatch();
        }
    }

    // Batches inside transactions: a good one committed, a failing one rolled back, then reuse.
    static String batches(Connection c, String label, int grp) throws SQLException {
        c.setAutoCommit(false);
        String good, bad, after;
        try (PreparedStatement ps = c.prepareStatement("INSERT INTO items (grp, k, v) VALUES (?, ?, ?)")) {
            addRows(ps, grp, label + "-", 400, -1, null);
            good = summary(ps.executeBatch());
            c.commit();
            addRows(ps, grp + 1, label + "-x", 300, 150, label + "-7");
            try {
                ps.executeBatch();
                throw new AssertionError("failing batch succeeded");
            } catch (BatchUpdateException e) {
                SQLException next = e.getNextException();
                eq("23505", next == null ? e.getSQLState() : next.getSQLState(), "batch error");
                bad = "failed state=" + e.getSQLState() + " updateCounts=" + e.getUpdateCounts().length;
            }
            c.rollback();
            eq("0", query1(c, "SELECT count(*) FROM items WHERE grp = " + (grp + 1)), "rolled back batch");
            addRows(ps, grp + 1, label + "-y", 20, -1, null);
            after = summary(ps.executeBatch());
            c.commit();
        }
        String rows = query1(c, "SELECT count(*) || '/' || sum(v) FROM items WHERE grp IN (" + grp + "," + (grp + 1) + ")");
        c.commit();
        return "batch " + label + " good " + good + "; " + bad + "; after " + after + "; rows=" + rows;
    }

    static void generatedKeys(Connection c) throws SQLException {
        List<String> keys = new ArrayList<>();
        try (PreparedStatement ps = c.prepareStatement("INSERT INTO gk (name) VALUES (?)", Statement.RETURN_GENERATED_KEYS);
             PreparedStatement byCol = c.prepareStatement("INSERT INTO gk (name) VALUES (?)", new String[] {"id"})) {
            for (int i = 0; i < 7; i++) {
                ps.setString(1, "single" + i);
                eq(1, ps.executeUpdate(), "insert count");
                try (ResultSet rs = ps.getGeneratedKeys()) { rs.next(); keys.add(rs.getInt("id") + ":" + rs.getString("name")); }
            }
            for (int i = 0; i < 4; i++) { ps.setString(1, "batch" + i); ps.addBatch(); }
            ps.executeBatch();
            try (ResultSet rs = ps.getGeneratedKeys()) { while (rs.next()) keys.add(rs.getInt(1) + ":" + rs.getString(2)); }
            byCol.setString(1, "bycolumn");
            byCol.executeUpdate();
            try (ResultSet rs = byCol.getGeneratedKeys()) { rs.next(); keys.add(rs.getLong(1) + ":bycolumn"); }
        }
        eq(12, keys.size(), "key count");
        out("generated keys " + String.join(" ", keys));
    }

    // setFetchSize in a transaction reads through a suspended portal; an autocommit batch with a bad row.
    static void cursorAndAutocommitBatch(Connection c) throws SQLException {
        c.setAutoCommit(false);
        long n = 0, sum = 0, want = 0;
        try (PreparedStatement ps = c.prepareStatement("SELECT g FROM generate_series(1, ?) AS g")) {
            ps.setFetchSize(1000);
            for (int run = 0; run < 7; run++) {
                ps.setInt(1, 20000 + run);
                want += (20000L + run) * (20001L + run) / 2;
                try (ResultSet rs = ps.executeQuery()) { while (rs.next()) { n++; sum += rs.getInt(1); } }
            }
        }
        c.commit();
        c.setAutoCommit(true);
        eq(140021L, n, "fetchSize rows"); eq(want, sum, "fetchSize sum");
        String landed;
        try (PreparedStatement ps = c.prepareStatement("INSERT INTO items (grp, k, v) VALUES (?, ?, ?)")) {
            addRows(ps, 3, "ac-", 50, 25, "m1");
            try {
                ps.executeBatch();
                throw new AssertionError("autocommit batch with duplicate succeeded");
            } catch (BatchUpdateException e) {
                landed = "state=" + e.getSQLState() + " updateCounts=" + e.getUpdateCounts().length;
            }
        }
        out("fetchSize rows=" + n + " sum=" + sum + "; autocommit failing batch " + landed
                + " rows landed=" + query1(c, "SELECT count(*) FROM items WHERE grp = 3"));
    }

    static void copy(Connection c) throws Exception {
        CopyManager cm = c.unwrap(PGConnection.class).getCopyAPI();
        StringBuilder data = new StringBuilder();
        for (int i = 1; i <= 3000; i++) data.append(i).append('\t').append(i % 100 == 0 ? "\\N" : "line\\t" + i).append('\n');
        eq(3000L, cm.copyIn("COPY copy_t (a, b) FROM STDIN", new StringReader(data.toString())), "copyIn rows");
        StringWriter w = new StringWriter();
        eq(3000L, cm.copyOut("COPY (SELECT a, b FROM copy_t ORDER BY a) TO STDOUT", w), "copyOut rows");
        eq(data.toString(), w.toString(), "copyOut text");
        try {
            cm.copyIn("COPY copy_t (a, b) FROM STDIN", new StringReader("5000\tok\n5001\tok\n7\tdup\n"));
            throw new AssertionError("duplicate copy accepted");
        } catch (SQLException e) {
            eq("23505", e.getSQLState(), "copy error");
        }
        c.setAutoCommit(false);
        cm.copyIn("COPY copy_t (a, b) FROM STDIN", new StringReader("6000\tx\n6001\ty\n"));
        c.rollback();
        c.setAutoCommit(true);
        out("copy in=3000 out=" + w.toString().length() + " chars, failing copy 23505, rolled back copy rows="
                + query1(c, "SELECT count(*) FROM copy_t WHERE a >= 5000") + ", then=" + query1(c, "SELECT count(*) FROM copy_t"));
    }

    // autosave=always pipelines a SAVEPOINT before every statement; plus an explicit savepoint.
    static void savepoints(Connection c) throws SQLException {
        c.setAutoCommit(false);
        List<String> errors = new ArrayList<>();
        try (PreparedStatement ps = c.prepareStatement("INSERT INTO items (grp, k, v) VALUES (4, ?, ?)")) {
            for (int i = 0; i < 12; i++) {
                Savepoint sp = i == 6 ? c.setSavepoint() : null;
                ps.setString(1, i % 4 == 3 ? "m1" : "sp-" + i); ps.setInt(2, i);
                try { ps.executeUpdate(); } catch (SQLException e) { errors.add(i + ":" + e.getSQLState()); }
                if (sp != null) c.rollback(sp);
            }
        }
        c.commit();
        c.setAutoCommit(true);
        out("savepoints errors=" + errors + " rows=" + query1(c, "SELECT string_agg(k, ',' ORDER BY v) FROM items WHERE grp = 4"));
    }

    // Statement.setQueryTimeout makes pgjdbc send a CancelRequest; the connection stays usable.
    static void queryTimeout(Connection c) throws SQLException {
        List<String> r = new ArrayList<>();
        for (boolean tx : new boolean[] {false, true}) {
            c.setAutoCommit(!tx);
            try (Statement s = c.createStatement()) {
                s.setQueryTimeout(1);
                s.execute("SELECT pg_sleep(20)");
                r.add("no timeout");
            } catch (SQLException e) { r.add(e.getSQLState()); }
            if (tx) c.rollback();
            r.add(query1(c, "SELECT 'usable'"));
        }
        out("query timeout " + r);
    }

    // ALTER TABLE changes the result of a server-prepared SELECT *; pgjdbc re-prepares it by itself.
    static void stalePlan(Connection c) throws SQLException {
        StringBuilder cols = new StringBuilder();
        try (PreparedStatement ps = c.prepareStatement("SELECT * FROM wide")) {
            for (int i = 0; i < 10; i++) {
                if (i == 6) exec(c, "ALTER TABLE wide ADD COLUMN b text DEFAULT 'b'");
                try (ResultSet rs = ps.executeQuery()) { rs.next(); cols.append(rs.getMetaData().getColumnCount()); }
            }
        }
        out("stale plan columns per run=" + cols);
    }

    // Session settings made with SET and JDBC calls hold for every later statement.
    static String sessionWorker(int t) throws Exception {
        String[] zones = {"UTC", "America/New_York", "Asia/Tokyo", "Europe/Berlin", "Australia/Adelaide"};
        try (Connection c = connect(t % 2 == 0 ? "" : "prepareThreshold=1")) {
            String zone = zones[t % zones.length], schema = t % 2 == 0 ? "public" : "alt", app = "jdbc-s" + t;
            exec(c, "SET TimeZone TO '" + zone + "'");
            exec(c, "SET application_name = '" + app + "'");
            c.setSchema(schema);
            eq(app, c.getClientInfo("ApplicationName"), "ApplicationName via ParameterStatus");
            String local = null;
            try (PreparedStatement ps = c.prepareStatement("SELECT current_setting('TimeZone'), current_setting('application_name'),"
                    + " (SELECT which FROM probe), to_char(?::timestamptz, 'YYYY-MM-DD HH24:MI TZH:TZM')")) {
                for (int i = 0; i < 10; i++) {
                    c.setReadOnly(i % 3 == 1); // with autocommit off: BEGIN READ ONLY
                    c.setAutoCommit(i % 3 != 1);
                    ps.setTimestamp(1, Timestamp.from(TS), utc());
                    try (ResultSet rs = ps.executeQuery()) {
                        rs.next();
                        eq(List.of(zone, app, schema), List.of(rs.getString(1), rs.getString(2), rs.getString(3)), "settings run " + i);
                        local = rs.getString(4);
                    }
                    eq(i % 3 == 1 ? "on" : "off", query1(c, "SHOW transaction_read_only"), "read only run " + i);
                    eq(schema, c.getSchema(), "getSchema");
                    if (i % 3 == 1) c.commit();
                }
            }
            return t + " tz=" + zone + " local=" + local + " schema=" + schema + " app=" + app;
        }
    }

    // Connection.setTransactionIsolation is SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL.
    static String isolationWorker(int t) throws Exception {
        int[] levels = {Connection.TRANSACTION_SERIALIZABLE, Connection.TRANSACTION_REPEATABLE_READ, Connection.TRANSACTION_READ_COMMITTED};
        String[] names = {"serializable", "repeatable read", "read committed"};
        try (Connection c = connect("")) {
            c.setTransactionIsolation(levels[t % 3]);
            for (int i = 0; i < 8; i++) {
                c.setAutoCommit(i % 2 == 0);
                eq(names[t % 3], query1(c, "SELECT current_setting('transaction_isolation')"), "isolation run " + i);
                if (i % 2 == 1) c.commit();
                eq(levels[t % 3], c.getTransactionIsolation(), "getTransactionIsolation run " + i);
            }
            return t + " " + names[t % 3];
        }
    }

    // One of 12 concurrent threads, each with its own Connection and settings.
    static String worker(int t) throws Exception {
        try (Connection c = connect(t % 3 == 0 ? "prepareThreshold=1" : (t % 3 == 1 ? "reWriteBatchedInserts=true" : ""))) {
            int grp = 1000 + t;
            long sum = 0;
            try (PreparedStatement ins = c.prepareStatement("INSERT INTO items (grp, k, v) VALUES (?, ?, ?)");
                 PreparedStatement q = c.prepareStatement("SELECT count(*), coalesce(sum(v), 0) FROM items WHERE grp = ?");
                 // no casts: the result types come from the parameter types pgjdbc declares in its Parse
                 PreparedStatement typed = c.prepareStatement("SELECT ?, ?, ?, ?, pg_typeof(?)::text")) {
                for (int i = 0; i < 25; i++) {
                    ins.setInt(1, grp); ins.setString(2, "t" + t + "-" + i); ins.setInt(3, t * 1000 + i);
                    eq(1, ins.executeUpdate(), "worker insert");
                    sum += t * 1000 + i;
                    q.setInt(1, grp);
                    try (ResultSet rs = q.executeQuery()) {
                        rs.next();
                        eq(List.of((long) i + 1, sum), List.of(rs.getLong(1), rs.getLong(2)), "worker count/sum");
                    }
                    typed.setInt(1, i); typed.setLong(2, (long) t << 33); typed.setBytes(3, new byte[] {(byte) t, (byte) i});
                    typed.setBoolean(4, i % 2 == 1); typed.setInt(5, i);
                    try (ResultSet rs = typed.executeQuery()) {
                        rs.next();
                        eq(List.of(i, (long) t << 33, hex(new byte[] {(byte) t, (byte) i}), i % 2 == 1, "integer"),
                                List.of(rs.getObject(1), rs.getObject(2), hex(rs.getBytes(3)), rs.getObject(4), rs.getString(5)), "typed params");
                    }
                }
                c.setAutoCommit(false);
                addRows(ins, grp, "t" + t + "-r", 50, -1, null);
                ins.executeBatch();
                c.rollback();
                addRows(ins, grp, "t" + t + "-b", 50, -1, null);
                ins.executeBatch();
                c.commit();
                c.setAutoCommit(true);
            }
            CopyManager cm = c.unwrap(PGConnection.class).getCopyAPI();
            StringBuilder data = new StringBuilder();
            for (int j = 0; j < 200; j++) data.append(10000 + t * 1000 + j).append("\tw").append(t).append('\n');
            eq(200L, cm.copyIn("COPY copy_t FROM STDIN", new StringReader(data.toString())), "worker copyIn");
            StringWriter w = new StringWriter();
            cm.copyOut("COPY (SELECT a, b FROM copy_t WHERE b = 'w" + t + "' ORDER BY a) TO STDOUT", w);
            eq(data.toString(), w.toString(), "worker copyOut");
            return t + " rows=" + query1(c, "SELECT count(*) || ' sum=' || sum(v) FROM items WHERE grp = " + grp) + " copy=200";
        }
    }
}
