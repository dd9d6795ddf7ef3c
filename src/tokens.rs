//! Users and API tokens.
//!
//! A token is `cfc_` followed by 40 characters drawn from the OS's secure
//! random source (about 238 bits). It is shown once, when it is created; the
//! database keeps only its SHA-256, which is enough because a token is random,
//! not a password: there is nothing to guess and so nothing to salt or stretch.
//!
//! Authentication reads one row by that hash. Tracking "last used" must not
//! make every read a write, so a token's first use is recorded at once and
//! later uses refresh the timestamp only when it is at least a minute old.

use std::fmt;

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::clock;
use crate::error::{Error, Result};

pub const PREFIX: &str = "cfc_";
/// Random characters after the prefix (the contract asks for at least 32).
const RANDOM_CHARS: usize = 40;
/// The shortest token that can be one of ours; anything shorter is refused unread.
const MIN_RANDOM_CHARS: usize = 32;
/// How stale `last_used_at` may get before a use refreshes it.
pub const TOUCH_EVERY_SECS: i64 = 60;
/// The user created, with a token, on a database that has no tokens at all.
pub const BOOTSTRAP_USER: &str = "admin";
/// User names: the command line's `--user`.
const MAX_USER_NAME_CHARS: usize = 100;

/// A plaintext token. Only `expose` shows it; `Debug` never does.
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(cfc_…)")
    }
}

/// A fresh token from the OS's random source.
pub fn mint() -> Result<Secret> {
    const ALPHABET: &[u8; 62] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut token = String::with_capacity(PREFIX.len() + RANDOM_CHARS);
    token.push_str(PREFIX);
    let mut buf = [0u8; 64];
    while token.len() < PREFIX.len() + RANDOM_CHARS {
        getrandom::fill(&mut buf)
            .map_err(|e| Error::Internal(format!("no secure random source: {e}")))?;
        // Rejection sampling keeps every character equally likely: 248 is
        // the largest multiple of 62 that fits in a byte.
        for &b in buf.iter().filter(|&&b| b < 248) {
            if token.len() == PREFIX.len() + RANDOM_CHARS {
                break;
            }
            token.push(ALPHABET[(b % 62) as usize] as char);
        }
    }
    Ok(Secret(token))
}

pub fn hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Whether `token` has the shape of one of ours, checked before any lookup.
pub fn is_well_formed(token: &str) -> bool {
    token.len() >= PREFIX.len() + MIN_RANDOM_CHARS
        && token.starts_with(PREFIX)
        && token[PREFIX.len()..]
            .bytes()
            .all(|b| b.is_ascii_alphanumeric())
}

#[derive(Debug, Clone)]
pub struct User {
    pub id: i64,
    pub uuid: String,
    pub name: String,
    pub email: String,
    pub created_at: i64,
    pub updated_at: i64,
}

const USER_COLUMNS: &str = "id, uuid, name, email, created_at, updated_at";

fn user_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<User> {
    Ok(User {
        id: r.get("id")?,
        uuid: r.get("uuid")?,
        name: r.get("name")?,
        email: r.get("email")?,
        created_at: r.get("created_at")?,
        updated_at: r.get("updated_at")?,
    })
}

fn check_user_name(name: &str) -> Result<()> {
    let chars = name.chars().count();
    if name.trim().is_empty() || chars > MAX_USER_NAME_CHARS || name.chars().any(char::is_control) {
        return Err(Error::Invalid(format!(
            "user name must be 1 to {MAX_USER_NAME_CHARS} characters, not blank, without control characters"
        )));
    }
    Ok(())
}

pub fn find_user(conn: &Connection, name: &str) -> Result<Option<User>> {
    let sql = format!("SELECT {USER_COLUMNS} FROM users WHERE name = ?1");
    Ok(conn
        .prepare_cached(&sql)?
        .query_row([name], user_from_row)
        .optional()?)
}

pub fn user_by_id(conn: &Connection, id: i64) -> Result<User> {
    let sql = format!("SELECT {USER_COLUMNS} FROM users WHERE id = ?1");
    Ok(conn.prepare_cached(&sql)?.query_row([id], user_from_row)?)
}

/// The user called `name`, created if there is none. Call inside a write
/// transaction so that two callers cannot both create it.
pub fn ensure_user(conn: &Connection, name: &str) -> Result<User> {
    ensure_user_with_id(conn, name, None)
}

