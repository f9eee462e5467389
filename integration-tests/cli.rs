//! The command line: `pgrouter check`.

use std::process::Command;

fn pgrouter(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_pgrouter")).args(args).output().expect("run pgrouter")
}

#[test]
fn check_accepts_the_example_config() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/conf/pgrouter.toml");
    let out = pgrouter(&["check", "--config", path]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        text.contains("OK") && text.contains("database app") && text.contains("shard 1: primary 127.0.0.1:5442"),
        "{text}"
    );
}

#[test]
fn check_prints_every_error_with_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken.toml");
    std::fs::write(
        &path,
        "[proxy]\nlisten = \"nowhere\"\nquery_wait_timeout = \"a while\"\ntypo = 1\n\n[[users]]\nname = \"app\"\n\n[[databases]]\nname = \"app\"\npool_size = 0\n",
    )
    .unwrap();
    let out = pgrouter(&["check", "--config", path.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    for expected in [
        "proxy.listen:",
        "proxy.query_wait_timeout:",
        "proxy.typo: unknown key",
        "users[0].password: is required",
        "databases[0].pool_size: must be at least 1",
        "databases[0].shards: at least one",
    ] {
        assert!(err.contains(expected), "missing {expected:?} in:\n{err}");
    }
    // the run command refuses the same file the same way, before listening
    let out = pgrouter(&["--config", path.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("proxy.typo: unknown key"));
}

/// `pgrouter demo` as the README shows it: starts everything, serves psql, and Ctrl-C (SIGINT)
/// stops pgrouter and every PostgreSQL server it started.
#[test]
fn demo_starts_serves_and_cleans_up() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    use std::time::Duration;

    // A free port can be taken by another test between picking it and the demo binding it:
    // then the demo says so in its log, and it is started again on another.
    let mut attempts = 3;
    let (mut child, lines, logs, seen, config) = loop {
        let port = pgrouter::cluster::free_port();
        let mut child = Command::new(env!("CARGO_BIN_EXE_pgrouter"))
            .args(["demo", "--listen", &format!("127.0.0.1:{port}")])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start demo");
        // the demo's log, drained meanwhile so the pipe never fills, for the message of a failure
        let stderr = child.stderr.take().unwrap();
        let logs = std::thread::spawn(move || std::io::read_to_string(stderr).unwrap_or_default());
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut seen = Vec::new();
        let mut config = None;
        for line in lines.by_ref() {
            let line = line.unwrap();
            if let Some(path) = line.trim().strip_prefix(&format!("pgrouter on 127.0.0.1:{port}, config ")) {
                config = Some(std::path::PathBuf::from(path));
            }
            let done = line.contains("Press Ctrl-C to stop");
            seen.push(line);
            if done {
                break;
            }
        }
        if let Some(config) = config {
            break (child, lines, logs, seen, config);
        }
        let _ = child.wait();
        let log = logs.join().unwrap_or_default();
        attempts -= 1;
        assert!(
            attempts > 0 && log.contains("Address already in use"),
            "demo did not start:\n{}\nits log:\n{log}",
            seen.join("\n")
        );
    };
    let base = config.parent().unwrap().to_owned();
    let psql_line = seen.iter().find(|l| l.trim_start().starts_with("psql ")).expect("a psql line");
    let url = psql_line.trim().trim_start_matches("psql ").trim_matches('"').to_owned();
    let out = crate::harness::pg_tool("psql").args(["-X", "-At", &url, "-c", "select 40 + 2"]).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "42", "{}", String::from_utf8_lossy(&out.stderr));
    assert!(seen.iter().any(|l| l.contains("replica")) && seen.iter().any(|l| l.contains("shard2")), "{seen:?}");

    let ok = Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap().success();
    assert!(ok);
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let status = child.wait().unwrap();
    let log = logs.join().unwrap_or_default();
    assert!(status.success(), "{status}: {rest:?}\n{log}");
    assert!(rest.iter().any(|l| l.contains("stopped pgrouter and PostgreSQL")), "{rest:?}");
    assert!(crate::harness::wait_until(Duration::from_secs(5), || !base.exists()), "{} left behind", base.display());
}
