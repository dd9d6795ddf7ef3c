//! Keeps tiny_http's connection thread pool from starving new connections.
//!
//! tiny_http 0.12 serves each connection on a thread of its own pool, which
//! keeps four threads alive forever and others for 5 s after their last
//! connection. `TaskPool::spawn` starts a new thread only when its count of
//! idle threads is zero, and queues the connection otherwise; but a thread it
//! has just woken still counts as idle until it re-takes the queue's lock. In a
//! burst, the accept thread usually gets there first, sees "idle threads" again
//! and again, and queues connection after connection for the few threads that
//! were really idle. Each of those then serves one keep-alive connection for
//! as long as it stays open, and the rest wait with no answer until some
//! connection closes.
//!
//! So the danger is an idle pool thread at the moment a burst arrives. The
//! warden removes that state instead of racing it:
//!
//! - At start it opens `PLUGS` keep-alive connections to the server itself,
//!   one at a time, each confirmed by a round trip. They occupy the pool's
//!   permanent threads, so on a fresh server no thread is idle and every new
//!   connection gets a thread of its own at once.
//! - Threads freed when clients disconnect idle for a few seconds and can
//!   let a later burst queue a few connections behind busy ones again. While
//!   requests flow the warden replaces one plug every `BUSY_TICK`: closing a
//!   plug ends its thread's task, and a pool thread whose task ends takes the
//!   oldest queued connection before it goes idle. A queued connection is
//!   therefore served within a few ticks. When nothing is queued the freed
//!   thread goes idle and is at once taken again by the replacement plug, so
//!   rotating costs nothing in the healthy state.
//!
//! The plugs send `GET /.warden`, answered 404 without touching the database.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// tiny_http's pool keeps this many threads for good.
const PLUGS: usize = 4;
/// How often a plug is replaced while requests are flowing.
const BUSY_TICK: Duration = Duration::from_millis(25);
/// And while the server is idle (well within the server's idle timeout, so
/// the server never closes a plug itself).
const IDLE_EVERY: Duration = Duration::from_secs(1);
/// A freed pool thread takes well under this to get back to the queue.
const SETTLE: Duration = Duration::from_millis(1);

const PLUG_REQUEST: &[u8] = b"GET /.warden HTTP/1.1\r\nHost: warden\r\n\r\n";

pub struct Warden {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Warden {
    /// Plugs the pool of the server at `addr`; returns once the plugs are in.
    /// `served` counts the server's requests.
    pub fn start(addr: SocketAddr, served: Arc<AtomicU64>) -> io::Result<Warden> {
        let target = loopback(addr);
        let mut plugs = VecDeque::with_capacity(PLUGS);
        for _ in 0..PLUGS {
            plugs.push_back(plug(target)?);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = thread::Builder::new()
            .name("warden".into())
            .spawn(move || rotate(target, plugs, &served, &stopping))?;
        Ok(Warden { stop, thread: Some(thread) })
    }

    pub fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

/// Where to connect to reach a server listening on `addr`.
fn loopback(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => SocketAddr::new(Ipv4Addr::LOCALHOST.into(), addr.port()),
        IpAddr::V6(ip) if ip.is_unspecified() => SocketAddr::new(Ipv6Addr::LOCALHOST.into(), addr.port()),
        _ => addr,
    }
}

/// A connection to the server that has been answered once, so that a pool
/// thread is known to hold it.
fn plug(target: SocketAddr) -> io::Result<TcpStream> {
    let mut s = TcpStream::connect_timeout(&target, Duration::from_secs(1))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(1)))?;
    s.write_all(PLUG_REQUEST)?;
    // Read the whole answer, so the connection is clean. A plug whose answer
    // does not come is kept all the same: it is queued, and will hold the
    // thread that eventually takes it.
    let mut buf = [0u8; 1024];
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(1);
    while Instant::now() < deadline {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
        if response_complete(&got) {
            break;
        }
    }
    Ok(s)
}

fn response_complete(got: &[u8]) -> bool {
    let Some(head_end) = got.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&got[..head_end]).to_ascii_lowercase();
    let length = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    got.len() >= head_end + 4 + length
}

fn rotate(target: SocketAddr, mut plugs: VecDeque<TcpStream>, served: &AtomicU64, stop: &AtomicBool) {
    let mut seen = served.load(Ordering::Relaxed);
    let mut last = Instant::now();
    while !stop.load(Ordering::SeqCst) {
        thread::park_timeout(BUSY_TICK);
        let now_served = served.load(Ordering::Relaxed);
        // More than our own plug's request since the last rotation.
        let busy = now_served > seen + 1;
        if !(busy || last.elapsed() >= IDLE_EVERY) || stop.load(Ordering::SeqCst) {
            continue;
        }
        drop(plugs.pop_front());
        thread::sleep(SETTLE);
        match plug(target) {
            Ok(p) => plugs.push_back(p),
            Err(e) => eprintln!("comfy-runners: warden could not reconnect: {e}"),
        }
        seen = served.load(Ordering::Relaxed);
        last = Instant::now();
        if plugs.len() < PLUGS {
            // A failed reconnect is retried on the next tick.
            if let Ok(p) = plug(target) {
                plugs.push_back(p);
            }
        }
    }
}