/// As `ensure_user`; a new user gets the public id `wanted` if it is a UUID
/// no other user has (an import keeps the `user_id` of a migrated user).
pub fn ensure_user_with_id(conn: &Connection, name: &str, wanted: Option<&str>) -> Result<User> {
    check_user_name(name)?;
    if let Some(user) = find_user(conn, name)? {
        return Ok(user);
    }
    let now = clock::now();
    let free = |id: &String| -> Result<bool> {
        let taken: bool = conn.query_row(
            "SELECT EXISTS (SELECT 1 FROM users WHERE uuid = ?1)",
            [id],
            |r| r.get(0),
        )?;
        Ok(!taken)
    };
    let wanted = wanted
        .and_then(|w| uuid::Uuid::try_parse(w).ok())
        .map(|u| u.to_string());
    let uuid = match wanted {
        Some(id) if free(&id)? => id,
        _ => uuid::Uuid::new_v4().to_string(),
    };
    conn.execute(
        "INSERT INTO users (uuid, name, created_at, updated_at) VALUES (?1, ?2, ?3, ?3)",
        params![uuid, name, now],
    )?;
    user_by_id(conn, conn.last_insert_rowid())
}

/// One token as `token list` shows it: everything but the token.
#[derive(Debug, Serialize)]
pub struct TokenInfo {
    pub id: String,
    pub user: String,
    pub name: String,
    #[serde(with = "clock::rfc3339")]
    pub created_at: i64,
    #[serde(serialize_with = "optional_time")]
    pub expires_at: Option<i64>,
    #[serde(serialize_with = "optional_time")]
    pub last_used_at: Option<i64>,
    #[serde(serialize_with = "optional_time")]
    pub revoked_at: Option<i64>,
}

fn optional_time<S: serde::Serializer>(ts: &Option<i64>, s: S) -> Result<S::Ok, S::Error> {
    match ts {
        Some(ts) => s.serialize_str(&clock::format(*ts)),
        None => s.serialize_none(),
    }
}

/// Creates a token for `user` (creating the user if needed) in one transaction.
pub fn create(
    conn: &mut Connection,
    user: &str,
    label: &str,
    expires_in_secs: Option<i64>,
) -> Result<(TokenInfo, Secret)> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let created = insert_token(&tx, user, label, expires_in_secs)?;
    tx.commit()?;
    Ok(created)
}

fn insert_token(
    conn: &Connection,
    user: &str,
    label: &str,
    expires_in_secs: Option<i64>,
) -> Result<(TokenInfo, Secret)> {
    let owner = ensure_user(conn, user)?;
    let secret = mint()?;
    let now = clock::now();
    let info = TokenInfo {
        id: uuid::Uuid::new_v4().to_string(),
        user: owner.name,
        name: label.to_string(),
        created_at: now,
        expires_at: expires_in_secs.map(|s| now.saturating_add(s)),
        last_used_at: None,
        revoked_at: None,
    };
    conn.execute(
        "INSERT INTO tokens (id, user_id, hash, name, created_at, expires_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![
            info.id,
            owner.id,
            &hash(secret.expose())[..],
            info.name,
            info.created_at,
            info.expires_at
        ],
    )?;
    Ok((info, secret))
}

/// On a database without a single token, creates `admin` and a token for it,
/// so a newcomer can call the API at once. `None` when tokens already exist.
pub fn bootstrap(conn: &mut Connection) -> Result<Option<Secret>> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let any: bool = tx.query_row("SELECT EXISTS (SELECT 1 FROM tokens)", [], |r| r.get(0))?;
    if any {
        return Ok(None);
    }
    let (_, secret) = insert_token(&tx, BOOTSTRAP_USER, "bootstrap", None)?;
    tx.commit()?;
    Ok(Some(secret))
}

pub fn list(conn: &Connection, user: Option<&str>) -> Result<Vec<TokenInfo>> {
    let mut stmt = conn.prepare(
        "SELECT t.id, u.name AS user, t.name, t.created_at, t.expires_at, t.last_used_at, t.revoked_at
         FROM tokens t JOIN users u ON u.id = t.user_id
         WHERE ?1 IS NULL OR u.name = ?1
         ORDER BY t.created_at, t.rowid",
    )?;
    let rows = stmt.query_map([user], |r| {
        Ok(TokenInfo {
            id: r.get("id")?,
            user: r.get("user")?,
            name: r.get("name")?,
            created_at: r.get("created_at")?,
            expires_at: r.get("expires_at")?,
            last_used_at: r.get("last_used_at")?,
            revoked_at: r.get("revoked_at")?,
        })
    })?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

#[derive(Debug, PartialEq, Eq)]
pub enum Revoked {
    Now,
    Already,
}

/// Revokes the token with public id `id`. Unknown ids are an error; revoking
/// twice changes nothing.
pub fn revoke(conn: &Connection, id: &str) -> Result<Revoked> {
    let unknown = || Error::Invalid(format!("no token with id {id}"));
    let id = uuid::Uuid::try_parse(id)
        .map_err(|_| unknown())?
        .to_string();
    let changed = conn.execute(
        "UPDATE tokens SET revoked_at = ?1 WHERE id = ?2 AND revoked_at IS NULL",
        params![clock::now(), id],
    )?;
    if changed == 1 {
        return Ok(Revoked::Now);
    }
    let exists: bool = conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM tokens WHERE id = ?1)",
        [&id],
        |r| r.get(0),
    )?;
    if exists {
        Ok(Revoked::Already)
    } else {
        Err(unknown())
    }
}

