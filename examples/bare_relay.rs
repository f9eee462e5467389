//! The floor for a tokio proxy: a TCP relay that copies bytes between each client and one
//! PostgreSQL server, on tokio's current-thread runtime, with no parsing, pooling or timers
//! of its own. `benches/compare.sh` can run pgbench through it (`BARE=1`) to show how much of
//! pgrouter's CPU per query is the runtime's and how much is pgrouter's.
//!
//! Usage: `cargo run --release --example bare_relay -- LISTEN_ADDR SERVER_ADDR`

use std::net::SocketAddr;

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(listen), Some(server)) = (args.next(), args.next()) else {
        eprintln!("usage: bare_relay LISTEN_ADDR SERVER_ADDR");
        std::process::exit(2);
    };
    let listen: SocketAddr = listen.parse().map_err(std::io::Error::other)?;
    let server: SocketAddr = server.parse().map_err(std::io::Error::other)?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen).await?;
        loop {
            let (mut client, _) = listener.accept().await?;
            tokio::spawn(async move {
                let Ok(mut upstream) = tokio::net::TcpStream::connect(server).await else { return };
                let _ = client.set_nodelay(true);
                let _ = upstream.set_nodelay(true);
                let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
            });
        }
    })
}
