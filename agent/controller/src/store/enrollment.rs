//! Join tokens and enrolled hosts, in SQL.
//!
//! A token is stored as its id and the SHA-256 of its secret; the secret itself is shown once,
//! by `patchctl tokens create`, and never stored. An enrolment checks the token, spends one use
//! and records the host and the names its certificate carries in one transaction, so a
//! single-use token raced by two hosts (or two controllers) enrolls exactly one.

use super::ingest::labels;
use super::sql::{Db, DbResult, p};
use std::collections::BTreeMap;
use subtle::ConstantTimeEq;

/// A token to store.
#[derive(Debug, Clone)]
pub struct NewToken {
    pub id: String,
    pub secret_sha256: [u8; 32],
    pub labels: BTreeMap<String, String>,
    pub uses: u32,
    /// May enroll a host id that is already known (replacing its certificate).
    pub reenroll: bool,
    pub created_at: i64,
    pub expires_at: i64,
}

/// A token as `patchctl tokens list` shows it: never the secret.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TokenRow {
    pub id: String,
    pub labels: BTreeMap<String, String>,
    pub uses_left: i64,
    pub used: i64,
    pub reenroll: bool,
    pub created_at: i64,
    pub expires_at: i64,
    pub revoked_at: Option<i64>,
}

/// One enrolment to record.
#[derive(Debug, Clone)]
pub struct Enrolment {
    pub token_id: String,
    /// SHA-256 of the secret the host presented.
    pub secret_sha256: [u8; 32],
    pub host_id: String,
    /// Every name the certificate carries: the host id first.
    pub names: Vec<String>,
    pub serial: String,
    pub not_after: i64,
    pub agent_version: String,
    /// The encoded `EnrollFacts`.
    pub facts: Vec<u8>,
}

// A host enrolled but not yet heard from has last_seen 0 (the column predates enrolment and
// is NOT NULL); `hosts list` shows it as never seen.

/// Why an enrolment or renewal is refused. Nothing was changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("the token is unknown or its secret is wrong")]
    UnknownToken,
    #[error("the token was revoked")]
    TokenRevoked,
    #[error("the token expired")]
    TokenExpired,
    #[error("the token has no uses left")]
    TokenUsedUp,
    #[error(
        "host {0:?} is already known to the controller; enrol it again with a token made by `patchctl tokens create --reenroll`"
    )]
    AlreadyEnrolled(String),
    #[error("the name {name:?} belongs to host {owner:?}")]
    NameTaken { name: String, owner: String },
    #[error("host {0:?} is revoked")]
    Revoked(String),
    #[error("host {0:?} was never enrolled; only enrolled hosts renew (enrol it with a token)")]
    NotEnrolled(String),
}

/// A host as `patchctl hosts list` shows it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct HostListRow {
    pub host_id: String,
    pub labels: BTreeMap<String, String>,
    pub cert_serial: Option<String>,
    pub cert_not_after: Option<i64>,
    pub enrolled_at: Option<i64>,
    pub last_seen: Option<i64>,
    pub agent_version: String,
    pub revoked_at: Option<i64>,
    /// Since when the host holds a control channel to the controller; None: not connected.
    pub connected_since: Option<i64>,
}

