//! The PostgreSQL backend: for fleets past one controller, and for several controllers on one
//! database.
//!
//! Like the SQLite backend, each process has one writer thread that batches queued writes into
//! one transaction and answers only after the commit. It orders a batch by host so that two
//! replicas' batches take row locks in the same order; a batch that fails (a conflict with the
//! other replica, one bad write) is rolled back and its writes run again one transaction each,
//! so one write's failure is its own. Reads use a few pooled connections, each read one
//! read-only, repeatable-read transaction. A listener connection turns `NOTIFY`s into
//! [`Notice`]s: how one replica hands a push to the replica that holds the host's channel.

use super::Result;
use super::sql::{Db, DbError, DbResult, Dialect, Row, Value, numbered};
use super::writer::{Op, next_batch};
use bytes::BytesMut;
use postgres::fallible_iterator::FallibleIterator;
use postgres::types::{FromSql, IsNull, ToSql, Type, to_sql_checked};
use postgres::{Client, GenericClient, NoTls, Statement};
use std::collections::HashMap;
use std::sync::{Mutex, mpsc};
use std::time::Duration;
use tokio::sync::broadcast;

type BoxError = Box<dyn std::error::Error + Sync + Send>;

impl From<postgres::Error> for DbError {
    fn from(e: postgres::Error) -> Self {
        // The server's message names the constraint or the column; the bare Display does not.
        match e.as_db_error() {
            Some(d) => DbError(format!("{}: {}", d.severity(), d.message())),
            None => match std::error::Error::source(&e) {
                Some(why) => DbError(format!("{e}: {why}")),
                None => DbError(e.to_string()),
            },
        }
    }
}

impl ToSql for Value {
    fn to_sql(&self, ty: &Type, out: &mut BytesMut) -> std::result::Result<IsNull, BoxError> {
        match self {
            Value::Null => Ok(IsNull::Yes),
            Value::Int(n) => match *ty {
                Type::INT8 => n.to_sql(ty, out),
                Type::INT4 => i32::try_from(*n)?.to_sql(ty, out),
                Type::INT2 => i16::try_from(*n)?.to_sql(ty, out),
                Type::BOOL => (*n != 0).to_sql(ty, out),
                Type::FLOAT8 => (*n as f64).to_sql(ty, out),
                Type::TEXT | Type::VARCHAR => n.to_string().to_sql(ty, out),
                _ => Err(format!("cannot send an integer as {ty}").into()),
            },
            Value::Real(x) => match *ty {
                Type::FLOAT8 => x.to_sql(ty, out),
                Type::FLOAT4 => (*x as f32).to_sql(ty, out),
                _ => Err(format!("cannot send a real as {ty}").into()),
            },
            Value::Text(s) => s.as_str().to_sql(ty, out),
            Value::Bytes(b) => b.as_slice().to_sql(ty, out),
        }
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    to_sql_checked!();
}

impl<'a> FromSql<'a> for Value {
    fn from_sql(ty: &Type, raw: &'a [u8]) -> std::result::Result<Self, BoxError> {
        Ok(match *ty {
            Type::INT8 => Value::Int(i64::from_sql(ty, raw)?),
            Type::INT4 => Value::Int(i32::from_sql(ty, raw)?.into()),
            Type::INT2 => Value::Int(i16::from_sql(ty, raw)?.into()),
            Type::BOOL => Value::Int(bool::from_sql(ty, raw)?.into()),
            Type::FLOAT8 => Value::Real(f64::from_sql(ty, raw)?),
            Type::FLOAT4 => Value::Real(f32::from_sql(ty, raw)?.into()),
            Type::BYTEA => Value::Bytes(Vec::from_sql(ty, raw)?),
            Type::TEXT | Type::VARCHAR | Type::NAME | Type::BPCHAR | Type::UNKNOWN => {
                Value::Text(String::from_sql(ty, raw)?)
            }
            // What pg_notify and the advisory locks return.
            Type::VOID => Value::Null,
            _ => return Err(format!("the store does not read columns of type {ty}").into()),
        })
    }

    fn from_sql_null(_: &Type) -> std::result::Result<Self, BoxError> {
        Ok(Value::Null)
    }

