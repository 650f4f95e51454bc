//! What a job did to one package: one enum in the journal, on the wire and in `patchctl`.

use crate::proto::v1 as pb;
use serde::{Deserialize, Serialize};

/// A package's outcome. Serialized as its words, which are also the journal's format from
/// before the enum existed, so old journal files read the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    #[serde(rename = "planned")]
    Planned,
    #[serde(rename = "would change (dry run)")]
    WouldChange,
    #[serde(rename = "changed")]
    Changed,
    #[serde(rename = "installed")]
    Installed,
    #[serde(rename = "unchanged")]
    Unchanged,
    #[serde(rename = "not installed")]
    NotInstalled,
    #[serde(rename = "changed (not to the planned version)")]
    OffPlan,
    #[serde(rename = "removed (not planned)")]
    RemovedUnplanned,
}

const ALL: [Outcome; 8] = [
    Outcome::Planned,
    Outcome::WouldChange,
    Outcome::Changed,
    Outcome::Installed,
    Outcome::Unchanged,
    Outcome::NotInstalled,
    Outcome::OffPlan,
    Outcome::RemovedUnplanned,
];

impl Outcome {
    /// The words, as `PackageResult.outcome` and the journal carry them.
    pub fn text(self) -> &'static str {
        match self {
            Outcome::Planned => "planned",
            Outcome::WouldChange => "would change (dry run)",
            Outcome::Changed => "changed",
            Outcome::Installed => "installed",
            Outcome::Unchanged => "unchanged",
            Outcome::NotInstalled => "not installed",
            Outcome::OffPlan => "changed (not to the planned version)",
            Outcome::RemovedUnplanned => "removed (not planned)",
        }
    }

    /// Whether the job installed or moved the package (to the planned version or not), as
    /// rollouts count "packages changed". An unplanned removal is counted as a failure instead.
    pub fn changed_the_host(self) -> bool {
        matches!(
            self,
            Outcome::Changed | Outcome::Installed | Outcome::OffPlan
        )
    }

    pub fn to_proto(self) -> pb::PackageOutcome {
        match self {
            Outcome::Planned => pb::PackageOutcome::Planned,
            Outcome::WouldChange => pb::PackageOutcome::WouldChange,
            Outcome::Changed => pb::PackageOutcome::Changed,
            Outcome::Installed => pb::PackageOutcome::Installed,
            Outcome::Unchanged => pb::PackageOutcome::Unchanged,
            Outcome::NotInstalled => pb::PackageOutcome::NotInstalled,
            Outcome::OffPlan => pb::PackageOutcome::OffPlan,
            Outcome::RemovedUnplanned => pb::PackageOutcome::RemovedUnplanned,
        }
    }

    /// A reported package's outcome: its `result`, or for an agent that sends only the text,
    /// the text. None when neither is known.
    pub fn of(p: &pb::PackageResult) -> Option<Outcome> {
        match pb::PackageOutcome::try_from(p.result) {
            Ok(pb::PackageOutcome::Unspecified) | Err(_) => {
                ALL.into_iter().find(|o| o.text() == p.outcome)
            }
            Ok(r) => ALL.into_iter().find(|o| o.to_proto() == r),
        }
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.text())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_proto_and_journal_agree() {
        for o in ALL {
            let json = serde_json::to_string(&o).expect("json");
            assert_eq!(json, format!("\"{}\"", o.text()));
            let by_result = pb::PackageResult {
                result: o.to_proto() as i32,
                ..Default::default()
            };
            let by_text = pb::PackageResult {
                outcome: o.text().into(),
                ..Default::default()
            };
            assert_eq!(Outcome::of(&by_result), Some(o));
            assert_eq!(Outcome::of(&by_text), Some(o));
        }
        assert_eq!(Outcome::of(&pb::PackageResult::default()), None);
        assert!(Outcome::Changed.changed_the_host() && Outcome::OffPlan.changed_the_host());
        assert!(!Outcome::Unchanged.changed_the_host() && !Outcome::WouldChange.changed_the_host());
    }
}
