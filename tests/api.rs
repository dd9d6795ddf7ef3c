//! The HTTP contract, over a real socket against the real binary.

mod common;

use std::collections::HashSet;

use common::Server;
use serde_json::{json, Value};

const RUNNER_FIELDS: [&str; 9] = [
    "id",
    "user_id",
    "name",
    "status",
    "endpoint",
    "tags",
    "headers",
    "created_at",
    "updated_at",
];

fn assert_runner_shape(r: &Value) {
    let obj = r.as_object().expect("runner is an object");
    let keys: Vec<&str> = obj.keys().map(String::as_str).collect();
    assert_eq!(keys, RUNNER_FIELDS, "exactly the nine fields");
    let id = r["id"].as_str().unwrap();
    assert_eq!(uuid::Uuid::parse_str(id).unwrap().get_version_num(), 4);
    assert_eq!(id, id.to_lowercase());
    for ts in ["created_at", "updated_at"] {
        let s = r[ts].as_str().unwrap();
        assert_eq!(s.len(), 20, "{s}");
        assert!(s.ends_with('Z') && s.as_bytes()[10] == b'T', "{s}");
    }
}

#[test]
fn create_get_update_delete_round_trip() {
    let s = Server::start();
    let body = json!({
        "name": "Production GPU Runner",
        "endpoint": "https://my-comfy.example.com",
        "tags": ["production", "gpu-a100"],
        "headers": {"Authorization": "Bearer secret_token", "x-Mixed-Case": "v"},
        "id": "550e8400-e29b-41d4-a716-446655440000",
        "user_id": "7c9e6679-7425-40de-944b-e07fc1f90ae7",
        "created_at": "2000-01-01T00:00:00Z",
        "unknown": {"ignored": true}
    });
    let r = s.post("/v1/runner", &body);
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/json"));
    let created = r.json();
    assert_runner_shape(&created);
    assert_ne!(created["id"], body["id"], "id is the server's");
    assert_ne!(created["created_at"], "2000-01-01T00:00:00Z");
    assert_eq!(created["status"], "active");
    assert_eq!(created["name"], body["name"]);
    assert_eq!(created["endpoint"], body["endpoint"]);
    assert_eq!(created["tags"], body["tags"]);
    assert_eq!(created["headers"], body["headers"]);
    let header_names: Vec<_> = created["headers"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    assert_eq!(
        header_names,
        ["Authorization", "x-Mixed-Case"],
        "order and case kept"
    );
    assert_eq!(created["created_at"], created["updated_at"]);
    let me = s.get("/v1/user").json();
    assert_eq!(created["user_id"], me["id"]);

    let id = created["id"].as_str().unwrap();
    let got = s.get(&format!("/v1/runner/{id}"));
    assert_eq!(got.status, 200);
    assert_eq!(got.json(), created);
    let upper = s.get(&format!("/v1/runner/{}", id.to_uppercase()));
    assert_eq!(
        upper.status, 200,
        "a UUID in a path is accepted in either case"
    );

    std::thread::sleep(std::time::Duration::from_millis(1100));
    let put = s.put(
        &format!("/v1/runner/{id}"),
        &json!({"status": "disabled", "tags": ["only"], "name": null, "created_at": "1999-01-01T00:00:00Z"}),
    );
    assert_eq!(put.status, 200, "{}", put.text());
    let updated = put.json();
    assert_runner_shape(&updated);
    assert_eq!(updated["status"], "disabled");
    assert_eq!(updated["tags"], json!(["only"]));
    assert_eq!(updated["name"], created["name"], "null keeps the value");
    assert_eq!(
        updated["headers"], created["headers"],
        "absent keeps the value"
    );
    assert_eq!(updated["created_at"], created["created_at"]);
    assert!(updated["updated_at"].as_str() > created["updated_at"].as_str());
    assert_eq!(s.get(&format!("/v1/runner/{id}")).json(), updated);

    let put = s.put(&format!("/v1/runner/{id}"), &json!({"headers": {}}));
    assert_eq!(
        put.json()["headers"],
        json!({}),
        "headers are replaced whole"
    );

    let del = s.delete(&format!("/v1/runner/{id}"));
    assert_eq!(del.status, 204);
    assert!(del.body.is_empty());
    s.get(&format!("/v1/runner/{id}"))
        .assert_error(404, "not found");
    s.delete(&format!("/v1/runner/{id}"))
        .assert_error(404, "not found");
    s.put(&format!("/v1/runner/{id}"), &json!({}))
        .assert_error(404, "not found");
}

#[test]
fn created_with_status_disabled_and_defaults() {
    let s = Server::start();
    let r = s.post(
        "/v1/runner",
        &json!({"name": "n", "endpoint": "http://10.0.0.1:8188", "status": "disabled"}),
    );
    assert_eq!(r.status, 201);
    assert_eq!(r.json()["status"], "disabled");
    let r = s.post(
        "/v1/runner",
        &json!({"name": " x ", "endpoint": "http://h"}),
    );
    let v = r.json();
    assert_eq!(v["name"], " x ", "names are not trimmed");
    assert_eq!(v["tags"], json!([]));
    assert_eq!(v["headers"], json!({}));
    assert_eq!(v["endpoint"], "http://h", "no trailing slash added");
}

#[test]
fn validation_failures_name_the_field_and_store_nothing() {
    let s = Server::start();
    let ok = json!({"name": "n", "endpoint": "http://h:1"});
    let with = |k: &str, v: Value| {
        let mut b = ok.clone();
        b[k] = v;
        b
    };
    let cases: Vec<(Value, &str)> = vec![
        (json!({"endpoint": "http://h"}), "name"),
        (json!({"name": "n"}), "endpoint"),
        (with("name", json!("")), "name"),
        (with("name", json!("   ")), "name"),
        (with("name", json!("x".repeat(101))), "name"),
        (with("name", json!(42)), "name"),
        (with("name", json!(["n"])), "name"),
        (with("endpoint", json!("not a url")), "endpoint"),
        (with("endpoint", json!("ftp://h")), "endpoint"),
        (with("endpoint", json!("http://")), "endpoint"),
        (with("endpoint", json!("/relative")), "endpoint"),
        (with("endpoint", json!(8188)), "endpoint"),
        (with("tags", json!(vec!["t"; 11])), "tags"),
        (with("tags", json!([""])), "tags"),
        (with("tags", json!([1])), "tags"),
        (with("tags", json!("gpu")), "tags"),
        (with("headers", json!({"bad name": "v"})), "headers"),
        (with("headers", json!({"X-A": "1", "x-a": "2"})), "headers"),
        (
            with("headers", json!({"X-A": "a\r\nInjected: 1"})),
            "headers",
        ),
        (with("headers", json!({"X-A": 1})), "headers"),
        (with("headers", json!(["X-A"])), "headers"),
        (with("status", json!("paused")), "status"),
        (with("status", json!("ACTIVE")), "status"),
        (with("status", json!(true)), "status"),
    ];
    for (body, field) in &cases {
        let r = s.post("/v1/runner", body);
        r.assert_error(400, field);
    }
    assert_eq!(s.get("/v1/runner").json()["total"], 0, "nothing stored");

    let max = with("name", json!("é".repeat(100)));
    assert_eq!(
        s.post("/v1/runner", &max).status,
        201,
        "100 characters, not bytes"
    );
    let ten = with("tags", json!(vec!["t"; 10]));
    assert_eq!(s.post("/v1/runner", &ten).status, 201);

    // An update with one bad field changes nothing.
    let r = s.create("keep");
    let id = r["id"].as_str().unwrap();
    let path = format!("/v1/runner/{id}");
    for (body, field) in cases.iter().skip(2) {
        s.put(&path, body).assert_error(400, field);
    }
    s.put(&path, &json!({"name": "changed", "status": "nope"}))
        .assert_error(400, "status");
    assert_eq!(s.get(&path).json(), r, "a rejected update changes nothing");
}

#[test]
fn malformed_bodies_are_400() {
    let s = Server::start();
    let t = s.token.clone();
    for body in [
        &b""[..],
        b"{",
        b"[]",
        b"\"s\"",
        b"null",
        b"{\"name\":",
        b"\xff\xfe",
        b"{} trailing",
    ] {
        let r = s.call("POST", "/v1/runner", Some(&t), Some(body));
        r.assert_error(400, "body");
    }
    let r = s.create("x");
    let path = format!("/v1/runner/{}", r["id"].as_str().unwrap());
    s.call("PUT", &path, Some(&t), Some(b"[1]"))
        .assert_error(400, "body");
    s.call("PUT", &path, Some(&t), Some(b"not json"))
        .assert_error(400, "body");
    // Content-Type is not checked.
    let raw = s.raw(
        &common::http_request(
            "POST",
            "/v1/runner",
            &t,
            br#"{"name":"n","endpoint":"http://h"}"#,
        ),
        std::time::Duration::from_secs(5),
    );
    assert!(
        raw.starts_with(b"HTTP/1.1 201"),
        "{}",
        String::from_utf8_lossy(&raw)
    );
}

#[test]
fn bad_ids_in_paths_are_400() {
    let s = Server::start();
    for id in [
        "not-a-uuid",
        "550e8400e29b41d4a716446655440000",
        "550e8400-e29b-41d4-a716-44665544000g",
        "1",
    ] {
        let p = format!("/v1/runner/{id}");
        s.get(&p).assert_error(400, "id");
        s.delete(&p).assert_error(400, "id");
        s.put(&p, &json!({})).assert_error(400, "id");
    }
    s.get("/v1/runner/550e8400-e29b-41d4-a716-446655440000")
        .assert_error(404, "not found");
}

#[test]
fn routing_errors() {
    let s = Server::start();
    let t = s.token.clone();
    for path in [
        "/",
        "/v2/runner",
        "/v1",
        "/v1/",
        "/v1/runners",
        "/v1/runner/",
        "/v1/runner/a/b",
        "/healthz/x",
    ] {
        let r = s.get(path);
        r.assert_error(404, "");
    }
    for (method, path, allow) in [
        ("DELETE", "/v1/runner", "GET, HEAD, POST"),
        ("PUT", "/v1/runner", "GET, HEAD, POST"),
        ("PATCH", "/v1/runner", "GET, HEAD, POST"),
        (
            "POST",
            "/v1/runner/550e8400-e29b-41d4-a716-446655440000",
            "GET, HEAD, PUT, DELETE",
        ),
        (
            "PATCH",
            "/v1/runner/not-even-a-uuid",
            "GET, HEAD, PUT, DELETE",
        ),
        ("POST", "/v1/user", "GET, HEAD"),
        ("POST", "/healthz", "GET, HEAD"),
    ] {
        let r = s.call(method, path, Some(&t), Some(b"{}"));
        r.assert_error(405, "method");
        assert_eq!(r.header("allow"), Some(allow), "{method} {path}");
    }
}

#[test]
fn authentication_comes_first_and_is_uniform() {
    let s = Server::start();
    let valid_shape = format!("cfc_{}", "A".repeat(40));
    let paths = [
        "/v1/runner",
        "/v1/runner/550e8400-e29b-41d4-a716-446655440000",
        "/v1/user",
        "/v1/nope",
        "/v1/runner/x/y",
    ];
    for path in paths {
        for method in ["GET", "POST", "PUT", "DELETE", "PATCH"] {
            s.call(method, path, None, Some(b"garbage"))
                .assert_error(401, "token");
            s.call(method, path, Some(&valid_shape), Some(b"garbage"))
                .assert_error(401, "token");
        }
    }
    let real = s.token.clone();
    for header in [
        format!("Basic {real}"),
        real.clone(),
        "Bearer".to_string(),
        format!("Bearer {}", &real[..real.len() - 1]),
        format!("Bearer {real}x"),
        "Bearer cfc_short".to_string(),
    ] {
        let r = raw_with_auth(&s, &header);
        assert!(
            r.starts_with(b"HTTP/1.1 401"),
            "{header}: {}",
            String::from_utf8_lossy(&r)
        );
        assert!(String::from_utf8_lossy(&r).contains("WWW-Authenticate: Bearer"));
    }
    for scheme in ["bearer", "BEARER", "bEaReR"] {
        let r = raw_with_auth(&s, &format!("{scheme} {real}"));
        assert!(
            r.starts_with(b"HTTP/1.1 200"),
            "{scheme}: {}",
            String::from_utf8_lossy(&r)
        );
    }
    // healthz needs no token.
    let h = s.call("GET", "/healthz", None, None);
    assert_eq!(h.status, 200);
    assert_eq!(h.json(), json!({"status": "ok"}));
    assert_eq!(h.header("content-type"), Some("application/json"));
}

fn raw_with_auth(s: &Server, header: &str) -> Vec<u8> {
    let rq = format!(
        "GET /v1/user HTTP/1.1\r\nHost: t\r\nAuthorization: {header}\r\nConnection: close\r\n\r\n"
    );
    s.raw(rq.as_bytes(), std::time::Duration::from_secs(5))
}

#[test]
fn user_endpoint() {
    let s = Server::start();
    let v = s.get("/v1/user").json();
    let keys: HashSet<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        HashSet::from([
            "id",
            "name",
            "email",
            "deleted",
            "tier",
            "provider",
            "created_at",
            "updated_at"
        ])
    );
    assert_eq!(v["name"], "admin");
    assert_eq!(v["deleted"], false);
    assert_eq!(v["tier"], "enterprise");
    assert_eq!(v["provider"], "local");
    assert!(v["email"].is_string());
    let bob = s.token_for("bob");
    let b = s.call("GET", "/v1/user", Some(&bob), None).json();
    assert_eq!(b["name"], "bob");
    assert_ne!(b["id"], v["id"]);
}

