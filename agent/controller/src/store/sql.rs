//! The one seam between the store's logic and its two databases.
//!
//! Every query of the store is written once, against [`Db`], in the SQL both SQLite and
//! PostgreSQL accept: `?N` placeholders (rewritten to `$N` for PostgreSQL), `ON CONFLICT`
//! upserts, `CAST(... AS BIGINT)` around sums. Where the dialects part (a row's physical id,
//! reading a JSON label), the code asks [`Db::dialect`]. Values cross as [`Value`]: integers
//! (flags are 0/1), reals, text, bytes, null; each backend converts them to and from its own
//! types, so a query's meaning does not depend on which database runs it.

use std::fmt;

/// Which database runs the query, for the few places their SQL differs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Postgres,
}

impl Dialect {
    /// A row's physical id, for deleting a bounded batch from a table without a key.
    pub fn row_id(self) -> &'static str {
        match self {
            Dialect::Sqlite => "rowid",
            Dialect::Postgres => "ctid",
        }
    }

    /// The database's clock in unix seconds: replicas on several machines agree on it.
    pub fn now(self) -> &'static str {
        match self {
            Dialect::Sqlite => "CAST(strftime('%s', 'now') AS INTEGER)",
            Dialect::Postgres => "CAST(extract(epoch FROM clock_timestamp()) AS BIGINT)",
        }
    }

    /// The text of a key of a JSON object stored as text in `column`.
    pub fn json_text(self, column: &str, key: &str) -> String {
        match self {
            Dialect::Sqlite => format!("json_extract({column}, '$.{key}')"),
            Dialect::Postgres => format!("(({column})::jsonb ->> '{key}')"),
        }
    }
}

/// One value in or out of a query.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Int(i64),
    Real(f64),
    Text(String),
    Bytes(Vec<u8>),
}

/// A query failed; the message names the database's reason.
#[derive(Debug, Clone, PartialEq)]
pub struct DbError(pub String);

impl fmt::Display for DbError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for DbError {}

pub type DbResult<T> = std::result::Result<T, DbError>;

/// A connection, or a transaction on one: what every store function runs against.
pub trait Db {
    fn dialect(&self) -> Dialect;
    /// Runs a statement; the rows it changed.
    fn exec(&mut self, sql: &str, params: &[Value]) -> DbResult<u64>;
    /// Runs a query; every row it returned.
    fn rows(&mut self, sql: &str, params: &[Value]) -> DbResult<Vec<Row>>;
    /// Runs several statements separated by `;`, without parameters (schema changes).
    fn script(&mut self, sql: &str) -> DbResult<()>;

    /// The first row, if any.
    fn row(&mut self, sql: &str, params: &[Value]) -> DbResult<Option<Row>> {
        Ok(self.rows(sql, params)?.into_iter().next())
    }
}

/// One returned row.
#[derive(Debug, Clone, PartialEq)]
pub struct Row(pub Vec<Value>);

fn wrong(i: usize, want: &str, got: &Value) -> DbError {
    DbError(format!("column {i}: expected {want}, found {got:?}"))
}

impl Row {
    fn at(&self, i: usize) -> DbResult<&Value> {
        self.0
            .get(i)
            .ok_or_else(|| DbError(format!("no column {i} in the row")))
    }

    pub fn opt_i64(&self, i: usize) -> DbResult<Option<i64>> {
        match self.at(i)? {
            Value::Null => Ok(None),
            Value::Int(n) => Ok(Some(*n)),
            v => Err(wrong(i, "an integer", v)),
        }
    }

    pub fn i64(&self, i: usize) -> DbResult<i64> {
        self.opt_i64(i)?
            .ok_or_else(|| wrong(i, "an integer", &Value::Null))
    }

    /// An integer that fits `T` (an enum's number, an index).
    pub fn int<T: TryFrom<i64>>(&self, i: usize) -> DbResult<T> {
        let n = self.i64(i)?;
        T::try_from(n).map_err(|_| DbError(format!("column {i}: {n} is out of range")))
    }

    pub fn bool(&self, i: usize) -> DbResult<bool> {
        Ok(self.i64(i)? != 0)
    }

    pub fn f64(&self, i: usize) -> DbResult<f64> {
        match self.at(i)? {
            Value::Real(x) => Ok(*x),
            Value::Int(n) => Ok(*n as f64),
            v => Err(wrong(i, "a number", v)),
        }
    }

    pub fn opt_f64(&self, i: usize) -> DbResult<Option<f64>> {
        match self.at(i)? {
            Value::Null => Ok(None),
            _ => self.f64(i).map(Some),
        }
    }

