//! The zypper parsers against output shaped as zypper 1.14 prints it (captured from the real
//! zypper on the test sandbox, trimmed).

use super::*;
use crate::pkg::{Classification, Severity, SlaClass};
use std::time::UNIX_EPOCH;

const LIST_UPDATES: &str = r#"<?xml version='1.0'?>
<stream>
<message type="error">Specified path &apos;/sb/nonexistent&apos; is not a directory: file:/sb/nonexistent</message>
<prompt id="8">
<text>Abort, retry, ignore?</text>
<option default="1" value="a" desc="Skip retrieval of the file and abort current operation."/>
</prompt>
<message type="error">Error building the cache:
[gone|file:/sb/nonexistent] Valid metadata not found at specified URL
History:
 - Unknown error reading from &apos;file:/sb/nonexistent&apos;
</message>
<message type="warning">Skipping repository &apos;gone&apos; because of the above error.</message>
<message type="info">Loading repository data...</message>
<update-status version="0.6">
<update-list>
<update kind="package" name="crit" edition="1.1-1" arch="noarch" edition-old="1.0-1"><summary>s</summary><description>d</description><license/><source url="file:/sb/repo" alias="test"/></update><update kind="package" name="plain" edition="2:1.1-1" arch="x86_64" edition-old="2:1.0-1"><summary>s</summary><description/><license/><source url="file:/sb/repo" alias="test"/></update><update kind="package" name="zypp-stack" edition="1.1-1" arch="noarch" edition-old="1.0-1"><summary/><source alias="test"/></update><update kind="package" name="libA" edition="1.1-1" arch="x86_64" edition-old="1.0-1"><source alias="test"/></update>
</update-list>
</update-status>
</stream>
"#;

const LIST_PATCHES: &str = r#"<?xml version='1.0'?>
<stream>
<message type="info">Reading installed packages...</message>
<update-status version="0.6">
<update-list>
<update kind="patch" name="SUSE-2026-6" edition="1" arch="noarch" status="needed" category="recommended" severity="important" pkgmanager="true" restart="false" interactive="false"><summary>stack</summary><source alias="test"/><issue-date time_t="1775001600" text="2026-04-01T00:00:00Z"/><issue-list/></update></update-list>
<blocked-update-list>
<update kind="patch" name="SUSE-2026-1" edition="1" arch="noarch" status="needed" category="security" severity="critical" pkgmanager="false" restart="false" interactive="false"><summary>crit update</summary><source url="file:/sb/repo" alias="test"/><issue-date time_t="1767225600" text="2026-01-01T00:00:00Z"/><issue-list><issue type="cve" id="CVE-2026-0001"><title>CVE-2026-0001</title></issue><issue type="cve" id="CVE-2026-0002"><title/></issue><issue type="bugzilla" id="1234"><title>bug</title></issue></issue-list></update><update kind="patch" name="SUSE-2026-9" edition="1" arch="noarch" status="needed" category="recommended" severity="moderate" pkgmanager="false" restart="true" interactive="true"><source alias="test"/><issue-date time_t="1772323200"/></update><update kind="patch" name="SUSE-2026-8" edition="1" arch="noarch" status="needed" category="optional" severity="low" pkgmanager="false" restart="false" interactive="false"><source alias="test"/></update>
</blocked-update-list>
</update-status>
</stream>
"#;

const PATCH_INFO: &str = "Loading repository data...
Reading installed packages...


Information for patch SUSE-2026-1:
----------------------------------
Repository  : test
Name        : SUSE-2026-1
Status      : needed
Category    : security
Interactive : ---
Summary     : crit update
Description : 
    a description line : with a colon
Provides    : patch:SUSE-2026-1 = 1
Conflicts   : crit < 1.1-1


Information for patch SUSE-2026-9:
----------------------------------
Name        : SUSE-2026-9
Conflicts   : [3]
    crit < 1.1-1
    srcpackage:crit < 1.1-1
    libA.x86_64 < 1.1-1

Information for patch SUSE-2026-6:
----------------------------------
Conflicts   : zypp-stack < 1.1-1

Information for patch SUSE-2026-8:
----------------------------------
Conflicts   : [2]
    libA.i586 < 1.1-1
    libB < 1.1-1
";

