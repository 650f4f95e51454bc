//! The needed patches and the packages each one updates, kept between scans.
//!
//! `list-patches` and `info -t patch` cost more than the `list-updates` they annotate (on a
//! 1,500-package root with 100 needed patches: 0.06 s and 0.13 s against 0.09 s; see
//! docs/PERFORMANCE.md). What they report changes only when the repository metadata or the rpm
//! database does, so the view is kept under a [`Fingerprint`] of both and recomputed only when
//! that changes. Which packages a patch updates never changes for one patch edition, so that is
//! kept across recomputations and `info` asked only about patches not seen before.

use super::XmlUpdate;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// Size and modification time of every file that decides what zypper reports about patches:
/// zypper's solv caches (rebuilt on every metadata refresh, and `@System` on every rpm
/// change), the repository definitions and zypp.conf, and rpm's database files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fingerprint(Vec<(PathBuf, u64, Option<SystemTime>)>);

/// The fingerprint of `inputs` (files, or directories read two levels deep). None when the
/// first input, zypper's solv cache, is not where it was expected (a `--cache-dir` elsewhere):
/// then nothing is kept and every scan asks zypper.
pub fn fingerprint(inputs: &[PathBuf]) -> Option<Fingerprint> {
    if !inputs.first()?.is_dir() {
        return None;
    }
    let mut out = Vec::new();
    for p in inputs {
        collect(p, 2, &mut out);
    }
    out.sort();
    Some(Fingerprint(out))
}

fn collect(path: &Path, depth: u8, out: &mut Vec<(PathBuf, u64, Option<SystemTime>)>) {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        out.push((path.to_path_buf(), 0, None));
        return;
    };
    if meta.is_dir() && depth > 0 {
        if let Ok(entries) = std::fs::read_dir(path) {
            for e in entries.flatten() {
                collect(&e.path(), depth - 1, out);
            }
        }
        return;
    }
    // SQLite's shared-memory index changes when anyone reads the database (rpm's sqlite
    // backend): it says nothing about the contents.
    if path.to_string_lossy().ends_with("-shm") {
        return;
    }
    out.push((path.to_path_buf(), meta.len(), meta.modified().ok()));
}

/// The needed patches and their packages, as of one fingerprint.
#[derive(Debug, Default)]
pub struct PatchCache {
    view: Option<(Fingerprint, Vec<XmlUpdate>)>,
    /// Packages per patch edition (`name edition`), from `info -t patch`.
    members: HashMap<String, Vec<String>>,
}

fn key(p: &XmlUpdate) -> String {
    format!("{} {}", p.name, p.edition)
}

impl PatchCache {
    /// The needed patches, if they were read under this same fingerprint.
    pub fn needed(&self, now: Option<&Fingerprint>) -> Option<Vec<XmlUpdate>> {
        match (&self.view, now) {
            (Some((then, needed)), Some(now)) if then == now => Some(needed.clone()),
            _ => None,
        }
    }

    /// The patches among `needed` whose packages are not known yet.
    pub fn unknown<'a>(&self, needed: &'a [XmlUpdate]) -> Vec<&'a str> {
        needed
            .iter()
            .filter(|p| !self.members.contains_key(&key(p)))
            .map(|p| p.name.as_str())
            .collect()
    }

    /// Records a fresh view: the needed patches (under `fingerprint`, when there is one) and
    /// the packages of those `info` was just asked about. Patches no longer needed are dropped.
    pub fn store(
        &mut self,
        fingerprint: Option<Fingerprint>,
        needed: &[XmlUpdate],
        info: HashMap<String, Vec<String>>,
    ) {
        for p in needed {
            if let Some(m) = info.get(&p.name) {
                self.members.insert(key(p), m.clone());
            }
        }
        let keep: std::collections::HashSet<String> = needed.iter().map(key).collect();
        self.members.retain(|k, _| keep.contains(k));
        self.view = fingerprint.map(|f| (f, needed.to_vec()));
    }

    /// Packages per patch name, for [`super::assemble`].
    pub fn members(&self, needed: &[XmlUpdate]) -> HashMap<String, Vec<String>> {
        needed
            .iter()
            .filter_map(|p| Some((p.name.clone(), self.members.get(&key(p))?.clone())))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn patch(name: &str, edition: &str) -> XmlUpdate {
        XmlUpdate {
            kind: "patch".into(),
            name: name.into(),
            edition: edition.into(),
            ..XmlUpdate::default()
        }
    }

    #[test]
    fn fingerprints_change_with_the_files_beneath() {
        let dir = tempfile::tempdir().expect("tmp");
        let solv = dir.path().join("solv");
        let db = dir.path().join("rpmdb");
        assert!(fingerprint(&[solv.clone(), db.clone()]).is_none());
        std::fs::create_dir_all(solv.join("test")).expect("mkdir");
        std::fs::write(solv.join("test/solv"), "a").expect("w");
        let a = fingerprint(&[solv.clone(), db.clone()]).expect("fp");
        assert_eq!(Some(&a), fingerprint(&[solv.clone(), db.clone()]).as_ref());
        std::fs::write(solv.join("test/solv"), "ab").expect("w");
        let b = fingerprint(&[solv.clone(), db.clone()]).expect("fp");
        assert_ne!(a, b, "a rebuilt solv file");
        std::fs::create_dir_all(&db).expect("mkdir");
        std::fs::write(db.join("rpmdb.sqlite"), "x").expect("w");
        let c = fingerprint(&[solv.clone(), db.clone()]).expect("fp");
        assert_ne!(b, c, "an rpm database change");
        std::fs::write(db.join("rpmdb.sqlite-shm"), "read").expect("w");
        assert_eq!(
            Some(c),
            fingerprint(&[solv, db]),
            "a reader's shared-memory index"
        );
    }

    #[test]
    fn the_view_is_kept_per_fingerprint_and_members_per_patch_edition() {
        let dir = tempfile::tempdir().expect("tmp");
        std::fs::create_dir_all(dir.path().join("solv")).expect("mkdir");
        let fp = fingerprint(&[dir.path().join("solv")]);
        let mut c = PatchCache::default();
        let needed = vec![patch("A", "1"), patch("B", "1")];
        assert_eq!(c.needed(fp.as_ref()), None);
        assert_eq!(c.unknown(&needed), ["A", "B"]);
        let info = HashMap::from([
            ("A".to_string(), vec!["a".to_string()]),
            ("B".to_string(), vec!["b".to_string()]),
        ]);
        c.store(fp.clone(), &needed, info);
        assert_eq!(c.needed(fp.as_ref()), Some(needed.clone()));
        assert_eq!(c.needed(None), None, "no fingerprint, no reuse");
        // A new edition of B is a new patch; A is known; C is new.
        let later = vec![patch("A", "1"), patch("B", "2"), patch("C", "1")];
        assert_eq!(c.unknown(&later), ["B", "C"]);
        c.store(
            None,
            &later,
            HashMap::from([
                ("B".to_string(), vec!["b2".to_string()]),
                ("C".to_string(), vec!["c".to_string()]),
            ]),
        );
        let m = c.members(&later);
        assert_eq!((m["A"][0].as_str(), m["B"][0].as_str()), ("a", "b2"));
        assert_eq!(c.needed(fp.as_ref()), None, "stored without a fingerprint");
        c.store(None, &[patch("C", "1")], HashMap::new());
        assert_eq!(c.unknown(&later), ["A", "B"], "no longer needed: forgotten");
    }
}