pub fn create_token(db: &mut dyn Db, t: &NewToken) -> DbResult<()> {
    db.exec(
        "INSERT INTO tokens(id, secret_sha256, labels, uses_left, reenroll, created_at, expires_at)
         VALUES(?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        p![
            &t.id,
            &t.secret_sha256[..],
            serde_json::to_string(&t.labels).unwrap_or_else(|_| "{}".into()),
            t.uses,
            t.reenroll,
            t.created_at,
            t.expires_at
        ],
    )?;
    Ok(())
}

pub fn tokens(db: &mut dyn Db) -> DbResult<Vec<TokenRow>> {
    db.rows(
        "SELECT id, labels, uses_left, uses, reenroll, created_at, expires_at, revoked_at
         FROM tokens ORDER BY created_at, id",
        &[],
    )?
    .iter()
    .map(|r| {
        Ok(TokenRow {
            id: r.text(0)?,
            labels: labels(&r.text(1)?),
            uses_left: r.i64(2)?,
            used: r.i64(3)?,
            reenroll: r.bool(4)?,
            created_at: r.i64(5)?,
            expires_at: r.i64(6)?,
            revoked_at: r.opt_i64(7)?,
        })
    })
    .collect()
}

pub fn revoke_token(db: &mut dyn Db, id: &str, now: i64) -> DbResult<bool> {
    Ok(db.exec(
        "UPDATE tokens SET revoked_at = ?2 WHERE id = ?1 AND revoked_at IS NULL",
        p![id, now],
    )? == 1)
}

/// What a valid token grants: its labels, and whether it may re-enroll a known host.
struct Grant {
    labels: BTreeMap<String, String>,
    reenroll: bool,
}

/// What the token grants when it may enroll now, else why not.
fn check_token(db: &mut dyn Db, e: &Enrolment, now: i64) -> DbResult<Result<Grant, Refusal>> {
    let Some(r) = db.row(
        "SELECT secret_sha256, labels, uses_left, expires_at, revoked_at, reenroll
         FROM tokens WHERE id = ?1",
        p![&e.token_id],
    )?
    else {
        return Ok(Err(Refusal::UnknownToken));
    };
    // Constant time: how much of the secret is right must not show in the answer's timing.
    if !bool::from(r.bytes(0)?.as_slice().ct_eq(&e.secret_sha256[..])) {
        return Ok(Err(Refusal::UnknownToken));
    }
    if r.opt_i64(4)?.is_some() {
        return Ok(Err(Refusal::TokenRevoked));
    }
    if now >= r.i64(3)? {
        return Ok(Err(Refusal::TokenExpired));
    }
    if r.i64(2)? <= 0 {
        return Ok(Err(Refusal::TokenUsedUp));
    }
    Ok(Ok(Grant {
        labels: labels(&r.text(1)?),
        reenroll: r.bool(5)?,
    }))
}

/// The host that holds `name` (as its host id or a certificate name), other than `host_id`.
fn name_owner(db: &mut dyn Db, name: &str, host_id: &str) -> DbResult<Option<String>> {
    db.row(
        "SELECT host_id FROM host_names WHERE name = ?1 AND host_id != ?2
         UNION SELECT host_id FROM hosts WHERE host_id = ?1 AND host_id != ?2 LIMIT 1",
        p![name, host_id],
    )?
    .map(|r| r.text(0))
    .transpose()
}

pub fn enroll(
    db: &mut dyn Db,
    e: &Enrolment,
    now: i64,
) -> DbResult<Result<BTreeMap<String, String>, Refusal>> {
    let Grant { labels, reenroll } = match check_token(db, e, now)? {
        Ok(ok) => ok,
        Err(refusal) => return Ok(Err(refusal)),
    };
    let known = db
        .row(
            "SELECT count(*) FROM hosts WHERE host_id = ?1",
            p![&e.host_id],
        )?
        .map(|r| r.i64(0))
        .transpose()?
        .unwrap_or(0)
        > 0;
    if known && !reenroll {
        return Ok(Err(Refusal::AlreadyEnrolled(e.host_id.clone())));
    }
    for name in &e.names {
        if let Some(owner) = name_owner(db, name, &e.host_id)? {
            return Ok(Err(Refusal::NameTaken {
                name: name.clone(),
                owner,
            }));
        }
    }
    // Spend the use; the condition makes it exact whoever else enrolls at the same time.
    if db.exec(
        "UPDATE tokens SET uses_left = uses_left - 1, uses = uses + 1 WHERE id = ?1 AND uses_left > 0",
        p![&e.token_id],
    )? != 1
    {
        return Ok(Err(Refusal::TokenUsedUp));
    }
    db.exec(
        "INSERT INTO hosts(host_id, labels, agent_version, first_seen, last_seen, enrolled_at,
           cert_serial, cert_not_after, enroll_token, facts, revoked_at)
         VALUES(?1, ?2, ?3, ?4, 0, ?4, ?5, ?6, ?7, ?8, NULL)
         ON CONFLICT(host_id) DO UPDATE SET labels = excluded.labels,
           agent_version = excluded.agent_version, enrolled_at = ?4, cert_serial = ?5,
           cert_not_after = ?6, enroll_token = ?7, facts = ?8, revoked_at = NULL",
        p![
            &e.host_id,
            serde_json::to_string(&labels).unwrap_or_else(|_| "{}".into()),
            &e.agent_version,
            now,
            &e.serial,
            e.not_after,
            &e.token_id,
            &e.facts
        ],
    )?;
    db.exec("DELETE FROM host_names WHERE host_id = ?1", p![&e.host_id])?;
    for name in &e.names {
        db.exec(
            "INSERT INTO host_names(name, host_id) VALUES(?1, ?2)",
            p![name, &e.host_id],
        )?;
    }
    Ok(Ok(labels))
}