#[test]
fn list_updates_packages_and_skipped_repositories() {
    let s = parse_xml(LIST_UPDATES).expect("parses");
    let names: Vec<(&str, &str, &str, &str)> = s
        .updates
        .iter()
        .map(|u| {
            (
                u.name.as_str(),
                u.edition_old.as_str(),
                u.edition.as_str(),
                u.repo.as_str(),
            )
        })
        .collect();
    assert_eq!(
        names,
        [
            ("crit", "1.0-1", "1.1-1", "test"),
            ("plain", "2:1.0-1", "2:1.1-1", "test"),
            ("zypp-stack", "1.0-1", "1.1-1", "test"),
            ("libA", "1.0-1", "1.1-1", "test"),
        ]
    );
    let e = repo_errors(&s.messages);
    assert_eq!(e.len(), 1);
    assert_eq!(e[0].repo, "gone");
    assert_eq!(
        e[0].error,
        "Valid metadata not found at specified URL (file:/sb/nonexistent)"
    );
}

#[test]
fn skipped_repositories_in_text_output() {
    let text = "Retrieving repository 'gone' metadata [.error]\nRepository 'gone' is invalid.\n[gone|file:/sb/nonexistent] Valid metadata not found at specified URL\nWarning: Skipping repository 'gone' because of the above error.\n";
    let e = repo_errors(&[("error".to_string(), text.to_string())]);
    assert_eq!(e.len(), 1);
    assert_eq!(e[0].repo, "gone");
    assert!(
        e[0].error.contains("Valid metadata not found"),
        "{}",
        e[0].error
    );
}

#[test]
fn an_untagged_error_before_the_skip_is_the_reason() {
    let msgs = vec![
        ("info".to_string(), "Repository 'test' is up to date.".to_string()),
        (
            "error".to_string(),
            "Error building the cache:\n[|] Failed to cache repo (1).\nHistory:\n - 'repo2solv' '-o' 'solv'\n/raw/test/repodata/x-updateinfo.xml.gz: No such file or directory\n".to_string(),
        ),
        (
            "error".to_string(),
            "Skipping repository 'test' because of the above error.".to_string(),
        ),
    ];
    let e = repo_errors(&msgs);
    assert_eq!(e[0].repo, "test");
    assert!(
        e[0].error
            .starts_with("Error building the cache: [|] Failed to cache repo (1).")
            && e[0].error.ends_with("No such file or directory"),
        "{}",
        e[0].error
    );
}

#[test]
fn refresh_errors_without_a_reason_still_name_the_repository() {
    let msgs = vec![(
        "error".to_string(),
        "Skipping repository 'other' because of the above error.".to_string(),
    )];
    let e = repo_errors(&msgs);
    assert_eq!(e[0].repo, "other");
    assert!(e[0].error.contains("skipped"));
}

#[test]
fn patches_categories_severities_references_flags() {
    let s = parse_xml(LIST_PATCHES).expect("parses");
    assert_eq!(s.updates.len(), 4);
    let crit = &s.updates[1];
    assert_eq!(
        (crit.category.as_str(), crit.severity.as_str()),
        ("security", "critical")
    );
    assert_eq!(crit.cves, ["CVE-2026-0001", "CVE-2026-0002"]);
    assert_eq!(crit.bugs, ["1234"]);
    assert_eq!(
        crit.issued,
        Some(UNIX_EPOCH + Duration::from_secs(1_767_225_600))
    );
    assert!(s.updates[0].flags.update_stack);
    assert!(s.updates[2].flags.interactive && s.updates[2].flags.reboot_suggested);
}

#[test]
fn patch_members_from_conflicts() {
    let m = parse_patch_info(PATCH_INFO);
    assert_eq!(m["SUSE-2026-1"], ["crit"]);
    assert_eq!(m["SUSE-2026-9"], ["crit", "libA.x86_64"]);
    assert_eq!(m["SUSE-2026-6"], ["zypp-stack"]);
    assert_eq!(m["SUSE-2026-8"], ["libA.i586", "libB"]);
}

