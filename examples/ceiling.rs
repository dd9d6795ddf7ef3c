//! The benchmark's ceilings: a server answering every request with a fixed
//! JSON body of a given size, touching no database. Two kinds:
//!
//! - `bare`: tiny_http alone, as any service would start it: a listener with
//!   `TCP_NODELAY` (without it every response over 1 KiB waits ~40 ms for a
//!   delayed ACK, see the README) handed to `Server::from_listener`, and
//!   WORKERS threads calling `recv()`. Nothing else: no guard against
//!   tiny_http's connection starvation, so some connections of a burst may go
//!   unanswered, which the harness's loadcheck reports.
//! - `layer`: the same HTTP layer as `comfy-runners serve` (socket options,
//!   workers, pool warden), so the ratio to it is what the database and the
//!   handlers cost.
//!
//!     cargo run --release --example ceiling -- bare|layer 127.0.0.1:8190 1500 [WORKERS]
//!
//! Prints `listening on http://HOST:PORT` on stderr once it accepts.

use std::sync::Arc;
use std::thread;

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

fn fail(msg: String) -> ! {
    eprintln!("ceiling: {msg}");
    std::process::exit(1);
}

fn main() {
    let mut args = std::env::args().skip(1);
    let kind = args.next().unwrap_or_default();
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:8190".into());
    let size: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(1500);
    let workers: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(4);
    let listener = bind(&addr).unwrap_or_else(|e| fail(format!("cannot listen on {addr}: {e}")));
    let body = body(size);
    match kind.as_str() {
        "layer" => {
            let server = Server::start(listener, workers, Arc::new(Fixed(body)))
                .unwrap_or_else(|e| fail(format!("cannot start: {e}")));
            eprintln!("listening on http://{}", server.addr());
            server.join();
        }
        "bare" => {
            let server = tiny_http::Server::from_listener(listener, None)
                .unwrap_or_else(|e| fail(format!("cannot start: {e}")));
            eprintln!("listening on http://{}", server.server_addr());
            let server = Arc::new(server);
            let content_type =
                tiny_http::Header::from_bytes(&b"Content-Type"[..], &b"application/json"[..])
                    .unwrap_or_else(|()| fail("bad header".into()));
            let threads: Vec<_> = (0..workers)
                .map(|_| {
                    let (server, body, content_type) =
                        (server.clone(), body.clone(), content_type.clone());
                    thread::spawn(move || {
                        while let Ok(rq) = server.recv() {
                            let reply = tiny_http::Response::from_data(body.clone())
                                .with_header(content_type.clone());
                            let _ = rq.respond(reply);
                        }
                    })
                })
                .collect();
            for t in threads {
                let _ = t.join();
            }
        }
        other => fail(format!("the kind is bare or layer, not {other:?}")),
    }
}
