//! The agent's side of signed jobs: the engine that admits, queues and runs them one at a time,
//! the state machine every job moves through, the durable journal that survives crashes and
//! reboots, and the hooks and checks a job may name. What a job may say and how an envelope is
//! verified is the wire contract, in `patch_agent_wire::job`.

pub mod clock;
pub mod engine;
pub mod hooks;
pub mod journal;
pub mod state;
