//! The database: one SQLite file. This module owns how connections are opened
//! and configured, the pool the server shares, and moving a file's schema
//! forward. Domain SQL lives with the domain (`runners`, `tokens`).

use std::path::Path;
use std::time::Duration;

use r2d2_sqlite::SqliteConnectionManager;
use rusqlite::config::DbConfig;
use rusqlite::{Connection, OpenFlags, TransactionBehavior};

use crate::error::{Error, Result};

pub type Pool = r2d2::Pool<SqliteConnectionManager>;
pub type PooledConn = r2d2::PooledConnection<SqliteConnectionManager>;

/// The current schema, applied whole to a new database.
const SCHEMA: &str = include_str!("../schema.sql");

/// The version `SCHEMA` describes; kept in `PRAGMA user_version`.
pub const SCHEMA_VERSION: i64 = 2;

/// Steps that move a database from version N-1 to N, for N > 1, in order:
/// `MIGRATIONS[i]` takes version `i + 1` to `i + 2`. Each runs inside the
/// transaction that also sets the new version, so a step happens whole or not
/// at all. A step is frozen once released: it says what that version was.
const MIGRATIONS: &[&str] = &[
    // 2: the count triggers without upserts (see schema.sql); the counts
    // themselves are unchanged.
    "DROP TRIGGER runners_count_insert;
     DROP TRIGGER runners_count_update;
     CREATE TRIGGER runners_count_insert AFTER INSERT ON runners
     BEGIN
         INSERT INTO runner_counts (user_id, status, n)
             SELECT NEW.user_id, NEW.status, 0
             WHERE NOT EXISTS (SELECT 1 FROM runner_counts
                               WHERE user_id = NEW.user_id AND status = NEW.status);
         UPDATE runner_counts SET n = n + 1
             WHERE user_id = NEW.user_id AND status = NEW.status;
     END;
     CREATE TRIGGER runners_count_update AFTER UPDATE OF user_id, status ON runners
         WHEN OLD.user_id IS NOT NEW.user_id OR OLD.status IS NOT NEW.status
     BEGIN
         UPDATE runner_counts SET n = n - 1
             WHERE user_id = OLD.user_id AND status = OLD.status;
         INSERT INTO runner_counts (user_id, status, n)
             SELECT NEW.user_id, NEW.status, 0
             WHERE NOT EXISTS (SELECT 1 FROM runner_counts
                               WHERE user_id = NEW.user_id AND status = NEW.status);
         UPDATE runner_counts SET n = n + 1
             WHERE user_id = NEW.user_id AND status = NEW.status;
     END;",
];

/// How long a statement waits for another writer (the CLI, another worker)
/// before giving up with SQLITE_BUSY.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Per-connection page cache. Small on purpose: the OS page cache holds the
/// file anyway, and this is per pooled connection, so it bounds the server's
/// memory rather than its speed.
const CACHE_KIB: i64 = 2048;

/// Settings every connection gets, in this order:
/// - `busy_timeout` first, so that even the statements below wait for a lock
///   instead of failing while another process writes;
/// - `foreign_keys`, off by default in SQLite, so a runner cannot outlive its user;
/// - `synchronous = NORMAL`, which in WAL mode still never corrupts the file and
///   loses nothing when the process dies; only an OS crash or power cut can undo
///   the last commits;
/// - a bounded page cache;
/// - the query planner stability guarantee. Without it SQLite marks a
///   statement whose LIMIT, OFFSET or `?N IS NULL` test is a bound parameter
///   as "plan depends on the value", and compiles it afresh every time a new
///   value is bound, which made the prepared-statement cache worthless for
///   the list (a full parse per request). Our plans never depend on values.
///
/// WAL itself is a property of the file, set once in `migrate`.
fn configure(conn: &Connection) -> rusqlite::Result<()> {
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.pragma_update(None, "foreign_keys", true)?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.pragma_update(None, "cache_size", -CACHE_KIB)?;
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)?;
    // The server prepares a handful of statements over and over.
    conn.set_prepared_statement_cache_capacity(32);
    Ok(())
}

