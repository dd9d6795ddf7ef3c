//! The runner domain: the runner object, the rules for its fields, and all of
//! the SQL that reads and writes runners, including import and export.
//!
//! Every write renders the runner object once and stores that JSON (`doc`)
//! beside the few columns the list filters and sorts on; a read copies stored
//! documents into the response without parsing them. Counts per user and
//! status are kept by triggers in schema.sql, so `total` is a lookup.

use std::collections::HashSet;
use std::fmt;
use std::io::Write;
use std::sync::mpsc;
use std::thread;

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use serde::de::{self, DeserializeOwned, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

use crate::clock;
use crate::error::{Error, Result};

pub const MAX_NAME_CHARS: usize = 100;
pub const MAX_TAGS: usize = 10;
pub const DEFAULT_PER_PAGE: i64 = 10;
pub const MAX_PER_PAGE: i64 = 100;
/// Runners handed from the parsing thread to the inserting one at a time.
const IMPORT_BATCH: usize = 1024;
/// Page cache of the connection that runs an import.
const IMPORT_CACHE_KIB: i64 = 1024 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Active,
    Disabled,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Active => "active",
            Status::Disabled => "disabled",
        }
    }

    pub fn parse(s: &str) -> Option<Status> {
        match s {
            "active" => Some(Status::Active),
            "disabled" => Some(Status::Disabled),
            _ => None,
        }
    }
}

/// Header name to value, in the order given (names keep their case).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Headers(pub Vec<(String, String)>);

impl Serialize for Headers {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_map(self.0.iter().map(|(k, v)| (k, v)))
    }
}

impl<'de> Deserialize<'de> for Headers {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Headers, D::Error> {
        struct Visit;
        impl<'de> de::Visitor<'de> for Visit {
            type Value = Headers;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object of strings")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut m: A,
            ) -> std::result::Result<Headers, A::Error> {
                let mut out = Vec::new();
                while let Some(entry) = m.next_entry::<String, String>()? {
                    out.push(entry);
                }
                Ok(Headers(out))
            }
        }
        d.deserialize_map(Visit)
    }
}

/// The runner object, exactly the nine fields of the API, in the API's order.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Runner {
    pub id: String,
    pub user_id: String,
    pub name: String,
    pub status: Status,
    pub endpoint: String,
    pub tags: Vec<String>,
    pub headers: Headers,
    #[serde(with = "clock::rfc3339")]
    pub created_at: i64,
    #[serde(with = "clock::rfc3339")]
    pub updated_at: i64,
}

impl Runner {
    fn render(&self) -> Result<String> {
        serde_json::to_string(self).map_err(|e| Error::Internal(format!("rendering a runner: {e}")))
    }
}

/// Whose runners: every query is scoped to one user.
#[derive(Debug, Clone, Copy)]
pub struct Owner<'a> {
    /// The user's rowid.
    pub id: i64,
    /// The user's public id, written into each runner as `user_id`.
    pub uuid: &'a str,
}

// ---------------------------------------------------------------------------
// Field rules. Each takes the JSON value given for its field and says, naming
// the field, what is wrong with it.

/// Parses a request body that must be one JSON object.
pub fn body_object(body: &[u8]) -> Result<Map<String, Value>> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(Error::bad_request("request body must be a JSON object")),
        Err(e) => Err(Error::BadRequest(format!(
            "request body is not valid JSON: {e}"
        ))),
    }
}

/// The value of `field`, treating `null` as absent.
fn given<'a>(map: &'a Map<String, Value>, field: &str) -> Option<&'a Value> {
    map.get(field).filter(|v| !v.is_null())
}

pub fn check_name(v: &Value) -> Result<String> {
    let bad = || {
        Error::BadRequest(format!(
            "name must be a string of 1 to {MAX_NAME_CHARS} characters, not only whitespace"
        ))
    };
    let s = v.as_str().ok_or_else(bad)?;
    let chars = s.chars().count();
    if chars == 0 || chars > MAX_NAME_CHARS || s.chars().all(char::is_whitespace) {
        return Err(bad());
    }
    Ok(s.to_string())
}

pub fn check_endpoint(v: &Value) -> Result<String> {
    let bad = || Error::bad_request("endpoint must be an absolute http or https URL with a host");
    let s = v.as_str().ok_or_else(bad)?;
    // The URL parser forgives what a browser's address bar forgives (spaces,
    // missing or extra slashes, backslashes, stray characters). An endpoint
    // is stored and returned exactly as given, so it must already be a proper
    // absolute URL: RFC 3986 characters (non-ASCII is let through for
    // international names), valid percent escapes, a non-empty authority.
    let lower = s.get(..8).unwrap_or(s).to_ascii_lowercase();
    let rest = match () {
        _ if lower.starts_with("http://") => &s[7..],
        _ if lower.starts_with("https://") => &s[8..],
        _ => return Err(bad()),
    };
    if rest.is_empty() || rest.starts_with(['/', '?', '#']) || !uri_chars(s) {
        return Err(bad());
    }
    let url = url::Url::parse(s).map_err(|_| bad())?;
    match url.host_str() {
        Some(h) if !h.is_empty() => Ok(s.to_string()),
        _ => Err(bad()),
    }
}

