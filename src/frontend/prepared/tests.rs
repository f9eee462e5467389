use super::*;
use crate::protocol::framing;

fn frame(tag: u8, body: &[u8]) -> Frame {
    Frame::new(tag, body)
}

fn parse(name: &str, sql: &str) -> Frame {
    frame(b'P', format!("{name}\0{sql}\0\0\0").as_bytes())
}

fn bind(portal: &str, name: &str) -> Frame {
    frame(b'B', format!("{portal}\0{name}\0\0\0\0\0\0\0").as_bytes())
}

fn execute() -> Frame {
    frame(b'E', b"\0\0\0\0\0")
}

fn sync() -> Frame {
    frame(b'S', b"")
}

/// The messages in a byte stream: (tag, body).
fn messages(bytes: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut buf = BytesMut::from(bytes);
    let mut out = Vec::new();
    while let Some(f) = framing::decode(&mut buf, 1 << 20).unwrap() {
        out.push((f.tag(), f.body().to_vec()));
    }
    out
}

fn tags(bytes: &[u8]) -> String {
    messages(bytes).iter().map(|(t, _)| char::from(*t)).collect()
}

struct Conn {
    registry: Registry,
    client: ClientStatements,
    server: ServerStatements,
}

impl Conn {
    fn new() -> Self {
        Self { registry: Registry::default(), client: ClientStatements::default(), server: ServerStatements::default() }
    }

    fn ctx(&mut self) -> Context<'_> {
        Context { registry: &self.registry, client: &mut self.client, server: &mut self.server }
    }
}

/// Sends client frames; returns (to server, to client).
fn send(ex: &mut Exchange, conn: &mut Conn, frames: Vec<Frame>) -> (Vec<u8>, Vec<u8>) {
    let (mut s, mut c) = (BytesMut::new(), BytesMut::new());
    for f in frames {
        ex.client_frame(f, &mut conn.ctx(), &mut s, &mut c);
    }
    (s.to_vec(), c.to_vec())
}

/// Server replies (tag, body); returns what the client gets. As in the relay, a message is
/// handled whole if the flow watches it (ReadyForQuery, the COPY responses) or the exchange
/// does not take it as it passes.
fn reply(ex: &mut Exchange, conn: &mut Conn, replies: &[(u8, &[u8])]) -> Vec<u8> {
    let mut c = BytesMut::new();
    for (tag, body) in replies {
        let whole = matches!(tag, b'Z' | b'G') || !ex.pass(*tag);
        let d = if whole && ex.watches(*tag) {
            ex.server_message(*tag, body, &mut conn.ctx())
        } else {
            Disposition::Forward
        };
        if d == Disposition::Forward {
            c.extend_from_slice(Frame::new(*tag, body).as_bytes());
        }
        ex.emit_due(&mut c);
    }
    c.to_vec()
}

fn error(code: &str, msg: &str) -> Vec<u8> {
    format!("SERROR\0C{code}\0M{msg}\0\0").into_bytes()
}

#[test]
fn named_statements_are_renamed_and_prepared_once_per_server() {
    let mut conn = Conn::new();
    let mut ex = Exchange::default();
    let (to_server, to_client) =
        send(&mut ex, &mut conn, vec![parse("S_1", "select 1"), bind("", "S_1"), execute(), sync()]);
    let sent = messages(&to_server);
    assert_eq!(tags(&to_server), "PBES");
    assert!(sent[0].1.starts_with(b"pgr_1\0select 1\0"), "{:?}", String::from_utf8_lossy(&sent[0].1));
    assert!(sent[1].1.starts_with(b"\0pgr_1\0"));
    assert!(to_client.is_empty());
    let out =
        reply(&mut ex, &mut conn, &[(b'1', b""), (b'2', b""), (b'D', b"row"), (b'C', b"SELECT 1\0"), (b'Z', b"I")]);
    assert_eq!(tags(&out), "12DCZ");
    assert!(ex.is_empty());

    // the same client, next transaction, same server: Parse is skipped and answered here
    let (to_server, to_client) =
        send(&mut ex, &mut conn, vec![parse("S_2", "select 1"), bind("", "S_2"), execute(), sync()]);
    assert_eq!(tags(&to_server), "BES");
    assert_eq!(tags(&to_client), "1", "ParseComplete answered by the proxy");
    let out = reply(&mut ex, &mut conn, &[(b'2', b""), (b'C', b"SELECT 1\0"), (b'Z', b"I")]);
    assert_eq!(tags(&out), "2CZ");
}

