//! The command line: `pgrouter check`.

use std::process::Command;

fn pgrouter(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_pgrouter"))
        .args(args)
        .output()
        .expect("run pgrouter")
}

#[test]
fn check_accepts_the_example_config() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/conf/pgrouter.toml");
    let out = pgrouter(&["check", "--config", path]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("OK")
            && text.contains("database app")
            && text.contains("shard 1: primary 127.0.0.1:5442"),
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
