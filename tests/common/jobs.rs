//! The signed-jobs fixture shared by the job tests: an apt, dnf or zypper sandbox, a dev PKI, a job
//! signing key the agent trusts, a simulated reboot, and helpers to sign, submit and watch jobs
//! through the real patchctl and grpcurl.

use super::*;
use patch_agent_wire::job::trust::SigningKey;
use patch_agent_wire::proto::v1 as pb;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant, SystemTime};

pub struct Fixture {
    pub tmp: tempfile::TempDir,
    pub pki: Pki,
    pub sandbox: PathBuf,
    pub keys: PathBuf,
    pub trusted: PathBuf,
}

pub fn fixture(name: &str, kind: &str, args: &[&str]) -> Fixture {
    let (tmp, pki) = setup(name);
    let sandbox = tmp.path().join(kind);
    let script =
        Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/fixtures/{kind}-sandbox.sh"));
    let out = run(Command::new("bash").arg(script).arg(&sandbox).args(args));
    assert!(out.status.success(), "fixture: {}", text(&out));
    let keys = tmp.path().join("keys");
    let out = run(Command::new(patchctl()).args(["keys", "new"]).arg(&keys));
    assert!(out.status.success(), "keys new: {}", text(&out));
    let trusted = tmp.path().join("trusted");
    std::fs::create_dir_all(&trusted).expect("trusted");
    std::fs::copy(keys.join("signing.pem"), trusted.join("signing.pem")).expect("copy key");
    // A simulated reboot: a new boot id, then SIGTERM to the agent (the script's parent); with
    // a `noop` file present it does nothing, like a reboot that never happens.
    let d = tmp.path().display();
    std::fs::write(tmp.path().join("boot_id"), "boot-1\n").expect("boot id");
    let script = format!(
        "#!/bin/sh\n[ -e {d}/noop ] && exit 0\nn=$(cat {d}/reboots 2>/dev/null || echo 0)\nn=$((n+1))\necho $n > {d}/reboots\necho boot-after-$n > {d}/boot_id\nkill -TERM $PPID\n"
    );
    std::fs::write(tmp.path().join("reboot.sh"), script).expect("reboot script");
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            tmp.path().join("reboot.sh"),
            std::fs::Permissions::from_mode(0o755),
        )
        .expect("chmod");
    }
    Fixture {
        tmp,
        pki,
        sandbox,
        keys,
        trusted,
    }
}

impl Fixture {
    /// Writes a shell hook `name` with `body` into the agent's hooks_dir, with `mode`.
    pub fn hook(&self, name: &str, body: &str, mode: u32) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let hooks = self.tmp.path().join("hooks");
        std::fs::create_dir_all(&hooks).expect("hooks dir");
        let p = hooks.join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).expect("hook");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).expect("chmod");
        p
    }

    pub fn config(&self, kind: &str, extra_packages: &str) -> String {
        let s = self.sandbox.display();
        let packages = match kind {
            "apt" => format!(
                "[packages]\nmanager = \"apt\"\nscan_on_start = false\napt_config = \"{s}/apt.conf\"\ndpkg_status = \"{s}/root/var/lib/dpkg/status\"\nreboot_required_file = \"{s}/root/run/reboot-required\"\ndpkg_args = [\"--root={s}/root\", \"--force-not-root\", \"--force-script-chrootless\", \"--log={s}/root/var/log/dpkg.log\"]\n{extra_packages}"
            ),
            "zypper" => format!(
                "[packages]\nmanager = \"zypper\"\nscan_on_start = false\nzypper_args = [\"--root\", \"{s}/root\"]\n{extra_packages}"
            ),
            _ => format!(
                "[packages]\nmanager = \"dnf\"\nscan_on_start = false\nrpm_root = \"{s}/root\"\ndnf_args = [\"-c\", \"{s}/dnf.conf\", \"--installroot={s}/root\", \"--releasever=1\", \"--setopt=reposdir={s}/repos.d\", \"--setopt=cachedir={s}/cache\"]\n{extra_packages}"
            ),
        };
        let dir = self.tmp.path().join("agent");
        let mut c = config_text(&dir, &self.pki, &packages).replacen(
            "[agent]\n",
            &format!(
                "[agent]\nboot_id_path = \"{}\"\n",
                self.tmp.path().join("boot_id").display()
            ),
            1,
        );
        c.push_str(&format!(
            "[jobs]\ntrusted_keys_dir = \"{}\"\nmin_free_mib = 1\nhooks_dir = \"{}\"\ncheck_timeout = \"2s\"\ncheck_interval = \"200ms\"\nreboot_command = [\"{}\"]\nreboot_grace = \"3s\"\n",
            self.trusted.display(),
            self.tmp.path().join("hooks").display(),
            self.tmp.path().join("reboot.sh").display()
        ));
        c
    }

    pub fn start(&self, kind: &str) -> Agent {
        let dir = self.tmp.path().join("agent");
        Agent::start(&dir, &self.config(kind, ""))
    }

    pub fn key(&self) -> PathBuf {
        self.keys.join("signing.key")
    }

    /// `patchctl job sign` with the given flags; returns the job file.
    pub fn sign(&self, id: &str, flags: &[&str]) -> PathBuf {
        let file = self.tmp.path().join(format!("{id}.job"));
        let out = run(Command::new(patchctl())
            .args(["job", "sign", "--signing-key"])
            .arg(self.key())
            .arg("-o")
            .arg(&file)
            .args(["--id", id, "--target", "test-host"])
            .args(flags));
        assert!(out.status.success(), "sign {id}: {}", text(&out));
        file
    }

    pub fn patchctl(&self, agent: &Agent, args: &[&str]) -> Output {
        run(Command::new(patchctl())
            .args(args)
            .args(["--agent", &format!("unix:{}", agent.socket.display())]))
    }

    /// Signs, submits and watches a job; returns the final GetJob status as JSON.
    pub fn run_job(&self, agent: &Agent, id: &str, flags: &[&str]) -> Value {
        let file = self.sign(id, flags);
        let out = self.patchctl(agent, &["submit", file.to_str().expect("path")]);
        assert!(out.status.success(), "submit {id}: {}", text(&out));
        let out = self.patchctl(agent, &["watch", id]);
        let status = get_job(agent, id);
        let state = status["state"].as_str().unwrap_or("").to_string();
        let ok = state == "JOB_STATE_SUCCEEDED" || state == "JOB_STATE_SUCCEEDED_REBOOT_REQUIRED";
        assert_eq!(
            out.status.code(),
            Some(if ok { 0 } else { 3 }),
            "watch exits 0 for success and 3 for a job that ended otherwise ({state}): {}",
            text(&out)
        );
        status
    }

    /// `dpkg --audit` on the sandbox reports nothing half-installed or half-configured.
    pub fn assert_dpkg_consistent(&self) {
        let audit = run(Command::new("dpkg")
            .arg(format!(
                "--admindir={}/root/var/lib/dpkg",
                self.sandbox.display()
            ))
            .arg("--audit"));
        assert!(audit.stdout.is_empty(), "dpkg --audit: {}", text(&audit));
    }

    pub fn dpkg_versions(&self) -> String {
        let out = run(Command::new("dpkg-query")
            .arg(format!(
                "--admindir={}/root/var/lib/dpkg",
                self.sandbox.display()
            ))
            .args(["-W", "-f", "${Package}=${Version} "]));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    pub fn rpm_versions(&self) -> String {
        let out = run(Command::new("rpm")
            .arg("--root")
            .arg(self.sandbox.join("root"))
            .args(["-qa", "--qf", "%{NAME}=%{VERSION} \\n"]));
        let mut v: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .map(str::to_string)
            .collect();
        v.sort();
        v.join(" ")
    }
}

