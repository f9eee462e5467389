//! The full test topology: a primary with a streaming replica and two shard primaries, with
//! pgrouter in front, as `pgrouter demo` starts it.

use crate::harness::{Env, EnvOptions, assert_ok, stdout, wait_until};

#[test]
fn full_topology_with_replica_and_shards() {
    let env = Env::start(EnvOptions { replica: true, shards: 2, ..EnvOptions::default() });
    let replica = env.topo.replica.as_ref().expect("replica started");
    assert_eq!(replica.psql("app", "select pg_is_in_recovery()").unwrap(), "t");
    assert_eq!(env.topo.shards.len(), 2);
    for shard in &env.topo.shards {
        assert_eq!(shard.psql("app", "select pg_is_in_recovery()").unwrap(), "f");
    }
    // writes through pgrouter reach the primary and stream to the replica
    let out =
        env.proxy.psql("app", &["-c", "create table streamed (id int)", "-c", "insert into streamed values (1), (2)"]);
    assert_ok(&out, "write through pgrouter");
    assert!(
        wait_until(std::time::Duration::from_secs(10), || replica
            .psql("app", "select count(*) from streamed")
            .ok()
            .as_deref()
            == Some("2")),
        "the replica did not receive the rows"
    );
    // session pooling keeps everything on the primary; transaction pooling reads from the replica
    let out = env.proxy.psql("app_session", &["-At", "-c", "select pg_is_in_recovery()"]);
    assert_eq!(stdout(&out).trim(), "f", "session pooling uses the primary");
    let on_replica = wait_until(std::time::Duration::from_secs(10), || {
        stdout(&env.proxy.psql("app", &["-At", "-c", "select pg_is_in_recovery()"])).trim() == "t"
    });
    assert!(on_replica, "reads never reached the replica");
}
