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
//! - At start, once the pool's permanent threads are up, it opens keep-alive
//!   connections to the server itself ("plugs"), one at a time, each confirmed
//!   by a round trip, until one of them makes the pool start a new thread:
//!   proof that no idle thread is left. On a fresh server every new
//!   connection then gets a thread of its own at once.
//! - Threads freed when clients disconnect idle for 5 s and can let a burst
//!   in that window queue connections behind busy ones again (a client that
//!   opens one connection, closes it and then opens many does exactly this;
//!   wrk is one). While requests flow (and for a while after) the warden
//!   replaces its plugs every `BUSY_TICK`: closing a plug ends its thread's
//!   task, and a pool thread whose task ends takes the oldest queued
//!   connection before it goes idle. When nothing is queued the freed thread
//!   goes idle and is at once taken again by a replacement plug, so rotating
//!   costs little in the healthy state. When something was queued, the freed
//!   threads went to it, so the replacements find no idle thread and the pool
//!   starts a new thread for each: the process gains as many threads as it
//!   opened plugs. That is the sign that more may be queued, and the warden
//!   rotates again at once, draining the queue a few connections per round in
//!   milliseconds rather than per tick.
//! - Once requests stop, rotation stops too (it would only free threads),
//!   but for one every `RENEW_EVERY`: new connections must keep coming, for
//!   the idle timeout also bounds tiny_http's accept (see there), and so the
//!   server's idle timeout never closes a plug. Threads freed by departed
//!   clients expire after 5 s, so a server that has gone quiet is again as a
//!   fresh one, but for the last client's thread: the first request after a
//!   quiet spell wakes the warden at once, and for a short while it rotates
//!   every `EAGER_TICK`, since a burst then is likely, and likely to be
//!   queued behind that thread.
//!
//! The plugs send `GET /.warden`, answered 404 without touching the database,
//! and left out of the server's count of requests (`Traffic`), so that the
//! warden's own requests never look like clients.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::{self, JoinHandle, Thread};
use std::time::{Duration, Instant};

/// tiny_http starts this many pool threads, plus its accept thread.
const POOL_THREADS: usize = 4;
/// Plugs at most (a bound, in case thread counts cannot be read).
const MAX_PLUGS: usize = 16;
/// How often the plugs are replaced while requests are flowing.
const BUSY_TICK: Duration = Duration::from_millis(20);
/// Rotations in a row while a backlog lasts, at most, before the next tick.
const FAST_ROUNDS: u32 = 32;
/// How long the warden waits for its replacement plugs' answers (so that the
/// pool has started whatever threads it starts for them before they are
/// counted, and so that a plug is closed with nothing left to read).
const ANSWER_WITHIN: Duration = Duration::from_millis(5);
/// After a quiet spell, rotations come this often for `EAGER_FOR`.
const EAGER_TICK: Duration = Duration::from_millis(5);
const EAGER_FOR: Duration = Duration::from_millis(50);
/// While quiet, how often the warden looks at its plugs (requests wake it).
const QUIET_TICK: Duration = Duration::from_secs(1);
/// "Flowing": a request other than a plug's was served this recently.
const BUSY_FOR: Duration = Duration::from_secs(2);
/// While quiet, how often the plugs are replaced all the same. The idle
/// timeout is set on the listening socket (so that every connection inherits
/// it), and there it also bounds how long tiny_http's accept waits: an accept
/// that times out ends tiny_http's accept loop for good, so a new connection
/// must come well within it, and so that the server's idle timeout never
/// closes a plug either.
const RENEW_EVERY: Duration = Duration::from_secs(20);
/// A freed pool thread takes well under this to get back to the queue.
const SETTLE: Duration = Duration::from_millis(1);

/// The path of the plugs' requests; the server leaves them out of its count
/// of requests served, which is how the warden tells that clients are busy.
pub const PLUG_PATH: &str = "/.warden";
const PLUG_REQUEST: &[u8] = b"GET /.warden HTTP/1.1\r\nHost: warden\r\n\r\n";