#[test]
fn assembled_updates_carry_their_patches() {
    let packages = parse_xml(LIST_UPDATES).expect("p").updates;
    let patches = parse_xml(LIST_PATCHES).expect("x").updates;
    let u = assemble(&packages, &patches, &parse_patch_info(PATCH_INFO));
    let by = |n: &str| u.iter().find(|u| u.name == n).expect(n);
    // The update stack first.
    assert_eq!(u[0].name, "zypp-stack");
    assert!(u[0].flags.update_stack);
    assert_eq!(u[0].classification, Classification::Bugfix);
    let crit = by("crit");
    assert_eq!(crit.classification, Classification::Security);
    assert_eq!(crit.category, "security");
    assert_eq!(crit.severity, Severity::Critical);
    assert_eq!(crit.sla, SlaClass::Critical);
    assert_eq!(crit.advisories, ["SUSE-2026-1", "SUSE-2026-9"]);
    assert_eq!(crit.cves, ["CVE-2026-0001", "CVE-2026-0002"]);
    assert_eq!(crit.bug_ids, ["1234"]);
    assert_eq!(
        crit.issued,
        Some(UNIX_EPOCH + Duration::from_secs(1_767_225_600))
    );
    assert!(crit.flags.interactive && crit.flags.reboot_suggested);
    assert_eq!(
        (
            crit.installed_version.as_str(),
            crit.candidate_version.as_str()
        ),
        ("1.0-1", "1.1-1")
    );
    // libA.x86_64 is in SUSE-2026-9; the i586 build in SUSE-2026-8 is another package.
    assert_eq!(by("libA").advisories, ["SUSE-2026-9"]);
    let plain = by("plain");
    assert_eq!(
        (plain.classification, plain.severity, plain.sla),
        (Classification::Other, Severity::Unknown, SlaClass::Low)
    );
    assert!(plain.advisories.is_empty() && plain.category.is_empty());
}

#[test]
fn categories() {
    assert_eq!(classify("security"), Classification::Security);
    assert_eq!(classify("recommended"), Classification::Bugfix);
    assert_eq!(classify("optional"), Classification::Enhancement);
    assert_eq!(classify("feature"), Classification::Enhancement);
    assert_eq!(classify("document"), Classification::Other);
    assert_eq!(classify("yast"), Classification::Other);
}

#[test]
fn cut_short_xml_is_an_error() {
    let cut = &LIST_UPDATES[..LIST_UPDATES.len() / 2];
    assert!(parse_xml(cut).is_err());
}

#[test]
fn exit_codes() {
    assert_eq!(Exit::of(Some(0)), Exit::Ok);
    assert_eq!(Exit::of(Some(7)), Exit::Locked);
    assert_eq!(Exit::of(Some(100)), Exit::UpdatesNeeded);
    assert_eq!(Exit::of(Some(101)), Exit::UpdatesNeeded);
    assert_eq!(Exit::of(Some(102)), Exit::RebootNeeded);
    assert_eq!(Exit::of(Some(103)), Exit::RestartNeeded);
    assert_eq!(Exit::of(Some(104)), Exit::NotFound);
    assert_eq!(Exit::of(Some(106)), Exit::ReposSkipped);
    assert_eq!(Exit::of(Some(107)), Exit::ScriptFailed);
    assert_eq!(Exit::of(Some(4)), Exit::Error(Some(4)));
    assert_eq!(Exit::of(None), Exit::Error(None));
}

#[test]
fn scriptlet_failures_name_the_package() {
    let out = "(1/1) Installing: broken-1.1-1.noarch [......done]\nAdditional rpm output:\nbroken: post-install failed on purpose\nwarning: %post(broken-1.1-1.noarch) scriptlet failed, exit status 1\n";
    assert_eq!(
        failed_scriptlets(out),
        ["broken-1.1-1.noarch %post failed, exit status 1"]
    );
    assert!(failed_scriptlets("nothing here").is_empty());
}

#[test]
fn licence_refusals() {
    let out = "lic License Agreement\nYou must agree.\nIn order to install 'lic', you must agree to terms of the following license agreement:\nAborting installation due to the need for license confirmation. Please restart the operation in interactive mode and confirm your agreement with required licenses, or use the --auto-agree-with-licenses option.\n";
    assert_eq!(
        licence_refusal(out).as_deref(),
        Some("lic asks for its licence to be agreed to")
    );
    assert_eq!(licence_refusal("all fine"), None);
}