pub fn grpc(agent: &Agent, method: &str, data: &str) -> Output {
    agent.grpcurl_unix(&["-emit-defaults", "-max-time", "120", "-d", data, method])
}

pub fn get_job(agent: &Agent, id: &str) -> Value {
    let out = grpc(
        agent,
        "patchagent.v1.Agent/GetJob",
        &format!(r#"{{"job_id":"{id}"}}"#),
    );
    assert!(out.status.success(), "GetJob {id}: {}", text(&out));
    serde_json::from_slice(&out.stdout).expect("json")
}

/// Waits until a job's journal (its durable history) mentions `needle`.
pub fn wait_for_history(journal: &Path, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !std::fs::read_to_string(journal)
        .unwrap_or_default()
        .contains(needle)
    {
        assert!(
            Instant::now() < deadline,
            "{} never said {needle:?}",
            journal.display()
        );
        std::thread::sleep(Duration::from_millis(25));
    }
}

pub fn outcome<'a>(status: &'a Value, name: &str) -> Option<&'a Value> {
    status["packages"]
        .as_array()?
        .iter()
        .find(|p| p["name"] == name)
}

pub struct Forge {
    pub key: SigningKey,
}

impl Forge {
    pub fn job(&self, id: &str) -> pb::Job {
        pb::Job {
            job_id: id.into(),
            targets: vec!["test-host".into()],
            expires_at: Some((SystemTime::now() + Duration::from_secs(3600)).into()),
            action: Some(pb::job::Action::Upgrade(pb::UpgradeAction {
                scope: pb::UpgradeScope::All as i32,
                ..Default::default()
            })),
            ..Default::default()
        }
    }

    pub fn seal(&self, payload: Vec<u8>) -> pb::SignedJob {
        pb::SignedJob {
            signature: self.key.sign(&payload),
            key_id: self.key.key_id(),
            payload,
        }
    }
}

pub fn b64(data: &[u8]) -> String {
    use std::io::Write;
    let mut child = Command::new("base64")
        .arg("-w0")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("base64");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(data)
        .expect("write");
    String::from_utf8(child.wait_with_output().expect("base64").stdout).expect("utf8")
}

/// SubmitJob through grpcurl with the given client identity ("unix" for the local socket).
pub fn submit(agent: &Agent, pki: &Pki, who: &str, env: &pb::SignedJob) -> Output {
    let body = format!(
        r#"{{"payload":"{}","keyId":"{}","signature":"{}"}}"#,
        b64(&env.payload),
        env.key_id,
        b64(&env.signature)
    );
    let mut cmd = Command::new(grpcurl_bin());
    if who == "unix" {
        cmd.args(["-plaintext", "-unix", "-max-time", "30", "-d", &body])
            .arg(&agent.socket);
    } else {
        cmd.args(pki.client(who))
            .args(["-max-time", "30", "-d", &body])
            .arg(&agent.addr);
    }
    run(cmd.arg("patchagent.v1.Agent/SubmitJob"))
}

pub fn expect_code(out: &Output, code: &str, needle: &str) {
    let t = text(out);
    assert!(!out.status.success(), "accepted but should be {code}: {t}");
    assert!(t.contains(&format!("Code: {code}")), "want {code}: {t}");
    assert!(t.contains(needle), "want {needle:?} in: {t}");
}

pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

pub fn wait_state(agent: &Agent, id: &str, want: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = get_job(agent, id);
        if s["state"] == want {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "{id} never reached {want}: {s:#}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn history(agent: &Agent, id: &str) -> String {
    std::fs::read_to_string(agent.dir.join(format!("state/jobs/{id}.json"))).expect("journal")
}