/// Proof that a request carries a live token: the handlers of `/v1` take one.
#[derive(Debug)]
pub struct Authed {
    /// The token's rowid, for `touch`.
    pub token: i64,
    /// The user's rowid, which every runner row carries.
    pub user: i64,
    /// The user's public id, `user_id` in runner objects.
    pub user_uuid: String,
    pub last_used_at: Option<i64>,
}

/// When, if at all, a use of this token should be written down.
#[derive(Debug, PartialEq, Eq)]
pub enum Touch {
    /// Recently recorded: nothing to write.
    No,
    /// Never used before: record it before answering.
    Now,
    /// Stale: refresh it, but it may wait until the answer has gone out.
    Later,
}

impl Authed {
    pub fn touch_due(&self, now: i64) -> Touch {
        match self.last_used_at {
            None => Touch::Now,
            Some(t) if now - t >= TOUCH_EVERY_SECS => Touch::Later,
            Some(_) => Touch::No,
        }
    }
}

/// The live token `token` (well-formed, known, not revoked, not expired), or None.
pub fn authenticate(conn: &Connection, token: &str, now: i64) -> Result<Option<Authed>> {
    if !is_well_formed(token) {
        return Ok(None);
    }
    let mut stmt = conn.prepare_cached(
        "SELECT t.rowid, t.user_id, u.uuid, t.expires_at, t.revoked_at, t.last_used_at
         FROM tokens t JOIN users u ON u.id = t.user_id
         WHERE t.hash = ?1",
    )?;
    let found = stmt
        .query_row([&hash(token)[..]], |r| {
            let expires_at: Option<i64> = r.get(3)?;
            let revoked_at: Option<i64> = r.get(4)?;
            let live = revoked_at.is_none() && expires_at.is_none_or(|e| now < e);
            Ok(live.then(|| -> rusqlite::Result<Authed> {
                Ok(Authed {
                    token: r.get(0)?,
                    user: r.get(1)?,
                    user_uuid: r.get(2)?,
                    last_used_at: r.get(5)?,
                })
            }))
        })
        .optional()?;
    match found.flatten() {
        Some(authed) => Ok(Some(authed?)),
        None => Ok(None),
    }
}

/// Records a use of token `token` at `now`, unless one at most a minute old is
/// already recorded (so concurrent requests write it once).
pub fn touch(conn: &Connection, token: i64, now: i64) -> Result<()> {
    conn.prepare_cached(
        "UPDATE tokens SET last_used_at = ?1
         WHERE rowid = ?2 AND (last_used_at IS NULL OR last_used_at <= ?1 - ?3)",
    )?
    .execute(params![now, token, TOUCH_EVERY_SECS])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minted_tokens_are_well_formed_and_distinct() {
        let a = mint().unwrap();
        let b = mint().unwrap();
        assert!(is_well_formed(a.expose()), "{}", a.expose());
        assert_eq!(a.expose().len(), PREFIX.len() + RANDOM_CHARS);
        assert_ne!(a.expose(), b.expose());
        assert!(!format!("{a:?}").contains(&a.expose()[4..]));
    }

    #[test]
    fn shape_check() {
        let ok = format!("cfc_{}", "a".repeat(32));
        assert!(is_well_formed(&ok));
        assert!(!is_well_formed(&format!("cfc_{}", "a".repeat(31))));
        assert!(!is_well_formed(&format!("cfx_{}", "a".repeat(32))));
        assert!(!is_well_formed(&format!("cfc_{}-", "a".repeat(32))));
        assert!(!is_well_formed(&format!("cfc_{}é", "a".repeat(32))));
        assert!(!is_well_formed(""));
    }

    #[test]
    fn touch_is_due_on_first_use_and_after_a_minute() {
        let mut a = Authed {
            token: 1,
            user: 1,
            user_uuid: String::new(),
            last_used_at: None,
        };
        assert_eq!(a.touch_due(1000), Touch::Now);
        a.last_used_at = Some(1000);
        assert_eq!(a.touch_due(1059), Touch::No);
        assert_eq!(a.touch_due(1060), Touch::Later);
    }
}
