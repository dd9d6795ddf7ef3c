//! The HTTP API. `server` runs the socket and the workers; this file routes a
//! request to its handler in the order the contract fixes: authentication,
//! then the route (404, 405), then the body (413, 400), then validation.

mod auth;
mod runners;
mod server;
mod warden;

use std::sync::Arc;

pub use server::{bind, Handler, Incoming, Reply, Server, Stopper, MAX_BODY};

use crate::clock;
use crate::db::{Pool, Writer};
use crate::error::{Error, Result};
use crate::tokens::{self, Touch};

/// The comfy-runners API over one database pool.
pub struct App {
    pool: Pool,
    /// Every write of the server takes its turn here (see `Writer`).
    writer: Arc<Writer>,
}

impl App {
    pub fn new(pool: Pool) -> App {
        App {
            pool,
            writer: Arc::new(Writer::default()),
        }
    }
}

impl Handler for App {
    fn handle(&self, rq: &mut Incoming<'_>) -> Reply {
        self.route(rq).unwrap_or_else(|e| Reply::error(&e))
    }
}

/// What a `/v1` request asks for: its path and method, resolved.
enum Action<'a> {
    List,
    Create,
    Get(&'a str),
    Update(&'a str),
    Delete(&'a str),
    User,
}

impl<'a> Action<'a> {
    /// 404 for an unknown path, 405 (with the allowed methods) for a known one.
    fn resolve(path: &'a str, method: &str) -> Result<Action<'a>> {
        let read = matches!(method, "GET" | "HEAD");
        match path {
            "/v1/runner" => match method {
                _ if read => Ok(Action::List),
                "POST" => Ok(Action::Create),
                _ => Err(Error::MethodNotAllowed("GET, HEAD, POST")),
            },
            "/v1/user" if read => Ok(Action::User),
            "/v1/user" => Err(Error::MethodNotAllowed("GET, HEAD")),
            _ => match path.strip_prefix("/v1/runner/") {
                Some(id) if !id.is_empty() && !id.contains('/') => match method {
                    _ if read => Ok(Action::Get(id)),
                    "PUT" => Ok(Action::Update(id)),
                    "DELETE" => Ok(Action::Delete(id)),
                    _ => Err(Error::MethodNotAllowed("GET, HEAD, PUT, DELETE")),
                },
                _ => Err(NO_SUCH_ENDPOINT),
            },
        }
    }

    fn has_body(&self) -> bool {
        matches!(self, Action::Create | Action::Update(_))
    }
}

const NO_SUCH_ENDPOINT: Error = Error::NotFound("no such endpoint");

impl App {
    fn route(&self, rq: &mut Incoming<'_>) -> Result<Reply> {
        let url = origin_form(rq.url());
        let (path, query) = url.split_once('?').unwrap_or((url, ""));
        let (path, query) = (path.to_string(), query.to_string());
        let method = rq.method();
        if path == "/healthz" {
            return match method {
                "GET" | "HEAD" => Ok(self.healthz()),
                _ => Err(Error::MethodNotAllowed("GET, HEAD")),
            };
        }
        if path != "/v1" && !path.starts_with("/v1/") {
            return Err(NO_SUCH_ENDPOINT);
        }
        let action = Action::resolve(&path, method);
        let now = clock::now();

        let mut conn = self.checkout()?;
        // A read runs its statements (token, count, page) in one read
        // transaction: one snapshot, and one acquisition of the WAL's read
        // lock instead of one per statement.
        let reading = matches!(method, "GET" | "HEAD");
        if reading {
            conn.prepare_cached("BEGIN")?.execute([])?;
        }
        let authed = auth::authenticate(&conn, rq.header("Authorization"), now);
        let mut reply = match (&authed, action) {
            (Err(_), _) => None,
            (Ok(_), Err(e)) => Some(Reply::error(&e)),
            (Ok(authed), Ok(action)) => {
                let body = if action.has_body() {
                    // The body comes at the client's pace: wait for it
                    // holding no database connection.
                    drop(conn);
                    let body = rq.body();
                    conn = self.checkout()?;
                    Some(body)
                } else {
                    None
                };
                let handled = body.transpose().and_then(|b| {
                    if reading {
                        handle(&mut conn, authed, action, &query, b, now)
                    } else {
                        self.writer
                            .write(&mut conn, |c| handle(c, authed, action, &query, b, now))
                    }
                });
                Some(handled.unwrap_or_else(|e| Reply::error(&e)))
            }
        };
        if reading
            && conn
                .prepare_cached("COMMIT")
                .and_then(|mut s| s.execute([]))
                .is_err()
        {
            let _ = conn.execute_batch("ROLLBACK");
        }
        let authed = authed?;
        let mut reply = reply
            .take()
            .unwrap_or_else(|| Reply::error(&Error::Unauthorized));

        match authed.touch_due(now) {
            Touch::No => {}
            Touch::Now => {
                // A token's first use (even one answered 404) is on record
                // before its answer is.
                let token = authed.token;
                if let Err(e) = self
                    .writer
                    .write(&mut conn, |c| tokens::touch(c, token, now))
                {
                    eprintln!("comfy-runners: recording a token's first use: {e}");
                }
            }
            Touch::Later => {
                let (pool, writer) = (self.pool.clone(), self.writer.clone());
                let token = authed.token;
                reply.after = Some(Box::new(move || {
                    let done = pool
                        .get()
                        .map_err(Error::from)
                        .and_then(|mut c| writer.write(&mut c, |c| tokens::touch(c, token, now)));
                    if let Err(e) = done {
                        eprintln!("comfy-runners: recording a token's use: {e}");
                    }
                }));
            }
        }
        Ok(reply)
    }

    /// A pooled connection, never inside a transaction.
    fn checkout(&self) -> Result<crate::db::PooledConn> {
        let conn = self.pool.get()?;
        if !conn.is_autocommit() {
            // Only a panic in a handler can leave a transaction open; never
            // let it leak into the next request on this connection.
            conn.execute_batch("ROLLBACK")?;
        }
        Ok(conn)
    }

    /// `GET /healthz`: 200 when the database answers a read of the file.
    fn healthz(&self) -> Reply {
        let answered = self.pool.get().map_err(Error::from).and_then(|c| {
            c.query_row("SELECT count(*) FROM sqlite_schema", [], |r| {
                r.get::<_, i64>(0)
            })
            .map_err(Error::from)
        });
        match answered {
            Ok(_) => Reply::json(200, br#"{"status":"ok"}"#.to_vec()),
            Err(e) => Reply::error(&Error::Unavailable(e.to_string())),
        }
    }
}

/// The path and query of a request target; an absolute-form target
/// (`http://host/v1/user`, which HTTP/1.1 servers must accept) loses its
/// scheme and authority.
fn origin_form(target: &str) -> &str {
    let lower = target.get(..8).unwrap_or(target).to_ascii_lowercase();
    let rest = match () {
        _ if lower.starts_with("http://") => &target[7..],
        _ if lower.starts_with("https://") => &target[8..],
        _ => return target,
    };
    match rest.find(['/', '?']) {
        Some(i) if rest.as_bytes()[i] == b'/' => &rest[i..],
        _ => "/",
    }
}

/// Runs one resolved action for an authenticated caller.
fn handle(
    conn: &mut rusqlite::Connection,
    authed: &tokens::Authed,
    action: Action<'_>,
    query: &str,
    body: Option<Vec<u8>>,
    now: i64,
) -> Result<Reply> {
    let body = body.unwrap_or_default();
    match action {
        Action::List => runners::list(conn, authed, query),
        Action::Create => runners::create(conn, authed, &body, now),
        Action::Get(id) => runners::get(conn, authed, id),
        Action::Update(id) => runners::update(conn, authed, id, &body, now),
        Action::Delete(id) => runners::delete(conn, authed, id),
        Action::User => user(conn, authed),
    }
}

/// `GET /v1/user`.
fn user(conn: &rusqlite::Connection, authed: &tokens::Authed) -> Result<Reply> {
    let u = tokens::user_by_id(conn, authed.user)?;
    let body = serde_json::json!({
        "id": u.uuid,
        "name": u.name,
        "email": u.email,
        "deleted": false,
        "tier": "enterprise",
        "provider": "local",
        "created_at": clock::format(u.created_at),
        "updated_at": clock::format(u.updated_at),
    });
    Ok(Reply::json(200, body.to_string().into_bytes()))
}

#[cfg(test)]
mod tests {
    use super::origin_form;

    #[test]
    fn absolute_form_targets() {
        assert_eq!(origin_form("/v1/runner?page=2"), "/v1/runner?page=2");
        assert_eq!(origin_form("http://h:8189/v1/user"), "/v1/user");
        assert_eq!(origin_form("HTTPS://h/v1/runner?x=1"), "/v1/runner?x=1");
        assert_eq!(origin_form("http://h"), "/");
        assert_eq!(origin_form("*"), "*");
    }
}
