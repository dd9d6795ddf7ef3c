//! The synchronous server: the listening socket, tiny_http, a fixed set of
//! worker threads, the one place a response is written, and shutdown.
//!
//! tiny_http reads requests on a thread per connection and queues them; the
//! workers take them from that queue, call the handler, and answer. Two
//! defects of tiny_http 0.12 are worked around here and in `warden`:
//!
//! - It never sets TCP_NODELAY, and writes a response through a 1 KiB buffer,
//!   so a response over ~1 KiB leaves in two segments and on a keep-alive
//!   connection the second waits ~40 ms for the client's delayed ACK. We bind
//!   the socket ourselves with TCP_NODELAY set on the listener, which Linux
//!   copies to every accepted socket, and hand it to `Server::from_listener`.
//! - Its connection thread pool can leave new connections queued behind busy
//!   threads; see `warden` for the mechanism and the remedy.

use std::io::{self, Read};
use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, SockRef, Socket, Type};

use super::warden::{Traffic, Warden};
use crate::error::Error;

/// The largest request body read; a larger one is a 413.
pub const MAX_BODY: usize = 1 << 20;

/// A connection that sends nothing for this long is closed (it also bounds
/// how long a slow client can hold a thread in the middle of a request).
/// Set on the listening socket, it bounds tiny_http's accept too, whose loop
/// ends for good when an accept times out: the warden connects well within
/// it, however quiet the server.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// How often an idle worker looks up from the queue.
const POLL: Duration = Duration::from_millis(100);

/// During shutdown, the queue is drained once it has stayed empty this long.
const QUIET: Duration = Duration::from_millis(500);

/// How long shutdown waits for requests in flight, at most.
const DRAIN_LIMIT: Duration = Duration::from_secs(5);

/// Bodies that tiny_http has not read by the time a request is dropped are
/// read and thrown away when it is dropped, into a buffer the size of what
/// is left. A `Content-Length` beyond this is not believed: such a request
/// is answered and its connection abandoned instead (see `send`).
const BELIEVABLE_BODY: u64 = 1 << 30;

/// tiny_http reads bodies up to this size before queueing the request.
const TINY_HTTP_BUFFERED: u64 = 1024;

/// Binds `addr` for `Server::start`: TCP_NODELAY and the idle timeout are set
/// on the listening socket so that every accepted connection inherits them.
pub fn bind(addr: &str) -> io::Result<TcpListener> {
    let addr = addr
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no address to listen on"))?;
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_tcp_nodelay(true)?;
    socket.set_read_timeout(Some(IDLE_TIMEOUT))?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// The request as a handler sees it.
pub struct Incoming<'a> {
    rq: &'a mut tiny_http::Request,
    body_done: bool,
}

impl Incoming<'_> {
    pub fn method(&self) -> &'static str {
        match self.rq.method() {
            tiny_http::Method::Get => "GET",
            tiny_http::Method::Head => "HEAD",
            tiny_http::Method::Post => "POST",
            tiny_http::Method::Put => "PUT",
            tiny_http::Method::Delete => "DELETE",
            _ => "OTHER",
        }
    }

    /// The request target: path and query.
    pub fn url(&self) -> &str {
        self.rq.url()
    }

    /// The first header called `name` (case-insensitive).
    pub fn header(&self, name: &'static str) -> Option<&str> {
        self.rq
            .headers()
            .iter()
            .find(|h| h.field.equiv(name))
            .map(|h| h.value.as_str())
    }

    /// The body, at most `MAX_BODY` bytes. A declared length over the limit
    /// is refused before reading anything.
    pub fn body(&mut self) -> Result<Vec<u8>, Error> {
        if declared_length(self.rq).is_some_and(|n| n > MAX_BODY as u64) {
            return Err(Error::PayloadTooLarge);
        }
        let mut body = Vec::new();
        self.rq
            .as_reader()
            .take(MAX_BODY as u64 + 1)
            .read_to_end(&mut body)
            .map_err(|e| match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => Error::RequestTimeout,
                _ => Error::bad_request("the request body ended early or could not be read"),
            })?;
        if body.len() > MAX_BODY {
            return Err(Error::PayloadTooLarge);
        }
        self.body_done = true;
        Ok(body)
    }
}