#[test]
fn a_bind_on_a_server_without_the_statement_prepares_it_first() {
    let mut conn = Conn::new();
    let mut ex = Exchange::default();
    send(&mut ex, &mut conn, vec![parse("s0", "select $1"), sync()]);
    reply(&mut ex, &mut conn, &[(b'1', b""), (b'Z', b"I")]);
    // the client's next transaction lands on another server connection
    conn.server = ServerStatements::default();
    let (to_server, _) = send(&mut ex, &mut conn, vec![bind("", "s0"), execute(), sync()]);
    assert_eq!(tags(&to_server), "PBES", "Parse injected before the Bind");
    let out = reply(&mut ex, &mut conn, &[(b'1', b""), (b'2', b""), (b'C', b"SELECT 1\0"), (b'Z', b"I")]);
    assert_eq!(tags(&out), "2CZ", "the injected Parse's answer is hidden");
}

#[test]
fn errors_skip_to_sync_like_postgresql() {
    let mut conn = Conn::new();
    let mut ex = Exchange::default();
    // P(fails) B E S — the server answers E then Z; nothing for B and E
    send(&mut ex, &mut conn, vec![parse("bad", "selec 1"), bind("", "bad"), execute(), sync()]);
    let out = reply(&mut ex, &mut conn, &[(b'E', &error("42601", "syntax error")), (b'Z', b"I")]);
    assert_eq!(tags(&out), "EZ");
    assert!(ex.is_empty());
    assert!(conn.server.is_empty(), "the failed Parse is not remembered as prepared");
    // a skipped Parse whose ParseComplete would come after an earlier error is not sent
    send(&mut ex, &mut conn, vec![parse("ok", "select 2"), sync()]);
    reply(&mut ex, &mut conn, &[(b'1', b""), (b'Z', b"I")]);
    let (_, to_client) = send(&mut ex, &mut conn, vec![parse("", "selec"), parse("ok2", "select 2"), sync()]);
    assert!(to_client.is_empty(), "not due yet");
    let out = reply(&mut ex, &mut conn, &[(b'E', &error("42601", "syntax error")), (b'Z', b"I")]);
    assert_eq!(tags(&out), "EZ", "no ParseComplete after the error");
}

#[test]
fn messages_sent_after_an_error_before_sync_are_skipped_like_postgresql() {
    let mut conn = Conn::new();
    let mut ex = Exchange::default();
    let flush = frame(b'H', b"");
    send(&mut ex, &mut conn, vec![parse("", "select 1/0"), bind("", ""), execute(), flush]);
    let out = reply(&mut ex, &mut conn, &[(b'1', b""), (b'2', b""), (b'E', &error("22012", "division by zero"))]);
    assert_eq!(tags(&out), "12E");
    // only now does the client send the rest of the segment: the server ignores it
    let (to_server, to_client) =
        send(&mut ex, &mut conn, vec![parse("a", "select 42"), bind("", "a"), execute(), sync()]);
    assert_eq!(tags(&to_server), "PBES");
    assert!(to_client.is_empty());
    let out = reply(&mut ex, &mut conn, &[(b'Z', b"I")]);
    assert_eq!(tags(&out), "Z");
    assert!(ex.is_empty() && conn.server.is_empty(), "nothing was prepared");
    // the next segment prepares the statement for real
    let (to_server, _) = send(&mut ex, &mut conn, vec![parse("b", "select 42"), bind("", "b"), execute(), sync()]);
    assert_eq!(tags(&to_server), "PBES");
    let out = reply(&mut ex, &mut conn, &[(b'1', b""), (b'2', b""), (b'C', b"SELECT 1\0"), (b'Z', b"I")]);
    assert_eq!(tags(&out), "12CZ");
    assert!(ex.is_empty() && !conn.server.is_empty());
}

