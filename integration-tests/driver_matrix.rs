//! The real-driver matrix: each driver's check script (in `drivers/`) runs once directly against
//! PostgreSQL and once through pgrouter in transaction mode with pool_size 2, each time on a
//! fresh database, and must succeed both times with identical output. The scripts use at least
//! 10 concurrent connections each. `drivers/setup.sh` installs the drivers on first use (a
//! Python venv from the pinned requirements, node-postgres from its lock file, Debian's JDBC
//! driver) into `target/drivers`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use futures_util::future::join_all;

use crate::harness::{APP_PASSWORD, APP_USER, Env, EnvOptions, describe, runtime};

/// A script that takes longer than this through a debug build is treated as hung.
const SCRIPT_LIMIT: Duration = Duration::from_secs(300);
const JDBC_JAR: &str = "/usr/share/java/postgresql.jar";

fn drivers_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("integration-tests/drivers")
}

/// Runs `drivers/setup.sh` once per test process; returns where it installed things.
fn installed() -> &'static Path {
    static OUT: OnceLock<PathBuf> = OnceLock::new();
    OUT.get_or_init(|| {
        let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/drivers");
        let started = Instant::now();
        let status = Command::new("bash")
            .arg(drivers_dir().join("setup.sh"))
            .arg(&out)
            .stdout(Stdio::null())
            .status()
            .expect("run drivers/setup.sh");
        assert!(status.success(), "drivers/setup.sh failed ({status}); see its output above");
        println!("drivers: setup.sh took {:.1} s", started.elapsed().as_secs_f64());
        out
    })
}

/// Where a script runs: a server database reached directly or through the proxy.
struct Target {
    port: u16,
    database: &'static str,
}

/// A topology whose primary has the databases `direct` and `proxied`, and a proxy serving
/// `proxied` in transaction mode with `pool_size`.
fn matrix_env(pool_size: usize) -> Env {
    let databases = format!(
        "[[databases]]\nname = \"proxied\"\npool_mode = \"transaction\"\npool_size = {pool_size}\n\
         [[databases.shards]]\nprimary = \"{{PRIMARY}}\"\n"
    );
    Env::start(EnvOptions {
        pool_size,
        databases,
        server_databases: vec!["direct".into(), "proxied".into()],
        ..EnvOptions::default()
    })
}

/// Runs a driver's command against `target` with the connection in the environment
/// (PGROUTER_DSN and the libpq PG* variables); returns its stdout, failing on a non-zero exit.
fn run(name: &str, mut cmd: Command, target: &Target) -> String {
    let dir = tempfile::tempdir().expect("temp dir");
    let (out_path, err_path) = (dir.path().join("stdout"), dir.path().join("stderr"));
    let dsn = format!("postgresql://{APP_USER}:{APP_PASSWORD}@127.0.0.1:{}/{}", target.port, target.database);
    let mut child = cmd
        .env("PGROUTER_DSN", dsn)
        .env("PGHOST", "127.0.0.1")
        .env("PGPORT", target.port.to_string())
        .env("PGUSER", APP_USER)
        .env("PGPASSWORD", APP_PASSWORD)
        .env("PGDATABASE", target.database)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).expect("stdout file"))
        .stderr(std::fs::File::create(&err_path).expect("stderr file"))
        .spawn()
        .unwrap_or_else(|e| panic!("{name}: cannot start {cmd:?}: {e}"));
    let deadline = Instant::now() + SCRIPT_LIMIT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for script") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{name} on {}: still running after {SCRIPT_LIMIT:?}", target.database);
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stdout = std::fs::read_to_string(&out_path).unwrap_or_default();
    let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
    assert!(status.success(), "{name} on {} failed ({status})\nstdout:\n{stdout}\nstderr:\n{stderr}", target.database);
    stdout
}

