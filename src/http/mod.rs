//! The HTTP API. `server` runs the socket and the workers; this file routes a
//! request to its handler in the order the contract fixes: authentication,
//! then the route (404, 405), then the body (413, 400), then validation.

mod auth;
mod runners;
mod server;
mod warden;

pub use server::{bind, Handler, Incoming, Reply, Server, Stopper, MAX_BODY};

use crate::clock;
use crate::db::Pool;
use crate::error::{Error, Result};
use crate::tokens::{self, Touch};

/// The comfy-runners API over one database pool.
pub struct App {
    pool: Pool,
}

impl App {
    pub fn new(pool: Pool) -> App {
        App { pool }
    }
}

impl Handler for App {
    fn handle(&self, rq: &mut Incoming<'_>) -> Reply {
        self.route(rq).unwrap_or_else(|e| Reply::error(&e))
    }
}

/// The paths of `/v1`.
enum Route<'a> {
    Runners,
    Runner(&'a str),
    User,
}

impl<'a> Route<'a> {
    fn parse(path: &'a str) -> Result<Route<'a>> {
        match path {
            "/v1/runner" => Ok(Route::Runners),
            "/v1/user" => Ok(Route::User),
            _ => match path.strip_prefix("/v1/runner/") {
                Some(id) if !id.is_empty() && !id.contains('/') => Ok(Route::Runner(id)),
                _ => Err(NO_SUCH_ENDPOINT),
            },
        }
    }

    fn allow(&self) -> &'static str {
        match self {
            Route::Runners => "GET, HEAD, POST",
            Route::Runner(_) => "GET, HEAD, PUT, DELETE",
            Route::User => "GET, HEAD",
        }
    }
}

const NO_SUCH_ENDPOINT: Error = Error::NotFound("no such endpoint");

impl App {
    fn route(&self, rq: &mut Incoming<'_>) -> Result<Reply> {
        let url = rq.url();
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

        let mut conn = self.pool.get()?;
        if !conn.is_autocommit() {
            // Only a panic in a handler can leave a transaction open; never
            // let it leak into the next request on this connection.
            conn.execute_batch("ROLLBACK")?;
        }
        let now = clock::now();
        // A read runs its statements (token, count, page) in one read
        // transaction: one snapshot, and one acquisition of the WAL's read
        // lock instead of one per statement.
        let reading = matches!(method, "GET" | "HEAD");
        if reading {
            conn.prepare_cached("BEGIN")?.execute([])?;
        }
        let outcome = self.dispatch(&mut conn, rq, &path, &query, method, now);
        if reading
            && conn
                .prepare_cached("COMMIT")
                .and_then(|mut s| s.execute([]))
                .is_err()
        {
            let _ = conn.execute_batch("ROLLBACK");
        }
        let (authed, mut reply) = outcome?;

        match authed.touch_due(now) {
            Touch::No => {}
            Touch::Now => {
                // A token's first use is on record before its answer is.
                if let Err(e) = tokens::touch(&conn, authed.token, now) {
                    eprintln!("comfy-runners: recording a token's first use: {e}");
                }
            }
            Touch::Later => {
                let pool = self.pool.clone();
                let token = authed.token;
                reply.after = Some(Box::new(move || {
                    let done = pool
                        .get()
                        .map_err(Error::from)
                        .and_then(|c| tokens::touch(&c, token, now));
                    if let Err(e) = done {
                        eprintln!("comfy-runners: recording a token's use: {e}");
                    }
                }));
            }
        }
        Ok(reply)
    }

    /// Authentication, then the route, then the handler. The handler's errors
    /// are turned into replies here; the ones returned are auth's and routing's.
    fn dispatch(
        &self,
        conn: &mut rusqlite::Connection,
        rq: &mut Incoming<'_>,
        path: &str,
        query: &str,
        method: &str,
        now: i64,
    ) -> Result<(tokens::Authed, Reply)> {
        let authed = auth::authenticate(conn, rq.header("Authorization"), now)?;
        let route = Route::parse(path)?;
        let reply = match (&route, method) {
            (Route::Runners, "GET" | "HEAD") => runners::list(conn, &authed, query),
            (Route::Runners, "POST") => rq
                .body()
                .and_then(|b| runners::create(conn, &authed, &b, now)),
            (Route::Runner(id), "GET" | "HEAD") => runners::get(conn, &authed, id),
            (Route::Runner(id), "PUT") => rq
                .body()
                .and_then(|b| runners::update(conn, &authed, id, &b, now)),
            (Route::Runner(id), "DELETE") => runners::delete(conn, &authed, id),
            (Route::User, "GET" | "HEAD") => user(conn, &authed),
            (route, _) => Err(Error::MethodNotAllowed(route.allow())),
        };
        Ok((authed, reply.unwrap_or_else(|e| Reply::error(&e))))
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