/// What the server tells the warden: how many requests it has served (the
/// plugs' not counted), and, for the first request after a quiet spell, a
/// wake-up call.
#[derive(Default)]
pub struct Traffic {
    served: AtomicU64,
    /// Set by the warden when it goes quiet; the request that clears it
    /// wakes the warden.
    quiet: AtomicBool,
    warden: OnceLock<Thread>,
}

impl Traffic {
    /// Counts a request (other than a plug's) as it is served.
    pub fn served(&self) {
        // SeqCst pairs with the warden's store of `quiet` and then load of
        // `served`: either it sees this request, or this sees it quiet.
        self.served.fetch_add(1, Ordering::SeqCst);
        if self.quiet.load(Ordering::SeqCst) && self.quiet.swap(false, Ordering::SeqCst) {
            if let Some(t) = self.warden.get() {
                t.unpark();
            }
        }
    }
}

pub struct Warden {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Warden {
    /// Plugs the pool of the server at `addr`, whose tiny_http server was
    /// created when the process had `threads_before` threads; returns once the
    /// plugs are in. `traffic` is kept by the server.
    /// Setting `stop` (the server does, when it stops) ends the rotation.
    pub fn start(
        addr: SocketAddr,
        threads_before: Option<usize>,
        traffic: Arc<Traffic>,
        stop: Arc<AtomicBool>,
    ) -> io::Result<Warden> {
        let target = loopback(addr);
        // The pool's threads count as idle only once they wait for work; a
        // plug that arrives before that gets a new thread instead.
        let deadline = Instant::now() + Duration::from_secs(1);
        if let Some(before) = threads_before {
            while threads().is_some_and(|n| n < before + POOL_THREADS + 1)
                && Instant::now() < deadline
            {
                thread::sleep(Duration::from_millis(1));
            }
        }
        thread::sleep(Duration::from_millis(5));
        let mut plugs = Vec::with_capacity(POOL_THREADS + 1);
        while plugs.len() < MAX_PLUGS {
            let before = threads();
            plugs.push(plug(target, true)?);
            match (before, threads()) {
                (Some(b), Some(a)) if a > b => break,
                (Some(_), Some(_)) => continue,
                _ if plugs.len() >= POOL_THREADS => break,
                _ => continue,
            }
        }
        let stopping = stop.clone();
        let thread = thread::Builder::new()
            .name("warden".into())
            .spawn(move || {
                let _ = traffic.warden.set(thread::current());
                rotate(target, plugs, &traffic, &stopping)
            })?;
        Ok(Warden {
            stop,
            thread: Some(thread),
        })
    }

    pub fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

/// How many threads this process has (Linux), if that can be read.
pub fn threads() -> Option<usize> {
    std::fs::read_dir("/proc/self/task").ok().map(|d| d.count())
}

/// Where to connect to reach a server listening on `addr`.
fn loopback(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), addr.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv6Addr::LOCALHOST.into(), addr.port())
        }
        _ => addr,
    }
}

/// A connection to the server holding a pool thread. At start-up it is
/// answered once before the next is opened, so that each is known to hold its
/// own thread; a plug whose answer does not come is kept all the same (it is
/// queued, and will hold the thread that eventually takes it). Replacements
/// are opened together and then waited for briefly (`read_answers`).
fn plug(target: SocketAddr, confirm: bool) -> io::Result<TcpStream> {
    let mut s = TcpStream::connect_timeout(&target, Duration::from_secs(1))?;
    s.set_nodelay(true)?;
    s.write_all(PLUG_REQUEST)?;
    if confirm {
        s.set_read_timeout(Some(Duration::from_secs(1)))?;
        let deadline = Instant::now() + Duration::from_secs(1);
        let mut got = Vec::new();
        while Instant::now() < deadline && !response_complete(&got) && read_some(&mut s, &mut got) {
        }
    }
    Ok(s)
}

/// Reads what is there into `got`; false at end of stream, error or timeout.
fn read_some(s: &mut TcpStream, got: &mut Vec<u8>) -> bool {
    let mut buf = [0u8; 1024];
    match s.read(&mut buf) {
        Ok(0) | Err(_) => false,
        Ok(n) => {
            got.extend_from_slice(&buf[..n]);
            true
        }
    }
}

