//! psql through pgrouter: multi-statement queries, errors, \copy, large results.

use crate::harness::{Env, EnvOptions, assert_ok, stderr, stdout};

#[test]
fn multi_statement_query_and_error_recovery() {
    let env = Env::start(EnvOptions::default());
    for db in ["app", "app_session"] {
        let out = env.proxy.psql(db, &["-At", "-c", "select 1 as a; select 'two' as b; select 3"]);
        assert_ok(&out, "multi-statement query");
        assert_eq!(stdout(&out).lines().collect::<Vec<_>>(), ["1", "two", "3"], "{db}");

        // An error in the middle of a session; the session keeps working afterwards.
        let script = "select 1 as before;\nselect 1/0;\nselect 'still alive' as after;\nbegin;\nselect 1/0;\nselect 1;\nrollback;\nselect 'after rollback';\n";
        let out = env.proxy.psql(db, &["-At", "-c", "\\set ON_ERROR_STOP 0", "-f", "-"]);
        let _ = out;
        let out = run_psql_script(&env, db, script);
        let text = stdout(&out);
        assert!(text.contains("still alive") && text.contains("after rollback"), "{db}: {text}\n{}", stderr(&out));
        assert!(stderr(&out).contains("division by zero"), "{db}: {}", stderr(&out));
        assert!(stderr(&out).contains("current transaction is aborted"), "{db}: {}", stderr(&out));
    }
}

fn run_psql_script(env: &Env, db: &str, script: &str) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("script.sql");
    std::fs::write(&file, script).unwrap();
    env.proxy.psql(db, &["-At", "-f", file.to_str().unwrap()])
}

#[test]
fn copy_in_and_out_with_backslash_copy() {
    let env = Env::start(EnvOptions::default());
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.csv");
    let output = dir.path().join("out.csv");
    let rows: String = (1..=5000).map(|i| format!("{i},name {i},\"quoted, {i}\"\n")).collect();
    std::fs::write(&input, &rows).unwrap();
    for db in ["app", "app_session"] {
        let table = format!("copy_{db}");
        let out = env.proxy.psql(
            db,
            &[
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                &format!("create table {table} (id int primary key, name text, note text)"),
                "-c",
                &format!("\\copy {table} from '{}' with (format csv)", input.display()),
                "-c",
                &format!("\\copy (select * from {table} order by id) to '{}' with (format csv)", output.display()),
                "-At",
                "-c",
                &format!("select count(*), sum(id) from {table}"),
            ],
        );
        assert_ok(&out, "\\copy");
        assert!(stdout(&out).contains("5000|12502500"), "{}", stdout(&out));
        assert_eq!(std::fs::read_to_string(&output).unwrap(), rows, "{db}: COPY TO output differs from the input");
        // A COPY that fails half-way leaves the session usable.
        let bad = dir.path().join("bad.csv");
        std::fs::write(&bad, "9001,a,b\nnot-a-number,c,d\n").unwrap();
        let out = env.proxy.psql(
            db,
            &[
                "-c",
                &format!("\\copy {table} from '{}' with (format csv)", bad.display()),
                "-At",
                "-c",
                &format!("select count(*) from {table}"),
            ],
        );
        assert!(stderr(&out).contains("invalid input syntax"), "{}", stderr(&out));
        assert!(stdout(&out).contains("5000"), "{}", stdout(&out));
    }
}

/// A 1,000,000-row result streams through: the proxy's peak RSS grows by far less than the
/// result (about 100 MB here).
#[test]
fn million_row_result_streams_in_bounded_memory() {
    let env = Env::start(EnvOptions::default());
    // warm up so allocator pools exist before the baseline
    assert_ok(&env.proxy.psql("app", &["-c", "select 1"]), "warm-up");
    let before = env.proxy.mem_kib("VmRSS");
    let out = env.proxy.psql(
        "app",
        &["-At", "-o", "/dev/null", "-c", "select g, repeat('x', 100) from generate_series(1, 1000000) g"],
    );
    assert_ok(&out, "1M-row query");
    let peak = env.proxy.mem_kib("VmHWM");
    let growth_mib = peak.saturating_sub(before) as f64 / 1024.0;
    eprintln!(
        "measured: 1M rows (~110 MB) through pgrouter: RSS before {before} KiB, peak {peak} KiB, growth {growth_mib:.1} MiB"
    );
    assert!(growth_mib < 50.0, "peak RSS grew by {growth_mib:.1} MiB");
    // and the row count is right
    let out =
        env.proxy.psql("app", &["-At", "-c", "select count(*) from (select g from generate_series(1, 1000000) g) s"]);
    assert_eq!(stdout(&out).trim(), "1000000");
}