/// Opens (creating if needed) the database file and brings its schema to the
/// current version. Used by every command; the server then builds a pool.
pub fn open(path: &Path) -> Result<Connection> {
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
        | OpenFlags::SQLITE_OPEN_CREATE
        | OpenFlags::SQLITE_OPEN_NO_MUTEX
        | OpenFlags::SQLITE_OPEN_URI;
    let mut conn = Connection::open_with_flags(path, flags)
        .map_err(|e| Error::Internal(format!("cannot open database {}: {e}", path.display())))?;
    configure(&conn)?;
    migrate(&mut conn).map_err(|e| match e {
        Error::Internal(m) => Error::Internal(format!("database {}: {m}", path.display())),
        other => other,
    })?;
    Ok(conn)
}

/// A pool of `size` connections to an already migrated file.
pub fn pool(path: &Path, size: u32) -> Result<Pool> {
    let manager = SqliteConnectionManager::file(path).with_init(|c: &mut Connection| configure(c));
    r2d2::Pool::builder()
        .max_size(size)
        .min_idle(Some(size))
        // A checkout is on every request; a broken SQLite connection is not a
        // thing that happens to a local file, so don't ping it each time.
        .test_on_check_out(false)
        .connection_timeout(Duration::from_secs(10))
        .build(manager)
        .map_err(|e| Error::Internal(format!("cannot open database pool: {e}")))
}

fn user_version(conn: &Connection) -> rusqlite::Result<i64> {
    conn.query_row("PRAGMA user_version", [], |r| r.get(0))
}

/// Moves the file to `SCHEMA_VERSION` in one IMMEDIATE transaction (so two
/// processes starting together cannot both migrate). A file written by a newer
/// binary is refused and left untouched.
fn migrate(conn: &mut Connection) -> Result<()> {
    let seen = user_version(conn)?;
    if seen > SCHEMA_VERSION {
        return Err(newer(seen));
    }
    // WAL lets readers and the one writer proceed together; it is stored in
    // the file, so setting it once here covers every later connection.
    let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") && !mode.eq_ignore_ascii_case("memory") {
        return Err(Error::Internal(format!(
            "could not switch the journal to WAL (got {mode})"
        )));
    }
    if seen == SCHEMA_VERSION {
        return Ok(());
    }
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let version = user_version(&tx)?;
    match version {
        v if v > SCHEMA_VERSION => return Err(newer(v)),
        v if v == SCHEMA_VERSION => return Ok(()),
        0 => tx.execute_batch(SCHEMA)?,
        v => {
            for step in &MIGRATIONS[(v - 1) as usize..] {
                tx.execute_batch(step)?;
            }
        }
    }
    tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
    tx.commit()?;
    Ok(())
}

fn newer(version: i64) -> Error {
    Error::Internal(format!(
        "schema version {version} is newer than this binary supports ({SCHEMA_VERSION}); \
         refusing to touch it"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_file_gets_current_version_and_wal() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.db");
        let conn = open(&path).unwrap();
        assert_eq!(user_version(&conn).unwrap(), SCHEMA_VERSION);
        let mode: String = conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        drop(conn);
        // Opening again is a no-op.
        let conn = open(&path).unwrap();
        assert_eq!(user_version(&conn).unwrap(), SCHEMA_VERSION);
    }

    #[test]
    fn newer_file_is_refused_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.db");
        {
            let c = Connection::open(&path).unwrap();
            c.execute_batch("CREATE TABLE future (x); PRAGMA user_version = 99;")
                .unwrap();
        }
        let err = open(&path).unwrap_err().to_string();
        assert!(err.contains("newer"), "{err}");
        let c = Connection::open(&path).unwrap();
        assert_eq!(user_version(&c).unwrap(), 99);
        let mode: String = c
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "delete", "a refused file is not even switched to WAL");
    }

    #[test]
    fn every_migration_step_has_a_version() {
        assert_eq!(MIGRATIONS.len() as i64, SCHEMA_VERSION - 1);
    }
}
