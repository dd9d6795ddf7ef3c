//! The command line, run as the built binary against temporary databases,
//! and its effect on a running server.

mod common;

use std::process::{Command, Output, Stdio};

use common::{cli, Server, BIN};
use serde_json::{json, Value};

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn ok(o: Output) -> Output {
    assert!(
        o.status.success(),
        "exit {:?}: {}",
        o.status.code(),
        stderr(&o)
    );
    o
}

fn token_list(db: &std::path::Path, extra: &[&str]) -> Vec<Value> {
    let mut args = vec!["token", "list", "--json"];
    args.extend_from_slice(extra);
    let out = ok(cli(db, &args));
    serde_json::from_slice::<Value>(&out.stdout)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

#[test]
fn token_create_prints_the_token_alone() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("t.db");
    let out = ok(cli(
        &db,
        &["token", "create", "--user", "alice", "--name", "laptop"],
    ));
    let text = stdout(&out);
    assert_eq!(text.lines().count(), 1, "{text:?}");
    let token = text.trim_end_matches('\n');
    assert!(token.starts_with("cfc_"), "{token}");
    assert!(
        token.len() >= 36 && token[4..].bytes().all(|b| b.is_ascii_alphanumeric()),
        "{token}"
    );
    let again = ok(cli(&db, &["token", "create", "--user", "alice"]));
    assert_ne!(stdout(&again).trim(), token);

    // Only a hash is stored.
    let raw = std::fs::read(&db).unwrap();
    let wal = std::fs::read(dir.path().join("t.db-wal")).unwrap_or_default();
    for bytes in [raw, wal] {
        assert!(
            !bytes.windows(token.len()).any(|w| w == token.as_bytes()),
            "token stored in plaintext"
        );
    }
}

