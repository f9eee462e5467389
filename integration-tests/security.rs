//! Security (issue 7): TLS to clients with a certificate authority the test makes with
//! openssl, psql with sslmode=require and verify-full, SCRAM-SHA-256-PLUS (channel
//! binding), plaintext refused under `require`, a rotated certificate taking effect on
//! reload; TLS from pgrouter to the servers; a flood of abandoned connections.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use crate::harness::{APP_PASSWORD, APP_USER, Env, EnvOptions, frontend_message, pg_tool, stderr, stdout};

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl").args(args).current_dir(dir).output().expect("run openssl");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A CA (`ca.pem`) and a server certificate for localhost / 127.0.0.1 signed by it
/// (`<name>.pem`, `<name>.key`).
fn make_ca(dir: &Path) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=pgrouter test CA",
        ],
    );
}

fn make_server_cert(dir: &Path, name: &str, cn: &str) {
    let key = format!("{name}.key");
    let csr = format!("{name}.csr");
    let pem = format!("{name}.pem");
    std::fs::write(dir.join("san.ext"), "subjectAltName = DNS:localhost, IP:127.0.0.1\n").unwrap();
    openssl(
        dir,
        &["req", "-newkey", "rsa:2048", "-nodes", "-keyout", &key, "-out", &csr, "-subj", &format!("/CN={cn}")],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &pem,
            "-days",
            "2",
            "-extfile",
            "san.ext",
        ],
    );
}

fn psql(port: u16, conn: &str, command: &str) -> Output {
    pg_tool("psql")
        .arg(format!("host=localhost hostaddr=127.0.0.1 port={port} user={APP_USER} dbname=app {conn}"))
        .args(["-X", "-At", "-c", command])
        .env("PGPASSWORD", APP_PASSWORD)
        .env("PGCONNECT_TIMEOUT", "10")
        .output()
        .expect("run psql")
}

/// The subject of the certificate the proxy presents (openssl s_client's PostgreSQL STARTTLS).
fn presented_subject(port: u16) -> String {
    let out = Command::new("openssl")
        .args(["s_client", "-starttls", "postgres", "-connect", &format!("127.0.0.1:{port}")])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run openssl s_client");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines().find(|l| l.starts_with("subject=")).unwrap_or_default().to_owned()
}

fn tls_env(dir: &Path, mode: &str) -> Env {
    let proxy = format!(
        "[proxy.tls]\nmode = \"{mode}\"\ncert = \"{}\"\nkey = \"{}\"\n",
        dir.join("server.pem").display(),
        dir.join("server.key").display()
    );
    Env::start(EnvOptions { proxy, ..EnvOptions::default() })
}

/// mode = require: psql with sslmode=require and verify-full (against the test's CA) gets
/// TLS; a plaintext client is refused; a client that trusts another CA refuses the proxy;
/// a rotated certificate is presented after SIGHUP.
#[test]
fn tls_to_clients() {
    let certs = tempfile::tempdir().unwrap();
    let dir = certs.path();
    make_ca(dir);
    make_server_cert(dir, "server", "pgrouter one");
    let env = tls_env(dir, "require");
    let port = env.proxy.port;
    let ca = dir.join("ca.pem");
    for conn in [
        "sslmode=require".to_owned(),
        "sslmode=require channel_binding=require".to_owned(),
        format!("sslmode=verify-full sslrootcert={}", ca.display()),
    ] {
        let out = psql(port, &conn, "\\conninfo");
        assert!(out.status.success(), "{conn}: {}", stderr(&out));
        assert!(stdout(&out).contains("SSL connection"), "{conn}: {}", stdout(&out));
        let out = psql(port, &conn, "select 6 * 7");
        assert_eq!(stdout(&out).trim(), "42", "{conn}: queries run over TLS: {}", stderr(&out));
    }
    let out = psql(port, "sslmode=disable", "select 1");
    assert!(!out.status.success() && stderr(&out).contains("only TLS"), "plaintext refused: {}", stderr(&out));
    // a client that trusts another CA does not accept the proxy's certificate
    let other = tempfile::tempdir().unwrap();
    make_ca(other.path());
    let out =
        psql(port, &format!("sslmode=verify-full sslrootcert={}", other.path().join("ca.pem").display()), "select 1");
    assert!(!out.status.success(), "verify-full against another CA must fail");
    // rotate: a new certificate in the same files, then SIGHUP
    assert!(presented_subject(port).contains("pgrouter one"), "{}", presented_subject(port));
    make_server_cert(dir, "server", "pgrouter two");
    env.proxy.signal("HUP");
    assert!(crate::harness::wait_until(Duration::from_secs(10), || env.proxy.log().contains("config reloaded")));
    assert!(presented_subject(port).contains("pgrouter two"), "rotated: {}", presented_subject(port));
    let out = psql(port, &format!("sslmode=verify-full sslrootcert={}", ca.display()), "select 1");
    assert!(out.status.success(), "verify-full after rotation: {}", stderr(&out));
}