/// Reads each plug's answer, giving them all `within` in all (so that
/// closing a plug later is an orderly close); a late one is left unread.
fn read_answers(plugs: &mut [TcpStream], within: Duration) {
    let deadline = Instant::now() + within;
    for s in plugs {
        let mut got = Vec::new();
        while !response_complete(&got) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || s.set_read_timeout(Some(left)).is_err() || !read_some(s, &mut got)
            {
                return;
            }
        }
    }
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

fn rotate(target: SocketAddr, mut plugs: Vec<TcpStream>, traffic: &Traffic, stop: &AtomicBool) {
    let want = plugs.len();
    // Quiet from the start: the first request wakes us.
    traffic.quiet.store(true, Ordering::SeqCst);
    // Whether `traffic.quiet` was set by us since the last request seen.
    let mut asked = true;
    let mut seen = traffic.served.load(Ordering::SeqCst);
    let mut last_busy = Instant::now() - BUSY_FOR;
    let mut eager_until = Instant::now();
    let mut last_renewed = Instant::now();
    // Rotations in a row so far because of a backlog.
    let mut fast = 0u32;
    // Look again at once, without waiting for a tick.
    let mut again = false;
    while !stop.load(Ordering::SeqCst) {
        if fast == 0 && !std::mem::take(&mut again) {
            let now = Instant::now();
            thread::park_timeout(match () {
                _ if now < eager_until => EAGER_TICK,
                _ if last_busy.elapsed() < BUSY_FOR => BUSY_TICK,
                _ => QUIET_TICK,
            });
        }
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let now_served = traffic.served.load(Ordering::SeqCst);
        // A request cleared the flag we set (and woke us), or was counted.
        let rung = asked && !traffic.quiet.load(Ordering::SeqCst);
        if now_served != seen || rung {
            if last_busy.elapsed() >= BUSY_FOR {
                eager_until = Instant::now() + EAGER_FOR;
            }
            last_busy = Instant::now();
            seen = now_served;
            if asked {
                traffic.quiet.store(false, Ordering::SeqCst);
                asked = false;
            }
        }
        if fast == 0 && last_busy.elapsed() >= BUSY_FOR {
            if !asked {
                // From now on the next request wakes us. One that came since
                // `served` was read may not have: look again now.
                traffic.quiet.store(true, Ordering::SeqCst);
                asked = true;
                if traffic.served.load(Ordering::SeqCst) != seen {
                    again = true;
                    continue;
                }
            }
            // Quiet: rotating would only free threads; but see RENEW_EVERY.
            if plugs.len() == want && last_renewed.elapsed() < RENEW_EVERY {
                continue;
            }
        }
        // Close them all, so that each freed thread can take a queued
        // connection, then let the freed threads settle and plug them again.
        plugs.clear();
        thread::sleep(SETTLE);
        let before = threads();
        while plugs.len() < want {
            match plug(target, false) {
                Ok(p) => plugs.push(p),
                Err(e) => {
                    // Retried on the next tick; refused once the server stops.
                    if !stop.load(Ordering::SeqCst) {
                        eprintln!("comfy-runners: warden could not reconnect: {e}");
                    }
                    break;
                }
            }
        }
        read_answers(&mut plugs, ANSWER_WITHIN);
        // A new thread for every replacement: every freed thread went to a
        // queued connection, and more may be queued. (Fewer new threads mean
        // that the queue ran out, or a client connected meanwhile.)
        let backlog = match (before, threads()) {
            (Some(b), Some(a)) => a >= b + plugs.len() && !plugs.is_empty(),
            _ => false,
        };
        fast = if backlog && fast < FAST_ROUNDS {
            fast + 1
        } else {
            0
        };
        last_renewed = Instant::now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plug_request_asks_for_the_plug_path() {
        let head = String::from_utf8_lossy(PLUG_REQUEST);
        assert!(head.starts_with(&format!("GET {PLUG_PATH} HTTP/1.1\r\n")));
        assert!(response_complete(
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\n{}"
        ));
        assert!(!response_complete(
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 3\r\n\r\n{}"
        ));
    }
}
