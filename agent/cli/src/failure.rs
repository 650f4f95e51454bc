//! The kinds of failure a `patchctl` caller acts on, and the exit status of each. Everything
//! else (an agent or controller unreachable, a file that cannot be read, a call refused) is a
//! plain error at the edge: exit 1.

/// A failure with its own exit status.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// What the operator gave is wrong: flags, a job template an agent would refuse, an
    /// inventory file. Fix it and run again. Exit 2, as for a usage error.
    #[error("{0}")]
    Invalid(String),
    /// The command ran to its end, and the job or the rollout did not succeed. Exit 3.
    #[error("{0}")]
    NotSucceeded(String),
}

/// Exit status: the command did what was asked.
pub const OK: u8 = 0;
/// Exit status: the command could not be carried out (unreachable, refused, I/O).
pub const FAILED: u8 = 1;

impl Failure {
    pub fn exit_code(&self) -> u8 {
        match self {
            Failure::Invalid(_) => 2,
            Failure::NotSucceeded(_) => 3,
        }
    }
}

/// The exit status for an error that reached `main`.
pub fn exit_code(e: &anyhow::Error) -> u8 {
    e.downcast_ref::<Failure>()
        .map_or(FAILED, Failure::exit_code)
}

/// `Err(Failure::Invalid(..))` with a formatted message.
#[macro_export]
macro_rules! invalid {
    ($($arg:tt)*) => {
        return Err($crate::failure::Failure::Invalid(format!($($arg)*)).into())
    };
}
