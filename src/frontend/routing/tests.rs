//! Unit tests of the routing state's own helpers (routing itself is tested end to end).

use super::*;

#[test]
fn a_query_text_is_the_same_whether_or_not_it_was_shaped_last() {
    let mut state = RoutingState::default();
    state.shape(b"select 1");
    let bodies: [&[u8]; 8] =
        [b"select 1\0", b"select 2\0", b"select 1\0x\0", b"select 1", b"select\0 1\0", b"", b"\0", b"select 1 \0"];
    for body in bodies {
        assert_eq!(state.query_text(body), messages::query_text(body), "{:?}", String::from_utf8_lossy(body));
    }
    assert_eq!(state.query_text(b"select 1\0"), Some(&b"select 1"[..]));
}