/// mode = allow: TLS and plaintext clients both work.
#[test]
fn tls_allow_takes_both() {
    let certs = tempfile::tempdir().unwrap();
    make_ca(certs.path());
    make_server_cert(certs.path(), "server", "pgrouter");
    let env = tls_env(certs.path(), "allow");
    for (conn, tls) in [("sslmode=require", true), ("sslmode=disable", false)] {
        let out = psql(env.proxy.port, conn, "\\conninfo");
        assert!(out.status.success(), "{conn}: {}", stderr(&out));
        assert_eq!(stdout(&out).contains("SSL connection"), tls, "{conn}: {}", stdout(&out));
    }
    // SCRAM-SHA-256-PLUS binds the login to pgrouter's certificate; without TLS there is
    // nothing to bind to, and a client that insists refuses the login
    let out = psql(env.proxy.port, "sslmode=require channel_binding=require", "select 1");
    assert!(out.status.success(), "channel binding over TLS: {}", stderr(&out));
    let out = psql(env.proxy.port, "sslmode=disable channel_binding=require", "select 1");
    assert!(!out.status.success(), "channel binding cannot be had without TLS");
}

/// TLS from pgrouter to the server (`server_tls`), against a PostgreSQL with ssl = on and a
/// certificate from the test's CA: verify-full, require and prefer connect over TLS (the
/// server's pg_stat_ssl says so), disable does not, and verify-full against another CA
/// refuses to connect.
#[test]
fn tls_to_servers() {
    let certs = tempfile::tempdir().unwrap();
    let dir = certs.path();
    make_ca(dir);
    make_server_cert(dir, "server", "postgres under test");
    let other = tempfile::tempdir().unwrap();
    make_ca(other.path());
    // the server runs as the postgres OS user when the tests run as root
    let _ = Command::new("chown").args(["-R", "postgres"]).arg(dir).status();
    let _ = Command::new("chmod").arg("600").arg(dir.join("server.key")).status();
    let db = |name: &str, mode: &str, ca: &Path| {
        format!(
            "\n[[databases]]\nname = \"{name}\"\nserver_database = \"app\"\nserver_tls = \"{mode}\"\nserver_tls_ca = \"{}\"\n[[databases.shards]]\nprimary = \"{{PRIMARY}}\"\n",
            ca.display()
        )
    };
    let ca = dir.join("ca.pem");
    let databases = [
        db("tls_full", "verify-full", &ca),
        db("tls_require", "require", &ca),
        db("tls_prefer", "prefer", &ca),
        db("tls_wrong_ca", "verify-full", &other.path().join("ca.pem")),
    ]
    .concat();
    let env = Env::start(EnvOptions {
        databases,
        pg_conf: vec![
            "max_connections = 120".into(),
            "ssl = on".into(),
            format!("ssl_cert_file = '{}'", dir.join("server.pem").display()),
            format!("ssl_key_file = '{}'", dir.join("server.key").display()),
        ],
        ..EnvOptions::default()
    });
    let ssl = "select ssl from pg_stat_ssl where pid = pg_backend_pid()";
    for (database, want) in [("tls_full", "t"), ("tls_require", "t"), ("tls_prefer", "t"), ("app", "f")] {
        let out = env.proxy.psql(database, &["-At", "-c", ssl]);
        assert!(out.status.success(), "{database}: {}", stderr(&out));
        assert_eq!(stdout(&out).trim(), want, "{database}: TLS to the server");
    }
    let out = env.proxy.psql("tls_wrong_ca", &["-At", "-c", "select 1"]);
    let err = stderr(&out);
    assert!(!out.status.success() && err.contains("TLS handshake failed"), "verify-full against another CA: {err}");
}