#[test]
fn users_are_isolated() {
    let s = Server::start();
    let alice = s.token_for("alice");
    let bob = s.token_for("bob");
    let a = s.create_as(&alice, "alice-1");
    s.create_as(&bob, "bob-1");
    s.create_as(&bob, "bob-2");
    let path = format!("/v1/runner/{}", a["id"].as_str().unwrap());

    let list = s.call("GET", "/v1/runner", Some(&bob), None).json();
    assert_eq!(list["total"], 2);
    assert!(list["runners"]
        .as_array()
        .unwrap()
        .iter()
        .all(|r| r["name"].as_str().unwrap().starts_with("bob")));

    // Another user's runner is exactly a runner that does not exist.
    let missing = "/v1/runner/550e8400-e29b-41d4-a716-446655440000";
    for (method, body) in [
        ("GET", None),
        ("PUT", Some(&b"{\"name\":\"stolen\"}"[..])),
        ("DELETE", None),
    ] {
        let theirs = s.call(method, &path, Some(&bob), body);
        let nobodys = s.call(method, missing, Some(&bob), body);
        theirs.assert_error(404, "not found");
        assert_eq!(theirs.body, nobodys.body);
    }
    let still = s.call("GET", &path, Some(&alice), None);
    assert_eq!(still.json(), a, "untouched by bob");
    let mine = s.call("GET", "/v1/runner", Some(&alice), None).json();
    assert_eq!(mine["total"], 1);
}

