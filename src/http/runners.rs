//! The runner handlers: decode, validate, call the domain, encode. Each one
//! answers one endpoint of the contract.

use rusqlite::Connection;

use super::Reply;
use crate::error::Result;
use crate::runners::{self, Draft, ListQuery, Owner, Patch};
use crate::tokens::Authed;

fn owner(authed: &Authed) -> Owner<'_> {
    Owner {
        id: authed.user,
        uuid: &authed.user_uuid,
    }
}

/// `GET /v1/runner?page=&per_page=&status=`. Of repeated parameters the first counts.
pub fn list(conn: &Connection, authed: &Authed, query: &str) -> Result<Reply> {
    let (mut page, mut per_page, mut status) = (None, None, None);
    for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
        let slot = match k.as_ref() {
            "page" => &mut page,
            "per_page" => &mut per_page,
            "status" => &mut status,
            _ => continue,
        };
        slot.get_or_insert(v);
    }
    let q = ListQuery::from_params(page.as_deref(), per_page.as_deref(), status.as_deref())?;
    // About what one stored runner takes, so a page rarely reallocates.
    let mut body = Vec::with_capacity(64 + q.per_page as usize * 320);
    runners::list(conn, authed.user, &q, &mut body)?;
    Ok(Reply::json(200, body))
}

/// `POST /v1/runner`.
pub fn create(conn: &Connection, authed: &Authed, body: &[u8], now: i64) -> Result<Reply> {
    let draft = Draft::from_json(&runners::body_object(body)?)?;
    let doc = runners::create(conn, owner(authed), draft, now)?;
    Ok(Reply::json(201, doc.into_bytes()))
}

/// `GET /v1/runner/{id}`.
pub fn get(conn: &Connection, authed: &Authed, id: &str) -> Result<Reply> {
    let id = runners::parse_id(id)?;
    Ok(Reply::json(
        200,
        runners::get(conn, authed.user, &id)?.into_bytes(),
    ))
}

/// `PUT /v1/runner/{id}`.
pub fn update(
    conn: &mut Connection,
    authed: &Authed,
    id: &str,
    body: &[u8],
    now: i64,
) -> Result<Reply> {
    let fields = runners::body_object(body)?;
    let id = runners::parse_id(id)?;
    let patch = Patch::from_json(&fields)?;
    let doc = runners::update(conn, authed.user, &id, patch, now)?;
    Ok(Reply::json(200, doc.into_bytes()))
}

/// `DELETE /v1/runner/{id}`.
pub fn delete(conn: &Connection, authed: &Authed, id: &str) -> Result<Reply> {
    let id = runners::parse_id(id)?;
    runners::delete(conn, authed.user, &id)?;
    Ok(Reply::no_content())
}
