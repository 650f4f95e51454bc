//! The job state machine: one match over (state, event). Every allowed pair is an arm; anything
//! else is a typed error naming the state, so an impossible transition is a bug report, not a
//! silent overwrite.

use serde::{Deserialize, Serialize};

/// Every state a job can be in (the policies work fills in the middle ones).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum State {
    Queued,
    WaitingWindow,
    PreHook,
    Applying,
    Rebooting,
    Verifying,
    PostHook,
    Succeeded,
    SucceededRebootRequired,
    Failed,
    Cancelled,
    TimedOut,
    MissedWindow,
    Interrupted,
}

/// What happens to a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The engine takes the job off the queue.
    Start,
    /// The package operations finished; whether the host now needs a reboot.
    Applied {
        reboot_required: bool,
    },
    Fail(String),
    Cancel,
    Timeout,
    /// Found in APPLYING by a new agent process: the old one died mid-job.
    Recovered,
    /// Its expiry passed before it could start.
    Expired,
    /// Its maintenance window has not opened yet.
    WaitWindow,
    /// Pre-hooks start (from QUEUED/WAITING_WINDOW, instead of Start).
    StartHooks,
    /// Pre-hooks succeeded: apply.
    HooksDone,
    /// Packages applied: post-hooks start.
    PostHooks,
    /// Packages applied: post-patch checks start.
    Verify,
    /// The reboot command is about to run.
    Reboot,
    /// The host came back with a new boot id.
    Rebooted,
    /// Its maintenance window closed (or left too little time) before it could start.
    WindowMissed,
    /// About to start (or recovered after a restart), its envelope no longer verifies against
    /// the trust store: the key was removed.
    Untrusted(String),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{event:?} is not allowed in state {state:?}")]
pub struct NotAllowed {
    pub state: State,
    pub event: String,
}

impl State {
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            State::Succeeded
                | State::SucceededRebootRequired
                | State::Failed
                | State::Cancelled
                | State::TimedOut
                | State::MissedWindow
                | State::Interrupted
        )
    }

    /// The single transition function.
    pub fn next(self, event: &Event) -> Result<State, NotAllowed> {
        use State::*;
        let next = match (self, event) {
            (Queued, Event::Start) => Applying,
            (Queued, Event::Cancel) => Cancelled,
            (Queued, Event::Expired) => Failed,
            (Queued, Event::Recovered) => Queued,
            (Queued | WaitingWindow, Event::StartHooks) => PreHook,
            (PreHook, Event::HooksDone) => Applying,
            (Applying, Event::PostHooks) => PostHook,
            (Applying, Event::Verify) => Verifying,
            (Applying, Event::Reboot) => Rebooting,
            (Rebooting, Event::Rebooted) => Verifying,
            (Rebooting, Event::Fail(_)) => Failed,
            (Rebooting, Event::Timeout) => TimedOut,
            (Verifying, Event::PostHooks) => PostHook,
            (
                Verifying,
                Event::Applied {
                    reboot_required: false,
                },
            ) => Succeeded,
            (
                Verifying,
                Event::Applied {
                    reboot_required: true,
                },
            ) => SucceededRebootRequired,
            (Verifying, Event::Fail(_)) => Failed,
            (Verifying, Event::Timeout) => TimedOut,
            (Verifying, Event::Recovered) => Interrupted,
            (
                PostHook,
                Event::Applied {
                    reboot_required: false,
                },
            ) => Succeeded,
            (
                PostHook,
                Event::Applied {
                    reboot_required: true,
                },
            ) => SucceededRebootRequired,
            (PreHook | PostHook, Event::Fail(_)) => Failed,
            (PreHook | PostHook, Event::Timeout) => TimedOut,
            (PreHook | PostHook, Event::Recovered) => Interrupted,
            (PreHook, Event::Cancel) => Cancelled,
            (Queued, Event::WaitWindow) => WaitingWindow,
            (Queued | WaitingWindow, Event::WindowMissed) => MissedWindow,
            (WaitingWindow, Event::Start) => Applying,
            (WaitingWindow, Event::Cancel) => Cancelled,
            (WaitingWindow, Event::Expired) => Failed,
            (WaitingWindow, Event::Recovered) => WaitingWindow,
            (
                Applying,
                Event::Applied {
                    reboot_required: false,
                },
            ) => Succeeded,
            (
                Applying,
                Event::Applied {
                    reboot_required: true,
                },
            ) => SucceededRebootRequired,
            (Applying, Event::Fail(_)) => Failed,
            (Applying, Event::Cancel) => Cancelled,
            (Applying, Event::Timeout) => TimedOut,
            (Applying, Event::Recovered) => Interrupted,
            (Queued | WaitingWindow | Rebooting | Applying, Event::Untrusted(_)) => Failed,
            // Found queued after a restart, it cannot be validated again.
            (Queued | WaitingWindow, Event::Fail(_)) => Failed,
            (state, event) => {
                return Err(NotAllowed {
                    state,
                    event: format!("{event:?}"),
                });
            }
        };
        Ok(next)
    }

    pub fn to_proto(self) -> patch_agent_wire::proto::v1::JobState {
        use patch_agent_wire::proto::v1::JobState as P;
        match self {
            State::Queued => P::Queued,
            State::WaitingWindow => P::WaitingWindow,
            State::PreHook => P::PreHook,
            State::Applying => P::Applying,
            State::Rebooting => P::Rebooting,
            State::Verifying => P::Verifying,
            State::PostHook => P::PostHook,
            State::Succeeded => P::Succeeded,
            State::SucceededRebootRequired => P::SucceededRebootRequired,
            State::Failed => P::Failed,
            State::Cancelled => P::Cancelled,
            State::TimedOut => P::TimedOut,
            State::MissedWindow => P::MissedWindow,
            State::Interrupted => P::Interrupted,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transitions() {
        assert_eq!(State::Queued.next(&Event::Start), Ok(State::Applying));
        assert_eq!(
            State::Applying.next(&Event::Applied {
                reboot_required: true
            }),
            Ok(State::SucceededRebootRequired)
        );
        assert_eq!(
            State::Applying.next(&Event::Recovered),
            Ok(State::Interrupted)
        );
        assert_eq!(State::Queued.next(&Event::Cancel), Ok(State::Cancelled));
        let e = State::Succeeded.next(&Event::Start).expect_err("terminal");
        assert_eq!(e.state, State::Succeeded);
        assert!(State::Interrupted.is_terminal() && !State::Applying.is_terminal());
        assert_eq!(
            State::Queued.next(&Event::WaitWindow),
            Ok(State::WaitingWindow)
        );
        assert_eq!(
            State::WaitingWindow.next(&Event::Start),
            Ok(State::Applying)
        );
        assert_eq!(
            State::WaitingWindow.next(&Event::WindowMissed),
            Ok(State::MissedWindow)
        );
        assert!(State::Applying.next(&Event::WindowMissed).is_err());
        for s in [
            State::Succeeded,
            State::Failed,
            State::Cancelled,
            State::TimedOut,
            State::Interrupted,
        ] {
            for ev in [
                Event::Start,
                Event::Cancel,
                Event::Recovered,
                Event::Timeout,
            ] {
                assert!(s.next(&ev).is_err(), "{s:?} {ev:?}");
            }
        }
    }
}