#[test]
fn list_defaults_order_and_total() {
    let s = Server::start();
    let mut names = Vec::new();
    for i in 0..25 {
        let name = format!("r{i:02}");
        s.create(&name);
        names.push(name);
    }
    names.reverse(); // newest first; same-second ties: the later one first
    let page = s.get("/v1/runner").json();
    assert_eq!(page.as_object().unwrap().len(), 2);
    assert_eq!(page["total"], 25);
    let got: Vec<&str> = page["runners"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(got, names[..10], "default per_page is 10, newest first");
    for r in page["runners"].as_array().unwrap() {
        assert_runner_shape(r);
    }
    let last = s.get("/v1/runner?page=3").json();
    assert_eq!(last["runners"].as_array().unwrap().len(), 5);
    assert_eq!(last["total"], 25);
    let past = s.get("/v1/runner?page=4").json();
    assert_eq!(past, json!({"runners": [], "total": 25}));
    let huge = s
        .get("/v1/runner?page=9223372036854775807&per_page=100")
        .json();
    assert_eq!(huge, json!({"runners": [], "total": 25}));
    s.get("/v1/runner?page=9223372036854775808")
        .assert_error(400, "page");
    s.get("/v1/runner?page=99999999999999999999999999")
        .assert_error(400, "page");
}

#[test]
fn pagination_walks_see_every_runner_once_in_both_directions() {
    let s = Server::start();
    let mut created = Vec::new();
    for i in 0..37 {
        let r = s.create(&format!("w{i}"));
        if i % 3 == 0 {
            let id = r["id"].as_str().unwrap();
            s.put(&format!("/v1/runner/{id}"), &json!({"status": "disabled"}));
        }
        created.push(r["id"].as_str().unwrap().to_string());
    }
    created.reverse();
    for per_page in [1, 2, 5, 7, 10, 36, 37, 100] {
        let mut seen = Vec::new();
        for page in 1.. {
            let v = s
                .get(&format!("/v1/runner?per_page={per_page}&page={page}"))
                .json();
            assert_eq!(v["total"], 37);
            let rs = v["runners"].as_array().unwrap();
            if rs.is_empty() {
                break;
            }
            assert!(rs.len() <= per_page);
            seen.extend(rs.iter().map(|r| r["id"].as_str().unwrap().to_string()));
        }
        assert_eq!(
            seen, created,
            "per_page={per_page}: every runner once, in order"
        );
    }
    let mut disabled = Vec::new();
    for page in 1..=5 {
        let v = s
            .get(&format!(
                "/v1/runner?status=disabled&per_page=3&page={page}"
            ))
            .json();
        assert_eq!(v["total"], 13);
        for r in v["runners"].as_array().unwrap() {
            assert_eq!(r["status"], "disabled");
            disabled.push(r["id"].as_str().unwrap().to_string());
        }
    }
    let expected: Vec<String> = created
        .iter()
        .enumerate()
        .filter(|(i, _)| (36 - i) % 3 == 0)
        .map(|(_, id)| id.clone())
        .collect();
    assert_eq!(disabled, expected);
    let active = s.get("/v1/runner?status=active&per_page=100").json();
    assert_eq!(active["total"], 24);
    assert_eq!(active["runners"].as_array().unwrap().len(), 24);
}

#[test]
fn list_parameters_are_validated_never_clamped() {
    let s = Server::start();
    s.create("one");
    for (q, field) in [
        ("page=0", "page"),
        ("page=-1", "page"),
        ("page=abc", "page"),
        ("page=1.5", "page"),
        ("page=", "page"),
        ("per_page=0", "per_page"),
        ("per_page=101", "per_page"),
        ("per_page=-5", "per_page"),
        ("per_page=1e2", "per_page"),
        ("per_page=", "per_page"),
        ("status=paused", "status"),
        ("status=Active", "status"),
        ("status=", "status"),
        ("status=active%27%20OR%20%271%27%3D%271", "status"),
        ("page=1%3B%20DROP%20TABLE%20runners", "page"),
    ] {
        s.get(&format!("/v1/runner?{q}")).assert_error(400, field);
    }
    let ok = s
        .get("/v1/runner?per_page=100&page=1&status=active&unknown=1&foo")
        .json();
    assert_eq!(ok["total"], 1);
    assert_eq!(
        s.get("/v1/runner?per_page=1").json()["runners"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert_eq!(
        s.get("/v1/runner").json()["total"],
        1,
        "still there after injection attempts"
    );
}

#[test]
fn oversized_bodies_are_413_and_store_nothing() {
    let s = Server::start();
    let t = s.token.clone();
    let mut big = br#"{"name":"n","endpoint":"http://h","pad":""#.to_vec();
    big.resize(big.len() + (1 << 20), b'x');
    big.extend_from_slice(b"\"}");
    s.call("POST", "/v1/runner", Some(&t), Some(&big))
        .assert_error(413, "body");
    let r = s.create("x");
    let path = format!("/v1/runner/{}", r["id"].as_str().unwrap());
    s.call("PUT", &path, Some(&t), Some(&big))
        .assert_error(413, "body");
    // Just under the limit is read and validated.
    let mut fits = br#"{"name":"n","endpoint":"http://h","pad":""#.to_vec();
    fits.resize((1 << 20) - 2, b'x');
    fits.extend_from_slice(b"\"}");
    assert_eq!(
        s.call("POST", "/v1/runner", Some(&t), Some(&fits)).status,
        201
    );
    // Order of checks: auth before the body's size.
    s.call("POST", "/v1/runner", None, Some(&big))
        .assert_error(401, "token");
    assert_eq!(s.get("/v1/runner").json()["total"], 2);
}

#[test]
fn head_is_get_without_a_body() {
    let s = Server::start();
    let r = s.call("HEAD", "/v1/runner", Some(&s.token.clone()), None);
    assert_eq!(r.status, 200);
    assert!(r.body.is_empty());
}