#[test]
fn commands() {
    let cfg = ZypperConfig {
        program: "zypper".into(),
        args: vec!["--root".into(), "/sb".into()],
        rpm: "rpm".into(),
        root: root_of(&["--root".into(), "/sb".into()]),
        rpm_dbpath: "/var/lib/rpm".into(),
        command_timeout: Duration::from_secs(1),
        refresh_timeout: Duration::from_secs(1),
        lock_timeout: Duration::from_secs(42),
        apply_timeout: Duration::from_secs(1),
    };
    let up = cfg.apply_command(
        &super::super::Op::Upgrade("crit".into()),
        ApplyOptions::default(),
    );
    assert_eq!(
        up.args,
        [
            "--root",
            "/sb",
            "--non-interactive",
            "--no-color",
            "--no-refresh",
            "update",
            "--",
            "crit"
        ]
    );
    assert!(up.env.contains(&("ZYPP_LOCK_TIMEOUT".into(), "42".into())));
    let install = cfg.apply_command(
        &super::super::Op::Install {
            name: "crit".into(),
            version: Some("1.0-1".into()),
        },
        ApplyOptions {
            accept_licenses: true,
            allow_repo_errors: false,
        },
    );
    assert_eq!(
        install.args[4..],
        [
            "--no-refresh",
            "install",
            "--auto-agree-with-licenses",
            "--oldpackage",
            "--",
            "crit=1.0-1"
        ]
    );
    assert_eq!(cfg.reboot_flag(), PathBuf::from("/sb/run/reboot-needed"));
    assert_eq!(
        cfg.locks(),
        [
            Lock::PidFile("/sb/run/zypp.pid".into()),
            Lock::Fcntl("/sb/var/lib/rpm/.rpm.lock".into())
        ]
    );
    assert_eq!(root_of(&["--root=/x".into()]), Some(PathBuf::from("/x")));
    assert_eq!(
        root_of(&["-R".into(), "/y".into()]),
        Some(PathBuf::from("/y"))
    );
    assert_eq!(root_of(&["--root".into()]), None);
}

mod prop {
    use super::*;
    use proptest::prelude::*;
    proptest! {
        #[test]
        fn parsers_never_panic(s in "(?s).{0,800}") {
            let _ = parse_xml(&s);
            let _ = parse_patch_info(&s);
            let _ = failed_scriptlets(&s);
            let _ = licence_refusal(&s);
            let _ = repo_errors(&[("error".into(), s.clone())]);
        }

        #[test]
        fn xml_shaped_input_never_panics(
            attrs in proptest::collection::vec("[a-z-]{1,10}=\"[^\"<&]{0,12}\"", 0..6),
            tag in "(update|message|source|issue-date|issue)",
        ) {
            let doc = format!(
                "<stream><update-status><update-list><{tag} {}><issue-list><issue {}/></issue-list></{tag}></update-list></update-status></stream>",
                attrs.join(" "),
                attrs.join(" ")
            );
            let _ = parse_xml(&doc);
        }
    }
}

/// A stand-in for zypper that exits with the codes listed in `codes`, one per call, so the
/// backend's reading of each code can be checked without making the real zypper produce it
/// (103 needs zypper to update itself). The integration suite runs the real one.
struct FakeZypper {
    dir: tempfile::TempDir,
}

impl FakeZypper {
    fn new() -> Self {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tmp");
        let script = dir.path().join("zypper");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\nd={}\nn=$(cat $d/calls 2>/dev/null || echo 0); n=$((n+1)); echo $n > $d/calls\ncode=$(sed -n \"${{n}}p\" $d/codes)\necho \"zypper $*\"\n[ \"$code\" = 107 ] && echo 'warning: %post(broken-1.1-1.noarch) scriptlet failed, exit status 1'\nexit ${{code:-0}}\n",
                dir.path().display()
            ),
        )
        .expect("script");
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        std::fs::create_dir_all(dir.path().join("root/run")).expect("run");
        Self { dir }
    }

    fn backend(&self) -> Zypper {
        Zypper::new(ZypperConfig {
            program: self.dir.path().join("zypper"),
            args: Vec::new(),
            rpm: "rpm".into(),
            root: Some(self.dir.path().join("root")),
            rpm_dbpath: "/var/lib/rpm".into(),
            command_timeout: Duration::from_secs(10),
            refresh_timeout: Duration::from_secs(10),
            lock_timeout: Duration::from_secs(1),
            apply_timeout: Duration::from_secs(10),
        })
    }

    /// Applies an upgrade of `crit` with zypper exiting `codes` in turn; the result and how
    /// many times zypper ran.
    async fn apply(&self, codes: &[i32], opts: ApplyOptions) -> (Result<(), String>, usize) {
        let list: Vec<String> = codes.iter().map(ToString::to_string).collect();
        std::fs::write(self.dir.path().join("codes"), list.join("\n")).expect("codes");
        let _ = std::fs::remove_file(self.dir.path().join("calls"));
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        let r = self
            .backend()
            .apply(&super::super::Op::Upgrade("crit".into()), opts, tx)
            .await
            .map_err(|e| e.to_string());
        let calls = std::fs::read_to_string(self.dir.path().join("calls"))
            .ok()
            .and_then(|c| c.trim().parse().ok())
            .unwrap_or(0);
        (r, calls)
    }
}

