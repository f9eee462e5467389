//! `pgrouter demo`: the zero-setup way to try pgrouter. Starts a primary with a streaming
//! replica and two shard primaries from the machine's PostgreSQL binaries, writes a config for
//! them, and runs the proxy in the foreground until Ctrl-C, which stops everything it started.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::process::ExitCode;

use crate::cli::{init_logging, serve};
use crate::cluster::{Topology, TopologyOptions};
use crate::config::{Config, LogFormat};

const USER: &str = "app";
const PASSWORD: &str = "app-secret";

pub fn run(listen: SocketAddr) -> ExitCode {
    init_logging(LogFormat::Text);
    println!("pgrouter demo: starting PostgreSQL (primary, streaming replica, two shard primaries)...");
    let topology = match Topology::start(TopologyOptions::default()) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("pgrouter demo: cannot start PostgreSQL: {e}");
            return ExitCode::FAILURE;
        }
    };
    let text = config_text(&topology, listen);
    let path = topology.base_dir().join("pgrouter.toml");
    if let Err(e) = std::fs::write(&path, &text) {
        eprintln!("pgrouter demo: cannot write {}: {e}", path.display());
        return ExitCode::FAILURE;
    }
    let config = match Config::from_toml(&text) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("pgrouter demo: generated config is invalid:\n{e}");
            return ExitCode::FAILURE;
        }
    };
    let code = serve(config, Some(path.clone()), || print_banner(&topology, listen, &path));
    drop(topology);
    println!("pgrouter demo: stopped pgrouter and PostgreSQL");
    code
}

fn config_text(topology: &Topology, listen: SocketAddr) -> String {
    let replicas: Vec<String> = topology.replica.iter().map(|r| format!("\"{}\"", r.addr())).collect();
    let mut text = format!(
        "# Written by `pgrouter demo`.\n[proxy]\nlisten = \"{listen}\"\nshutdown_timeout = \"5s\"\n\n\
         [[users]]\nname = \"{USER}\"\npassword = \"{PASSWORD}\"\n\n\
         # The primary and its streaming replica.\n\
         [[databases]]\nname = \"app\"\npool_mode = \"transaction\"\npool_size = 10\n\n\
         [[databases.shards]]\nprimary = \"{}\"\nreplicas = [{}]\n",
        topology.primary.addr(),
        replicas.join(", ")
    );
    text.push_str("\n# The two shard primaries, as one database.\n[[databases]]\nname = \"shop\"\nserver_database = \"app\"\npool_size = 10\n");
    for shard in &topology.shards {
        write!(text, "\n[[databases.shards]]\nprimary = \"{}\"\n", shard.addr()).expect("write to String");
    }
    text.push_str("\n[[databases.sharded_tables]]\ntable = \"orders\"\ncolumn = \"customer_id\"\ntype = \"bigint\"\n");
    text
}

fn print_banner(topology: &Topology, listen: SocketAddr, config: &std::path::Path) {
    println!();
    for server in topology.servers() {
        println!("  {:<8} PostgreSQL on {}", server.name, server.addr());
    }
    println!("  pgrouter on {listen}, config {}", config.display());
    println!();
    println!("Connect with:");
    println!("  psql \"postgres://{USER}:{PASSWORD}@{}:{}/app\"", listen.ip(), listen.port());
    println!("  pgbench -i \"postgres://{USER}:{PASSWORD}@{}:{}/app\"", listen.ip(), listen.port());
    println!();
    println!("In database app, reads go to the streaming replica and writes to the primary");
    println!("(try `select pg_is_in_recovery()`). In database shop, `create table orders");
    println!("(customer_id bigint, note text)` runs on both shards, and a statement on orders goes");
    println!("to the shard its customer_id names. Press Ctrl-C to stop.");
}
