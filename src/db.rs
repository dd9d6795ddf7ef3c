//! The database: one SQLite file. This module owns how connections are opened
//! and configured, the pool the server shares, and moving a file's schema
//! forward. Domain SQL lives with the domain (`runners`, `tokens`).

use std::path::Path;
use std::sync::{Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

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

/// One writer at a time within this process, taking turns without sleeping.
///
/// SQLite admits one writer at a time; a connection that finds the write
/// lock taken sleeps in its busy handler (1 ms, then 2, 5, 10 ms...) and
/// tries again, so the server's workers, writing at the same moment, spent
/// their time asleep long after the lock was free. Waiting here instead, the
/// next writer starts the moment the last one ends. Writers in other
/// processes (the CLI) still meet SQLite's lock and its busy handler.
pub struct Writer {
    busy: Mutex<bool>,
    freed: Condvar,
    /// How long a write may wait in all: `BUSY_TIMEOUT`.
    within: Duration,
}

impl Default for Writer {
    fn default() -> Writer {
        Writer::within(BUSY_TIMEOUT)
    }
}

impl Writer {
    fn within(within: Duration) -> Writer {
        Writer {
            busy: Mutex::new(false),
            freed: Condvar::new(),
            within,
        }
    }

    /// Runs `f`, which writes through `conn`, as this process's one writer.
    /// Waiting for the other writers of the process and then for a writer in
    /// another process takes `BUSY_TIMEOUT` at most in all; beyond it the
    /// write is not attempted (503).
    pub fn write<T>(
        &self,
        conn: &mut Connection,
        f: impl FnOnce(&mut Connection) -> Result<T>,
    ) -> Result<T> {
        let deadline = Instant::now() + self.within;
        // Nothing panics while `busy` is locked; a poisoned lock is still sound.
        let mut busy = self.busy.lock().unwrap_or_else(PoisonError::into_inner);
        while *busy {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::Unavailable(format!(
                    "other writes held the database for {:?}",
                    self.within
                )));
            }
            busy = self
                .freed
                .wait_timeout(busy, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        *busy = true;
        drop(busy);
        let _turn = Turn(self);
        conn.busy_timeout(deadline.saturating_duration_since(Instant::now()))?;
        let written = f(conn);
        // What was written stands whatever this says (it cannot fail: SQLite
        // only records the number).
        let _ = conn.busy_timeout(BUSY_TIMEOUT);
        written
    }
}

/// Ends a turn of `Writer::write`, however `f` ended (a panic included).
struct Turn<'a>(&'a Writer);

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        *self.0.busy.lock().unwrap_or_else(PoisonError::into_inner) = false;
        self.0.freed.notify_one();
    }
}

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
    fn writers_take_turns_and_give_up_together() {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.db");
        drop(open(&path).unwrap());
        let writer = Arc::new(Writer::within(Duration::from_millis(500)));
        let inside = Arc::new(AtomicBool::new(false));
        let busy_timeout = |c: &Connection| -> i64 {
            c.query_row("PRAGMA busy_timeout", [], |r| r.get(0))
                .unwrap()
        };

        // One at a time, and each gets the whole time.
        let turns: Vec<_> = (0..4)
            .map(|i| {
                let (writer, inside, path) = (writer.clone(), inside.clone(), path.clone());
                std::thread::spawn(move || {
                    let mut conn = open(&path).unwrap();
                    for j in 0..5 {
                        writer
                            .write(&mut conn, |c| {
                                assert!(
                                    !inside.swap(true, Ordering::SeqCst),
                                    "two writers at once"
                                );
                                c.execute("CREATE TABLE IF NOT EXISTS t (x)", [])?;
                                c.execute("INSERT INTO t VALUES (?1)", [i * 10 + j])?;
                                std::thread::sleep(Duration::from_millis(2));
                                inside.store(false, Ordering::SeqCst);
                                Ok(())
                            })
                            .unwrap();
                    }
                    assert_eq!(busy_timeout(&conn), BUSY_TIMEOUT.as_millis() as i64);
                })
            })
            .collect();
        for t in turns {
            t.join().unwrap();
        }

        // A panic ends its turn.
        let mut conn = open(&path).unwrap();
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _ = writer.write(&mut conn, |_| -> Result<()> { panic!("in a write") });
        }));
        assert!(panicked.is_err());
        writer.write(&mut conn, |_| Ok(())).unwrap();

        // Another process holds the write lock: the one writing gives up when
        // its time is up, and the one waiting for its turn at the same time
        // rather than a whole timeout later.
        let other = open(&path).unwrap();
        other.execute_batch("BEGIN IMMEDIATE").unwrap();
        let start = Instant::now();
        let waits: Vec<_> = (0..2)
            .map(|_| {
                let (writer, path) = (writer.clone(), path.clone());
                std::thread::spawn(move || {
                    let mut conn = open(&path).unwrap();
                    let r = writer.write(&mut conn, |c| {
                        c.execute("INSERT INTO t VALUES (0)", [])?;
                        Ok(())
                    });
                    (r, start.elapsed())
                })
            })
            .collect();
        for w in waits {
            let (r, waited) = w.join().unwrap();
            assert!(matches!(r, Err(Error::Unavailable(_))), "{r:?}");
            assert!(waited < Duration::from_millis(900), "waited {waited:?}");
        }
        other.execute_batch("ROLLBACK").unwrap();
    }

    #[test]
    fn every_migration_step_has_a_version() {
        assert_eq!(MIGRATIONS.len() as i64, SCHEMA_VERSION - 1);
    }
}
