//! Test fixtures: the real `comfy-runners` binary serving a fresh database in
//! a temporary directory on 127.0.0.1:0, a client for it, and the CLI.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_comfy-runners");

pub struct Server {
    pub dir: tempfile::TempDir,
    child: Option<Child>,
    pub addr: String,
    pub base: String,
    /// The token printed at first start (user `admin`); empty if none was printed.
    pub token: String,
    stderr: Arc<Mutex<String>>,
    agent: ureq::Agent,
}

pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "status {}: body is not JSON ({e}): {:?}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The one error shape: exactly `{"status", "message"}` as JSON, the
    /// status matching, and the message mentioning `mention`.
    pub fn assert_error(&self, status: u16, mention: &str) {
        assert_eq!(self.status, status, "body: {}", self.text());
        assert_eq!(self.header("content-type"), Some("application/json"));
        let v = self.json();
        let obj = v.as_object().expect("error body is an object");
        assert_eq!(obj.len(), 2, "error body has exactly two fields: {v}");
        assert_eq!(obj["status"], Value::from(status));
        let msg = obj["message"].as_str().expect("message is a string");
        assert!(
            msg.to_lowercase().contains(&mention.to_lowercase()),
            "message {msg:?} should mention {mention:?}"
        );
        if status == 401 {
            assert_eq!(self.header("www-authenticate"), Some("Bearer"));
        }
    }
}

impl Server {
    pub fn start() -> Server {
        Server::start_in(tempfile::tempdir().unwrap(), &[])
    }

    /// Serves `dir/test.db` (created if missing) with extra `serve` arguments.
    pub fn start_in(dir: tempfile::TempDir, extra: &[&str]) -> Server {
        let db = dir.path().join("test.db");
        let mut child = Command::new(BIN)
            .arg("serve")
            .arg("--db")
            .arg(&db)
            .args(["--listen", "127.0.0.1:0"])
            .args(extra)
            .env_remove("COMFY_RUNNERS_DB")
            .env_remove("COMFY_RUNNERS_LISTEN")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start comfy-runners");
        let stderr = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel();
        let sink = stderr.clone();
        let pipe = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                if let Some(addr) = line.strip_prefix("listening on http://") {
                    let _ = tx.send(addr.to_string());
                }
                let mut s = sink.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("server did not start: {}", stderr.lock().unwrap()));
        let token = stderr
            .lock()
            .unwrap()
            .lines()
            .find(|l| l.starts_with("cfc_"))
            .unwrap_or("")
            .to_string();
        let agent = ureq::Agent::new_with_config(
            ureq::Agent::config_builder()
                .http_status_as_error(false)
                .timeout_global(Some(Duration::from_secs(30)))
                .build(),
        );
        Server {
            dir,
            child: Some(child),
            base: format!("http://{addr}"),
            addr,
            token,
            stderr,
            agent,
        }
    }

    pub fn db(&self) -> PathBuf {
        self.dir.path().join("test.db")
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Runs the CLI against this server's database.
    pub fn cli(&self, args: &[&str]) -> Output {
        cli(&self.db(), args)
    }

    /// A new token for `user` (created if needed), from the CLI.
    pub fn token_for(&self, user: &str) -> String {
        let out = self.cli(&["token", "create", "--user", user]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    pub fn call(&self, method: &str, path: &str, token: Option<&str>, body: Option<&[u8]>) -> Resp {
        let mut rq = ureq::http::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base));
        if let Some(t) = token {
            rq = rq.header("Authorization", format!("Bearer {t}"));
        }
        let result = match body {
            Some(b) => self.agent.run(rq.body(b.to_vec()).unwrap()),
            None => self.agent.run(rq.body(()).unwrap()),
        };
        let mut resp = result.unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let headers = resp
            .headers()
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
            .collect();
        let status = resp.status().as_u16();
        let body = resp
            .body_mut()
            .with_config()
            .limit(64 << 20)
            .read_to_vec()
            .unwrap_or_default();
        Resp {
            status,
            headers,
            body,
        }
    }

    /// With the admin token.
    pub fn get(&self, path: &str) -> Resp {
        self.call("GET", path, Some(&self.token), None)
    }

    pub fn post(&self, path: &str, body: &Value) -> Resp {
        self.call(
            "POST",
            path,
            Some(&self.token),
            Some(body.to_string().as_bytes()),
        )
    }

    pub fn put(&self, path: &str, body: &Value) -> Resp {
        self.call(
            "PUT",
            path,
            Some(&self.token),
            Some(body.to_string().as_bytes()),
        )
    }

    pub fn delete(&self, path: &str) -> Resp {
        self.call("DELETE", path, Some(&self.token), None)
    }

    /// Registers a runner named `name` with `token`; returns it.
    pub fn create_as(&self, token: &str, name: &str) -> Value {
        let body = serde_json::json!({"name": name, "endpoint": "http://127.0.0.1:8188"});
        let r = self.call(
            "POST",
            "/v1/runner",
            Some(token),
            Some(body.to_string().as_bytes()),
        );
        assert_eq!(r.status, 201, "{}", r.text());
        r.json()
    }

    pub fn create(&self, name: &str) -> Value {
        self.create_as(&self.token.clone(), name)
    }

    /// Sends raw bytes on a fresh connection; returns whatever comes back
    /// before the server closes it or `wait` passes.
    pub fn raw(&self, bytes: &[u8], wait: Duration) -> Vec<u8> {
        let mut s = TcpStream::connect(&self.addr).unwrap();
        s.set_read_timeout(Some(wait)).unwrap();
        let _ = s.write_all(bytes);
        let _ = s.shutdown(Shutdown::Write);
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        out
    }

    /// SIGTERM, then the exit status.
    pub fn stop(mut self) -> ExitStatus {
        self.signal("TERM");
        self.wait()
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap();
        assert!(ok.success());
    }

    pub fn wait(&mut self) -> ExitStatus {
        let mut child = self.child.take().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("server did not exit: {}", self.stderr());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Kills the server at once (SIGKILL) and keeps the directory.
    pub fn kill(mut self) -> tempfile::TempDir {
        let mut child = self.child.take().unwrap();
        let _ = child.kill();
        let _ = child.wait();
        std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap())
    }

    /// Stops the server cleanly and keeps the directory, for a restart.
    pub fn stop_keep(mut self) -> tempfile::TempDir {
        self.signal("TERM");
        let status = self.wait();
        assert!(status.success(), "exit {status:?}: {}", self.stderr());
        std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Runs the CLI with `--db db`.
pub fn cli(db: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .arg("--db")
        .arg(db)
        .env_remove("COMFY_RUNNERS_DB")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// A request head and body, for raw-socket tests.
pub fn http_request(method: &str, path: &str, token: &str, body: &[u8]) -> Vec<u8> {
    let mut rq = format!(
        "{method} {path} HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {token}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    rq.extend_from_slice(body);
    rq
}

/// Reads one HTTP response (head and Content-Length body) from `s`; returns
/// the status and body.
pub fn read_response(s: &mut impl Read) -> std::io::Result<(u16, Vec<u8>)> {
    let mut got = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&got[..end]).to_string();
            let status: u16 = head
                .split(' ')
                .nth(1)
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            let len = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().ok())?
                })
                .unwrap_or(0);
            while got.len() < end + 4 + len {
                let n = s.read(&mut buf)?;
                if n == 0 {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
                got.extend_from_slice(&buf[..n]);
            }
            return Ok((status, got[end + 4..end + 4 + len].to_vec()));
        }
        let n = s.read(&mut buf)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        got.extend_from_slice(&buf[..n]);
    }
}