/// The check passes directly and through the proxy, with the same output.
fn same_both_ways(name: &str, make: impl Fn() -> Command) {
    let env = matrix_env(2);
    let direct = run(name, make(), &Target { port: env.topo.primary.port, database: "direct" });
    let started = Instant::now();
    let proxied = run(name, make(), &Target { port: env.proxy.port, database: "proxied" });
    assert!(!direct.trim().is_empty(), "{name} printed nothing");
    assert_eq!(direct, proxied, "{name}: output through pgrouter differs from direct PostgreSQL");
    assert_no_session_warnings(name, &env);
    println!(
        "drivers: {name}: {} lines identical, {:.1} s through pgrouter (transaction mode, pool_size 2)",
        direct.lines().count(),
        started.elapsed().as_secs_f64()
    );
}

/// A warning from a client session (a reply queue out of step, settings that could not be
/// read back, a session ended by an error) means the proxy was not transparent somewhere.
fn assert_no_session_warnings(name: &str, env: &Env) {
    let log = env.proxy.log();
    let warnings: Vec<&str> = log.lines().filter(|l| l.contains("WARN pgrouter::frontend")).collect();
    assert!(warnings.is_empty(), "{name}: pgrouter logged warnings:\n{}", warnings.join("\n"));
}

fn python(script: &str) -> impl Fn() -> Command {
    let script = drivers_dir().join("python").join(script);
    move || {
        let mut cmd = Command::new(installed().join("venv/bin/python"));
        cmd.arg(&script);
        cmd
    }
}

#[test]
fn psycopg3() {
    same_both_ways("psycopg 3", python("psycopg3_check.py"));
}

#[test]
fn psycopg2() {
    same_both_ways("psycopg2", python("psycopg2_check.py"));
}

#[test]
fn sqlalchemy_orm() {
    same_both_ways("SQLAlchemy ORM", python("sqlalchemy_check.py"));
}

#[test]
fn django_orm() {
    same_both_ways("Django ORM", python("django_check.py"));
}

#[test]
fn asyncpg() {
    same_both_ways("asyncpg", python("asyncpg_check.py"));
}

/// 50 tasks × 200 prepared fetches over a 20-connection asyncpg pool, through pgrouter with
/// pool_size 4; the script checks every result and fails on any error.
#[test]
fn asyncpg_load_over_pool_of_four() {
    let env = matrix_env(4);
    let mut cmd = python("asyncpg_check.py")();
    cmd.arg("--load");
    let started = Instant::now();
    let out = run("asyncpg --load", cmd, &Target { port: env.proxy.port, database: "proxied" });
    assert_no_session_warnings("asyncpg --load", &env);
    println!("drivers: asyncpg --load through pool_size 4: {} ({:.1} s)", out.trim(), started.elapsed().as_secs_f64());
}

#[test]
fn node_postgres() {
    let script = drivers_dir().join("node/check.js");
    same_both_ways("node-postgres", || {
        installed();
        let mut cmd = Command::new("node");
        cmd.arg(&script);
        cmd
    });
}

#[test]
fn pgjdbc() {
    same_both_ways("pgjdbc", || {
        let classpath = format!("{}:{JDBC_JAR}", installed().join("java").display());
        let mut cmd = Command::new("java");
        cmd.args(["-cp", &classpath, "JdbcCheck"]);
        cmd
    });
}

/// tokio-postgres: 12 clients at once, each preparing statements once and running them in many
/// transactions (so they move between server connections), with a session setting, an error
/// and a rollback on the way; the result lines must be the same directly and through pgrouter.
#[test]
fn tokio_postgres() {
    let env = matrix_env(2);
    let url =
        |port: u16, db: &str| format!("host=127.0.0.1 port={port} user={APP_USER} password={APP_PASSWORD} dbname={db}");
    let rt = runtime();
    let direct = rt.block_on(tokio_postgres_check(&url(env.topo.primary.port, "direct")));
    let proxied = rt.block_on(tokio_postgres_check(&url(env.proxy.port, "proxied")));
    assert_eq!(direct, proxied, "tokio-postgres: output through pgrouter differs from direct PostgreSQL");
    assert_no_session_warnings("tokio-postgres", &env);
    println!("drivers: tokio-postgres: {} lines identical", direct.len());
}

