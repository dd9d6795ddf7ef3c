//! The benchmark's ceiling: the same HTTP layer as `comfy-runners serve`
//! (socket options, workers, pool warden) answering every request with a
//! fixed JSON body of a given size, touching no database.
//!
//!     cargo run --release --example ceiling -- 127.0.0.1:8190 1500 [workers]
//!
//! Prints `listening on http://HOST:PORT` on stderr once it accepts.

use std::sync::Arc;

use comfy_runners::http::{bind, Handler, Incoming, Reply, Server};

struct Fixed(Vec<u8>);

impl Handler for Fixed {
    fn handle(&self, _rq: &mut Incoming<'_>) -> Reply {
        Reply::json(200, self.0.clone())
    }
}

/// `{"pad":"xxx..."}` of exactly `size` bytes (at least the 10 bytes of `{"pad":""}`).
fn body(size: usize) -> Vec<u8> {
    let mut b = br#"{"pad":""#.to_vec();
    b.resize(size.max(10) - 2, b'x');
    b.extend_from_slice(b"\"}");
    b
}

fn main() {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:8190".into());
    let size: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(1500);
    let workers: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(4);
    let listener = bind(&addr).unwrap_or_else(|e| {
        eprintln!("ceiling: cannot listen on {addr}: {e}");
        std::process::exit(1);
    });
    let server = Server::start(listener, workers, Arc::new(Fixed(body(size)))).expect("start");
    eprintln!("listening on http://{}", server.addr());
    server.join();
}
