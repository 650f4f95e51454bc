//! One write, queued to a backend's writer thread: applied inside the batch's transaction,
//! answered only after the commit.

use super::Result;
use super::sql::{Db, DbResult};
use tokio::sync::oneshot;

/// Most writes applied in one transaction.
pub const BATCH: usize = 512;

pub trait Call: Send {
    /// Writes are applied in the order of their keys (the host they touch), so two writers
    /// on one database take row locks in the same order and never deadlock on each other.
    fn key(&self) -> &str;
    /// Applies the write; it may run again (in a transaction of its own) when its batch
    /// failed, so it keeps its inputs.
    fn apply(&mut self, db: &mut dyn Db) -> DbResult<()>;
    fn answer(self: Box<Self>, result: Result<()>);
}

pub type Op = Box<dyn Call>;

/// The next batch: waits for one write, then takes whatever else is queued, up to [`BATCH`].
/// None when every sender is gone (the store was dropped): the writer thread ends.
pub fn next_batch(rx: &std::sync::mpsc::Receiver<Op>) -> Option<Vec<Op>> {
    let first = rx.recv().ok()?;
    let mut batch = vec![first];
    while batch.len() < BATCH {
        match rx.try_recv() {
            Ok(op) => batch.push(op),
            Err(_) => break,
        }
    }
    Some(batch)
}

pub struct Write<T, F> {
    pub key: String,
    pub f: F,
    pub out: Option<T>,
    pub tx: oneshot::Sender<Result<T>>,
}

impl<T, F> Call for Write<T, F>
where
    T: Send,
    F: FnMut(&mut dyn Db) -> DbResult<T> + Send,
{
    fn key(&self) -> &str {
        &self.key
    }

    fn apply(&mut self, db: &mut dyn Db) -> DbResult<()> {
        self.out = Some((self.f)(db)?);
        Ok(())
    }

    fn answer(self: Box<Self>, result: Result<()>) {
        let Write { out, tx, .. } = *self;
        let _ =
            tx.send(result.and_then(|()| out.ok_or_else(|| "the write was not applied".into())));
    }
}
