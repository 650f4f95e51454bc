//! The embedded backend: one SQLite file, WAL, one writer thread, one reader connection.
//!
//! The writer takes everything queued (up to a batch), applies each write in its own
//! savepoint inside one transaction, commits once (`synchronous = FULL`: durable before anyone
//! is told), and only then answers each caller.

use super::Result;
use super::sql::{Db, DbError, DbResult, Dialect, Row, Value};
use super::writer::{Op, next_batch};
use rusqlite::types::{ToSqlOutput, ValueRef};
use rusqlite::{Connection, OpenFlags};
use std::path::Path;
use std::sync::mpsc;

impl From<rusqlite::Error> for DbError {
    fn from(e: rusqlite::Error) -> Self {
        DbError(e.to_string())
    }
}

impl rusqlite::ToSql for Value {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::Borrowed(match self {
            Value::Null => ValueRef::Null,
            Value::Int(n) => ValueRef::Integer(*n),
            Value::Real(x) => ValueRef::Real(*x),
            Value::Text(s) => ValueRef::Text(s.as_bytes()),
            Value::Bytes(b) => ValueRef::Blob(b),
        }))
    }
}

/// A SQLite connection (or transaction, or savepoint: they deref to one) as a [`Db`].
pub struct Lite<'a>(pub &'a Connection);

impl Db for Lite<'_> {
    fn dialect(&self) -> Dialect {
        Dialect::Sqlite
    }

    fn exec(&mut self, sql: &str, params: &[Value]) -> DbResult<u64> {
        let mut st = self.0.prepare_cached(sql)?;
        Ok(st.execute(rusqlite::params_from_iter(params))? as u64)
    }

    fn rows(&mut self, sql: &str, params: &[Value]) -> DbResult<Vec<Row>> {
        let mut st = self.0.prepare_cached(sql)?;
        let n = st.column_count();
        let mut rows = st.query(rusqlite::params_from_iter(params))?;
        let mut out = Vec::new();
        while let Some(r) = rows.next()? {
            let mut v = Vec::with_capacity(n);
            for i in 0..n {
                v.push(match r.get_ref(i)? {
                    ValueRef::Null => Value::Null,
                    ValueRef::Integer(n) => Value::Int(n),
                    ValueRef::Real(x) => Value::Real(x),
                    ValueRef::Text(t) => Value::Text(String::from_utf8_lossy(t).into_owned()),
                    ValueRef::Blob(b) => Value::Bytes(b.to_vec()),
                });
            }
            out.push(Row(v));
        }
        Ok(out)
    }

    fn script(&mut self, sql: &str) -> DbResult<()> {
        Ok(self.0.execute_batch(sql)?)
    }
}

/// Opens the database file: for writing (creating it), or read-only.
pub fn open(path: &Path, write: bool) -> Result<Connection> {
    let flags = if write {
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE
    } else {
        OpenFlags::SQLITE_OPEN_READ_ONLY
    } | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags).map_err(|e| {
        format!(
            "cannot open the database {}: {e}{}",
            path.display(),
            if write {
                ""
            } else {
                " (is it a controller database made by `patchctl serve --db`?)"
            }
        )
    })?;
    conn.busy_timeout(std::time::Duration::from_secs(10))
        .map_err(|e| e.to_string())?;
    // The store's statements, each prepared once (the default keeps 16).
    conn.set_prepared_statement_cache_capacity(128);
    if write {
        conn.execute_batch("PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL;")
            .map_err(|e| format!("cannot prepare the database {}: {e}", path.display()))?;
    }
    Ok(conn)
}

/// The writer thread's loop; see the module documentation.
pub fn writer(mut conn: Connection, rx: mpsc::Receiver<Op>) {
    while let Some(batch) = next_batch(&rx) {
        let mut replies = Vec::with_capacity(batch.len());
        let mut tx = match conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        {
            Ok(tx) => tx,
            Err(e) => {
                let msg = format!("cannot start a transaction: {e}");
                for op in batch {
                    op.answer(Err(msg.clone()));
                }
                continue;
            }
        };
        for mut op in batch {
            let result = (|| {
                let sp = tx.savepoint()?;
                op.apply(&mut Lite(&sp))?;
                sp.commit()?;
                Ok::<(), DbError>(())
            })()
            .map_err(|e| format!("database write failed: {e}"));
            replies.push((op, result));
        }
        if let Err(e) = tx.commit() {
            let msg = format!("database commit failed: {e}");
            for (op, _) in replies {
                op.answer(Err(msg.clone()));
            }
            continue;
        }
        for (op, result) in replies {
            op.answer(result);
        }
    }
}