    fn accepts(_: &Type) -> bool {
        true
    }
}

/// Prepared statements of one connection, by their SQL as the store writes it.
pub type Cache = HashMap<String, Statement>;

/// A PostgreSQL connection or transaction as a [`Db`].
pub struct PgDb<'a, C> {
    pub client: &'a mut C,
    pub cache: &'a mut Cache,
}

impl<C: GenericClient> PgDb<'_, C> {
    fn statement(&mut self, sql: &str) -> DbResult<Statement> {
        if let Some(st) = self.cache.get(sql) {
            return Ok(st.clone());
        }
        let st = self.client.prepare(&numbered(sql))?;
        self.cache.insert(sql.to_string(), st.clone());
        Ok(st)
    }
}

fn refs(params: &[Value]) -> Vec<&(dyn ToSql + Sync)> {
    params.iter().map(|v| v as &(dyn ToSql + Sync)).collect()
}

impl<C: GenericClient> Db for PgDb<'_, C> {
    fn dialect(&self) -> Dialect {
        Dialect::Postgres
    }

    fn exec(&mut self, sql: &str, params: &[Value]) -> DbResult<u64> {
        let st = self.statement(sql)?;
        Ok(self.client.execute(&st, &refs(params))?)
    }

    fn rows(&mut self, sql: &str, params: &[Value]) -> DbResult<Vec<Row>> {
        let st = self.statement(sql)?;
        let rows = self.client.query(&st, &refs(params))?;
        rows.iter()
            .map(|r| {
                (0..r.len())
                    .map(|i| r.try_get::<_, Value>(i).map_err(DbError::from))
                    .collect::<DbResult<Vec<_>>>()
                    .map(Row)
            })
            .collect()
    }

    fn script(&mut self, sql: &str) -> DbResult<()> {
        Ok(self.client.batch_execute(sql)?)
    }
}

/// A connection to `url` (any libpq-style URL; a host that is a path is a Unix socket).
pub fn connect(url: &str) -> Result<Client> {
    let mut config: postgres::Config = url
        .parse()
        .map_err(|e| format!("{} is not a PostgreSQL URL: {e}", redact(url)))?;
    if config.get_application_name().is_none() {
        config.application_name("patchctl");
    }
    config.connect_timeout(Duration::from_secs(10));
    config
        .connect(NoTls)
        .map_err(|e| format!("cannot connect to {}: {}", redact(url), DbError::from(e)))
}

/// The URL without its password, for messages and logs.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (auth, tail) = match rest.find('@') {
        Some(at) if !rest[..at].contains('/') => (&rest[..at], &rest[at..]),
        _ => return url.to_string(),
    };
    match auth.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***{tail}"),
        None => url.to_string(),
    }
}

/// Whether a failed write is worth running again: the other replica won a race.
fn retryable(e: &DbError) -> bool {
    ["deadlock", "could not serialize", "duplicate key"]
        .iter()
        .any(|m| e.0.contains(m))
}

/// Runs `ops` in one transaction.
fn run_batch(client: &mut Client, cache: &mut Cache, ops: &mut [Op]) -> DbResult<()> {
    let mut tx = client.transaction()?;
    for op in ops.iter_mut() {
        op.apply(&mut PgDb {
            client: &mut tx,
            cache,
        })?;
    }
    tx.commit()?;
    Ok(())
}

/// Runs one write in its own transaction, again if it lost a race (at most three times).
fn run_one(client: &mut Client, cache: &mut Cache, op: &mut Op) -> DbResult<()> {
    let mut attempt = 0;
    loop {
        match run_batch(client, cache, std::slice::from_mut(op)) {
            Err(e) if attempt < 3 && retryable(&e) => attempt += 1,
            other => return other,
        }
    }
}

/// The writer thread's loop; see the module documentation. It reconnects when the server
/// went away, answering the writes it could not apply with the reason.
pub fn writer(url: String, client: Client, rx: mpsc::Receiver<Op>) {
    let mut client = Some(client);
    let mut cache = Cache::new();
    while let Some(mut batch) = next_batch(&rx) {
        batch.sort_by(|a, b| a.key().cmp(b.key()));
        let c = match client.take().filter(|c| !c.is_closed()) {
            Some(c) => c,
            None => {
                cache.clear();
                match connect(&url) {
                    Ok(c) => c,
                    Err(e) => {
                        for op in batch {
                            op.answer(Err(format!("database write failed: {e}")));
                        }
                        continue;
                    }
                }
            }
        };
        let c = client.insert(c);
        if run_batch(c, &mut cache, &mut batch).is_ok() {
            for op in batch {
                op.answer(Ok(()));
            }
            continue;
        }
        // Statements prepared in the failed transaction are still valid, but a lost
        // connection's are not: start afresh.
        cache.clear();
        for mut op in batch {
            let result =
                run_one(c, &mut cache, &mut op).map_err(|e| format!("database write failed: {e}"));
            op.answer(result);
        }
    }
}