async fn tokio_postgres_check(url: &str) -> Vec<String> {
    let setup = crate::harness::connect(url).await.expect("connect");
    setup
        .batch_execute("create table items (worker int, n int, label text, primary key (worker, n))")
        .await
        .expect("create table");
    let workers = (0..12).map(|w| {
        let url = url.to_owned();
        async move {
            let c = crate::harness::connect(&url).await.expect("connect");
            c.batch_execute(&format!("SET search_path = public; SET application_name = 'worker {w}'")).await.unwrap();
            let insert = c.prepare("insert into items values ($1, $2, $3) returning n * 2").await.unwrap();
            let sum = c
                .prepare(
                    "select count(*), sum(n)::bigint, current_setting('application_name') from items where worker = $1",
                )
                .await
                .unwrap();
            let mut doubled = 0i64;
            for n in 0..40i32 {
                let row = c.query_one(&insert, &[&w, &n, &format!("w{w}n{n}")]).await.unwrap();
                doubled += i64::from(row.get::<_, i32>(0));
            }
            let dup = c.query_one(&insert, &[&w, &0i32, &"again"]).await.map(|_| ()).map_err(|e| describe(&e));
            let mut tx_client = c;
            let tx = tx_client.transaction().await.unwrap();
            tx.execute("delete from items where worker = $1", &[&w]).await.unwrap();
            tx.rollback().await.unwrap();
            let row = tx_client.query_one(&sum, &[&w]).await.unwrap();
            let (count, total, app): (i64, i64, String) = (row.get(0), row.get(1), row.get(2));
            format!("worker {w}: doubled {doubled}, duplicate {dup:?}, after rollback count {count} sum {total}, {app}")
        }
    });
    join_all(workers).await
}

/// SQLAlchemy's ORM on two shards (see `drivers/python/sqlalchemy_shards.py`): it prints
/// what it prints on one database, create_all() makes the schema on both shards, and every
/// row is found directly on the shard its customer_id hashes to.
#[test]
fn sqlalchemy_orm_on_two_shards() {
    let databases = r#"
[[databases]]
name = "shop"
server_database = "app"
pool_size = 4
[[databases.shards]]
primary = "{SHARD0}"
[[databases.shards]]
primary = "{SHARD1}"
[[databases.sharded_tables]]
table = "customers"
column = "customer_id"
type = "bigint"
[[databases.sharded_tables]]
table = "orders"
column = "customer_id"
type = "bigint"
"#;
    let env = Env::start(EnvOptions { shards: 2, databases: databases.into(), ..EnvOptions::default() });
    let printed =
        run("sqlalchemy-shards", python("sqlalchemy_shards.py")(), &Target { port: env.proxy.port, database: "shop" });
    let direct = run(
        "sqlalchemy-shards",
        python("sqlalchemy_shards.py")(),
        &Target { port: env.topo.primary.port, database: "app" },
    );
    assert_eq!(printed, direct, "two shards through pgrouter print what one database prints");
    print!("{printed}");
    let shard_of = |k: i64| pgrouter::sharding::hash::remainder(pgrouter::sharding::hash::int8(k), 2);
    let mut rows = [0, 0];
    for (index, shard) in env.topo.shards.iter().enumerate() {
        let tables =
            shard.psql("app", "select count(*) from pg_tables where tablename in ('customers', 'orders')").unwrap();
        assert_eq!(tables.trim(), "2", "create_all made both tables on shard {index}");
        for table in ["customers", "orders"] {
            let keys = shard.psql("app", &format!("select customer_id from {table}")).unwrap();
            for key in keys.lines().filter(|l| !l.is_empty()) {
                assert_eq!(shard_of(key.parse().unwrap()), index, "{table} row of customer {key} on shard {index}");
                rows[index] += 1;
            }
        }
    }
    assert_eq!(rows[0] + rows[1], 70, "20 customers and 50 orders, each once");
    assert!(rows[0] > 0 && rows[1] > 0, "both shards hold rows: {rows:?}");
    println!("drivers: sqlalchemy on two shards: rows per shard {rows:?}");
}
