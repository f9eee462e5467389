//! Client logins against pgrouter and pgrouter's logins to the backends.

use crate::harness::{
    APP_PASSWORD, APP_USER, CLEAR_PASSWORD, CLEAR_USER, Env, EnvOptions, MD5_PASSWORD, MD5_USER, assert_ok, connect,
    describe, runtime, sqlstate, stderr, stdout,
};

/// SCRAM-SHA-256 (tokio-postgres) and md5 (tokio-postgres, psql) client logins; backends whose
/// pg_hba asks for SCRAM, md5 and cleartext (one role each) all accept the proxy.
#[test]
fn logins_and_backend_auth_methods() {
    let env = Env::start(EnvOptions {
        users: "\n[[users]]\nname = \"viamd5\"\npassword = \"md5-client-secret\"\nauth = \"md5\"\nserver_user = \"app\"\nserver_password = \"app-secret\"\n".into(),
        ..EnvOptions::default()
    });
    let rt = runtime();
    rt.block_on(async {
        // app: SCRAM from the client, SCRAM to the backend.
        let client = connect(&env.proxy.url(APP_USER, APP_PASSWORD, "app")).await.expect("SCRAM login");
        let row = client.query_one("select current_user::text", &[]).await.unwrap();
        assert_eq!(row.get::<_, String>(0), APP_USER);
        // legacy: md5 from the client, md5 to the backend.
        let client = connect(&env.proxy.url(MD5_USER, MD5_PASSWORD, "app")).await.expect("md5 login");
        let row = client.query_one("select current_user::text", &[]).await.unwrap();
        assert_eq!(row.get::<_, String>(0), MD5_USER);
        // plain: SCRAM from the client, cleartext password to the backend.
        let client = connect(&env.proxy.url(CLEAR_USER, CLEAR_PASSWORD, "app")).await.expect("cleartext backend");
        let row = client.query_one("select current_user::text", &[]).await.unwrap();
        assert_eq!(row.get::<_, String>(0), CLEAR_USER);
    });
    // psql with an md5 client login whose server role differs.
    let out = env.proxy.psql_as("viamd5", "md5-client-secret", "app", &["-At", "-c", "select current_user"]);
    assert_ok(&out, "md5 login with psql");
    assert_eq!(stdout(&out).trim(), APP_USER);
}

#[test]
fn wrong_password_unknown_user_and_unknown_database() {
    let env = Env::start(EnvOptions::default());
    let rt = runtime();
    rt.block_on(async {
        let err = connect(&env.proxy.url(APP_USER, "wrong", "app")).await.expect_err("wrong password");
        assert_eq!(sqlstate(&err).as_deref(), Some("28P01"), "{err}");
        let err = connect(&env.proxy.url(MD5_USER, "wrong", "app")).await.expect_err("wrong md5 password");
        assert_eq!(sqlstate(&err).as_deref(), Some("28P01"), "{err}");
        let err = connect(&env.proxy.url("nobody", "x", "app")).await.expect_err("unknown user");
        assert_eq!(sqlstate(&err).as_deref(), Some("28000"), "{err}");
        assert!(describe(&err).contains("\"nobody\" is not configured"), "{err}");
        let err = connect(&env.proxy.url(APP_USER, APP_PASSWORD, "nodb")).await.expect_err("unknown database");
        assert_eq!(sqlstate(&err).as_deref(), Some("3D000"), "{err}");
        assert!(describe(&err).contains("database \"nodb\" does not exist"), "{err}");
    });
    let out = env.proxy.psql_as(APP_USER, "wrong", "app", &["-c", "select 1"]);
    assert!(stderr(&out).contains("password authentication failed for user \"app\""), "{}", stderr(&out));
}

/// A backend that refuses the proxy's credentials: the client gets 08006 with the server's
/// own reason, not a hang.
#[test]
fn backend_refusing_the_proxy_is_a_clear_error() {
    let env = Env::start(EnvOptions {
        users: "\n[[users]]\nname = \"mismatch\"\npassword = \"client-side\"\nserver_user = \"app\"\nserver_password = \"not-the-server-password\"\n".into(),
        ..EnvOptions::default()
    });
    runtime().block_on(async {
        let err = connect(&env.proxy.url("mismatch", "client-side", "app")).await.expect_err("backend refuses");
        assert_eq!(sqlstate(&err).as_deref(), Some("08006"), "{err}");
        assert!(describe(&err).contains("password authentication failed"), "{err}");
    });
}