#[tokio::test]
async fn exit_codes_when_applying() {
    let z = FakeZypper::new();
    let opts = ApplyOptions::default();
    assert_eq!(z.apply(&[0], opts).await, (Ok(()), 1));
    // 103: zypper updated itself; the same command once more, and only once.
    assert_eq!(z.apply(&[103, 0], opts).await, (Ok(()), 2));
    let (r, calls) = z.apply(&[103, 103], opts).await;
    assert!(r.is_err() && calls == 2, "{r:?} {calls}");
    // 102: done, and zypper's reboot flag is set.
    let flag = z.dir.path().join("root/run/reboot-needed");
    assert!(!flag.exists());
    assert_eq!(z.apply(&[102], opts).await, (Ok(()), 1));
    assert!(flag.exists());
    let (r, _) = z.apply(&[104], opts).await;
    assert!(
        r.as_ref().is_err_and(|e| e.contains("crit: not found")),
        "{r:?}"
    );
    let (r, _) = z.apply(&[107], opts).await;
    assert!(
        r.as_ref()
            .is_err_and(|e| e.contains("broken-1.1-1.noarch %post failed, exit status 1")),
        "{r:?}"
    );
    let (r, _) = z.apply(&[106], opts).await;
    assert!(
        r.as_ref().is_err_and(|e| e.contains("--allow-repo-errors")),
        "{r:?}"
    );
    let allowed = ApplyOptions {
        allow_repo_errors: true,
        ..opts
    };
    assert_eq!(z.apply(&[106], allowed).await, (Ok(()), 1));
    let (r, _) = z.apply(&[7], opts).await;
    assert!(r.as_ref().is_err_and(|e| e.contains("zypp lock")), "{r:?}");
    let (r, _) = z.apply(&[8], opts).await;
    assert!(r.as_ref().is_err_and(|e| e.contains("code 8")), "{r:?}");
}

/// For a package built for an architecture, zypper 1.14 prints its patch's conflicts per
/// architecture, the source package included (captured from an x86_64 package's patch).
#[test]
fn arch_qualified_conflicts_as_zypper_prints_them() {
    let info = "Information for patch A-1:\n--------------------------\nConflicts   : [3]\n    archy.x86_64 < 1.1-1\n    archy.noarch < 1.1-1\n    archy.src < 1.1-1\n";
    let members = parse_patch_info(info);
    let packages = vec![XmlUpdate {
        kind: "package".into(),
        name: "archy".into(),
        edition: "1.1-1".into(),
        edition_old: "1.0-1".into(),
        arch: "x86_64".into(),
        ..XmlUpdate::default()
    }];
    let patches = vec![XmlUpdate {
        kind: "patch".into(),
        name: "A-1".into(),
        category: "security".into(),
        severity: "important".into(),
        ..XmlUpdate::default()
    }];
    let u = assemble(&packages, &patches, &members);
    assert_eq!(u[0].advisories, ["A-1"]);
    assert_eq!(u[0].sla, SlaClass::High);
    // Another architecture of the same name is another package.
    let i586 = vec![XmlUpdate {
        arch: "i586".into(),
        ..packages[0].clone()
    }];
    assert!(assemble(&i586, &patches, &members)[0].advisories.is_empty());
}