#[test]
fn an_error_of_the_sync_itself_keeps_the_next_batch_in_step() {
    let mut conn = Conn::new();
    let mut ex = Exchange::default();
    // two pipelined batches; the first one's implicit COMMIT fails at its Sync
    send(&mut ex, &mut conn, vec![parse("s", "insert"), bind("", "s"), execute(), sync()]);
    send(&mut ex, &mut conn, vec![parse("s", "insert"), bind("", "s"), execute(), sync()]);
    let out = reply(
        &mut ex,
        &mut conn,
        &[(b'1', b""), (b'2', b""), (b'C', b"INSERT 0 1\0"), (b'E', &error("23503", "deferred fk")), (b'Z', b"I")],
    );
    assert_eq!(tags(&out), "12CEZ1", "the second batch's ParseComplete (answered by the proxy) follows at once");
    let out = reply(&mut ex, &mut conn, &[(b'2', b""), (b'C', b"INSERT 0 1\0"), (b'Z', b"I")]);
    assert_eq!(tags(&out), "2CZ");
    assert!(ex.is_empty());
}

#[test]
fn close_of_a_named_statement_is_answered_locally_in_order() {
    let mut conn = Conn::new();
    let mut ex = Exchange::default();
    send(&mut ex, &mut conn, vec![parse("a", "select 1"), sync()]);
    reply(&mut ex, &mut conn, &[(b'1', b""), (b'Z', b"I")]);
    let (to_server, to_client) = send(&mut ex, &mut conn, vec![bind("", "a"), execute(), frame(b'C', b"Sa\0"), sync()]);
    assert_eq!(tags(&to_server), "BES");
    assert!(to_client.is_empty(), "CloseComplete waits for the replies before it");
    let out = reply(&mut ex, &mut conn, &[(b'2', b""), (b'C', b"SELECT 1\0"), (b'Z', b"I")]);
    assert_eq!(tags(&out), "2C3Z");
    // the client's name is gone: a Bind now goes through unchanged (and the server errors)
    let (to_server, _) = send(&mut ex, &mut conn, vec![bind("", "a")]);
    assert!(messages(&to_server)[0].1.starts_with(b"\0a\0"));
}

#[test]
fn describe_statement_is_renamed() {
    let mut conn = Conn::new();
    let mut ex = Exchange::default();
    let (to_server, _) = send(&mut ex, &mut conn, vec![parse("st", "select 1"), frame(b'D', b"Sst\0"), sync()]);
    let sent = messages(&to_server);
    assert_eq!(tags(&to_server), "PDS");
    assert_eq!(sent[1].1, b"Spgr_1\0");
    let out = reply(&mut ex, &mut conn, &[(b'1', b""), (b't', b"\0\0"), (b'T', b"\0\0"), (b'Z', b"I")]);
    assert_eq!(tags(&out), "1tTZ");
}

#[test]
fn a_stale_plan_gets_a_new_name() {
    let mut conn = Conn::new();
    let mut ex = Exchange::default();
    send(&mut ex, &mut conn, vec![parse("q", "select * from t"), bind("", "q"), execute(), sync()]);
    let stale = error("0A000", "cached plan must not change result type");
    let out = reply(&mut ex, &mut conn, &[(b'1', b""), (b'2', b""), (b'E', &stale), (b'Z', b"I")]);
    assert_eq!(tags(&out), "12EZ");
    let (to_server, _) = send(&mut ex, &mut conn, vec![bind("", "q"), execute(), sync()]);
    assert_eq!(tags(&to_server), "PBES", "prepared again");
    assert!(messages(&to_server)[0].1.starts_with(b"pgr_2\0"), "under a new name");
    // PostgreSQL reports a stale plan at Bind as well
    let out = reply(&mut ex, &mut conn, &[(b'1', b""), (b'E', &stale), (b'Z', b"I")]);
    assert_eq!(tags(&out), "EZ");
    let (to_server, _) = send(&mut ex, &mut conn, vec![bind("", "q"), execute(), sync()]);
    assert!(messages(&to_server)[0].1.starts_with(b"pgr_3\0"), "renewed after a Bind error");
}

