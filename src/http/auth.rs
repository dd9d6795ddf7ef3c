//! `Authorization: Bearer <token>` to an `Authed` proof, or the one 401.

use rusqlite::Connection;

use crate::error::{Error, Result};
use crate::tokens::{self, Authed};

/// The token of a `Bearer` header; the scheme is case-insensitive.
fn bearer(header: &str) -> Option<&str> {
    let (scheme, token) = header.trim().split_once([' ', '\t'])?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Every failure (no header, another scheme, a malformed, unknown, expired or
/// revoked token) is the same `Unauthorized`, so nothing is learnt from it.
pub fn authenticate(conn: &Connection, header: Option<&str>, now: i64) -> Result<Authed> {
    let token = header.and_then(bearer).ok_or(Error::Unauthorized)?;
    tokens::authenticate(conn, token, now)?.ok_or(Error::Unauthorized)
}

#[cfg(test)]
mod tests {
    use super::bearer;

    #[test]
    fn bearer_scheme() {
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("bEaReR   abc "), Some("abc"));
        assert_eq!(bearer("Basic abc"), None);
        assert_eq!(bearer("Bearer"), None);
        assert_eq!(bearer("Bearerabc"), None);
    }
}