fn declared_length(rq: &tiny_http::Request) -> Option<u64> {
    if rq
        .headers()
        .iter()
        .any(|h| h.field.equiv("Transfer-Encoding"))
    {
        return None;
    }
    rq.headers()
        .iter()
        .find(|h| h.field.equiv("Content-Length"))
        .and_then(|h| h.value.as_str().trim().parse().ok())
}

/// What a handler answers. Writing it to the socket is the server's job.
pub struct Reply {
    pub status: u16,
    /// JSON, or empty for 204.
    pub body: Vec<u8>,
    /// For 405: the `Allow` header.
    pub allow: Option<&'static str>,
    /// For 401: send `WWW-Authenticate: Bearer`.
    pub challenge: bool,
    /// Work to do once the answer is on its way (bookkeeping the client
    /// should not wait for).
    pub after: Option<Box<dyn FnOnce() + Send>>,
}

impl Reply {
    pub fn json(status: u16, body: Vec<u8>) -> Reply {
        Reply {
            status,
            body,
            allow: None,
            challenge: false,
            after: None,
        }
    }

    pub fn no_content() -> Reply {
        Reply::json(204, Vec::new())
    }

    /// `{"status": N, "message": "..."}`, the one error shape. Internal causes
    /// go to the log here and only here.
    pub fn error(err: &Error) -> Reply {
        if matches!(err, Error::Internal(_) | Error::Unavailable(_)) {
            eprintln!("comfy-runners: {} error: {err}", err.status());
        }
        let body = serde_json::json!({"status": err.status(), "message": err.public_message()});
        let mut reply = Reply::json(err.status(), body.to_string().into_bytes());
        match err {
            Error::Unauthorized => reply.challenge = true,
            Error::MethodNotAllowed(allow) => reply.allow = Some(allow),
            _ => {}
        }
        reply
    }
}

pub trait Handler: Send + Sync + 'static {
    fn handle(&self, rq: &mut Incoming<'_>) -> Reply;
}

struct Shared {
    http: tiny_http::Server,
    /// A handle on the listening socket, to shut it down.
    listener: TcpListener,
    handler: Arc<dyn Handler>,
    stopping: AtomicBool,
    stopped_at: Mutex<Option<Instant>>,
    /// Set when tiny_http's accept loop died (it does not restart).
    failed: AtomicBool,
    traffic: Arc<Traffic>,
    /// Tells the warden to stop replacing its connections.
    warden_stop: Arc<AtomicBool>,
    /// Requests being served on upload threads.
    in_flight: AtomicUsize,
    /// The port we listen on, to recognise our connections' sockets.
    port: u16,
}

impl Shared {
    fn stop(&self) {
        if self.stopping.swap(true, Ordering::SeqCst) {
            return;
        }
        self.warden_stop.store(true, Ordering::SeqCst);
        if let Ok(mut at) = self.stopped_at.lock() {
            *at = Some(Instant::now());
        }
        // Wakes tiny_http's accept loop out of accept() with an error, which
        // ends it: no new connections from here on.
        let _ = SockRef::from(&self.listener).shutdown(std::net::Shutdown::Read);
    }

    fn stopped_at(&self) -> Option<Instant> {
        self.stopped_at.lock().ok().and_then(|at| *at)
    }

    /// Once stopping: whether a worker that last took a request at `last` is
    /// done. It is when nothing has arrived for `QUIET` since the stop began
    /// (tiny_http queues a request only once its head, and a small body, are
    /// in), or when `DRAIN_LIMIT` is up.
    fn drained(&self, last: Instant) -> bool {
        if !self.stopping.load(Ordering::Relaxed) {
            return false;
        }
        let Some(at) = self.stopped_at() else {
            return false;
        };
        at.elapsed() >= DRAIN_LIMIT || last.max(at).elapsed() >= QUIET
    }
}

/// A running server.
pub struct Server {
    shared: Arc<Shared>,
    addr: SocketAddr,
    workers: Vec<JoinHandle<()>>,
    warden: Warden,
}

/// Stops a server from another thread (a signal handler's, say).
/// It holds no strong reference, so a stopped server's resources (the
/// database pool above all) are released when `join` returns.
#[derive(Clone)]
pub struct Stopper(Weak<Shared>);

impl Stopper {
    /// Stop accepting; the workers finish what has arrived, then end.
    pub fn stop(&self) {
        if let Some(shared) = self.0.upgrade() {
            shared.stop();
        }
    }
}