#[test]
fn preparing_again_after_deallocate_gets_a_fresh_statement() {
    let mut conn = Conn::new();
    let mut ex = Exchange::default();
    send(&mut ex, &mut conn, vec![parse("a", "select * from t"), sync()]);
    reply(&mut ex, &mut conn, &[(b'1', b""), (b'Z', b"I")]);
    // the same text under another name is shared: answered by the proxy
    let (to_server, _) = send(&mut ex, &mut conn, vec![parse("b", "select * from t"), sync()]);
    assert_eq!(tags(&to_server), "S");
    reply(&mut ex, &mut conn, &[(b'Z', b"I")]);
    // DEALLOCATE ALL (after DDL, say), then Parse: a new server-side statement
    conn.client.clear();
    let (to_server, _) = send(&mut ex, &mut conn, vec![parse("a", "select * from t"), sync()]);
    assert_eq!(tags(&to_server), "PS");
    assert!(messages(&to_server)[0].1.starts_with(b"pgr_2\0"));
}

#[test]
fn extended_copy_in_owes_one_ready_for_query() {
    let mut conn = Conn::new();
    let mut ex = Exchange::default();
    send(&mut ex, &mut conn, vec![parse("c", "copy t from stdin"), bind("", "c"), execute(), sync()]);
    reply(&mut ex, &mut conn, &[(b'1', b""), (b'2', b""), (b'G', b"\0\0\0")]);
    send(&mut ex, &mut conn, vec![frame(b'd', b"1\n"), frame(b'c', b""), sync()]);
    let out = reply(&mut ex, &mut conn, &[(b'C', b"COPY 1\0"), (b'Z', b"I")]);
    assert_eq!(tags(&out), "CZ");
    assert!(ex.is_empty());
}

#[test]
fn full_servers_close_their_least_recently_used_statement() {
    let mut conn = Conn::new();
    let mut ex = Exchange::default();
    for i in 0..SERVER_STATEMENTS {
        send(&mut ex, &mut conn, vec![parse(&format!("s{i}"), &format!("select {i}")), sync()]);
        reply(&mut ex, &mut conn, &[(b'1', b""), (b'Z', b"I")]);
    }
    let (to_server, _) = send(&mut ex, &mut conn, vec![parse("one_more", "select 'x'"), sync()]);
    assert_eq!(tags(&to_server), "CPS");
    let out = reply(&mut ex, &mut conn, &[(b'3', b""), (b'1', b""), (b'Z', b"I")]);
    assert_eq!(tags(&out), "1Z", "the eviction's CloseComplete is hidden");
    assert_eq!(conn.server.len(), SERVER_STATEMENTS);
}

#[test]
fn answers_whose_type_says_enough_are_taken_as_they_pass() {
    let (mut ex, mut conn) = (Exchange::default(), Conn::new());
    send(&mut ex, &mut conn, vec![frame(b'Q', b"select 1\0")]);
    for tag in [b'T', b'D', b'C', b'N', b'E'] {
        assert!(ex.pass(tag), "{}", char::from(tag));
    }
    assert!(!ex.is_empty(), "the query is answered only by its ReadyForQuery");
    send(&mut ex, &mut conn, vec![parse("", "select 1"), bind("", ""), execute(), sync()]);
    // the simple query's ReadyForQuery comes first (handled whole), then the batch's answers
    assert_eq!(tags(&reply(&mut ex, &mut conn, &[(b'Z', b"I")])), "Z");
    for tag in [b'1', b'2', b'D', b'C'] {
        assert!(ex.pass(tag), "{}", char::from(tag));
    }
    assert!(!ex.pass(b'E'), "an error's body is read");
}

#[test]
fn an_answer_followed_by_one_of_the_proxys_own_is_handled_whole() {
    let (mut ex, mut conn) = (Exchange::default(), Conn::new());
    send(&mut ex, &mut conn, vec![parse("a", "select 1"), sync()]);
    reply(&mut ex, &mut conn, &[(b'1', b""), (b'Z', b"I")]);
    // the Close of a named statement is answered by the proxy, right after the Execute's answer
    send(&mut ex, &mut conn, vec![bind("", "a"), execute(), frame(b'C', b"Sa\0"), sync()]);
    assert!(ex.pass(b'2'));
    assert!(!ex.pass(b'C'), "the CloseComplete due after it must follow it in the stream");
    assert_eq!(tags(&reply(&mut ex, &mut conn, &[(b'C', b"SELECT 1\0"), (b'Z', b"I")])), "C3Z");
}
