//! Packages from `packaging/build.sh` and a Debian rootfs booted with `systemd-nspawn -b`, for
//! the packaging tests and benchmark.

use super::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const V1: &str = env!("CARGO_PKG_VERSION");
pub const V2: &str = "0.1.1";
pub const V3: &str = "0.1.2";
pub const ROOTFS_CACHE: &str = "/var/tmp/patch-agent-test-rootfs";

pub fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

pub fn arch() -> String {
    let out = run(Command::new("dpkg").arg("--print-architecture"));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// target/packages/patch-agent_VERSION_ARCH.deb, built by packaging/build.sh if missing.
pub fn deb(version: &str) -> PathBuf {
    let p = root().join(format!(
        "target/packages/patch-agent_{version}_{}.deb",
        arch()
    ));
    if !p.exists() {
        build(version);
    }
    assert!(p.exists(), "{} was not built", p.display());
    p
}

pub fn rpm_file(version: &str) -> PathBuf {
    let dir = root().join("target/packages");
    let find = || {
        std::fs::read_dir(&dir).ok().and_then(|d| {
            d.flatten().map(|e| e.path()).find(|p| {
                let n = p.file_name().unwrap_or_default().to_string_lossy();
                n.starts_with(&format!("patch-agent-{version}-")) && n.ends_with(".rpm")
            })
        })
    };
    if find().is_none() {
        build(version);
    }
    find().expect("rpm built")
}

/// One build at a time (tests run in parallel; each build rewrites target/agent and
/// target/release).
pub fn build(version: &str) {
    let out = run(Command::new("flock")
        .arg(root().join("target/.packaging.lock"))
        .arg(root().join("packaging/build.sh"))
        .env("PATCH_AGENT_VERSION", version)
        .current_dir(root()));
    assert!(out.status.success(), "packaging/build.sh: {}", text(&out));
}

/// A fresh copy of the cached Debian rootfs (made with debootstrap on first use).
pub fn rootfs(dest: &Path) {
    let cache = Path::new(ROOTFS_CACHE);
    let script = format!(
        "[ -e {c}/.complete ] || {{ rm -rf {c} && debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus bookworm {c} http://deb.debian.org/debian && touch {c}/.complete; }}",
        c = cache.display()
    );
    let out = run(Command::new("flock")
        .arg(format!("{ROOTFS_CACHE}.lock"))
        .args(["sh", "-c", &script]));
    assert!(out.status.success(), "debootstrap: {}", text(&out));
    let out = run(Command::new("cp").arg("-a").arg(cache).arg(dest));
    assert!(out.status.success(), "copy rootfs: {}", text(&out));
    let _ = std::fs::remove_file(dest.join(".complete"));
}

/// A rootfs booted with systemd-nspawn; commands run in it with nsenter.
pub struct Container {
    nspawn: Child,
    pub leader: u32,
    pub root: PathBuf,
    log: PathBuf,
}

impl Container {
    pub fn boot(root: &Path, name: &str) -> Self {
        let log = root.with_extension("console.log");
        let nspawn = Command::new("systemd-nspawn")
            .arg("-D")
            .arg(root)
            .args([
                "-b",
                "--register=no",
                "--keep-unit",
                "--console=pipe",
                "-M",
                name,
            ])
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).expect("log"))
            .stderr(Stdio::from(
                std::fs::File::create(log.with_extension("err")).expect("log"),
            ))
            .spawn()
            .expect("systemd-nspawn");
        let pid = nspawn.id();
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut leader = None;
        while leader.is_none() && Instant::now() < deadline {
            let out = run(Command::new("pgrep").args(["-P", &pid.to_string()]));
            leader = String::from_utf8_lossy(&out.stdout)
                .lines()
                .next()
                .and_then(|l| l.trim().parse().ok());
            std::thread::sleep(Duration::from_millis(50));
        }
        let c = Container {
            nspawn,
            leader: leader.expect("the container's init"),
            root: root.to_path_buf(),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let state = c.sh("systemctl is-system-running 2>/dev/null || true");
            let s = String::from_utf8_lossy(&state.stdout).trim().to_string();
            if s == "running" || s == "degraded" {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the container did not boot ({s}): {}",
                c.console()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        c
    }

    pub fn console(&self) -> String {
        format!(
            "{}{}",
            std::fs::read_to_string(&self.log).unwrap_or_default(),
            std::fs::read_to_string(self.log.with_extension("err")).unwrap_or_default()
        )
    }

    /// Runs a shell command inside the container (all its namespaces).
    pub fn sh(&self, script: &str) -> Output {
        run(Command::new("nsenter")
            .args([
                "-t",
                &self.leader.to_string(),
                "-m",
                "-u",
                "-i",
                "-n",
                "-p",
                "--",
            ])
            .args(["/bin/sh", "-c", script])
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"))
    }

    pub fn sh_ok(&self, script: &str) -> String {
        let out = self.sh(script);
        assert!(out.status.success(), "{script}: {}", text(&out));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// The agent's local socket, seen from outside.
    pub fn socket(&self) -> PathBuf {
        PathBuf::from(format!(
            "/proc/{}/root/run/patch-agent/agent.sock",
            self.leader
        ))
    }

    pub fn main_pid(&self) -> String {
        self.sh_ok("systemctl show -p MainPID --value patch-agent")
    }

    pub fn grpc(&self, method: &str) -> Output {
        grpcurl(&strings(&[
            "-plaintext",
            "-unix",
            &self.socket().display().to_string(),
            method,
        ]))
    }

    pub fn wait_serving(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = self.grpc("grpc.health.v1.Health/Check");
            if text(&out).contains("SERVING") && !text(&out).contains("NOT_SERVING") {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "health is not SERVING: {}\n{}",
                text(&out),
                text(&self.sh("journalctl -u patch-agent --no-pager | tail -40"))
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn status(&self) -> Value {
        let out = self.grpc("patchagent.v1.Agent/GetStatus");
        assert!(out.status.success(), "GetStatus: {}", text(&out));
        serde_json::from_slice(&out.stdout).expect("json")
    }

    pub fn install(&self, deb: &Path) -> String {
        let name = deb.file_name().expect("name").to_string_lossy().to_string();
        // Not /tmp: the booted system mounts a tmpfs over it.
        std::fs::copy(deb, self.root.join("var/tmp").join(&name)).expect("copy deb");
        // --force-confold: keep an agent.toml the admin (or a test) changed, as an upgrade on a
        // real host would when asked.
        let out = self.sh(&format!("dpkg -i --force-confold /var/tmp/{name} 2>&1"));
        assert!(out.status.success(), "dpkg -i {name}: {}", text(&out));
        text(&out)
    }

    /// Every path on the root file system, but those that change by themselves.
    pub fn files(&self) -> std::collections::BTreeSet<String> {
        let out = self.sh(
            "find / -xdev \\( -path /proc -o -path /sys -o -path /dev -o -path /run -o -path /tmp -o -path /var/tmp \
             -o -path /var/log -o -path /var/cache -o -path /var/lib/apt -o -path /var/lib/dpkg -o -path /srv \
             -o -path /var/lib/systemd/timers -o -path /var/lib/systemd/catalog -o -path /etc/apt \
             -o -path /var/lib/systemd/random-seed -o -path /var/lib/systemd/timesync \\) -prune -o -print",
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect()
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = self.sh("systemctl poweroff --no-block");
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.nspawn.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.nspawn.kill();
        let _ = self.nspawn.wait();
    }
}

impl Container {
    pub fn grpc_with(&self, method: &str, data: &str) -> Output {
        grpcurl(&strings(&[
            "-plaintext",
            "-unix",
            "-d",
            data,
            &self.socket().display().to_string(),
            method,
        ]))
    }
}

/// Enrolls the agent installed in rootfs `fs`: a dev PKI and a signing key made in `tmp` with
/// patchctl, the CA, agent certificate and key in /etc/patch-agent/tls, the public key in
/// trusted-keys, and the config listening on 127.0.0.1:0 (the container shares the host's
/// network). Returns the PKI and the private signing key.
pub fn enroll(fs: &Path, tmp: &Path, host_id: Option<&str>) -> (Pki, PathBuf) {
    let pki = Pki::new(tmp, "pki");
    let (key, trusted) = signing_key(tmp);
    for f in ["ca.pem", "agent.pem", "agent.key"] {
        std::fs::copy(pki.path(f), fs.join("etc/patch-agent/tls").join(f)).expect("cert");
    }
    std::fs::copy(
        trusted.join("signing.pem"),
        fs.join("etc/patch-agent/trusted-keys/signing.pem"),
    )
    .expect("key");
    let path = fs.join("etc/patch-agent/agent.toml");
    let mut conf = std::fs::read_to_string(&path).expect("conf").replacen(
        "listen = \"0.0.0.0:7443\"",
        "listen = \"127.0.0.1:0\"",
        1,
    );
    if let Some(id) = host_id {
        conf = conf.replacen("host_id = \"\"", &format!("host_id = \"{id}\""), 1);
    }
    std::fs::write(&path, conf).expect("conf");
    (pki, key)
}
