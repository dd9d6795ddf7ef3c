//! The server as a process: restarts, shutdown, hostile input, bursts of
//! connections, latency on keep-alive connections, and counts that stay exact.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use common::{http_request, read_response, Server};
use serde_json::{json, Value};

fn healthy(s: &Server) {
    let r = s.call("GET", "/healthz", None, None);
    assert_eq!(r.status, 200, "server stopped answering: {}", s.stderr());
    let u = s.get("/v1/user");
    assert_eq!(u.status, 200);
}

#[test]
fn restart_keeps_all_data_and_prints_no_new_token() {
    let s = Server::start();
    assert!(s.stderr().contains("created user admin"), "{}", s.stderr());
    let token = s.token.clone();
    for i in 0..5 {
        s.create(&format!("keep-{i}"));
    }
    let bob = s.token_for("bob");
    s.create_as(&bob, "bobs");
    let before = s.get("/v1/runner?per_page=100").json();
    let dir = s.stop_keep();
    assert!(
        !dir.path().join("test.db-wal").exists()
            || std::fs::metadata(dir.path().join("test.db-wal"))
                .unwrap()
                .len()
                == 0,
        "the database was closed cleanly"
    );

    let mut again = Server::start_in(dir, &[]);
    assert!(
        again.token.is_empty(),
        "no bootstrap token on a database with tokens"
    );
    assert!(!again.stderr().contains("created user"));
    again.token = token;
    assert_eq!(again.get("/v1/runner?per_page=100").json(), before);
    assert_eq!(
        again.call("GET", "/v1/runner", Some(&bob), None).json()["total"],
        1
    );
}

