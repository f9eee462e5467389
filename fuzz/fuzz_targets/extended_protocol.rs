//! The extended-protocol bookkeeping of transaction pooling: client messages (renamed
//! statements, Parse/Bind/Describe/Execute/Close/Sync) and server answers interleaved as the
//! input says, through `prepared::Exchange` and the relay's `Flow`.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use pgrouter::backend::statements::ServerStatements;
use pgrouter::frontend::flow::Flow;
use pgrouter::frontend::prepared::{ClientStatements, Context, Exchange, Registry};
use pgrouter::protocol::framing::Frame;
use pgrouter::protocol::messages::TxStatus;

fuzz_target!(|data: &[u8]| {
    let registry = Registry::default();
    let mut client = ClientStatements::default();
    let mut server = ServerStatements::default();
    let mut exchange = Exchange::default();
    let mut flow = Flow::default();
    let (mut to_server, mut to_client) = (BytesMut::new(), BytesMut::new());
    // each step: direction+tag byte, a length byte, then that many body bytes
    let mut rest = data;
    while let [head, len, tail @ ..] = rest {
        let n = usize::from(*len).min(tail.len());
        let (body, next) = tail.split_at(n);
        rest = next;
        let tag = head & 0x7f;
        if head & 0x80 == 0 {
            let tag = b"PBDECSHQFdcf"[usize::from(tag) % 12];
            flow.on_client(tag);
            let mut ctx = Context { registry: &registry, client: &mut client, server: &mut server };
            exchange.client_frame(Frame::new(tag, body), &mut ctx, &mut to_server, &mut to_client);
        } else {
            let tag = b"123tnTCIsZEGd"[usize::from(tag) % 13];
            let ready = (tag == b'Z').then(|| TxStatus::from_byte(*body.first().unwrap_or(&b'I'))).flatten();
            flow.on_server(tag, ready);
            if exchange.watches(tag) {
                let mut ctx = Context { registry: &registry, client: &mut client, server: &mut server };
                let _ = exchange.server_message(tag, body, &mut ctx);
            }
            exchange.emit_due(&mut to_client);
        }
        let _ = (flow.at_rest(), flow.idle(), flow.take_answered());
        to_server.clear();
        to_client.clear();
    }
});