/// Whether every character may stand in a URI (RFC 3986, plus non-ASCII
/// letters), and every `%` starts an escape.
fn uri_chars(s: &str) -> bool {
    let bytes = s.as_bytes();
    s.char_indices().all(|(i, c)| match c {
        '%' => bytes
            .get(i + 1..i + 3)
            .is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit)),
        c if c.is_ascii() => c.is_ascii_alphanumeric() || "-._~:/?#[]@!$&'()*+,;=".contains(c),
        c => !c.is_whitespace() && !c.is_control(),
    })
}

pub fn check_tags(v: &Value) -> Result<Vec<String>> {
    let list = v
        .as_array()
        .ok_or_else(|| Error::bad_request("tags must be an array of strings"))?;
    if list.len() > MAX_TAGS {
        return Err(Error::BadRequest(format!(
            "tags must have at most {MAX_TAGS} entries"
        )));
    }
    list.iter()
        .enumerate()
        .map(|(i, t)| match t.as_str() {
            Some(s) if !s.is_empty() => Ok(s.to_string()),
            _ => Err(Error::BadRequest(format!(
                "tags[{i}] must be a non-empty string"
            ))),
        })
        .collect()
}

/// RFC 9110 `token`: the characters a header name may have.
fn is_header_name(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

pub fn check_headers(v: &Value) -> Result<Headers> {
    let map = v
        .as_object()
        .ok_or_else(|| Error::bad_request("headers must be an object of strings"))?;
    let mut seen = HashSet::with_capacity(map.len());
    let mut out = Vec::with_capacity(map.len());
    for (name, value) in map {
        if !is_header_name(name) {
            return Err(Error::BadRequest(format!(
                "headers: {name:?} is not a valid HTTP header name"
            )));
        }
        if !seen.insert(name.to_ascii_lowercase()) {
            return Err(Error::BadRequest(format!(
                "headers: {name:?} is given twice (header names are case-insensitive)"
            )));
        }
        match value.as_str() {
            Some(s) if !s.contains(['\r', '\n']) => out.push((name.clone(), s.to_string())),
            Some(_) => {
                return Err(Error::BadRequest(format!(
                    "headers: the value of {name:?} must not contain CR or LF"
                )))
            }
            None => {
                return Err(Error::BadRequest(format!(
                    "headers: the value of {name:?} must be a string"
                )))
            }
        }
    }
    Ok(Headers(out))
}

pub fn check_status(v: &Value) -> Result<Status> {
    v.as_str()
        .and_then(Status::parse)
        .ok_or_else(|| Error::bad_request("status must be \"active\" or \"disabled\""))
}

/// The fields of a new runner: `POST /v1/runner`, and each runner of an import.
#[derive(Debug)]
pub struct Draft {
    pub name: String,
    pub endpoint: String,
    pub tags: Vec<String>,
    pub headers: Headers,
    pub status: Status,
}

impl Draft {
    pub fn from_json(map: &Map<String, Value>) -> Result<Draft> {
        let required = |field: &str| {
            given(map, field).ok_or_else(|| Error::BadRequest(format!("{field} is required")))
        };
        Ok(Draft {
            name: check_name(required("name")?)?,
            endpoint: check_endpoint(required("endpoint")?)?,
            tags: given(map, "tags")
                .map(check_tags)
                .transpose()?
                .unwrap_or_default(),
            headers: given(map, "headers")
                .map(check_headers)
                .transpose()?
                .unwrap_or_default(),
            status: given(map, "status")
                .map(check_status)
                .transpose()?
                .unwrap_or(Status::Active),
        })
    }
}

/// The fields of `PUT /v1/runner/{id}`: any subset; absent fields keep their value.
#[derive(Debug, Default)]
pub struct Patch {
    pub name: Option<String>,
    pub endpoint: Option<String>,
    pub tags: Option<Vec<String>>,
    pub headers: Option<Headers>,
    pub status: Option<Status>,
}

impl Patch {
    pub fn from_json(map: &Map<String, Value>) -> Result<Patch> {
        Ok(Patch {
            name: given(map, "name").map(check_name).transpose()?,
            endpoint: given(map, "endpoint").map(check_endpoint).transpose()?,
            tags: given(map, "tags").map(check_tags).transpose()?,
            headers: given(map, "headers").map(check_headers).transpose()?,
            status: given(map, "status").map(check_status).transpose()?,
        })
    }

    fn apply(self, r: &mut Runner) {
        if let Some(v) = self.name {
            r.name = v;
        }
        if let Some(v) = self.endpoint {
            r.endpoint = v;
        }
        if let Some(v) = self.tags {
            r.tags = v;
        }
        if let Some(v) = self.headers {
            r.headers = v;
        }
        if let Some(v) = self.status {
            r.status = v;
        }
    }
}

/// A UUID from a path, in either case; only the hyphenated form is accepted.
pub fn parse_id(s: &str) -> Result<String> {
    match uuid::Uuid::try_parse(s) {
        Ok(id) if s.len() == 36 => Ok(id.to_string()),
        _ => Err(Error::bad_request("runner id must be a UUID")),
    }
}

// ---------------------------------------------------------------------------
// Single runners.

/// The seq the next runner gets: one above any ever given (AUTOINCREMENT
/// keeps that in sqlite_sequence), so also above every ord.
macro_rules! next_seq {
    () => {
        "coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'runners'), 0) + 1"
    };
}

/// A new runner: next in insertion order, and newest in creation order.
const INSERT: &str = concat!(
    "INSERT INTO runners (seq, ord, id, user_id, status, created_at, doc) SELECT next, next, ?1, ?2, ?3, ?4, ?5 FROM (SELECT ",
    next_seq!(),
    " AS next)"
);

/// An imported runner, with its place in creation order given (see schema.sql).
/// OR ROLLBACK: a duplicate id ends the whole import anyway, and saying so
/// spares SQLite a statement journal for every row.
const IMPORT: &str =
    "INSERT OR ROLLBACK INTO runners (seq, ord, id, user_id, status, created_at, doc)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)";

/// Registers a new runner; returns its document.
pub fn create(conn: &Connection, owner: Owner<'_>, draft: Draft, now: i64) -> Result<String> {
    let runner = Runner {
        id: uuid::Uuid::new_v4().to_string(),
        user_id: owner.uuid.to_string(),
        name: draft.name,
        status: draft.status,
        endpoint: draft.endpoint,
        tags: draft.tags,
        headers: draft.headers,
        created_at: now,
        updated_at: now,
    };
    let doc = runner.render()?;
    conn.prepare_cached(INSERT)?.execute(params![
        runner.id,
        owner.id,
        runner.status.as_str(),
        runner.created_at,
        doc
    ])?;
    Ok(doc)
}

const NOT_FOUND: Error = Error::NotFound("runner not found");

/// One runner's document. `id` is as `parse_id` returns it.
pub fn get(conn: &Connection, owner: i64, id: &str) -> Result<String> {
    conn.prepare_cached("SELECT doc FROM runners WHERE id = ?1 AND user_id = ?2")?
        .query_row(params![id, owner], |r| r.get(0))
        .optional()?
        .ok_or(NOT_FOUND)
}

/// Applies `patch` and sets `updated_at`; returns the new document.
pub fn update(
    conn: &mut Connection,
    owner: i64,
    id: &str,
    patch: Patch,
    now: i64,
) -> Result<String> {
    // IMMEDIATE: the read and the write must see the same row, and a deferred
    // transaction that upgrades to a writer can fail without waiting.
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let (seq, doc): (i64, String) = tx
        .prepare_cached("SELECT seq, doc FROM runners WHERE id = ?1 AND user_id = ?2")?
        .query_row(params![id, owner], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?
        .ok_or(NOT_FOUND)?;
    let mut runner: Runner = serde_json::from_str(&doc)
        .map_err(|e| Error::Internal(format!("stored runner {id} is unreadable: {e}")))?;
    patch.apply(&mut runner);
    runner.updated_at = now;
    let doc = runner.render()?;
    tx.prepare_cached("UPDATE runners SET status = ?1, doc = ?2 WHERE seq = ?3")?
        .execute(params![runner.status.as_str(), doc, seq])?;
    tx.commit()?;
    Ok(doc)
}

pub fn delete(conn: &Connection, owner: i64, id: &str) -> Result<()> {
    let n = conn
        .prepare_cached("DELETE FROM runners WHERE id = ?1 AND user_id = ?2")?
        .execute(params![id, owner])?;
    if n == 0 {
        return Err(NOT_FOUND);
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// The list.

/// `GET /v1/runner`'s parameters, validated: never clamped, never defaulted
/// when present.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListQuery {
    pub page: i64,
    pub per_page: i64,
    pub status: Option<Status>,
}

impl ListQuery {
    /// From the raw values of the query parameters, `None` where absent.
    pub fn from_params(
        page: Option<&str>,
        per_page: Option<&str>,
        status: Option<&str>,
    ) -> Result<ListQuery> {
        let page = match page {
            None => 1,
            Some(s) => s.parse::<i64>().ok().filter(|p| *p >= 1).ok_or_else(|| {
                Error::bad_request("page must be an integer between 1 and 9223372036854775807")
            })?,
        };
        let per_page = match per_page {
            None => DEFAULT_PER_PAGE,
            Some(s) => s
                .parse::<i64>()
                .ok()
                .filter(|n| (1..=MAX_PER_PAGE).contains(n))
                .ok_or_else(|| {
                    Error::BadRequest(format!(
                        "per_page must be an integer between 1 and {MAX_PER_PAGE}"
                    ))
                })?,
        };
        let status =
            match status {
                None => None,
                Some(s) => Some(Status::parse(s).ok_or_else(|| {
                    Error::bad_request("status must be \"active\" or \"disabled\"")
                })?),
            };
        Ok(ListQuery {
            page,
            per_page,
            status,
        })
    }
}

/// How many runners `owner` has (in `status`, if given): one or two rows of
/// `runner_counts`.
fn count(conn: &Connection, owner: i64, status: Option<Status>) -> Result<i64> {
    let mut stmt = conn.prepare_cached(
        "SELECT coalesce(sum(n), 0) FROM runner_counts WHERE user_id = ?1 AND (?2 IS NULL OR status = ?2)",
    )?;
    Ok(stmt.query_row(params![owner, status.map(Status::as_str)], |r| r.get(0))?)
}

/// The page statements: [newest first, oldest first] x [any status, one status].
/// Each walks one index of schema.sql in order and stops after LIMIT rows;
/// skipped rows cost an index step each and never touch the table.
const PAGE_SQL: [[&str; 2]; 2] = [
    [
        "SELECT doc FROM runners WHERE user_id = ?1 ORDER BY created_at DESC, ord DESC LIMIT ?2 OFFSET ?3",
        "SELECT doc FROM runners WHERE user_id = ?1 AND status = ?4 ORDER BY created_at DESC, ord DESC LIMIT ?2 OFFSET ?3",
    ],
    [
        "SELECT doc FROM runners WHERE user_id = ?1 ORDER BY created_at ASC, ord ASC LIMIT ?2 OFFSET ?3",
        "SELECT doc FROM runners WHERE user_id = ?1 AND status = ?4 ORDER BY created_at ASC, ord ASC LIMIT ?2 OFFSET ?3",
    ],
];

/// Writes `{"runners":[...],"total":N}` for one page into `out`.
///
/// Offset paging costs one index step per skipped row. A page in the older
/// half is read from the other end instead (the count says exactly where it
/// starts from there), so the deepest page costs what the middle one does.
pub fn list(conn: &Connection, owner: i64, q: &ListQuery, out: &mut Vec<u8>) -> Result<()> {
    let mut total = count(conn, owner, q.status)?;
    out.extend_from_slice(b"{\"runners\":[");
    let offset = (q.page - 1).checked_mul(q.per_page).unwrap_or(i64::MAX);
    if offset < total {
        let status = q.status.map(Status::as_str);
        let from_oldest = offset > total / 2;
        let tx;
        if from_oldest && conn.is_autocommit() {
            // The reverse offset is computed from the count, so both must
            // come from one snapshot (the caller's transaction, or this one).
            tx = conn.unchecked_transaction()?;
            total = count(&tx, owner, q.status)?;
        }
        let limit = q.per_page.min(total.saturating_sub(offset));
        if limit > 0 && !from_oldest {
            let mut stmt = conn.prepare_cached(PAGE_SQL[0][status.is_some() as usize])?;
            let mut rows = match status {
                None => stmt.query(params![owner, limit, offset])?,
                Some(s) => stmt.query(params![owner, limit, offset, s])?,
            };
            let mut first = true;
            while let Some(row) = rows.next()? {
                if !first {
                    out.push(b',');
                }
                first = false;
                out.extend_from_slice(row.get_ref(0)?.as_bytes().map_err(rusqlite::Error::from)?);
            }
        } else if limit > 0 {
            let mut stmt = conn.prepare_cached(PAGE_SQL[1][status.is_some() as usize])?;
            let from_end = total - offset - limit;
            let mut rows = match status {
                None => stmt.query(params![owner, limit, from_end])?,
                Some(s) => stmt.query(params![owner, limit, from_end, s])?,
            };
            let mut docs = Vec::with_capacity(limit as usize);
            while let Some(row) = rows.next()? {
                docs.push(row.get::<_, String>(0)?);
            }
            for (i, doc) in docs.iter().rev().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                out.extend_from_slice(doc.as_bytes());
            }
        }
    }
    out.extend_from_slice(b"],\"total\":");
    out.extend_from_slice(total.to_string().as_bytes());
    out.push(b'}');
    Ok(())
}

// ---------------------------------------------------------------------------
// Export and import.

/// Writes every runner of `owner`, newest first, in the list's shape.
pub fn export(conn: &Connection, owner: i64, w: &mut dyn Write) -> Result<i64> {
    // One snapshot for the count and the rows, whatever the server writes meanwhile.
    let tx = conn.unchecked_transaction()?;
    let conn = &*tx;
    let total = count(conn, owner, None)?;
    let mut stmt = conn.prepare(PAGE_SQL[0][0])?;
    let mut rows = stmt.query(params![owner, -1, 0])?;
    w.write_all(b"{\"runners\":[")?;
    let mut n = 0i64;
    while let Some(row) = rows.next()? {
        if n > 0 {
            w.write_all(b",\n")?;
        } else {
            w.write_all(b"\n")?;
        }
        w.write_all(row.get_ref(0)?.as_bytes().map_err(rusqlite::Error::from)?)?;
        n += 1;
    }
    if n != total {
        return Err(Error::Internal(format!(
            "export saw {n} runners, the count says {total}"
        )));
    }
    write!(w, "\n],\"total\":{n}}}\n")?;
    Ok(n)
}

/// One runner of an import: validated as on create, keeping `id`, `status`,
/// `created_at` and `updated_at` when given.
fn imported(map: &Map<String, Value>, owner: Owner<'_>, now: i64) -> Result<Runner> {
    let draft = Draft::from_json(map)?;
    let id = match given(map, "id") {
        None => uuid::Uuid::new_v4().to_string(),
        Some(v) => v
            .as_str()
            .and_then(|s| parse_id(s).ok())
            .ok_or_else(|| Error::bad_request("id must be a UUID"))?,
    };
    let time = |field: &str| -> Result<Option<i64>> {
        given(map, field)
            .map(|v| {
                v.as_str().and_then(clock::parse).ok_or_else(|| {
                    Error::BadRequest(format!("{field} must be an RFC 3339 timestamp"))
                })
            })
            .transpose()
    };
    let created_at = time("created_at")?.unwrap_or(now);
    let updated_at = time("updated_at")?.unwrap_or(created_at);
    Ok(Runner {
        id,
        user_id: owner.uuid.to_string(),
        name: draft.name,
        status: draft.status,
        endpoint: draft.endpoint,
        tags: draft.tags,
        headers: draft.headers,
        created_at,
        updated_at,
    })
}

/// Imports `input` (`{"runners": [...]}` or a bare array) for `owner` in one
/// transaction: all of it, or nothing. Returns how many were imported.
///
/// Runners created in the same second are listed in reverse creation order,
/// so to list them back in the order of the file, each one gets a place in
/// creation order (`ord`) that falls as the file goes on. That needs the
/// count first: a quick pass over the input checks its shape and counts, and
/// a second pass validates and inserts.
///
/// A user the import creates takes the `user_id` its runners carry, when they
/// all carry the same one, so a migrated user keeps its identity too.
pub fn import(conn: &mut Connection, user: &str, input: &[u8], now: i64) -> Result<usize> {
    let mut n = 0usize;
    let mut owners = HashSet::new();
    for_each_runner::<PeekUserId>(input, &mut |_, peek| {
        n += 1;
        if owners.len() < 2 {
            owners.insert(peek.0);
        }
        Ok(())
    })?;
    let wanted = match owners.iter().next() {
        Some(Some(id)) if owners.len() == 1 => Some(id.as_str()),
        _ => None,
    };
    // Settings for the bulk load, put back afterwards whatever happens:
    // - a page cache that holds the id index, which the load touches all over
    //   (the pool's connections keep their small one);
    // - temporary b-trees in memory;
    // - no foreign key checks. Every row names the owner that this very
    //   transaction has just found or created, so the check can never fail,
    //   and with it on, SQLite must keep a statement journal (a copy of every
    //   page each insert touches, in case the check aborts the insert), which
    //   cost a tenth of the whole import.
    let saved: (i64, i64, bool) = conn.query_row(
        "SELECT cache_size, temp_store, foreign_keys FROM pragma_cache_size, pragma_temp_store, pragma_foreign_keys",
        [],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
    )?;
    conn.pragma_update(None, "cache_size", -IMPORT_CACHE_KIB)?;
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    conn.pragma_update(None, "foreign_keys", false)?;
    let loaded = load(conn, user, wanted, n, input, now);
    conn.pragma_update(None, "cache_size", saved.0)?;
    conn.pragma_update(None, "temp_store", saved.1)?;
    conn.pragma_update(None, "foreign_keys", saved.2)?;
    loaded
}

/// The transaction of `import`, for `n` runners.
fn load(
    conn: &mut Connection,
    user: &str,
    wanted: Option<&str>,
    n: usize,
    input: &[u8],
    now: i64,
) -> Result<usize> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let owner = crate::tokens::ensure_user_with_id(&tx, user, wanted)?;
    let owner = Owner {
        id: owner.id,
        uuid: &owner.uuid,
    };
    let base: i64 = tx.query_row(concat!("SELECT ", next_seq!()), [], |r| r.get(0))?;
    let top = base + n as i64 - 1;
    // Two stages on two threads: one parses, validates and renders, the
    // other inserts. A failure in either stops both.
    let (rows_tx, rows_rx) = mpsc::sync_channel::<Result<Batch>>(8);
    let owner_uuid = owner.uuid.to_string();
    let inserted = thread::scope(|scope| -> Result<usize> {
        scope.spawn(move || {
            let owner = Owner {
                id: owner.id,
                uuid: &owner_uuid,
            };
            let mut batch = Batch::default();
            let parsed = for_each_runner::<Value>(input, &mut |i, value| {
                let Value::Object(map) = value else {
                    return Err(numbered(i, Error::bad_request("must be a JSON object")));
                };
                let runner = imported(&map, owner, now).map_err(|e| numbered(i, e))?;
                batch.push(i, &runner)?;
                if batch.rows.len() == IMPORT_BATCH {
                    // The inserting side has stopped: so do we.
                    rows_tx
                        .send(Ok(std::mem::take(&mut batch)))
                        .map_err(|_| Error::Internal("import stopped".into()))?;
                }
                Ok(())
            });
            let _ = rows_tx.send(parsed.map(|()| batch));
        });
        let mut insert = tx.prepare(IMPORT)?;
        let mut seen = 0usize;
        for batch in rows_rx {
            let batch = batch?;
            for row in &batch.rows {
                let (id, doc) = batch.texts(row)?;
                let (seq, ord) = (base + row.i as i64, top - row.i as i64);
                let status = row.status.as_str();
                match insert.execute(params![seq, ord, id, owner.id, status, row.created_at, doc]) {
                    Err(e)
                        if e.sqlite_error_code()
                            == Some(rusqlite::ErrorCode::ConstraintViolation) =>
                    {
                        let dup = Error::BadRequest(format!("id {id} already exists"));
                        return Err(numbered(row.i, dup));
                    }
                    other => other?,
                };
                seen += 1;
            }
        }
        Ok(seen)
    })?;
    if inserted != n {
        return Err(Error::Internal(format!(
            "import saw {n} runners, then {inserted}"
        )));
    }
    tx.commit()?;
    Ok(n)
}

/// Runners on their way from the parsing thread of an import to the
/// inserting one: just what the insert binds, the texts of all of them in one
/// buffer. (Handing over each runner's own strings made the two threads fight
/// over the allocator's lock, one allocating, the other freeing.)
#[derive(Default)]
struct Batch {
    text: Vec<u8>,
    rows: Vec<BatchRow>,
}

struct BatchRow {
    /// The runner's place in the file, from 0.
    i: usize,
    status: Status,
    created_at: i64,
    /// `text[start..mid]` is the id, `text[mid..end]` the document.
    start: usize,
    mid: usize,
    end: usize,
}

impl Batch {
    fn push(&mut self, i: usize, runner: &Runner) -> Result<()> {
        if self.rows.is_empty() {
            self.rows.reserve(IMPORT_BATCH);
        }
        let start = self.text.len();
        self.text.extend_from_slice(runner.id.as_bytes());
        let mid = self.text.len();
        serde_json::to_writer(&mut self.text, runner)
            .map_err(|e| Error::Internal(format!("rendering a runner: {e}")))?;
        self.rows.push(BatchRow {
            i,
            status: runner.status,
            created_at: runner.created_at,
            start,
            mid,
            end: self.text.len(),
        });
        Ok(())
    }

    fn texts(&self, row: &BatchRow) -> Result<(&str, &str)> {
        let text = |range: std::ops::Range<usize>| {
            std::str::from_utf8(&self.text[range])
                .map_err(|e| Error::Internal(format!("rendered runner is not UTF-8: {e}")))
        };
        Ok((text(row.start..row.mid)?, text(row.mid..row.end)?))
    }
}

/// An error about runner `i` (0-based) of an import.
fn numbered(i: usize, e: Error) -> Error {
    match e {
        Error::BadRequest(m) | Error::Invalid(m) => {
            Error::Invalid(format!("runner {}: {m}", i + 1))
        }
        other => other,
    }
}

/// The `user_id` of one runner of an import, if it has a string one; reads
/// past anything else without building it.
struct PeekUserId(Option<String>);

impl<'de> Deserialize<'de> for PeekUserId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<PeekUserId, D::Error> {
        struct Visit;
        impl<'de> de::Visitor<'de> for Visit {
            type Value = PeekUserId;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a runner")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut m: A,
            ) -> std::result::Result<PeekUserId, A::Error> {
                let mut found = None;
                while let Some(key) = m.next_key::<std::borrow::Cow<'de, str>>()? {
                    if key == "user_id" {
                        found = m.next_value::<Value>()?.as_str().map(str::to_string);
                    } else {
                        m.next_value::<IgnoredAny>()?;
                    }
                }
                Ok(PeekUserId(found))
            }
            fn visit_seq<A: SeqAccess<'de>>(
                self,
                mut s: A,
            ) -> std::result::Result<PeekUserId, A::Error> {
                while s.next_element::<IgnoredAny>()?.is_some() {}
                Ok(PeekUserId(None))
            }
            fn visit_bool<E>(self, _: bool) -> std::result::Result<PeekUserId, E> {
                Ok(PeekUserId(None))
            }
            fn visit_i64<E>(self, _: i64) -> std::result::Result<PeekUserId, E> {
                Ok(PeekUserId(None))
            }
            fn visit_u64<E>(self, _: u64) -> std::result::Result<PeekUserId, E> {
                Ok(PeekUserId(None))
            }
            fn visit_f64<E>(self, _: f64) -> std::result::Result<PeekUserId, E> {
                Ok(PeekUserId(None))
            }
            fn visit_str<E>(self, _: &str) -> std::result::Result<PeekUserId, E> {
                Ok(PeekUserId(None))
            }
            fn visit_unit<E>(self) -> std::result::Result<PeekUserId, E> {
                Ok(PeekUserId(None))
            }
        }
        d.deserialize_any(Visit)
    }
}

