//! The statement classifier (through the shape cache, as sessions call it) and the
//! ordered-merge planner, on arbitrary text.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgrouter::router::Router;
use pgrouter::router::shape::Shape;

fuzz_target!(|data: &[u8]| {
    let router = Router::new(64);
    let mut shape = Shape::default();
    let class = router.classify(data, &mut shape);
    // a second look is a cache hit and must agree
    let again = router.classify(data, &mut shape);
    assert_eq!(class.access, again.access);
    let _ = pgrouter::router::hint::parse_hints(data);
    let _ = pgrouter::router::hint::session_command(data);
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = pgrouter::router::keys::ordered_merge(text);
        let _ = pgrouter::router::copy::copy_from_stdin(text);
    }
});