impl Server {
    /// Serves `listener` (from `bind`) with `workers` threads calling `handler`.
    /// Returns once the server is accepting connections.
    pub fn start(
        listener: TcpListener,
        workers: usize,
        handler: Arc<dyn Handler>,
    ) -> io::Result<Server> {
        let addr = listener.local_addr()?;
        let handle = listener.try_clone()?;
        let threads_before = super::warden::threads();
        let http = tiny_http::Server::from_listener(listener, None)
            .map_err(|e| io::Error::other(e.to_string()))?;
        let traffic = Arc::new(Traffic::default());
        let shared = Arc::new(Shared {
            http,
            listener: handle,
            handler,
            stopping: AtomicBool::new(false),
            stopped_at: Mutex::new(None),
            failed: AtomicBool::new(false),
            traffic: traffic.clone(),
            warden_stop: Arc::new(AtomicBool::new(false)),
            in_flight: AtomicUsize::new(0),
            port: addr.port(),
        });
        let workers = (0..workers.max(1))
            .map(|i| {
                let shared = shared.clone();
                thread::Builder::new()
                    .name(format!("worker-{i}"))
                    .spawn(move || work(&shared))
            })
            .collect::<io::Result<Vec<_>>>()?;
        // The workers started after `threads_before` was taken.
        let warden = Warden::start(
            addr,
            threads_before.map(|n| n + workers.len()),
            traffic,
            shared.warden_stop.clone(),
        )?;
        Ok(Server {
            shared,
            addr,
            workers,
            warden,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn stopper(&self) -> Stopper {
        Stopper(Arc::downgrade(&self.shared))
    }

    /// Waits for the server to stop (see `Stopper`). False if it stopped
    /// because it could no longer accept connections.
    pub fn join(self) -> bool {
        for w in self.workers {
            let _ = w.join();
        }
        // Uploads still being received get what is left of the drain time.
        while self.shared.in_flight.load(Ordering::SeqCst) > 0
            && self
                .shared
                .stopped_at()
                .is_some_and(|at| at.elapsed() < DRAIN_LIMIT)
        {
            thread::sleep(Duration::from_millis(10));
        }
        self.warden.stop();
        !self.shared.failed.load(Ordering::SeqCst)
    }
}

fn work(shared: &Arc<Shared>) {
    let mut last = Instant::now();
    loop {
        match shared.http.recv_timeout(POLL) {
            Ok(Some(rq)) => {
                last = Instant::now();
                match declared_length(&rq) {
                    Some(n) if n > BELIEVABLE_BODY => serve(shared, rq),
                    _ if body_on_socket(&rq) => slow_lane(shared, rq),
                    _ => serve(shared, rq),
                }
            }
            Ok(None) => {}
            Err(e) => {
                if !shared.stopping.load(Ordering::SeqCst) {
                    eprintln!("comfy-runners: cannot accept connections any more: {e}");
                    shared.failed.store(true, Ordering::SeqCst);
                    shared.stop();
                }
            }
        }
        if shared.drained(last) {
            return;
        }
    }
}

/// Whether tiny_http left this request's body on the socket: it reads a body
/// of up to 1 KiB before it queues the request, and larger ones (and chunked
/// ones) only as the handler reads them, at the client's pace.
fn body_on_socket(rq: &tiny_http::Request) -> bool {
    let chunked = rq
        .headers()
        .iter()
        .any(|h| h.field.equiv("Transfer-Encoding"));
    chunked || declared_length(rq).is_some_and(|n| n > TINY_HTTP_BUFFERED)
}

/// Serves a request whose body is still on its way on a thread of its own, so
/// that slow uploads cannot take the workers from everyone else.
fn slow_lane(shared: &Arc<Shared>, rq: tiny_http::Request) {
    shared.in_flight.fetch_add(1, Ordering::SeqCst);
    let mine = shared.clone();
    let spawned = thread::Builder::new().name("upload".into()).spawn(move || {
        serve(&mine, rq);
        mine.in_flight.fetch_sub(1, Ordering::SeqCst);
    });
    if spawned.is_err() {
        // The request went down with the closure, answered 500 by tiny_http.
        shared.in_flight.fetch_sub(1, Ordering::SeqCst);
        eprintln!("comfy-runners: no thread for an upload");
    }
}

fn serve(shared: &Shared, mut rq: tiny_http::Request) {
    if rq.url() != super::warden::PLUG_PATH {
        shared.traffic.served();
    }
    let mut incoming = Incoming {
        rq: &mut rq,
        body_done: false,
    };
    let mut reply = catch_unwind(AssertUnwindSafe(|| shared.handler.handle(&mut incoming)))
        .unwrap_or_else(|_| Reply::error(&Error::Internal("a handler panicked".into())));
    let body_done = incoming.body_done;
    let after = reply.after.take();
    send(rq, reply, body_done, shared.port);
    if let Some(after) = after {
        let _ = catch_unwind(AssertUnwindSafe(after));
    }
}

fn header(name: &str, value: &str) -> tiny_http::Header {
    // Both sides are ASCII constants of ours, which from_bytes accepts.
    tiny_http::Header::from_bytes(name.as_bytes(), value.as_bytes())
        .unwrap_or_else(|()| unreachable!("invalid header {name}"))
}

/// The one place a response is written.
fn send(rq: tiny_http::Request, reply: Reply, body_done: bool, port: u16) {
    let claimed = declared_length(&rq).unwrap_or(0);
    if claimed > BELIEVABLE_BODY && !body_done {
        return abandon(rq, &reply, port);
    }
    // Always a Content-Length: tiny_http would switch larger bodies to chunked.
    let mut response = tiny_http::Response::from_data(reply.body)
        .with_status_code(reply.status)
        .with_chunked_threshold(usize::MAX);
    if reply.status != 204 {
        response.add_header(header("Content-Type", "application/json"));
    }
    if let Some(allow) = reply.allow {
        response.add_header(header("Allow", allow));
    }
    if reply.challenge {
        response.add_header(header("WWW-Authenticate", "Bearer"));
    }
    // A body left unread is read and thrown away as the request drops; that
    // only happens on an upload thread (see `slow_lane`).
    let _ = rq.respond(response);
}

/// Answers a request that claims a body beyond `BELIEVABLE_BODY` without ever
/// dropping it: tiny_http would allocate the claimed size at once to read the
/// rest, and an allocation that large aborts the process. The answer is
/// written straight to the connection's socket with `Connection: close`, the
/// socket is shut down, and the request (with the thread tiny_http gave its
/// connection) is left to the end of the process.
fn abandon(rq: tiny_http::Request, reply: &Reply, port: u16) {
    let reason = tiny_http::StatusCode(reply.status).default_reason_phrase();
    let mut head = format!(
        "HTTP/1.1 {} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n",
        reply.status,
        reply.body.len()
    );
    if let Some(allow) = reply.allow {
        head.push_str(&format!("Allow: {allow}\r\n"));
    }
    if reply.challenge {
        head.push_str("WWW-Authenticate: Bearer\r\n");
    }
    head.push_str("\r\n");
    let peer = rq.remote_addr().copied();
    match peer.and_then(|p| socket_of(p, port)) {
        Some(fd) => {
            // SAFETY: `fd` belongs to the connection of `rq`, which holds it
            // open, and `rq` is never dropped (below), so it stays open.
            let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
            let sock = SockRef::from(&fd);
            let _ = sock
                .send(head.as_bytes())
                .and_then(|_| sock.send(&reply.body));
            let _ = sock.shutdown(std::net::Shutdown::Both);
        }
        None => eprintln!("comfy-runners: could not find the socket of {peer:?} to answer it"),
    }
    std::mem::forget(rq);
}

/// The file descriptor of this process's TCP connection from `peer` to our
/// `port`, found through /proc/self/fd (Linux).
fn socket_of(peer: SocketAddr, port: u16) -> Option<std::os::fd::RawFd> {
    let fds = std::fs::read_dir("/proc/self/fd").ok()?;
    fds.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .find(|&fd: &std::os::fd::RawFd| {
            // SAFETY: only the socket addresses are queried; a descriptor that
            // closed since the listing answers EBADF, and a reused one is
            // compared like any other and does not match.
            let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
            let sock = SockRef::from(&fd);
            let peer_ok = sock.peer_addr().ok().and_then(|a| a.as_socket()) == Some(peer);
            peer_ok
                && sock
                    .local_addr()
                    .ok()
                    .and_then(|a| a.as_socket())
                    .map(|a| a.port())
                    == Some(port)
        })
}
