//! The client-facing framing: startup packets (with negotiation requests, cancels, protocol
//! versions) and then whole frames, from arbitrary bytes, as a client would send them.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use pgrouter::protocol::{framing, messages, startup};

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    while let Ok(Some(_)) = startup::decode(&mut buf) {}
    let mut buf = BytesMut::from(data);
    while let Ok(Some(frame)) = framing::decode(&mut buf, 1 << 16) {
        let body = frame.body();
        let _ = messages::query_text(body);
        let _ = messages::parse_parse(body);
        let _ = messages::parse_param_types(body);
        let _ = messages::parse_bind(body);
        let _ = messages::parse_bind_names(body);
        let _ = messages::data_row_values(body);
        let _ = messages::parse_error_fields(body);
    }
});