    pub fn opt_text(&self, i: usize) -> DbResult<Option<String>> {
        match self.at(i)? {
            Value::Null => Ok(None),
            Value::Text(s) => Ok(Some(s.clone())),
            v => Err(wrong(i, "text", v)),
        }
    }

    pub fn text(&self, i: usize) -> DbResult<String> {
        self.opt_text(i)?
            .ok_or_else(|| wrong(i, "text", &Value::Null))
    }

    pub fn opt_bytes(&self, i: usize) -> DbResult<Option<Vec<u8>>> {
        match self.at(i)? {
            Value::Null => Ok(None),
            Value::Bytes(b) => Ok(Some(b.clone())),
            v => Err(wrong(i, "bytes", v)),
        }
    }

    pub fn bytes(&self, i: usize) -> DbResult<Vec<u8>> {
        self.opt_bytes(i)?
            .ok_or_else(|| wrong(i, "bytes", &Value::Null))
    }
}

impl From<i64> for Value {
    fn from(n: i64) -> Self {
        Value::Int(n)
    }
}

impl From<i32> for Value {
    fn from(n: i32) -> Self {
        Value::Int(n.into())
    }
}

impl From<u32> for Value {
    fn from(n: u32) -> Self {
        Value::Int(n.into())
    }
}

impl From<usize> for Value {
    fn from(n: usize) -> Self {
        Value::Int(i64::try_from(n).unwrap_or(i64::MAX))
    }
}

impl From<u64> for Value {
    fn from(n: u64) -> Self {
        Value::Int(i64::try_from(n).unwrap_or(i64::MAX))
    }
}

impl From<bool> for Value {
    fn from(b: bool) -> Self {
        Value::Int(b.into())
    }
}

impl From<f64> for Value {
    fn from(x: f64) -> Self {
        Value::Real(x)
    }
}

impl From<&str> for Value {
    fn from(s: &str) -> Self {
        Value::Text(s.to_string())
    }
}

impl From<&String> for Value {
    fn from(s: &String) -> Self {
        Value::Text(s.clone())
    }
}

impl From<String> for Value {
    fn from(s: String) -> Self {
        Value::Text(s)
    }
}

impl From<&[u8]> for Value {
    fn from(b: &[u8]) -> Self {
        Value::Bytes(b.to_vec())
    }
}

impl From<Vec<u8>> for Value {
    fn from(b: Vec<u8>) -> Self {
        Value::Bytes(b)
    }
}

impl From<&Vec<u8>> for Value {
    fn from(b: &Vec<u8>) -> Self {
        Value::Bytes(b.clone())
    }
}

impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(v: Option<T>) -> Self {
        v.map_or(Value::Null, Into::into)
    }
}

/// Query parameters: `p![a, b]` is `&[Value::from(a), Value::from(b)]`.
macro_rules! p {
    ($($v:expr),* $(,)?) => {
        &[$($crate::store::sql::Value::from($v)),*][..]
    };
}
pub(crate) use p;

/// `?N` placeholders as PostgreSQL's `$N`. The store's SQL has no `?` inside string literals.
pub fn numbered(sql: &str) -> String {
    sql.replace('?', "$")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_read_what_they_hold_and_name_what_they_do_not() {
        let r = Row(vec![
            Value::Int(3),
            Value::Null,
            Value::Text("x".into()),
            Value::Bytes(vec![1]),
            Value::Real(1.5),
        ]);
        assert_eq!(r.i64(0), Ok(3));
        assert_eq!(r.int::<u8>(0), Ok(3));
        assert!(r.bool(0).expect("bool"));
        assert_eq!(r.opt_i64(1), Ok(None));
        assert_eq!(r.text(2).as_deref(), Ok("x"));
        assert_eq!(r.bytes(3), Ok(vec![1]));
        assert_eq!(r.f64(4), Ok(1.5));
        assert_eq!(r.f64(0), Ok(3.0));
        assert!(r.i64(1).expect_err("fails").0.contains("column 1"));
        assert!(r.text(0).expect_err("fails").0.contains("expected text"));
        assert!(r.i64(9).expect_err("fails").0.contains("no column 9"));
        assert!(Row(vec![Value::Int(-1)]).int::<u32>(0).is_err());
    }

    #[test]
    fn placeholders_are_numbered_for_postgres() {
        assert_eq!(
            numbered("SELECT a FROM t WHERE b = ?1 AND c = ?12"),
            "SELECT a FROM t WHERE b = $1 AND c = $12"
        );
    }
}