type Visit<'a, T> = &'a mut dyn FnMut(usize, T) -> Result<()>;

/// Calls `f` for each runner of an import document, in order, without holding
/// the whole document in memory as values.
fn for_each_runner<T: DeserializeOwned>(input: &[u8], f: Visit<'_, T>) -> Result<()> {
    let mut failed = None;
    let mut de = serde_json::Deserializer::from_slice(input);
    let seed = Document {
        f,
        failed: &mut failed,
    };
    let parsed = seed.deserialize(&mut de).and_then(|()| de.end());
    match (failed, parsed) {
        (Some(e), _) => Err(e),
        (None, Ok(())) => Ok(()),
        (None, Err(e)) => Err(Error::Invalid(format!("import file: {e}"))),
    }
}

/// The document: either `{"runners": [...], ...}` or `[...]`.
struct Document<'a, 'f, T> {
    f: Visit<'f, T>,
    failed: &'a mut Option<Error>,
}

impl<'de, T: DeserializeOwned> DeserializeSeed<'de> for Document<'_, '_, T> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> std::result::Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de, T: DeserializeOwned> de::Visitor<'de> for Document<'_, '_, T> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("{\"runners\": [...]} or a JSON array of runners")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> std::result::Result<(), A::Error> {
        Each {
            f: self.f,
            failed: self.failed,
        }
        .visit_seq(seq)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<(), A::Error> {
        let mut each = Some(Each {
            f: self.f,
            failed: self.failed,
        });
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            match (key.as_ref(), each.take()) {
                ("runners", Some(e)) => map.next_value_seed(e)?,
                (_, e) => {
                    each = e;
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        if each.is_some() {
            return Err(de::Error::custom("the document has no \"runners\" array"));
        }
        Ok(())
    }
}

/// The array of runners.
struct Each<'a, 'f, T> {
    f: Visit<'f, T>,
    failed: &'a mut Option<Error>,
}

impl<'de, T: DeserializeOwned> DeserializeSeed<'de> for Each<'_, '_, T> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> std::result::Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de, T: DeserializeOwned> de::Visitor<'de> for Each<'_, '_, T> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an array of runners")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<(), A::Error> {
        let mut i = 0;
        while let Some(item) = seq.next_element::<T>()? {
            if let Err(e) = (self.f)(i, item) {
                *self.failed = Some(e);
                return Err(de::Error::custom("import aborted"));
            }
            i += 1;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn names() {
        assert!(check_name(&json!("a")).is_ok());
        assert!(check_name(&json!(" padded ")).is_ok());
        assert!(
            check_name(&json!("é".repeat(100))).is_ok(),
            "characters, not bytes"
        );
        assert!(check_name(&json!("x".repeat(101))).is_err());
        assert!(check_name(&json!("")).is_err());
        assert!(check_name(&json!(" \t\n")).is_err());
        assert!(check_name(&json!(5)).is_err());
        let msg = check_name(&json!("")).unwrap_err().public_message();
        assert!(msg.starts_with("name"), "{msg}");
    }

    #[test]
    fn endpoints() {
        for ok in [
            "http://192.168.1.100:8188",
            "https://my-comfy.example.com",
            "HTTPS://Example.com/path?q=1#f",
            "http://[::1]:8188/",
            "http://user:pw@host",
            "http://h/a%20b?c=d&e=f;g",
            "http://bücher.example/",
            "https://h:443/~x/(y)*,!$'",
        ] {
            assert_eq!(check_endpoint(&json!(ok)).unwrap(), ok);
        }
        for bad in [
            "",
            "example.com",
            "ftp://example.com",
            "http://",
            "http:example.com",
            "http:/example.com",
            " http://example.com",
            "http://exa mple.com",
            "http://example.com\n",
            "http:\\\\example.com",
            "mailto:a@b.c",
            "http://:80",
            "http:///h",
            "http:////h/x",
            "http://h/\u{a0}x",
            "http://h/%zz",
            "http://h/%4",
            "http://h/<x>",
            "http://h/\"",
            "http://h/{x}",
            "http://?q",
        ] {
            assert!(check_endpoint(&json!(bad)).is_err(), "{bad:?} accepted");
        }
        assert!(check_endpoint(&json!(1)).is_err());
    }

    #[test]
    fn tags() {
        assert_eq!(
            check_tags(&json!(["b", "a", "b"])).unwrap(),
            ["b", "a", "b"]
        );
        assert!(check_tags(&json!([])).unwrap().is_empty());
        assert!(check_tags(&json!(vec!["t"; 10])).is_ok());
        assert!(check_tags(&json!(vec!["t"; 11])).is_err());
        assert!(check_tags(&json!([""])).is_err());
        assert!(check_tags(&json!([1])).is_err());
        assert!(check_tags(&json!("a")).is_err());
    }

    #[test]
    fn headers() {
        let h = check_headers(&json!({"X-B": "1", "a": "2"})).unwrap();
        assert_eq!(
            h.0,
            [
                ("X-B".to_string(), "1".to_string()),
                ("a".to_string(), "2".to_string())
            ]
        );
        assert!(
            check_headers(&json!({"Authorization": "Bearer x", "authorization": "y"})).is_err()
        );
        assert!(check_headers(&json!({"Bad Name": "x"})).is_err());
        assert!(check_headers(&json!({"": "x"})).is_err());
        assert!(check_headers(&json!({"X": "a\r\nb"})).is_err());
        assert!(check_headers(&json!({"X": "a\nb"})).is_err());
        assert!(check_headers(&json!({"X": 1})).is_err());
        assert!(check_headers(&json!(["X"])).is_err());
        assert!(check_headers(&json!({"X": ""})).is_ok());
    }

    #[test]
    fn null_is_absent() {
        let map = body_object(
            br#"{"name":"n","endpoint":"http://h","tags":null,"headers":null,"status":null}"#,
        )
        .unwrap();
        let d = Draft::from_json(&map).unwrap();
        assert_eq!(d.status, Status::Active);
        assert!(d.tags.is_empty() && d.headers.0.is_empty());
        let map = body_object(br#"{"name":null,"endpoint":"http://h"}"#).unwrap();
        assert!(Draft::from_json(&map)
            .unwrap_err()
            .public_message()
            .contains("name"));
        let p = Patch::from_json(&body_object(br#"{"name":null}"#).unwrap()).unwrap();
        assert!(p.name.is_none());
    }

    #[test]
    fn list_query_rules() {
        let q = ListQuery::from_params(None, None, None).unwrap();
        assert_eq!(
            q,
            ListQuery {
                page: 1,
                per_page: 10,
                status: None
            }
        );
        let q = ListQuery::from_params(Some("9223372036854775807"), Some("100"), Some("disabled"))
            .unwrap();
        assert_eq!(q.page, i64::MAX);
        for (p, pp, s, field) in [
            (Some("0"), None, None, "page"),
            (Some("-1"), None, None, "page"),
            (Some("9223372036854775808"), None, None, "page"),
            (Some("1.5"), None, None, "page"),
            (Some(""), None, None, "page"),
            (Some("1 "), None, None, "page"),
            (None, Some("0"), None, "per_page"),
            (None, Some("101"), None, "per_page"),
            (None, Some("ten"), None, "per_page"),
            (None, None, Some("Active"), "status"),
            (None, None, Some(""), "status"),
        ] {
            let msg = ListQuery::from_params(p, pp, s)
                .unwrap_err()
                .public_message();
            assert!(msg.starts_with(field), "{p:?} {pp:?} {s:?}: {msg}");
        }
    }

    #[test]
    fn path_ids() {
        let id = "550E8400-E29B-41D4-A716-446655440000";
        assert_eq!(parse_id(id).unwrap(), id.to_lowercase());
        assert!(parse_id("550e8400e29b41d4a716446655440000").is_err());
        assert!(parse_id("nope").is_err());
    }

    #[test]
    fn rendered_runner_has_exactly_the_api_fields_in_order() {
        let r = Runner {
            id: "i".into(),
            user_id: "u".into(),
            name: "n".into(),
            status: Status::Disabled,
            endpoint: "http://h".into(),
            tags: vec![],
            headers: Headers::default(),
            created_at: 0,
            updated_at: 1,
        };
        assert_eq!(
            r.render().unwrap(),
            r#"{"id":"i","user_id":"u","name":"n","status":"disabled","endpoint":"http://h","tags":[],"headers":{},"created_at":"1970-01-01T00:00:00Z","updated_at":"1970-01-01T00:00:01Z"}"#
        );
        let back: Runner = serde_json::from_str(&r.render().unwrap()).unwrap();
        assert_eq!(back.updated_at, 1);
    }

    #[test]
    fn import_documents_of_both_shapes() {
        let mut n = 0;
        for_each_runner::<IgnoredAny>(br#"{"total": 2, "runners": [{}, {}]}"#, &mut |_, _| {
            n += 1;
            Ok(())
        })
        .unwrap();
        for_each_runner::<IgnoredAny>(b"[{}, {}, {}]", &mut |_, _| {
            n += 1;
            Ok(())
        })
        .unwrap();
        assert_eq!(n, 5);
        for bad in [&b"{}"[..], b"5", b"[", b"{\"runners\": 1}", b"[] x"] {
            assert!(for_each_runner::<IgnoredAny>(bad, &mut |_, _| Ok(())).is_err());
        }
    }

    #[test]
    fn import_puts_the_connection_settings_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = crate::db::open(&dir.path().join("x.db")).unwrap();
        let settings = |c: &Connection| -> (i64, i64, bool) {
            c.query_row(
                "SELECT cache_size, temp_store, foreign_keys FROM pragma_cache_size, pragma_temp_store, pragma_foreign_keys",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .unwrap()
        };
        let before = settings(&conn);
        assert!(before.2, "foreign keys are on");
        let good =
            br#"[{"name": "a", "endpoint": "http://h"}, {"name": "b", "endpoint": "http://h"}]"#;
        assert_eq!(import(&mut conn, "alice", good, 1).unwrap(), 2);
        assert_eq!(settings(&conn), before);
        let bad = br#"[{"name": "c", "endpoint": "http://h"}, {"name": ""}]"#;
        assert!(import(&mut conn, "alice", bad, 1).is_err());
        assert_eq!(settings(&conn), before);
        let n: i64 = conn
            .query_row("SELECT count(*) FROM runners", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 2, "the failed import left nothing behind");
    }
}
