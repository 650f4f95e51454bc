//! Parsers for what zypper prints: `--xmlout` documents (list-updates, list-patches,
//! refresh), `info -t patch` text, and the scriptlet and licence messages of a failed run. All
//! pure, unit-tested against captured output and fuzzed.

use super::super::{Classification, RepoError, Severity, SlaClass, Update};
use patch_agent_wire::packages::PatchFlags;
use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// One `<update>` of `list-updates` (kind="package") or `list-patches` (kind="patch").
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct XmlUpdate {
    pub kind: String,
    pub name: String,
    /// `[epoch:]version-release`.
    pub edition: String,
    pub edition_old: String,
    pub arch: String,
    /// The repository alias.
    pub repo: String,
    /// Patches: category, severity, flags, issue date and references.
    pub category: String,
    pub severity: String,
    pub status: String,
    pub flags: PatchFlags,
    pub issued: Option<SystemTime>,
    pub cves: Vec<String>,
    pub bugs: Vec<String>,
}

/// What one `--xmlout` run printed: its updates and its messages.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct XmlStream {
    pub updates: Vec<XmlUpdate>,
    /// (type, text): "info", "warning", "error".
    pub messages: Vec<(String, String)>,
}

/// Parses a `zypper --xmlout` document. Output cut short (a killed zypper) is an error, never a
/// partial list taken for the whole.
pub fn parse_xml(text: &str) -> Result<XmlStream, String> {
    let doc = roxmltree::Document::parse(text)
        .map_err(|e| format!("zypper printed XML that does not parse: {e}"))?;
    let mut out = XmlStream::default();
    for node in doc.root_element().descendants() {
        match node.tag_name().name() {
            "message" => out.messages.push((
                node.attribute("type").unwrap_or("info").to_string(),
                node.text().unwrap_or_default().trim().to_string(),
            )),
            // While an update-stack patch is pending, zypper lists every other needed patch as
            // blocked behind it: they are pending all the same.
            "update"
                if node.parent().is_some_and(|p| {
                    p.has_tag_name("update-list") || p.has_tag_name("blocked-update-list")
                }) =>
            {
                out.updates.push(xml_update(node));
            }
            _ => {}
        }
    }
    Ok(out)
}

