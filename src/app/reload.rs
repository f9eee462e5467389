//! Config reload (SIGHUP, or RELOAD on the admin console): the config file is read and
//! checked again; a valid one becomes the new snapshot, an invalid one is refused with every
//! error logged under its key path, and the old config stays in effect.
//!
//! Nothing is dropped: pools whose server and credentials did not change keep their
//! connections and are resized; pools the new config no longer has close their connections
//! as clients give them back; servers keep their health records. Sessions move to the new
//! snapshot between transactions (`Session::follow_reload`), so a transaction finishes on
//! the config it started with.

use std::sync::Arc;

use super::{App, Snapshot, start_health_checks};
use crate::config::Config;

impl App {
    /// Reads the config file again and puts it in effect; the error (every problem, one per
    /// line) when it is refused.
    pub fn reload(&self) -> Result<(), String> {
        let outcome = self.try_reload();
        let result = if outcome.is_ok() { "ok" } else { "error" };
        self.telemetry.counter("pgrouter_config_reloads_total", &[("result", result)]).increment(1);
        outcome
    }

    fn try_reload(&self) -> Result<(), String> {
        let path = self.config_path.as_ref().ok_or("pgrouter was started without a config file to read again")?;
        let mut config = Config::load(path).map_err(|errors| {
            for e in &errors.0 {
                tracing::error!(key = %e.path, error = %e.message, config = %path.display(), "config reload refused; the running config stays");
            }
            errors.to_string()
        })?;
        let _serialised = self.reloading.lock().expect("reload lock");
        let old = self.now();
        keep_restart_only_settings(&old.config, &mut config);
        let snapshot = Snapshot::build(config, &self.telemetry, Some(&old), &self.shutdown).inspect_err(|e| {
            tracing::error!(error = %e, config = %path.display(), "config reload refused; the running config stays");
        })?;
        start_health_checks(&snapshot);
        old.pools.retire_unused(&snapshot.pools);
        let (databases, users, generation) =
            (snapshot.config.databases.len(), snapshot.config.users.len(), snapshot.generation);
        self.current.store(Arc::new(snapshot));
        self.generation.store(generation, std::sync::atomic::Ordering::Release);
        old.checkers.cancel();
        tracing::info!(config = %path.display(), generation, databases, users, "config reloaded");
        Ok(())
    }
}

/// Settings a running process cannot change (its listeners and runtime) keep their running
/// values, with a warning saying a restart is needed.
fn keep_restart_only_settings(running: &Config, new: &mut Config) {
    let (old, p) = (&running.proxy, &mut new.proxy);
    let mut kept = Vec::new();
    macro_rules! keep {
        ($($field:ident),*) => {$(
            if p.$field != old.$field {
                p.$field = old.$field;
                kept.push(concat!("proxy.", stringify!($field)));
            }
        )*};
    }
    keep!(listen, metrics_listen, workers, instance_id, reuse_port, log_format);
    for key in kept {
        tracing::warn!(key, "changing this setting needs a restart; the running value stays");
    }
}
