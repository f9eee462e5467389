//! Micro-benchmarks of the sans-IO protocol code on the per-message path: client framing,
//! scanning a backend result stream, and a whole SCRAM login on the proxy's side.
//!
//! Run with `cargo bench --bench protocol`. Numbers are machine-dependent; compare runs on
//! the same machine only.

use std::hint::black_box;

use bytes::BytesMut;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use pgrouter::protocol::framing;
use pgrouter::protocol::scan::{Piece, Scanner};
use pgrouter::protocol::scram::{ScramServer, ScramVerifier};
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};

fn message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![tag];
    v.extend_from_slice(&u32::try_from(body.len() + 4).unwrap().to_be_bytes());
    v.extend_from_slice(body);
    v
}

/// What pgbench -S sends per transaction in extended mode: Parse, Bind, Describe, Execute, Sync.
fn extended_batch() -> Vec<u8> {
    let mut v = message(b'P', b"\0SELECT abalance FROM pgbench_accounts WHERE aid = $1;\0\0\0");
    v.extend(message(b'B', b"\0\0\0\0\0\x01\0\0\0\x0512345\0\0"));
    v.extend(message(b'D', b"P\0"));
    v.extend(message(b'E', b"\0\0\0\0\0"));
    v.extend(message(b'S', b""));
    v
}

fn framing(c: &mut Criterion) {
    let batch = extended_batch();
    let mut group = c.benchmark_group("framing");
    group.throughput(Throughput::Elements(5));
    group.bench_function("decode extended batch (5 messages)", |b| {
        b.iter(|| {
            let mut buf = BytesMut::from(&batch[..]);
            while let Some(frame) = framing::decode(&mut buf, 1 << 20).unwrap() {
                black_box(frame.tag());
            }
        });
    });
    group.finish();
}

fn scanning(c: &mut Criterion) {
    // RowDescription, 1000 DataRows, CommandComplete, ReadyForQuery
    let mut stream = message(b'T', &[0u8; 30]);
    for i in 0..1000u32 {
        let mut row = vec![0, 2, 0, 0, 0, 4];
        row.extend_from_slice(&i.to_be_bytes());
        row.extend_from_slice(&[0, 0, 0, 16]);
        row.extend_from_slice(b"0123456789abcdef");
        stream.extend(message(b'D', &row));
    }
    stream.extend(message(b'C', b"SELECT 1000\0"));
    stream.extend(message(b'Z', b"I"));
    let mut group = c.benchmark_group("scan");
    group.throughput(Throughput::Bytes(stream.len() as u64));
    group.bench_function("result of 1000 rows", |b| {
        b.iter(|| {
            let mut scanner = Scanner::default();
            let mut at = 0;
            let wanted = |t| matches!(t, b'Z' | b'S' | b'G');
            while let Piece::Pass(n) | Piece::Message { len: n, .. } =
                scanner.next(&stream[at..], 1 << 20, wanted).unwrap()
            {
                at += n;
            }
            black_box(at)
        });
    });
    group.finish();
}

fn scram(c: &mut Criterion) {
    let verifier = ScramVerifier::generate("app-secret");
    // The client's PBKDF2 is the client's cost; this measures the proxy's proof check.
    c.bench_function("scram server: verify client-final", |b| {
        b.iter_batched(
            || {
                let mut server = ScramServer::new(verifier.clone());
                let mut client = ScramSha256::new(b"app-secret", ChannelBinding::unsupported());
                let server_first = server.client_first(client.message()).unwrap();
                client.update(&server_first).unwrap();
                (server, client.message().to_vec())
            },
            |(mut server, client_final)| black_box(server.client_final(&client_final).unwrap()),
            criterion::BatchSize::SmallInput,
        );
    });
}

criterion_group!(benches, framing, scanning, scram);
criterion_main!(benches);