/// A few connections for reads, opened as needed.
pub struct Readers {
    url: String,
    idle: Mutex<Vec<(Client, Cache)>>,
    permits: tokio::sync::Semaphore,
}

/// Reads at once, per process.
const READERS: usize = 8;

impl Readers {
    pub fn new(url: String, first: Client) -> Self {
        Self {
            url,
            idle: Mutex::new(vec![(first, Cache::new())]),
            permits: tokio::sync::Semaphore::new(READERS),
        }
    }

    /// Runs `f` in a read-only, repeatable-read transaction (one consistent view), on a
    /// blocking thread.
    pub async fn read<T: Send + 'static>(
        self: &std::sync::Arc<Self>,
        f: impl FnOnce(&mut dyn Db) -> DbResult<T> + Send + 'static,
    ) -> Result<T> {
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| "the database readers stopped".to_string())?;
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            let idle = this
                .idle
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .pop();
            let (mut client, mut cache) = match idle.filter(|(c, _)| !c.is_closed()) {
                Some(c) => c,
                None => (connect(&this.url)?, Cache::new()),
            };
            let result = (|| {
                let mut tx = client
                    .build_transaction()
                    .isolation_level(postgres::IsolationLevel::RepeatableRead)
                    .read_only(true)
                    .start()?;
                let out = f(&mut PgDb {
                    client: &mut tx,
                    cache: &mut cache,
                })?;
                tx.commit()?;
                Ok::<T, DbError>(out)
            })();
            if !client.is_closed() {
                this.idle
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .push((client, cache));
            }
            result.map_err(|e| format!("database read failed: {e}"))
        })
        .await
        .map_err(|e| e.to_string())?
    }
}

impl Drop for Readers {
    /// A blocking client closes by running its own small runtime, which must not happen on
    /// an async worker: the idle connections close on a thread of their own.
    fn drop(&mut self) {
        let idle = std::mem::take(
            self.idle
                .get_mut()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        if !idle.is_empty() {
            let _ = std::thread::Builder::new()
                .name("store-close".into())
                .spawn(move || drop(idle));
        }
    }
}

/// A `NOTIFY` this process listens for; `Resync` after the listener reconnected (notices may
/// have been missed: look at the database).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    Notify { channel: String, payload: String },
    Resync,
}

/// Listens on `channels` on a connection of its own, reconnecting as needed, for the life of
/// the process.
pub fn listen(url: String, channels: &[&str]) -> broadcast::Sender<Notice> {
    let (tx, _) = broadcast::channel(1024);
    let out = tx.clone();
    let listen: String = channels.iter().map(|c| format!("LISTEN {c};")).collect();
    let spawned = std::thread::Builder::new()
        .name("store-listener".into())
        .spawn(move || {
            let mut first = true;
            loop {
                let mut client = match connect(&url) {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, "Cannot listen for other controllers' notices; retrying in 1s");
                        std::thread::sleep(Duration::from_secs(1));
                        continue;
                    }
                };
                if let Err(e) = client.batch_execute(&listen) {
                    tracing::warn!(error = %e, "LISTEN failed; retrying in 1s");
                    std::thread::sleep(Duration::from_secs(1));
                    continue;
                }
                if !first {
                    let _ = tx.send(Notice::Resync);
                }
                first = false;
                loop {
                    let next = {
                        let mut n = client.notifications();
                        let mut it = n.timeout_iter(Duration::from_secs(1));
                        it.next().map(|m| {
                            m.map(|m| (m.channel().to_string(), m.payload().to_string()))
                        })
                    };
                    match next {
                        Ok(Some((channel, payload))) => {
                            let _ = tx.send(Notice::Notify { channel, payload });
                        }
                        Ok(None) => {
                            if client.is_closed() {
                                break;
                            }
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "The notice listener lost its connection; reconnecting");
                            break;
                        }
                    }
                }
            }
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "Cannot start the notice listener");
    }
    out
}