/// 2,000 connections opened and left without a startup packet: an established client keeps
/// running queries throughout, and every abandoned connection is closed once
/// client_login_timeout (2 s here) has passed.
#[test]
fn abandoned_connections_do_not_starve_clients() {
    use std::io::Read;
    use std::net::TcpStream;
    use std::time::Instant;
    let env = Env::start(EnvOptions { proxy: "client_login_timeout = \"2s\"\n".into(), ..EnvOptions::default() });
    let port = env.proxy.port;
    let url = env.proxy.url(APP_USER, APP_PASSWORD, "app");
    let rt = crate::harness::runtime();
    let client = rt.block_on(crate::harness::connect(&url)).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let worker = {
        let stop = std::sync::Arc::clone(&stop);
        rt.spawn(async move {
            let (mut queries, mut slowest) = (0u32, Duration::ZERO);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let started = Instant::now();
                client.simple_query("select 1").await.expect("the established client keeps working");
                slowest = slowest.max(started.elapsed());
                queries += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (queries, slowest)
        })
    };
    let opened = Instant::now();
    let mut idle: Vec<TcpStream> =
        (0..2000).map(|_| TcpStream::connect(("127.0.0.1", port)).expect("connect")).collect();
    let took_to_open = opened.elapsed();
    std::thread::sleep(Duration::from_secs(3));
    let mut closed = 0;
    for stream in &mut idle {
        stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut sink = Vec::new();
        // the FATAL about client_login_timeout, then end of stream
        if stream.read_to_end(&mut sink).is_ok() {
            closed += 1;
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (queries, slowest) = rt.block_on(worker).unwrap();
    println!(
        "flood: 2,000 idle connections opened in {took_to_open:?}; {closed} closed by client_login_timeout; \
         the established client ran {queries} queries meanwhile, slowest {slowest:?}"
    );
    assert_eq!(closed, 2000, "every abandoned connection was closed");
    assert!(queries > 100, "the established client kept running queries");
}

/// What the connection answers until ReadyForQuery, an error that ends it, or its close:
/// the SQLSTATEs of its ErrorResponses, and whether it is still usable (ended with 'Z').
fn answers(stream: &mut std::net::TcpStream) -> (Vec<String>, bool) {
    use std::io::Read;
    let mut codes = Vec::new();
    loop {
        let mut head = [0u8; 5];
        if stream.read_exact(&mut head).is_err() {
            return (codes, false);
        }
        let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        let mut body = vec![0u8; len.saturating_sub(4)];
        if stream.read_exact(&mut body).is_err() {
            return (codes, false);
        }
        match head[0] {
            b'E' => codes.push(
                body.split(|&b| b == 0)
                    .find_map(|f| f.strip_prefix(b"C"))
                    .map(|c| String::from_utf8_lossy(c).into_owned())
                    .unwrap_or_default(),
            ),
            b'Z' => return (codes, true),
            _ => {}
        }
    }
}

/// Bad input of every kind the issue lists, each on its own connection: each gets an
/// ErrorResponse or a clean close, pgrouter does not crash, a normal client works
/// afterwards, and pgrouter's RSS ends within 10 MiB of where it started.
#[test]
fn bad_input_gets_errors_or_clean_closes() {
    use crate::operations::{raw_login, trusted_user};
    use std::io::Write;
    use std::net::TcpStream;
    let env = Env::start(EnvOptions {
        users: trusted_user(),
        proxy: "max_message_size = \"1MiB\"\nclient_login_timeout = \"2s\"\n".into(),
        ..EnvOptions::default()
    });
    let port = env.proxy.port;
    crate::harness::assert_ok(&env.proxy.psql("app", &["-c", "create table bad_copy (v text)"]), "create table");
    let rss_before = env.proxy.mem_kib("VmRSS");
    let fresh = || {
        let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s
    };
    let mut report = Vec::new();
    // before login: garbage, lengths 0-3, a length beyond any startup packet
    let mut starts: Vec<(&str, Vec<u8>)> = vec![("garbage startup", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec())];
    for len in 0u32..4 {
        starts.push(("startup length 0-3", len.to_be_bytes().to_vec()));
    }
    starts.push(("startup length 2^31-1", 0x7fff_ffffu32.to_be_bytes().to_vec()));
    for (what, bytes) in starts {
        let mut s = fresh();
        s.write_all(&bytes).unwrap();
        let (codes, usable) = answers(&mut s);
        assert!(!usable, "{what}: the connection must not go on");
        report.push(format!("{what}: {codes:?} then closed"));
    }
    // after login: each case on its own session
    let query = |sql: &[u8]| frontend_message(b'Q', &[sql, b"\0"].concat());
    let sync = frontend_message(b'S', b"");
    let cases: Vec<(&str, Vec<u8>, bool)> = vec![
        ("message length 0", vec![b'Q', 0, 0, 0, 0], false),
        ("message length 3", vec![b'Q', 0, 0, 0, 3], false),
        ("message beyond max_message_size", [vec![b'Q'], 0x7fff_0000u32.to_be_bytes().to_vec()].concat(), false),
        ("unknown message type", frontend_message(b'!', b""), false),
        ("Bind without Parse", [frontend_message(b'B', b"\0nope\0\0\0\0\0\0\0"), sync.clone()].concat(), true),
        ("Execute without Bind", [frontend_message(b'E', b"nope\0\0\0\0\0"), sync.clone()].concat(), true),
        ("CopyData outside COPY", [frontend_message(b'd', b"stray"), query(b"select 1")].concat(), true),
        ("invalid UTF-8 in SQL", query(b"select '\xff\xfe'"), true),
    ];
    for (what, bytes, stays) in cases {
        let (mut s, _, _) = raw_login(port);
        s.write_all(&bytes).unwrap();
        let (codes, usable) = answers(&mut s);
        assert_eq!(usable, stays, "{what}: {codes:?}");
        if stays {
            s.write_all(&query(b"select 1")).unwrap();
            assert!(answers(&mut s).1, "{what}: the session goes on");
        }
        assert!(!codes.is_empty() || stays, "{what}: an ErrorResponse or a clean close");
        report.push(format!("{what}: {codes:?}, {}", if usable { "session goes on" } else { "closed" }));
    }
    // clients that vanish: mid-message, mid-COPY, mid-pipeline
    let (mut s, _, _) = raw_login(port);
    s.write_all(&[b'Q', 0, 0, 0, 100, b's', b'e']).unwrap();
    drop(s);
    let (mut s, _, _) = raw_login(port);
    s.write_all(&query(b"copy bad_copy from stdin")).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    s.write_all(&frontend_message(b'd', b"half a row")).unwrap();
    drop(s);
    let (mut s, _, _) = raw_login(port);
    s.write_all(
        &[
            frontend_message(b'P', b"\0select pg_sleep(0.2)\0\0\0"),
            frontend_message(b'B', b"\0\0\0\0\0\0\0\0"),
            frontend_message(b'E', b"\0\0\0\0\0"),
        ]
        .concat(),
    )
    .unwrap();
    drop(s);
    report.push("vanished mid-message, mid-COPY, mid-pipeline".into());
    // everyone else is fine
    std::thread::sleep(Duration::from_millis(500));
    let out = env.proxy.psql("app", &["-At", "-c", "select count(*) from bad_copy"]);
    assert_eq!(stdout(&out).trim(), "0", "a normal client works; the abandoned COPY left nothing: {}", stderr(&out));
    let rss_after = env.proxy.mem_kib("VmRSS");
    println!("bad input:\n  {}\n  RSS {rss_before} KiB -> {rss_after} KiB", report.join("\n  "));
    assert!(rss_after < rss_before + 10 * 1024, "RSS within 10 MiB: {rss_before} -> {rss_after} KiB");
}

/// client_idle_timeout: a client that holds no server connection and sends nothing that long
/// is closed with 57P05; one that keeps talking is not.
#[test]
fn idle_clients_are_closed() {
    let env = Env::start(EnvOptions { proxy: "client_idle_timeout = \"1s\"\n".into(), ..EnvOptions::default() });
    let url = env.proxy.url(APP_USER, APP_PASSWORD, "app");
    let rt = crate::harness::runtime();
    let (idle, busy) = rt.block_on(async {
        (crate::harness::connect(&url).await.unwrap(), crate::harness::connect(&url).await.unwrap())
    });
    for _ in 0..6 {
        std::thread::sleep(Duration::from_millis(300));
        rt.block_on(busy.simple_query("select 1")).expect("a talking client stays");
    }
    let err = rt.block_on(idle.simple_query("select 1")).expect_err("the idle client was closed");
    let text = crate::harness::describe(&err);
    assert!(text.contains("57P05") || idle.is_closed(), "{text}");
}
