use super::*;

const MINIMAL: &str = r#"
[[users]]
name = "app"
password = "secret"

[[databases]]
name = "app"
[[databases.shards]]
primary = "127.0.0.1:5432"
"#;

fn errors(text: &str) -> Vec<String> {
    Config::from_toml(text).expect_err("config should be rejected").0.iter().map(ToString::to_string).collect()
}

#[test]
fn example_config_parses() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("conf/pgrouter.toml");
    let config = Config::load(&path).unwrap_or_else(|e| panic!("conf/pgrouter.toml:\n{e}"));
    assert_eq!(config.proxy.listen.to_string(), "127.0.0.1:6432");
    assert_eq!(config.proxy.max_message_size, 64 << 20);
    let db = config.database("app").unwrap();
    assert_eq!(db.shards.len(), 2);
    assert_eq!(db.shards[0].replicas[0].to_string(), "127.0.0.1:5433");
    assert_eq!(db.sharded_tables.len(), 3);
    assert_eq!(db.routing.rules[0].route, RuleRoute::Replica);
    let admin = config.user("admin").unwrap();
    let Some(Password::Scram(v)) = &admin.password else { panic!("admin has a SCRAM verifier") };
    assert!(*v == crate::protocol::scram::ScramVerifier::from_password("admin-secret", &v.salt, v.iterations));
}

#[test]
fn defaults() {
    let c = Config::from_toml(MINIMAL).unwrap();
    assert_eq!(c.proxy.query_wait_timeout, std::time::Duration::from_secs(10));
    assert_eq!(c.proxy.client_idle_timeout, std::time::Duration::ZERO);
    let db = c.database("app").unwrap();
    assert_eq!((db.pool_mode, db.pool_size, db.min_pool_size), (PoolMode::Transaction, 20, 0));
    assert_eq!(db.server_database, "app");
    let user = c.user("app").unwrap();
    assert_eq!(
        (user.auth, user.server_user.as_str(), user.server_password.as_deref()),
        (AuthMethod::ScramSha256, "app", Some("secret"))
    );
}

#[test]
fn every_error_is_reported_with_its_path() {
    let text = r#"
[proxy]
listen = "localhost"
query_wait_timeout = "soon"
max_message_size = "huge"
colour = "blue"

[[users]]
name = "app"

[[databases]]
name = "app"
pool_size = 0
pool_mode = "statement"
[[databases.shards]]
primary = "db1"
replicas = ["db2:5433"]
[[databases.routing.rules]]
pattern = "(unclosed"
route = "shard:7"
"#;
    let errs = errors(text);
    let expect = [
        "proxy.listen:",
        "proxy.query_wait_timeout:",
        "proxy.max_message_size:",
        "proxy.colour: unknown key",
        "users[0].password: is required",
        "databases[0].pool_size: must be at least 1",
        "databases[0].pool_mode: \"statement\" is not one of",
        "databases[0].shards[0].primary:",
        "databases[0].routing.rules[0].pattern: not a valid regular expression",
    ];
    for e in expect {
        assert!(errs.iter().any(|got| got.starts_with(e)), "missing {e:?} in {errs:#?}");
    }
}

#[test]
fn cross_references_are_checked() {
    let text = format!("{MINIMAL}\n[proxy]\nadmin_users = [\"root\"]\n");
    assert!(errors(&text).iter().any(|e| e.starts_with("proxy.admin_users[0]:")));
    let text = MINIMAL.replace(
        "[[databases]]\nname = \"app\"",
        "[[databases]]\nname = \"app\"\n[databases.sharding]\nhome_shard = 3",
    );
    assert!(errors(&text).iter().any(|e| e.starts_with("databases[0].sharding.home_shard:")), "{:?}", errors(&text));
    assert!(errors("").iter().any(|e| e.starts_with("users:")));
}

#[test]
fn duplicate_and_reserved_names() {
    let text = format!(
        "{MINIMAL}\n[[users]]\nname = \"app\"\npassword = \"x\"\n[[databases]]\nname = \"pgrouter\"\n[[databases.shards]]\nprimary = \"h:1\"\n"
    );
    let errs = errors(&text);
    assert!(errs.iter().any(|e| e.starts_with("users[1].name:") && e.contains("twice")), "{errs:?}");
    assert!(errs.iter().any(|e| e.starts_with("databases[1].name:") && e.contains("reserved")), "{errs:?}");
}

#[test]
fn password_forms() {
    let md5 =
        MINIMAL.replace("password = \"secret\"", "password = \"md5a3556571e93b0d20722ba62be61e8c2d\"\nauth = \"md5\"");
    let c = Config::from_toml(&md5).unwrap();
    assert!(matches!(c.user("app").unwrap().password, Some(Password::Md5Hash(_))));
    assert_eq!(c.user("app").unwrap().server_password, None);
    let scram_md5 = MINIMAL.replace("password = \"secret\"", "password = \"SCRAM-SHA-256$4096:c2FsdA==$dGVzdHRlc3R0ZXN0dGVzdHRlc3R0ZXN0dGVzdHRlc3Q=:dGVzdHRlc3R0ZXN0dGVzdHRlc3R0ZXN0dGVzdHRlc3Q=\"\nauth = \"md5\"");
    assert!(errors(&scram_md5).iter().any(|e| e.starts_with("users[0].password:")));
    let trust = MINIMAL.replace("password = \"secret\"", "auth = \"trust\"");
    assert!(Config::from_toml(&trust).is_ok());
}

#[test]
fn syntax_errors_name_the_line() {
    let errs = errors("[proxy]\nlisten = \n");
    assert!(errs[0].starts_with("line 2"), "{errs:?}");
}

#[test]
fn server_addresses() {
    assert_eq!("db1:5432".parse::<ServerAddr>().unwrap().to_string(), "db1:5432");
    assert_eq!("[::1]:5432".parse::<ServerAddr>().unwrap(), ServerAddr { host: "::1".into(), port: 5432 });
    assert!("db1".parse::<ServerAddr>().is_err());
    assert!("db1:0".parse::<ServerAddr>().is_err());
    assert!(":5432".parse::<ServerAddr>().is_err());
}

#[test]
fn instances_and_peers() {
    let text = format!("{MINIMAL}\n[proxy]\ninstance_id = 128\npeers = [\"127.0.0.1\"]\n");
    let errs = errors(&text);
    assert!(errs.iter().any(|e| e.starts_with("proxy.instance_id:")), "{errs:#?}");
    assert!(errs.iter().any(|e| e.starts_with("proxy.peers:")), "{errs:#?}");
    let text = format!("{MINIMAL}\n[proxy]\ninstance_id = 7\npeers = [\"10.0.0.2:6432\"]\nreuse_port = true\n");
    let proxy = Config::from_toml(&text).expect("valid").proxy;
    assert_eq!((proxy.instance_id, proxy.peers[0].to_string(), proxy.reuse_port), (7, "10.0.0.2:6432".into(), true));
}