fn xml_update(node: roxmltree::Node<'_, '_>) -> XmlUpdate {
    let attr = |k: &str| node.attribute(k).unwrap_or_default().to_string();
    let yes = |k: &str| node.attribute(k) == Some("true");
    let mut u = XmlUpdate {
        kind: attr("kind"),
        name: attr("name"),
        edition: attr("edition"),
        edition_old: attr("edition-old"),
        arch: attr("arch"),
        category: attr("category"),
        severity: attr("severity"),
        status: attr("status"),
        flags: PatchFlags {
            interactive: yes("interactive"),
            update_stack: yes("pkgmanager"),
            reboot_suggested: yes("restart"),
        },
        ..XmlUpdate::default()
    };
    for child in node.children().filter(roxmltree::Node::is_element) {
        match child.tag_name().name() {
            "source" => u.repo = child.attribute("alias").unwrap_or_default().to_string(),
            "issue-date" => {
                u.issued = child
                    .attribute("time_t")
                    .and_then(|t| t.parse::<u64>().ok())
                    .map(|t| UNIX_EPOCH + Duration::from_secs(t));
            }
            "issue-list" => {
                for issue in child.children().filter(|c| c.has_tag_name("issue")) {
                    let id = issue.attribute("id").unwrap_or_default().to_string();
                    if id.is_empty() {
                        continue;
                    }
                    match issue.attribute("type") {
                        Some("cve") => u.cves.push(id),
                        Some("bugzilla") => u.bugs.push(id),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    u
}

/// Repositories zypper skipped, with the reason it gave, from a run's messages (XML or text).
pub fn repo_errors(messages: &[(String, String)]) -> Vec<RepoError> {
    let mut out: Vec<RepoError> = Vec::new();
    for (_, text) in messages {
        for line in text.lines() {
            // "Skipping repository 'X' ..." in XML; "Warning: Skipping ..." in text output.
            const SKIPPING: &str = "Skipping repository '";
            let Some(rest) = line.find(SKIPPING).map(|i| &line[i + SKIPPING.len()..]) else {
                continue;
            };
            let Some((repo, _)) = rest.split_once('\'') else {
                continue;
            };
            if out.iter().any(|e| e.repo == repo) {
                continue;
            }
            // zypper names the repository as "[alias|url] reason" in the error before it; failing
            // that, the error just before says what went wrong.
            let tag = format!("[{repo}|");
            let tagged = messages.iter().flat_map(|(_, t)| t.lines()).find_map(|l| {
                let rest = l.trim().strip_prefix(&tag)?;
                let (url, reason) = rest.split_once(']')?;
                Some(format!("{} ({url})", reason.trim()))
            });
            let before = || {
                let at = messages.iter().position(|(_, t)| t.contains(line.trim()))?;
                let (_, t) = messages[..at].iter().rev().find(|(k, _)| k == "error")?;
                let text: Vec<&str> = t
                    .lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty() && *l != "History:")
                    .collect();
                let mut joined = text.join(" ");
                if let Some(cut) = (300..joined.len()).find(|i| joined.is_char_boundary(*i)) {
                    joined.truncate(cut);
                }
                (!joined.is_empty()).then_some(joined)
            };
            let why = tagged
                .or_else(before)
                .unwrap_or_else(|| "metadata could not be read; repository skipped".into());
            out.push(RepoError {
                repo: repo.to_string(),
                error: why,
            });
        }
    }
    out
}

/// The packages each patch updates, from `zypper info -t patch` text: a patch conflicts with
/// every older version of each of its packages (`name[.arch] < edition`). Source packages
/// (`srcpackage:`) are left out.
pub fn parse_patch_info(text: &str) -> HashMap<String, Vec<String>> {
    let mut out: HashMap<String, Vec<String>> = HashMap::new();
    let mut current: Option<String> = None;
    let mut in_conflicts = false;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("Information for patch ") {
            current = Some(rest.trim().trim_end_matches(':').to_string());
            in_conflicts = false;
            continue;
        }
        let Some(patch) = &current else { continue };
        if let Some((key, value)) = line.split_once(" : ")
            && !line.starts_with(' ')
        {
            in_conflicts = key.trim() == "Conflicts";
            if in_conflicts && !value.trim().starts_with('[') {
                push_conflict(out.entry(patch.clone()).or_default(), value);
            }
            continue;
        }
        if in_conflicts && line.starts_with(' ') && !line.trim().is_empty() {
            push_conflict(out.entry(patch.clone()).or_default(), line);
        } else {
            in_conflicts = false;
        }
    }
    out
}

fn push_conflict(list: &mut Vec<String>, capability: &str) {
    let Some(name) = capability.split_whitespace().next() else {
        return;
    };
    if name.contains(':') || name.is_empty() || list.iter().any(|n| n == name) {
        return;
    }
    list.push(name.to_string());
}

/// Whether a patch's package capability (`name` or `name.arch`) is this package.
fn names(capability: &str, name: &str, arch: &str) -> bool {
    capability == name
        || capability
            .strip_prefix(name)
            .and_then(|r| r.strip_prefix('.'))
            .is_some_and(|a| a == arch)
}

/// A patch category as a classification: security; recommended (bug fixes) as bugfix;
/// optional and feature as enhancement; document, yast and anything else as other.
pub fn classify(category: &str) -> Classification {
    match category.to_ascii_lowercase().as_str() {
        "security" => Classification::Security,
        "recommended" | "bugfix" => Classification::Bugfix,
        "optional" | "feature" | "enhancement" => Classification::Enhancement,
        _ => Classification::Other,
    }
}

/// Joins package updates with the needed patches that update them. Packages of update-stack
/// patches come first: they are applied before everything else, as `zypper patch` does.
pub fn assemble(
    packages: &[XmlUpdate],
    patches: &[XmlUpdate],
    members: &HashMap<String, Vec<String>>,
) -> Vec<Update> {
    let mut updates: Vec<Update> = packages
        .iter()
        .filter(|p| p.kind == "package")
        .map(|p| {
            let mine: Vec<&XmlUpdate> = patches
                .iter()
                .filter(|x| {
                    members
                        .get(&x.name)
                        .is_some_and(|m| m.iter().any(|c| names(c, &p.name, &p.arch)))
                })
                .collect();
            let strongest = mine.iter().min_by_key(|x| classify(&x.category));
            let classification = strongest.map_or(Classification::Other, |x| classify(&x.category));
            let severity = mine
                .iter()
                .filter(|x| classify(&x.category) == Classification::Security)
                .map(|x| Severity::parse(&x.severity))
                .min()
                .unwrap_or(Severity::Unknown);
            let set = |f: &dyn Fn(&XmlUpdate) -> &[String]| -> Vec<String> {
                mine.iter()
                    .flat_map(|x| f(x).iter().cloned())
                    .collect::<BTreeSet<_>>()
                    .into_iter()
                    .collect()
            };
            let flags = mine.iter().fold(PatchFlags::default(), |f, x| PatchFlags {
                interactive: f.interactive || x.flags.interactive,
                update_stack: f.update_stack || x.flags.update_stack,
                reboot_suggested: f.reboot_suggested || x.flags.reboot_suggested,
            });
            Update {
                name: p.name.clone(),
                arch: p.arch.clone(),
                installed_version: p.edition_old.clone(),
                candidate_version: p.edition.clone(),
                origin: p.repo.clone(),
                classification,
                severity,
                advisories: mine
                    .iter()
                    .map(|x| x.name.clone())
                    .collect::<BTreeSet<_>>()
                    .into_iter()
                    .collect(),
                cves: set(&|x| &x.cves),
                issued: mine.iter().filter_map(|x| x.issued).min(),
                first_seen: None,
                sla: SlaClass::of(classification, severity),
                category: strongest.map(|x| x.category.clone()).unwrap_or_default(),
                bug_ids: set(&|x| &x.bugs),
                flags,
            }
        })
        .collect();
    updates.sort_by_key(|u| !u.flags.update_stack);
    updates
}

/// The packages whose rpm scriptlet failed, from zypper's output
/// (`%post(NAME-VERSION-RELEASE.ARCH) scriptlet failed, exit status N`).
pub fn failed_scriptlets(text: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for line in text.lines() {
        let Some(at) = line.find(") scriptlet failed") else {
            continue;
        };
        let head = &line[..at];
        let Some(open) = head.rfind('(') else {
            continue;
        };
        let script = head[..open]
            .rsplit(|c: char| c.is_whitespace())
            .next()
            .unwrap_or_default();
        let what = format!(
            "{} {}{}",
            &head[open + 1..],
            script,
            line[at + 1..].trim_start_matches(" scriptlet")
        );
        if !out.contains(&what) {
            out.push(what);
        }
    }
    out
}

/// What zypper said about a licence it would not agree to by itself, if it did.
pub fn licence_refusal(text: &str) -> Option<String> {
    let mut package = None;
    let mut refused = false;
    for line in text.lines() {
        let l = line.trim();
        if let Some(rest) = l.strip_suffix(" License Agreement") {
            package = Some(rest.trim().to_string());
        }
        if l.starts_with("Aborting installation due to the need for license confirmation") {
            refused = true;
        }
    }
    refused.then(|| match package {
        Some(p) => format!("{p} asks for its licence to be agreed to"),
        None => "a package asks for its licence to be agreed to".to_string(),
    })
}