#[test]
fn token_list_json_and_table() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("t.db");
    let t1 = stdout(&ok(cli(
        &db,
        &["token", "create", "--user", "alice", "--name", "ci"],
    )))
    .trim()
    .to_string();
    let t2 = stdout(&ok(cli(
        &db,
        &["token", "create", "--user", "bob", "--expires-in", "12h"],
    )))
    .trim()
    .to_string();

    let list = token_list(&db, &[]);
    assert_eq!(list.len(), 2);
    for t in &list {
        let keys: Vec<&str> = t.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "id",
                "user",
                "name",
                "created_at",
                "expires_at",
                "last_used_at",
                "revoked_at"
            ]
        );
        assert!(uuid::Uuid::parse_str(t["id"].as_str().unwrap()).is_ok());
        assert!(t["last_used_at"].is_null() && t["revoked_at"].is_null());
    }
    assert_eq!(list[0]["user"], "alice");
    assert_eq!(list[0]["name"], "ci");
    assert!(list[0]["expires_at"].is_null());
    assert_eq!(list[1]["user"], "bob");
    assert_eq!(list[1]["name"], "", "no label is an empty string");
    let created = time::OffsetDateTime::parse(
        list[1]["created_at"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    let expires = time::OffsetDateTime::parse(
        list[1]["expires_at"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    assert_eq!((expires - created).whole_seconds(), 12 * 3600);

    let bobs = token_list(&db, &["--user", "bob"]);
    assert_eq!(bobs.len(), 1);
    assert_eq!(bobs[0]["user"], "bob");
    assert!(token_list(&db, &["--user", "nobody"]).is_empty());

    let table = stdout(&ok(cli(&db, &["token", "list"])));
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 3, "{table}");
    for word in [
        "ID",
        "USER",
        "LABEL",
        "CREATED",
        "EXPIRES",
        "LAST USED",
        "REVOKED",
    ] {
        assert!(lines[0].contains(word), "{table}");
    }
    assert!(lines[1].contains("alice") && lines[1].contains("ci"));
    assert!(lines[2].contains(list[1]["id"].as_str().unwrap()));
    for t in [&t1, &t2] {
        assert!(
            !table.contains(t.as_str()) && !table.contains(&t[4..]),
            "a token is never listed"
        );
    }
}

#[test]
fn revoke_takes_effect_on_a_running_server() {
    let s = Server::start();
    let token = s.token_for("carol");
    assert_eq!(s.call("GET", "/v1/user", Some(&token), None).status, 200);
    let id = token_list(&s.db(), &["--user", "carol"])[0]["id"]
        .as_str()
        .unwrap()
        .to_string();

    let out = ok(s.cli(&["token", "revoke", &id]));
    assert!(stdout(&out).contains(&id));
    s.call("GET", "/v1/user", Some(&token), None)
        .assert_error(401, "token");
    s.call("GET", "/v1/runner", Some(&token), None)
        .assert_error(401, "token");
    let revoked = token_list(&s.db(), &["--user", "carol"]);
    assert!(revoked[0]["revoked_at"].is_string());

    // Again: nothing changes, exit 0.
    ok(s.cli(&["token", "revoke", &id.to_uppercase()]));
    assert_eq!(
        token_list(&s.db(), &["--user", "carol"])[0]["revoked_at"],
        revoked[0]["revoked_at"]
    );

    for unknown in ["550e8400-e29b-41d4-a716-446655440000", "not-an-id"] {
        let out = s.cli(&["token", "revoke", unknown]);
        assert_eq!(out.status.code(), Some(1));
        assert!(
            stderr(&out).lines().next().unwrap().contains(unknown),
            "{}",
            stderr(&out)
        );
    }
    // A token created while the server runs works at once; other tokens are unaffected.
    let fresh = s.token_for("carol");
    assert_eq!(s.call("GET", "/v1/user", Some(&fresh), None).status, 200);
    assert_eq!(s.get("/v1/user").status, 200);
}

#[test]
fn expired_tokens_are_refused() {
    let s = Server::start();
    let token = stdout(&ok(s.cli(&[
        "token",
        "create",
        "--user",
        "dave",
        "--expires-in",
        "90d",
    ])))
    .trim()
    .to_string();
    assert_eq!(s.call("GET", "/v1/user", Some(&token), None).status, 200);
    // Move the expiry into the past rather than waiting for it.
    let conn = rusqlite::Connection::open(s.db()).unwrap();
    conn.busy_timeout(std::time::Duration::from_secs(5))
        .unwrap();
    let n = conn
        .execute("UPDATE tokens SET expires_at = strftime('%s','now') - 1 WHERE user_id = (SELECT id FROM users WHERE name = 'dave')", [])
        .unwrap();
    assert_eq!(n, 1);
    s.call("GET", "/v1/user", Some(&token), None)
        .assert_error(401, "token");
}

#[test]
fn last_used_is_recorded_at_first_use_then_coarsely() {
    let s = Server::start();
    let token = s.token_for("erin");
    assert!(token_list(&s.db(), &["--user", "erin"])[0]["last_used_at"].is_null());
    s.call("GET", "/v1/runner", Some(&token), None);
    let first = token_list(&s.db(), &["--user", "erin"])[0]["last_used_at"].clone();
    assert!(first.is_string(), "first use is recorded at once");

    // Within the minute, uses do not write.
    let conn = rusqlite::Connection::open(s.db()).unwrap();
    let changes = |c: &rusqlite::Connection| -> i64 {
        c.query_row("PRAGMA data_version", [], |r| r.get(0))
            .unwrap()
    };
    let before = changes(&conn);
    for _ in 0..20 {
        assert_eq!(s.call("GET", "/v1/runner", Some(&token), None).status, 200);
    }
    assert_eq!(
        changes(&conn),
        before,
        "reads did not write to the database"
    );
    assert_eq!(
        token_list(&s.db(), &["--user", "erin"])[0]["last_used_at"],
        first
    );

    // Once it is a minute old, the next use refreshes it.
    conn.execute("UPDATE tokens SET last_used_at = last_used_at - 120 WHERE user_id = (SELECT id FROM users WHERE name = 'erin')", [])
        .unwrap();
    let stale = token_list(&s.db(), &["--user", "erin"])[0]["last_used_at"].clone();
    s.call("GET", "/v1/runner", Some(&token), None);
    let mut refreshed = stale.clone();
    for _ in 0..200 {
        refreshed = token_list(&s.db(), &["--user", "erin"])[0]["last_used_at"].clone();
        if refreshed != stale {
            break;
        }
    }
    assert!(
        refreshed.as_str() > stale.as_str(),
        "{stale} -> {refreshed}"
    );
}

#[test]
fn usage_errors_exit_2_and_failures_exit_1() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("t.db");
    for args in [
        &["token", "create"][..],
        &["token", "create", "--user", "a", "--expires-in", "5w"],
        &["token", "create", "--user", "a", "--expires-in", "0s"],
        &["token", "frobnicate"],
        &["nope"],
        &[],
        &["runner", "import", "--user", "a"],
        &["serve", "--workers", "0"],
    ] {
        let out = cli(&db, args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(!stderr(&out).trim().is_empty());
    }
    let out = cli(&db, &["runner", "export", "--user", "ghost"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).starts_with("comfy-runners: "),
        "{}",
        stderr(&out)
    );
    assert_eq!(stderr(&out).lines().count(), 1);
    let out = cli(&db, &["token", "create", "--user", "  "]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("user name"));
}

#[test]
fn db_flag_before_or_after_and_from_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("flag.db");
    let out = Command::new(BIN)
        .arg("--db")
        .arg(&db)
        .args(["token", "create", "--user", "a"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let out = Command::new(BIN)
        .args(["token", "list", "--json"])
        .arg("--db")
        .arg(&db)
        .output()
        .unwrap();
    assert_eq!(
        serde_json::from_slice::<Value>(&out.stdout)
            .unwrap()
            .as_array()
            .unwrap()
            .len(),
        1
    );
    let out = Command::new(BIN)
        .args(["token", "list", "--json"])
        .env("COMFY_RUNNERS_DB", &db)
        .output()
        .unwrap();
    assert_eq!(
        serde_json::from_slice::<Value>(&out.stdout)
            .unwrap()
            .as_array()
            .unwrap()
            .len(),
        1
    );
    // The default is comfy-runners.db in the working directory.
    let out = Command::new(BIN)
        .args(["token", "create", "--user", "b"])
        .current_dir(dir.path())
        .env_remove("COMFY_RUNNERS_DB")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(dir.path().join("comfy-runners.db").exists());
}

#[test]
fn a_database_from_a_newer_version_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("t.db");
    ok(cli(&db, &["token", "create", "--user", "a"]));
    rusqlite::Connection::open(&db)
        .unwrap()
        .execute_batch("PRAGMA user_version = 999")
        .unwrap();
    let out = cli(&db, &["token", "list"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("newer"), "{}", stderr(&out));
    let out = cli(
        &dir.path().join("missing-dir").join("x.db"),
        &["token", "list"],
    );
    assert_eq!(out.status.code(), Some(1));
}

/// Runners with every kind of field, some disabled, several in one second.
fn populate(s: &Server, n: usize) -> Vec<Value> {
    (0..n)
        .map(|i| {
            let body = json!({
                "name": format!("runner {i} ✓"),
                "endpoint": format!("http://10.0.0.{i}:8188/"),
                "tags": ["gpu", format!("t{i}")],
                "headers": {"X-Token": format!("s{i}"), "authorization": "Bearer x"},
                "status": if i % 3 == 0 { "disabled" } else { "active" },
            });
            let r = s.post("/v1/runner", &body);
            assert_eq!(r.status, 201);
            r.json()
        })
        .collect()
}

fn export(db: &std::path::Path, user: &str) -> Vec<u8> {
    ok(cli(db, &["runner", "export", "--user", user])).stdout
}

#[test]
fn export_import_export_is_the_same_document() {
    let s = Server::start();
    let mut made = populate(&s, 12);
    made.reverse();
    let first = export(&s.db(), "admin");
    let doc: Value = serde_json::from_slice(&first).unwrap();
    assert_eq!(doc["total"], 12);
    assert_eq!(
        doc["runners"],
        Value::from(made.clone()),
        "newest first, the list's shape"
    );
    assert_eq!(
        doc["runners"],
        s.get("/v1/runner?per_page=100").json()["runners"]
    );

    let dir = tempfile::tempdir().unwrap();
    let fresh = dir.path().join("fresh.db");
    let file = dir.path().join("export.json");
    std::fs::write(&file, &first).unwrap();
    let out = ok(cli(
        &fresh,
        &[
            "runner",
            "import",
            "--user",
            "admin",
            file.to_str().unwrap(),
        ],
    ));
    assert!(stdout(&out).contains("12"), "{}", stdout(&out));
    let second = export(&fresh, "admin");
    assert_eq!(
        String::from_utf8(second).unwrap(),
        String::from_utf8(first).unwrap()
    );

    // The imported runners serve the same list.
    let t = s.stop_keep();
    drop(t);
    let moved = Server::start_in(tempfile::tempdir().unwrap(), &[]);
    let n = ok(common::cli(
        &moved.db(),
        &[
            "runner",
            "import",
            "--user",
            "admin",
            file.to_str().unwrap(),
        ],
    ));
    assert!(stdout(&n).contains("12"));
    // Into an existing user: the runners become that user's, all else kept.
    let me = moved.get("/v1/user").json()["id"].clone();
    for r in &mut made {
        r["user_id"] = me.clone();
    }
    let list = moved.get("/v1/runner?per_page=100").json();
    assert_eq!(list["runners"], Value::from(made));
    let disabled = moved.get("/v1/runner?status=disabled").json();
    assert_eq!(disabled["total"], 4);
}

#[test]
fn import_reads_bare_arrays_and_stdin_and_keeps_given_fields() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("t.db");
    let runners = json!([
        {"id": "550E8400-E29B-41D4-A716-446655440000", "name": "a", "endpoint": "http://a", "status": "disabled",
         "created_at": "2024-01-15T10:30:00Z", "updated_at": "2024-02-01T00:00:00Z", "user_id": "whatever"},
        {"name": "b", "endpoint": "https://b", "tags": null},
        {"name": "c", "endpoint": "http://c", "created_at": "2024-01-15T10:30:00Z"},
    ]);
    let mut child = Command::new(BIN)
        .args(["runner", "import", "--user", "zed", "-", "--db"])
        .arg(&db)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(runners.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let doc: Value = serde_json::from_slice(&export(&db, "zed")).unwrap();
    let rs = doc["runners"].as_array().unwrap();
    assert_eq!(rs.len(), 3);
    assert_eq!(rs[0]["name"], "b", "no created_at: now, so newest");
    // Same second: the file's order is kept.
    assert_eq!(rs[1]["id"], "550e8400-e29b-41d4-a716-446655440000");
    assert_eq!(rs[1]["status"], "disabled");
    assert_eq!(rs[1]["updated_at"], "2024-02-01T00:00:00Z");
    assert_eq!(rs[2]["name"], "c");
    assert_eq!(
        rs[2]["updated_at"], "2024-01-15T10:30:00Z",
        "updated_at defaults to created_at"
    );
    let owner = &rs[0]["user_id"];
    assert!(
        rs.iter().all(|r| &r["user_id"] == owner),
        "all owned by zed"
    );
}

#[test]
fn import_is_all_or_nothing() {
    let s = Server::start();
    populate(&s, 3);
    let before = export(&s.db(), "admin");
    let existing: Value = serde_json::from_slice(&before).unwrap();
    let taken = existing["runners"][0]["id"].as_str().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            json!([{"name": "ok", "endpoint": "http://ok"}, {"name": "ok2", "endpoint": "http://ok"},
                {"name": "bad", "endpoint": "not a url"}]),
            vec!["runner 3", "endpoint"],
        ),
        (
            json!({"runners": [{"name": "ok", "endpoint": "http://ok"}, {"id": taken, "name": "dup", "endpoint": "http://d"}]}),
            vec!["runner 2", &taken, "exists"],
        ),
        (
            json!([{"name": "x", "endpoint": "http://x", "id": "00000000-0000-4000-8000-000000000001"},
                {"name": "y", "endpoint": "http://y", "id": "00000000-0000-4000-8000-000000000001"}]),
            vec!["runner 2", "exists"],
        ),
        (
            json!([{"name": "x", "endpoint": "http://x", "created_at": "yesterday"}]),
            vec!["runner 1", "created_at"],
        ),
        (
            json!([{"name": "x", "endpoint": "http://x", "status": "gone"}]),
            vec!["runner 1", "status"],
        ),
        (
            json!([{"name": "x", "endpoint": "http://x", "id": "nope"}]),
            vec!["runner 1", "id"],
        ),
        (json!([5]), vec!["runner 1", "object"]),
        (json!({"items": []}), vec!["runners"]),
        (json!("runners"), vec!["import"]),
    ];
    for (i, (doc, words)) in cases.iter().enumerate() {
        let file = dir.path().join(format!("{i}.json"));
        std::fs::write(&file, doc.to_string()).unwrap();
        let out = s.cli(&[
            "runner",
            "import",
            "--user",
            "admin",
            file.to_str().unwrap(),
        ]);
        assert_eq!(out.status.code(), Some(1), "case {i}");
        let first = stderr(&out).lines().next().unwrap_or("").to_string();
        for w in words {
            assert!(first.contains(w), "case {i}: {first:?} should name {w:?}");
        }
        assert_eq!(
            export(&s.db(), "admin"),
            before,
            "case {i}: the database is as it was"
        );
    }
    let file = dir.path().join("broken.json");
    std::fs::write(&file, b"[{\"name\": \"x\", ").unwrap();
    assert_eq!(
        s.cli(&[
            "runner",
            "import",
            "--user",
            "admin",
            file.to_str().unwrap()
        ])
        .status
        .code(),
        Some(1)
    );
    assert_eq!(
        s.cli(&[
            "runner",
            "import",
            "--user",
            "admin",
            "/nonexistent/file.json"
        ])
        .status
        .code(),
        Some(1)
    );
    // A failed import into a new user does not leave the user behind.
    let file = dir.path().join("0.json");
    assert_eq!(
        s.cli(&[
            "runner",
            "import",
            "--user",
            "newbie",
            file.to_str().unwrap()
        ])
        .status
        .code(),
        Some(1)
    );
    assert_eq!(
        s.cli(&["runner", "export", "--user", "newbie"])
            .status
            .code(),
        Some(1)
    );
    assert_eq!(s.get("/v1/runner").json()["total"], 3);
}

#[test]
fn import_while_serving_is_seen_at_once() {
    let s = Server::start();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("in.json");
    let rs: Vec<Value> = (0..500)
        .map(|i| json!({"name": format!("n{i}"), "endpoint": "http://h"}))
        .collect();
    std::fs::write(&file, Value::from(rs).to_string()).unwrap();
    ok(s.cli(&[
        "runner",
        "import",
        "--user",
        "admin",
        file.to_str().unwrap(),
    ]));
    let v = s.get("/v1/runner?per_page=100&page=5").json();
    assert_eq!(v["total"], 500);
    assert_eq!(v["runners"].as_array().unwrap().len(), 100);
    assert_eq!(
        v["runners"][99]["name"], "n499",
        "file order kept for same-second runners"
    );
}
