//! The command-line entry points (DESIGN §10): run, `check`, `demo`. `main` only parses
//! arguments and calls these.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::app::{App, Stop, wait_for_stop};
use crate::config::{Config, LogFormat, Scheme};

#[derive(Debug, Parser)]
#[command(name = "pgrouter", version, about = "PostgreSQL routing proxy: pooling, read/write split, sharding")]
pub struct Cli {
    /// Config file (TOML)
    #[arg(long, short = 'c', env = "PGROUTER_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Validate a config file and print a summary of databases, shards and rules
    Check,
    /// Print where a statement would go and why (hint, rule, classification, fallback)
    Explain {
        /// The database whose routing applies (default: the first in the config)
        #[arg(long, short = 'd')]
        database: Option<String>,
        /// The SQL statement
        #[arg(allow_hyphen_values = true)]
        sql: String,
    },
    /// Start a local PostgreSQL topology (primary, streaming replica, two shards) and run
    /// pgrouter in front of it; Ctrl-C stops everything
    Demo {
        /// Where pgrouter listens
        #[arg(long, default_value = "127.0.0.1:6432")]
        listen: std::net::SocketAddr,
    },
}

impl Cli {
    pub fn run(self) -> ExitCode {
        match self.command {
            None => match self.config {
                Some(path) => run_proxy(&path),
                None => {
                    eprintln!(
                        "pgrouter: no config file; pass --config FILE or set PGROUTER_CONFIG (try `pgrouter demo`)"
                    );
                    ExitCode::from(2)
                }
            },
            Some(Command::Demo { listen }) => crate::demo::run(listen),
            Some(Command::Explain { database, sql }) => match self.config {
                Some(path) => explain(&path, database.as_deref(), &sql),
                None => {
                    eprintln!("pgrouter explain: pass --config FILE");
                    ExitCode::from(2)
                }
            },
            Some(Command::Check) => match self.config {
                Some(path) => check(&path),
                None => {
                    eprintln!("pgrouter check: pass --config FILE");
                    ExitCode::from(2)
                }
            },
        }
    }
}

/// Loads the config or prints every problem in it.
fn load(path: &Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|errors| {
        eprintln!("{}: {} error(s)", path.display(), errors.0.len());
        for e in &errors.0 {
            eprintln!("  {e}");
        }
        ExitCode::FAILURE
    })
}

fn check(path: &Path) -> ExitCode {
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    // the certificate files named by the config must be usable too
    let tls = std::iter::once(crate::frontend::tls::acceptor(&config.proxy.tls).map(drop)).chain(
        config
            .databases
            .iter()
            .enumerate()
            .map(|(i, db)| crate::backend::tls::settings(db, &format!("databases[{i}]")).map(drop)),
    );
    let errors: Vec<String> = tls.filter_map(Result::err).collect();
    if !errors.is_empty() {
        eprintln!("{}: {} error(s)", path.display(), errors.len());
        for e in errors {
            eprintln!("  {e}");
        }
        return ExitCode::FAILURE;
    }
    println!("{}: OK", path.display());
    println!("listen {}  users {}  databases {}", config.proxy.listen, config.users.len(), config.databases.len());
    for db in &config.databases {
        println!(
            "database {} (server database {}): {} pooling, pool_size {}, {} shard(s)",
            db.name,
            db.server_database,
            db.pool_mode,
            db.pool_size,
            db.shards.len()
        );
        for (i, shard) in db.shards.iter().enumerate() {
            let replicas: Vec<String> = shard.replicas.iter().map(ToString::to_string).collect();
            println!("  shard {i}: primary {}  replicas [{}]", shard.primary, replicas.join(", "));
        }
        for t in &db.sharded_tables {
            let scheme = match t.scheme {
                Scheme::Hash => "hash".to_owned(),
                Scheme::Range => format!("range, {} ranges", t.ranges.len()),
                Scheme::List => format!("list, {} lists", t.lists.len()),
            };
            println!("  sharded table {} by {} ({}, {scheme})", t.table, t.column, t.key_type);
        }
        for (i, rule) in db.routing.rules.iter().enumerate() {
            println!("  rule {i}: /{}/ -> {}", rule.pattern, rule.route);
        }
    }
    ExitCode::SUCCESS
}

fn explain(path: &Path, database: Option<&str>, sql: &str) -> ExitCode {
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let db = match database {
        Some(name) => config.database(name),
        None => config.databases.first(),
    };
    let Some(db) = db else {
        eprintln!("pgrouter explain: no database \"{}\" in {}", database.unwrap_or_default(), path.display());
        return ExitCode::FAILURE;
    };
    print!("{}", crate::router::explain::explain(db, sql));
    ExitCode::SUCCESS
}

fn run_proxy(path: &Path) -> ExitCode {
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    init_logging(config.proxy.log_format);
    serve(config, Some(path.to_path_buf()), || {})
}

/// Runs the proxy until SIGTERM (drain) or SIGINT (fast). `ready` runs once it listens.
pub fn serve(config: Config, config_path: Option<PathBuf>, ready: impl FnOnce()) -> ExitCode {
    let runtime = match runtime(config.proxy.workers) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pgrouter: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let listen = config.proxy.listen;
        let running = match App::start(config, config_path).await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(%listen, error = %e, "cannot start");
                return ExitCode::FAILURE;
            }
        };
        ready();
        match wait_for_stop(&running.app).await {
            Ok(Stop::Drain) => {
                tracing::info!("SIGTERM or SHUTDOWN: draining");
                running.drain().await;
                ExitCode::SUCCESS
            }
            Ok(Stop::Fast) => {
                tracing::info!("SIGINT: exiting now");
                ExitCode::SUCCESS
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot install signal handlers");
                ExitCode::FAILURE
            }
        }
    })
}

/// The tokio runtime for `workers` threads (0: one per core). With one, it is tokio's
/// current-thread scheduler: no work stealing, no cross-thread wake-ups. Without tokio's
/// time driver, which costs every park of the runtime: timers come from [`crate::timer`].
pub fn runtime(workers: usize) -> std::io::Result<tokio::runtime::Runtime> {
    if workers == 1 {
        return tokio::runtime::Builder::new_current_thread().enable_io().build();
    }
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if workers > 0 {
        builder.worker_threads(workers);
    }
    builder.enable_io().build()
}

/// Logs go to stderr; `RUST_LOG` overrides the default level (info).
pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}
