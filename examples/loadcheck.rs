//! Checks that a server answers every one of many keep-alive connections
//! opened at once, not just most of them: throughput tools such as wrk report
//! a healthy total even when a few connections never get an answer.
//!
//!     cargo run --release --example loadcheck -- ADDR PATH CONNS SECONDS [TOKEN]
//!
//! Opens CONNS connections, and only once all are connected does each one
//! send `GET PATH` again and again for SECONDS. Prints
//! `connections=C served=K min=.. median=.. max=.. total=..` (responses per
//! connection), then the count of non-2xx answers, the slowest first answer
//! (SECONDS for a connection never answered) and the slowest answer of all
//! with when it came. Exits 1 if any
//! connection got no answer at all, or its first one more than 1 s after the
//! start.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::process::ExitCode;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

/// The slowest acceptable first response.
const FIRST_LIMIT: Duration = Duration::from_secs(1);
/// How long a response in flight at the end may still take to arrive.
const GRACE: Duration = Duration::from_secs(1);
/// How often a blocked read looks at the clock.
const TICK: Duration = Duration::from_millis(50);
/// Limits on the arguments, so that a typo cannot start a flood.
const MAX_CONNS: usize = 1024;
const MAX_SECONDS: u64 = 60;

#[derive(Default)]
struct Outcome {
    responses: u64,
    /// Responses that were not 2xx.
    refused: u64,
    first: Option<Duration>,
    /// The longest wait for any one response, and when (since the start) it ended.
    worst: (Duration, Duration),
    /// Why the connection stopped early, if it did.
    failure: Option<String>,
}

/// Reads one response into nothing, keeping any bytes after it in `buf`.
/// Returns its status code. Gives up at `until`.
fn read_response(s: &mut TcpStream, buf: &mut Vec<u8>, until: Instant) -> Result<u16, String> {
    let mut chunk = [0u8; 16 * 1024];
    loop {
        if let Some(head_end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
            let status = head
                .split(' ')
                .nth(1)
                .and_then(|c| c.parse().ok())
                .ok_or_else(|| format!("not an HTTP response: {:?}", head.lines().next()))?;
            if head.contains("\r\ntransfer-encoding:") {
                return Err("chunked responses are not supported".into());
            }
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(Some(0), |v| v.trim().parse().ok())
                .ok_or("bad Content-Length")?;
            let end = head_end + 4 + length;
            if buf.len() >= end {
                buf.drain(..end);
                return Ok(status);
            }
        }
        if Instant::now() >= until {
            return Err("no complete response in time".into());
        }
        match s.read(&mut chunk) {
            Ok(0) => return Err("closed by the server".into()),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("read: {e}")),
        }
    }
}

/// One connection's life: connect, wait for all the others, then requests
/// back to back until `run` is over.
fn connection(addr: SocketAddr, request: &[u8], barrier: &Barrier, run: Duration) -> Outcome {
    let mut out = Outcome::default();
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).and_then(|s| {
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(TICK))?;
        Ok(s)
    });
    // Every thread reaches the barrier, connected or not, or the rest would wait forever.
    barrier.wait();
    let mut s = match stream {
        Ok(s) => s,
        Err(e) => {
            out.failure = Some(format!("connect: {e}"));
            return out;
        }
    };
    let start = Instant::now();
    let (deadline, until) = (start + run, start + run + GRACE);
    let mut buf = Vec::new();
    while Instant::now() < deadline {
        let sent = Instant::now();
        if let Err(e) = s.write_all(request) {
            out.failure = Some(format!("write: {e}"));
            break;
        }
        match read_response(&mut s, &mut buf, until) {
            Ok(status) => {
                out.responses += 1;
                out.first.get_or_insert_with(|| start.elapsed());
                if sent.elapsed() > out.worst.0 {
                    out.worst = (sent.elapsed(), start.elapsed());
                }
                if !(200..300).contains(&status) {
                    out.refused += 1;
                }
            }
            Err(e) => {
                out.failure = Some(e);
                break;
            }
        }
    }
    out
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let parsed = (|| {
        let addr = args.first()?.to_socket_addrs().ok()?.next()?;
        let path = args.get(1)?.clone();
        let conns: usize = args
            .get(2)?
            .parse()
            .ok()
            .filter(|c| (1..=MAX_CONNS).contains(c))?;
        let secs: u64 = args
            .get(3)?
            .parse()
            .ok()
            .filter(|s| (1..=MAX_SECONDS).contains(s))?;
        (args.len() <= 5).then_some((addr, path, conns, secs, args.get(4).cloned()))
    })();
    let Some((addr, path, conns, secs, token)) = parsed else {
        eprintln!(
            "usage: loadcheck ADDR PATH CONNS(1-{MAX_CONNS}) SECONDS(1-{MAX_SECONDS}) [TOKEN]"
        );
        return ExitCode::from(2);
    };

    let auth = token.map_or_else(String::new, |t| format!("Authorization: Bearer {t}\r\n"));
    let request: Arc<[u8]> = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}\r\n")
        .into_bytes()
        .into();
    let barrier = Arc::new(Barrier::new(conns));
    let run = Duration::from_secs(secs);
    let threads: Vec<_> = (0..conns)
        .map(|_| {
            let (request, barrier) = (request.clone(), barrier.clone());
            thread::Builder::new()
                .stack_size(256 * 1024)
                .spawn(move || connection(addr, &request, &barrier, run))
        })
        .collect::<io::Result<_>>()
        .unwrap_or_else(|e| {
            eprintln!("loadcheck: cannot start a thread per connection: {e}");
            std::process::exit(1);
        });
    let outcomes: Vec<Outcome> = threads
        .into_iter()
        .map(|t| {
            t.join().unwrap_or_else(|_| Outcome {
                failure: Some("panicked".into()),
                ..Outcome::default()
            })
        })
        .collect();

    let mut counts: Vec<u64> = outcomes.iter().map(|o| o.responses).collect();
    counts.sort_unstable();
    let served = counts.iter().filter(|&&n| n > 0).count();
    // A connection never answered counts as waiting the whole check.
    let slowest_first = outcomes
        .iter()
        .map(|o| o.first.unwrap_or(run))
        .max()
        .unwrap_or_default();
    let refused: u64 = outcomes.iter().map(|o| o.refused).sum();
    let (worst, worst_at) = outcomes.iter().map(|o| o.worst).max().unwrap_or_default();
    println!(
        "connections={conns} served={served} min={} median={} max={} total={} non2xx={refused} \
         first_max={}ms worst={}ms@{:.2}s",
        counts[0],
        counts[conns / 2],
        counts[conns - 1],
        counts.iter().sum::<u64>(),
        slowest_first.as_millis(),
        worst.as_millis(),
        worst_at.as_secs_f64(),
    );

    let mut ok = true;
    for (i, o) in outcomes.iter().enumerate() {
        let late = o.first.filter(|f| *f > FIRST_LIMIT);
        if o.responses == 0 || late.is_some() {
            ok = false;
            let what = match late {
                Some(f) => format!("first response after {} ms", f.as_millis()),
                None => "no response".to_string(),
            };
            let why = o
                .failure
                .as_deref()
                .map_or_else(String::new, |f| format!(" ({f})"));
            eprintln!(
                "loadcheck: connection {i}: {what}, {} in all{why}",
                o.responses
            );
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
