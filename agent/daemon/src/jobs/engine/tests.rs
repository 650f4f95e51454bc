use super::*;
use crate::pkg::SlaClass;

fn u(name: &str, class: Classification, sev: Severity, issued_days_ago: Option<u64>) -> Update {
    let now = SystemTime::now();
    Update {
        name: name.into(),
        arch: "all".into(),
        installed_version: "1".into(),
        candidate_version: "2".into(),
        origin: String::new(),
        classification: class,
        severity: sev,
        advisories: vec![],
        cves: vec![],
        issued: issued_days_ago.map(|d| now - Duration::from_secs(d * 86_400)),
        first_seen: Some(now),
        sla: SlaClass::of(class, sev),
        category: String::new(),
        bug_ids: vec![],
        flags: Default::default(),
    }
}

#[test]
fn selection_rules() {
    use Classification::*;
    let all = [
        u("crit", Security, Severity::Critical, Some(100)),
        u("mod", Security, Severity::Moderate, Some(40)),
        u("deb", Security, Severity::Unknown, None),
        u("bug", Bugfix, Severity::Unknown, Some(100)),
        u("libfoo", Other, Severity::Unknown, None),
    ];
    let names = |v: Vec<&Update>| v.iter().map(|u| u.name.clone()).collect::<Vec<_>>();
    let now = SystemTime::now();
    assert_eq!(
        names(select(&all, false, None, &[], 0, now).0),
        ["crit", "mod", "deb", "bug", "libfoo"]
    );
    assert_eq!(
        names(select(&all, true, None, &[], 0, now).0),
        ["crit", "mod", "deb"]
    );
    assert_eq!(
        names(select(&all, true, Some(Severity::Important), &[], 0, now).0),
        ["crit", "deb"]
    );
    assert_eq!(
        names(select(&all, true, Some(Severity::Critical), &[], 0, now).0),
        ["crit"]
    );
    let ex = [
        patch_agent_wire::job::Exclude::Name("crit".into()),
        patch_agent_wire::job::Exclude::Pattern(
            "lib*".into(),
            regex::Regex::new("^(?:lib.*)$").expect("re"),
        ),
    ];
    assert_eq!(
        names(select(&all, false, None, &ex, 0, now).0),
        ["mod", "deb", "bug"]
    );
    let (chosen, skipped) = select(&all, false, None, &[], 50, now);
    assert_eq!(names(chosen), ["crit", "bug"]);
    assert!(
        skipped
            .iter()
            .any(|(u, why)| u.name == "deb" && why.contains("first seen 0 day"))
    );
    assert!(
        skipped
            .iter()
            .any(|(u, why)| u.name == "mod" && why.contains("advisory issued 40 day"))
    );
}