pub fn renewable(db: &mut dyn Db, host_id: &str) -> DbResult<Result<Vec<String>, Refusal>> {
    let row = db.row(
        "SELECT enrolled_at, revoked_at FROM hosts WHERE host_id = ?1",
        p![host_id],
    )?;
    match row
        .map(|r| Ok::<_, super::sql::DbError>((r.opt_i64(0)?, r.opt_i64(1)?)))
        .transpose()?
    {
        Some((_, Some(_))) => return Ok(Err(Refusal::Revoked(host_id.into()))),
        Some((Some(_), None)) => {}
        _ => return Ok(Err(Refusal::NotEnrolled(host_id.into()))),
    }
    let mut names: Vec<String> = db
        .rows(
            "SELECT name FROM host_names WHERE host_id = ?1 ORDER BY name",
            p![host_id],
        )?
        .iter()
        .map(|r| r.text(0))
        .collect::<DbResult<_>>()?;
    // The host id first, as at enrolment.
    names.retain(|n| n != host_id);
    names.insert(0, host_id.to_string());
    Ok(Ok(names))
}

pub fn renewed(db: &mut dyn Db, host_id: &str, serial: &str, not_after: i64) -> DbResult<bool> {
    Ok(db.exec(
        "UPDATE hosts SET cert_serial = ?2, cert_not_after = ?3
         WHERE host_id = ?1 AND revoked_at IS NULL AND enrolled_at IS NOT NULL",
        p![host_id, serial, not_after],
    )? == 1)
}

pub fn host_revoked(db: &mut dyn Db, host_id: &str) -> DbResult<bool> {
    Ok(db
        .row(
            "SELECT count(*) FROM hosts WHERE host_id = ?1 AND revoked_at IS NOT NULL",
            p![host_id],
        )?
        .map(|r| r.i64(0))
        .transpose()?
        .unwrap_or(0)
        > 0)
}

pub fn revoke_host(db: &mut dyn Db, host_id: &str, now: i64) -> DbResult<bool> {
    Ok(db.exec(
        "UPDATE hosts SET revoked_at = ?2 WHERE host_id = ?1 AND revoked_at IS NULL",
        p![host_id, now],
    )? == 1)
}

/// Every host; a host counts as connected while its channel's controller is alive.
pub fn host_list(db: &mut dyn Db) -> DbResult<Vec<HostListRow>> {
    let sql = format!(
        "SELECT h.host_id, h.labels, h.cert_serial, h.cert_not_after, h.enrolled_at,
           CASE WHEN h.last_seen = 0 THEN NULL ELSE h.last_seen END,
           h.agent_version, h.revoked_at, {}
         FROM hosts h ORDER BY h.host_id",
        super::replicas::connected_since(db)
    );
    db.rows(&sql, &[])?
        .iter()
        .map(|r| {
            Ok(HostListRow {
                host_id: r.text(0)?,
                labels: labels(&r.text(1)?),
                cert_serial: r.opt_text(2)?,
                cert_not_after: r.opt_i64(3)?,
                enrolled_at: r.opt_i64(4)?,
                last_seen: r.opt_i64(5)?,
                agent_version: r.text(6)?,
                revoked_at: r.opt_i64(7)?,
                connected_since: r.opt_i64(8)?,
            })
        })
        .collect()
}