#[test]
fn sigterm_finishes_the_request_in_flight_then_exits_0() {
    let s = Server::start();
    let body =
        json!({"name": "in flight", "endpoint": "http://h", "pad": "x".repeat(4000)}).to_string();
    let rq = http_request("POST", "/v1/runner", &s.token, body.as_bytes());
    let split = rq.len() - 1000;
    let mut conn = TcpStream::connect(&s.addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    conn.write_all(&rq[..split]).unwrap();
    // The head has arrived and a worker is reading the body when the signal comes.
    thread::sleep(Duration::from_millis(200));
    s.signal("TERM");
    thread::sleep(Duration::from_millis(200));
    conn.write_all(&rq[split..]).unwrap();
    let (status, reply) = read_response(&mut conn).unwrap();
    assert_eq!(status, 201, "{}", String::from_utf8_lossy(&reply));
    // No new connections once stopping.
    let mut s = s;
    let status = s.wait();
    assert!(status.success(), "{status:?}: {}", s.stderr());
    assert!(TcpStream::connect(&s.addr).is_err());
}

#[test]
fn sigint_also_stops_cleanly() {
    let mut s = Server::start();
    s.signal("INT");
    assert!(s.wait().success());
}

#[test]
fn listen_address_in_use_is_a_one_line_error() {
    let s = Server::start();
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(common::BIN)
        .args(["serve", "--listen", &s.addr, "--db"])
        .arg(dir.path().join("other.db"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    let last = err.lines().last().unwrap();
    assert!(
        last.starts_with("comfy-runners: cannot listen on") && last.contains(&s.addr),
        "{err}"
    );
    healthy(&s);
}

#[test]
fn hostile_input_never_hurts_the_server() {
    let s = Server::start();
    let t = s.token.clone();
    let wait = Duration::from_secs(3);
    let huge_claim = format!(
        "POST /v1/runner HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {t}\r\nContent-Length: 99999999999999999\r\n\r\n{{}}"
    );
    let huge_claim_no_auth =
        "POST /v1/runner HTTP/1.1\r\nHost: x\r\nContent-Length: 1099511627776\r\n\r\n".to_string();
    let big_claim = format!("PUT /v1/runner/x HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {t}\r\nContent-Length: 5000000\r\n\r\n");
    let mut chunked = format!("POST /v1/runner HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {t}\r\nTransfer-Encoding: chunked\r\n\r\n").into_bytes();
    for _ in 0..20 {
        chunked
            .extend_from_slice(format!("{:x}\r\n{}\r\n", 100_000, "a".repeat(100_000)).as_bytes());
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("garbage", b"\x00\x01\x02garbage\xff\xfe\r\n\r\n".to_vec()),
        ("binary", (0..4096).map(|i| (i * 7 % 256) as u8).collect()),
        ("no newline", vec![b'A'; 200_000]),
        ("bad request line", b"GET\r\n\r\n".to_vec()),
        ("http/2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec()),
        ("bad header", b"GET /v1/user HTTP/1.1\r\nno colon here\r\n\r\n".to_vec()),
        ("huge claimed body", huge_claim.into_bytes()),
        ("huge claimed body, no token", huge_claim_no_auth.into_bytes()),
        ("big claimed body", big_claim.into_bytes()),
        ("chunked 2 MB", chunked),
        ("bad expect", format!("POST /v1/runner HTTP/1.1\r\nAuthorization: Bearer {t}\r\nExpect: tea\r\nContent-Length: 2\r\n\r\n{{}}").into_bytes()),
        ("http/1.0", format!("GET /v1/runner HTTP/1.0\r\nAuthorization: Bearer {t}\r\n\r\n").into_bytes()),
        ("utf-8 path", format!("GET /v1/runner/\u{e9}\u{1f600} HTTP/1.1\r\nAuthorization: Bearer {t}\r\n\r\n").into_bytes()),
        ("invalid utf-8 path", [&b"GET /v1/runner/\xff\xfe HTTP/1.1\r\nAuthorization: Bearer "[..], t.as_bytes(), b"\r\n\r\n"].concat()),
        ("nul in query", format!("GET /v1/runner?page=1%00&status=%00 HTTP/1.1\r\nAuthorization: Bearer {t}\r\n\r\n").into_bytes()),
        ("long query", format!("GET /v1/runner?page={} HTTP/1.1\r\nAuthorization: Bearer {t}\r\n\r\n", "9".repeat(50_000)).into_bytes()),
        ("wrong types", http_request("POST", "/v1/runner", &t, br#"{"name":{"$gt":""},"endpoint":[1],"tags":{"a":1},"headers":"x"}"#)),
        ("deep json", http_request("POST", "/v1/runner", &t, &[vec![b'['; 100_000], vec![b']'; 100_000]].concat())),
        ("huge number", http_request("POST", "/v1/runner", &t, format!("{{\"name\": 1{}}}", "0".repeat(5000)).as_bytes())),
        ("sql in json", http_request("POST", "/v1/runner", &t, br#"{"name":"x'); DROP TABLE runners;--","endpoint":"http://h"}"#)),
    ];
    for (what, bytes) in &cases {
        let reply = s.raw(bytes, wait);
        let text = String::from_utf8_lossy(&reply);
        assert!(
            !text.contains(" 500 ") && !text.contains(" 503 "),
            "{what}: {text}"
        );
        healthy(&s);
    }
    // The runner with SQL in its name is just a name.
    let list = s.get("/v1/runner").json();
    assert_eq!(list["total"], 1);
    assert_eq!(list["runners"][0]["name"], "x'); DROP TABLE runners;--");
    // Every /v1 answer above was JSON with the right status.
    let r = s.raw(&cases[6].1, wait);
    assert!(
        String::from_utf8_lossy(&r).starts_with("HTTP/1.1 413"),
        "{}",
        String::from_utf8_lossy(&r)
    );
    let r = s.raw(&cases[7].1, wait);
    assert!(String::from_utf8_lossy(&r).starts_with("HTTP/1.1 401"));
    let r = s.raw(&cases[9].1, wait);
    assert!(
        String::from_utf8_lossy(&r).starts_with("HTTP/1.1 413"),
        "{}",
        String::from_utf8_lossy(&r)
    );
}

/// Opens `n` keep-alive connections at once; each sends a request as soon as
/// all are connected. Returns how long each waited for its first answer.
fn burst(s: &Server, n: usize) -> Vec<Option<Duration>> {
    let barrier = Arc::new(Barrier::new(n));
    let rq = Arc::new(http_request("GET", "/v1/runner", &s.token, b""));
    let handles: Vec<_> = (0..n)
        .map(|_| {
            let (barrier, rq, addr) = (barrier.clone(), rq.clone(), s.addr.clone());
            thread::spawn(move || {
                let mut c = TcpStream::connect(&addr).unwrap();
                c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                barrier.wait();
                let start = Instant::now();
                c.write_all(&rq).unwrap();
                let first = read_response(&mut c)
                    .ok()
                    .filter(|(st, _)| *st == 200)
                    .map(|_| start.elapsed());
                // Keep the connection open (and used) until everyone is done.
                barrier.wait();
                first
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

fn assert_all_served(waits: &[Option<Duration>], when: &str) {
    assert_all_served_within(waits, Duration::from_secs(1), when);
}

fn assert_all_served_within(waits: &[Option<Duration>], limit: Duration, when: &str) {
    let served = waits
        .iter()
        .filter(|w| w.is_some_and(|d| d < limit))
        .count();
    assert_eq!(
        served,
        waits.len(),
        "{when}: only {served} of {} connections answered within {limit:?}",
        waits.len()
    );
}

/// One request on a connection of its own, then closed.
fn lone_request(s: &Server) {
    let mut one = TcpStream::connect(&s.addr).unwrap();
    one.write_all(&http_request("GET", "/healthz", "", b""))
        .unwrap();
    assert_eq!(read_response(&mut one).unwrap().0, 200);
}

#[test]
fn a_fresh_server_answers_64_simultaneous_keep_alive_connections() {
    for start in 0..4 {
        let s = Server::start();
        s.create("r");
        assert_all_served(&burst(&s, 64), &format!("fresh start {start}"));
    }
}

#[test]
fn bursts_right_after_other_connections_closed_are_served_too() {
    let s = Server::start();
    for round in 0..4 {
        // Connections that just closed leave idle pool threads behind.
        assert_all_served(&burst(&s, 16), &format!("round {round}, 16"));
        assert_all_served(&burst(&s, 64), &format!("round {round}, 64"));
        // One connection, closed just before a burst (what wrk does).
        lone_request(&s);
        assert_all_served(&burst(&s, 64), &format!("round {round}, after one"));
    }
    // The same after the server has gone quiet: the first request wakes the
    // warden, which then finds the burst queued behind that one's thread.
    thread::sleep(Duration::from_millis(2500));
    lone_request(&s);
    let waits = burst(&s, 64);
    assert_all_served_within(&waits, Duration::from_millis(500), "after a quiet spell");
}

#[test]
fn an_idle_server_still_accepts_after_the_idle_timeout() {
    // The 60 s idle timeout is set on the listening socket, where it also
    // bounds each wait of tiny_http's accept, and an accept that times out
    // would end tiny_http's accept loop for good.
    let s = Server::start();
    assert_eq!(s.get("/v1/runner").status, 200);
    thread::sleep(Duration::from_secs(65));
    let mut c = TcpStream::connect(&s.addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    c.write_all(&http_request("GET", "/v1/runner", &s.token, b""))
        .unwrap();
    assert_eq!(read_response(&mut c).unwrap().0, 200);
    assert!(!s.stderr().contains("cannot accept"), "{}", s.stderr());
    assert!(s.stop().success());
}

#[test]
fn large_responses_on_keep_alive_connections_are_not_delayed() {
    let s = Server::start();
    for i in 0..10 {
        s.create(&format!(
            "a runner with a longish name to make the page bigger {i}"
        ));
    }
    let rq = http_request("GET", "/v1/runner", &s.token, b"");
    let mut c = TcpStream::connect(&s.addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut times = Vec::new();
    for _ in 0..25 {
        let start = Instant::now();
        c.write_all(&rq).unwrap();
        let (status, body) = read_response(&mut c).unwrap();
        assert_eq!(status, 200);
        assert!(
            body.len() > 2500,
            "the page spans several segments: {}",
            body.len()
        );
        times.push(start.elapsed());
    }
    times.sort();
    // With Nagle's algorithm on, each of these waits ~40 ms for a delayed ACK.
    assert!(
        times[times.len() / 2] < Duration::from_millis(15),
        "median {:?}",
        times[times.len() / 2]
    );
}

fn counts_match(db: &std::path::Path) {
    let conn = rusqlite::Connection::open(db).unwrap();
    conn.busy_timeout(Duration::from_secs(10)).unwrap();
    let mismatches: Vec<(i64, String, i64, i64)> = conn
        .prepare(
            "WITH real AS (SELECT user_id, status, count(*) AS n FROM runners GROUP BY user_id, status)
             SELECT coalesce(r.user_id, c.user_id), coalesce(r.status, c.status), coalesce(r.n, 0), coalesce(c.n, 0)
             FROM real r FULL OUTER JOIN runner_counts c ON c.user_id = r.user_id AND c.status = r.status
             WHERE coalesce(r.n, 0) != coalesce(c.n, 0)",
        )
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert!(
        mismatches.is_empty(),
        "counts differ from COUNT(*): {mismatches:?}"
    );
}

#[test]
fn totals_stay_exact_under_concurrent_writers_imports_and_kills() {
    let s = Server::start();
    let tokens: Vec<String> = (0..3).map(|i| s.token_for(&format!("u{i}"))).collect();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("import.json");
    let batch: Vec<Value> = (0..3000).map(|i| json!({"name": format!("imp{i}"), "endpoint": "http://h", "status": if i % 2 == 0 { "active" } else { "disabled" }})).collect();
    std::fs::write(&file, Value::from(batch).to_string()).unwrap();

    let s = Arc::new(s);
    let writers: Vec<_> = (0..6)
        .map(|w| {
            let (s, token) = (s.clone(), tokens[w % 3].clone());
            thread::spawn(move || {
                let mut mine = Vec::new();
                for i in 0..60 {
                    let r = s.call(
                        "POST",
                        "/v1/runner",
                        Some(&token),
                        Some(
                            json!({"name": format!("w{w}-{i}"), "endpoint": "http://h"})
                                .to_string()
                                .as_bytes(),
                        ),
                    );
                    assert_eq!(r.status, 201, "{}", r.text());
                    mine.push(r.json()["id"].as_str().unwrap().to_string());
                    if i % 3 == 0 {
                        let id = &mine[i / 2];
                        let st = if i % 2 == 0 { "disabled" } else { "active" };
                        let r = s.call(
                            "PUT",
                            &format!("/v1/runner/{id}"),
                            Some(&token),
                            Some(json!({"status": st}).to_string().as_bytes()),
                        );
                        assert_eq!(r.status, 200, "{}", r.text());
                    }
                    if i % 5 == 4 {
                        let id = mine.remove(0);
                        assert_eq!(
                            s.call("DELETE", &format!("/v1/runner/{id}"), Some(&token), None)
                                .status,
                            204
                        );
                    }
                }
            })
        })
        .collect();
    let importer = {
        let (db, file) = (s.db(), file.clone());
        thread::spawn(move || {
            common::cli(
                &db,
                &["runner", "import", "--user", "u1", file.to_str().unwrap()],
            )
        })
    };
    for w in writers {
        w.join().unwrap();
    }
    assert!(importer.join().unwrap().status.success());
    counts_match(&s.db());
    for (i, t) in tokens.iter().enumerate() {
        let all = s.call("GET", "/v1/runner", Some(t), None).json()["total"]
            .as_i64()
            .unwrap();
        let act = s
            .call("GET", "/v1/runner?status=active", Some(t), None)
            .json()["total"]
            .as_i64()
            .unwrap();
        let dis = s
            .call("GET", "/v1/runner?status=disabled", Some(t), None)
            .json()["total"]
            .as_i64()
            .unwrap();
        assert_eq!(all, act + dis, "user {i}");
        let expected = 2 * 48 + if i == 1 { 3000 } else { 0 };
        assert_eq!(all, expected, "user {i}");
    }

    // Killed in the middle of an import, and with writes in flight.
    let s = Arc::try_unwrap(s).ok().unwrap();
    let big: Vec<Value> = (0..200_000)
        .map(|i| json!({"name": format!("k{i}"), "endpoint": "http://h"}))
        .collect();
    std::fs::write(&file, Value::from(big).to_string()).unwrap();
    let mut import = std::process::Command::new(common::BIN)
        .args([
            "runner",
            "import",
            "--user",
            "u2",
            file.to_str().unwrap(),
            "--db",
        ])
        .arg(s.db())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let token = tokens[0].clone();
    let load = {
        let base = s.base.clone();
        thread::spawn(move || {
            let agent = ureq::Agent::new_with_config(
                ureq::Agent::config_builder()
                    .http_status_as_error(false)
                    .timeout_global(Some(Duration::from_secs(2)))
                    .build(),
            );
            for i in 0..200 {
                let r = agent
                    .post(format!("{base}/v1/runner"))
                    .header("Authorization", format!("Bearer {token}"))
                    .send(json!({"name": format!("late{i}"), "endpoint": "http://h"}).to_string());
                if r.is_err() {
                    break;
                }
            }
        })
    };
    thread::sleep(Duration::from_millis(300));
    let _ = import.kill();
    let _ = import.wait();
    thread::sleep(Duration::from_millis(50));
    let dir = s.kill();
    let _ = load.join();
    counts_match(&dir.path().join("test.db"));
    let again = Server::start_in(dir, &[]);
    let u2 = again
        .call("GET", "/v1/runner", Some(&tokens[2]), None)
        .json()["total"]
        .as_i64()
        .unwrap();
    assert!(
        u2 == 96 || u2 == 96 + 200_000,
        "an import is all or nothing: {u2}"
    );
    counts_match(&again.db());
}

/// The count triggers as schema version 1 wrote them.
const V1_TRIGGERS: &str = "
    DROP TRIGGER runners_count_insert;
    DROP TRIGGER runners_count_update;
    CREATE TRIGGER runners_count_insert AFTER INSERT ON runners
    BEGIN
        INSERT INTO runner_counts (user_id, status, n) VALUES (NEW.user_id, NEW.status, 1)
            ON CONFLICT (user_id, status) DO UPDATE SET n = n + 1;
    END;
    CREATE TRIGGER runners_count_update AFTER UPDATE OF user_id, status ON runners
        WHEN OLD.user_id IS NOT NEW.user_id OR OLD.status IS NOT NEW.status
    BEGIN
        UPDATE runner_counts SET n = n - 1
            WHERE user_id = OLD.user_id AND status = OLD.status;
        INSERT INTO runner_counts (user_id, status, n) VALUES (NEW.user_id, NEW.status, 1)
            ON CONFLICT (user_id, status) DO UPDATE SET n = n + 1;
    END;
    PRAGMA user_version = 1;
";

/// `(user_version, the triggers' SQL with whitespace collapsed)` of a file.
fn schema_of(db: &std::path::Path) -> (i64, Vec<String>) {
    let conn = rusqlite::Connection::open(db).unwrap();
    let version = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    let triggers = conn
        .prepare("SELECT sql FROM sqlite_schema WHERE type = 'trigger' ORDER BY name")
        .unwrap()
        .query_map([], |r| r.get::<_, String>(0))
        .unwrap()
        .map(|sql| {
            sql.unwrap()
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect();
    (version, triggers)
}

#[test]
fn a_version_1_database_is_migrated_and_its_counts_stay_exact() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("test.db");
    let file = dir.path().join("import.json");
    let batch: Vec<Value> = (0..30)
        .map(|i| json!({"name": format!("old{i}"), "endpoint": "http://h", "status": if i % 3 == 0 { "disabled" } else { "active" }}))
        .collect();
    std::fs::write(&file, Value::from(batch).to_string()).unwrap();
    let import = |user: &str| {
        let out = common::cli(
            &db,
            &["runner", "import", "--user", user, file.to_str().unwrap()],
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    import("alice");
    let current = schema_of(&db);
    assert_eq!(current.0, 2);
    // Versions 1 and 2 differ only in the count triggers: put back version 1's.
    rusqlite::Connection::open(&db)
        .unwrap()
        .execute_batch(V1_TRIGGERS)
        .unwrap();
    let old = schema_of(&db);
    assert_eq!(old.0, 1);
    assert_ne!(old.1, current.1);

    // Any command moves the file to version 2, with the triggers a new file gets.
    import("bob");
    assert_eq!(schema_of(&db), current);
    counts_match(&db);

    // And the migrated triggers keep the counts through every kind of write.
    let s = Server::start_in(dir, &[]);
    let alice = s.token_for("alice");
    let page = s
        .call("GET", "/v1/runner?per_page=100", Some(&alice), None)
        .json();
    assert_eq!(page["total"], 30);
    for r in page["runners"].as_array().unwrap().iter().take(6) {
        let id = r["id"].as_str().unwrap();
        let flipped = if r["status"] == "active" {
            "disabled"
        } else {
            "active"
        };
        let body = json!({"status": flipped}).to_string();
        let put = s.call(
            "PUT",
            &format!("/v1/runner/{id}"),
            Some(&alice),
            Some(body.as_bytes()),
        );
        assert_eq!(put.status, 200, "{}", put.text());
    }
    let gone = page["runners"][10]["id"].as_str().unwrap();
    assert_eq!(
        s.call("DELETE", &format!("/v1/runner/{gone}"), Some(&alice), None)
            .status,
        204
    );
    let body = json!({"name": "new", "endpoint": "http://h", "status": "disabled"}).to_string();
    assert_eq!(
        s.call("POST", "/v1/runner", Some(&alice), Some(body.as_bytes()))
            .status,
        201
    );
    counts_match(&s.db());
    let total = |q: &str| {
        s.call("GET", &format!("/v1/runner{q}"), Some(&alice), None)
            .json()["total"]
            .as_i64()
            .unwrap()
    };
    assert_eq!(total(""), 30);
    assert_eq!(total("?status=active") + total("?status=disabled"), 30);
}

#[test]
fn slow_uploads_do_not_hold_the_workers() {
    let s = Server::start();
    // More stalled uploads than there are workers.
    let stalled: Vec<TcpStream> = (0..12)
        .map(|_| {
            let mut c = TcpStream::connect(&s.addr).unwrap();
            let head = format!(
                "POST /v1/runner HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Length: 5000\r\n\r\n{{",
                s.token
            );
            c.write_all(head.as_bytes()).unwrap();
            c
        })
        .collect();
    thread::sleep(Duration::from_millis(200));
    let start = Instant::now();
    for _ in 0..20 {
        assert_eq!(s.call("GET", "/healthz", None, None).status, 200);
        assert_eq!(s.get("/v1/runner").status, 200);
    }
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    drop(stalled);
    healthy(&s);
}

#[test]
fn sigterm_waits_for_a_small_body_whose_head_has_arrived() {
    let s = Server::start();
    let body = br#"{"name":"small","endpoint":"http://h"}"#;
    let rq = http_request("POST", "/v1/runner", &s.token, body);
    let split = rq.len() - 10;
    let mut conn = TcpStream::connect(&s.addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    conn.write_all(&rq[..split]).unwrap();
    thread::sleep(Duration::from_millis(100));
    s.signal("TERM");
    thread::sleep(Duration::from_millis(100));
    conn.write_all(&rq[split..]).unwrap();
    let (status, _) = read_response(&mut conn).unwrap();
    assert_eq!(status, 201);
    let mut s = s;
    assert!(s.wait().success());
}

#[test]
fn an_absurd_content_length_gets_a_whole_answer_and_a_closed_connection() {
    let s = Server::start();
    for (auth, expect) in [
        (format!("Authorization: Bearer {}\r\n", s.token), "413"),
        (String::new(), "401"),
    ] {
        let rq = format!("POST /v1/runner HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: 99999999999999\r\n\r\n{{}}");
        let mut c = TcpStream::connect(&s.addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        c.write_all(rq.as_bytes()).unwrap();
        let mut got = Vec::new();
        std::io::Read::read_to_end(&mut c, &mut got).expect("the server closes the connection");
        let text = String::from_utf8_lossy(&got);
        assert!(text.starts_with(&format!("HTTP/1.1 {expect}")), "{text}");
        assert!(text.contains("Content-Type: application/json"), "{text}");
        let body = text.split("\r\n\r\n").nth(1).unwrap();
        let v: Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["status"], expect.parse::<u16>().unwrap());
    }
    healthy(&s);
}

#[test]
fn a_new_runner_lists_first_in_its_second_even_after_deletes() {
    let s = Server::start();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("i.json");
    std::fs::write(&file, json!([{"name": "a0", "endpoint": "http://h"}, {"name": "a1", "endpoint": "http://h"}, {"name": "a2", "endpoint": "http://h"}]).to_string()).unwrap();
    let out = s.cli(&[
        "runner",
        "import",
        "--user",
        "admin",
        file.to_str().unwrap(),
    ]);
    assert!(out.status.success());
    let list = s.get("/v1/runner").json();
    let ids: Vec<String> = list["runners"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect();
    // The last two inserted (a1, a2) go; a new one must still come first.
    for id in &ids[1..] {
        assert_eq!(s.delete(&format!("/v1/runner/{id}")).status, 204);
    }
    let x = s.create("x");
    let list = s.get("/v1/runner").json();
    let names: Vec<&str> = list["runners"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    if x["created_at"] == list["runners"][1]["created_at"] {
        assert_eq!(names, ["x", "a0"]);
    }
    assert_eq!(names[0], "x");
}

#[test]
fn a_busy_address_on_a_new_database_spends_no_token() {
    let s = Server::start();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("new.db");
    let out = std::process::Command::new(common::BIN)
        .args(["serve", "--listen", &s.addr, "--db"])
        .arg(&db)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    let later = Server::start_in(dir, &[]);
    assert!(
        later.token.starts_with("cfc_"),
        "the first real start still shows the token: {}",
        later.stderr()
    );
}

#[test]
fn absolute_form_targets_and_token_use_on_unknown_paths() {
    let s = Server::start();
    let t = s.token_for("fay");
    let rq = format!("GET http://{}/v1/nope HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {t}\r\nConnection: close\r\n\r\n", s.addr);
    let reply = String::from_utf8_lossy(&s.raw(rq.as_bytes(), Duration::from_secs(5))).to_string();
    assert!(reply.starts_with("HTTP/1.1 404"), "{reply}");
    let rq = format!(
        "GET http://{}/v1/user HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        s.addr
    );
    let reply = String::from_utf8_lossy(&s.raw(rq.as_bytes(), Duration::from_secs(5))).to_string();
    assert!(
        reply.starts_with("HTTP/1.1 401"),
        "auth first, for absolute-form too: {reply}"
    );
    let out = s.cli(&["token", "list", "--json", "--user", "fay"]);
    let list: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        list[0]["last_used_at"].is_string(),
        "a 404 is a use of the token"
    );
}
