//! Multi-host fixtures: network namespaces on a bridge, and `patchctl serve` in one of them.

use super::{Pki, patchctl, run, text};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub fn ip(args: &[&str]) -> Output {
    run(Command::new("ip").args(args))
}

pub fn ip_ok(args: &[&str]) {
    let out = ip(args);
    assert!(out.status.success(), "ip {args:?}: {}", text(&out));
}

/// Network namespaces on one bridge; the root namespace is 10.213.N.1. Torn down on drop.
pub struct Net {
    bridge: String,
    tag: String,
    subnet: u8,
    nodes: Vec<String>,
}

impl Net {
    pub fn new(name: &str, subnet: u8) -> Self {
        let tag = format!("{name}{}", std::process::id() % 1000);
        let bridge = format!("pab{tag}");
        let _ = ip(&["link", "del", &bridge]);
        ip_ok(&["link", "add", &bridge, "type", "bridge"]);
        let net = Net {
            bridge,
            tag,
            subnet,
            nodes: Vec::new(),
        };
        ip_ok(&[
            "addr",
            "add",
            &format!("10.213.{subnet}.1/24"),
            "dev",
            &net.bridge,
        ]);
        ip_ok(&["link", "set", &net.bridge, "up"]);
        net
    }

    fn veth(&self, i: u8) -> String {
        format!("pv{}{i}", self.tag)
    }

    /// A namespace with address 10.213.N.i; returns (namespace, address).
    pub fn add(&mut self, i: u8) -> (String, String) {
        let ns = format!("pa-{}-{i}", self.tag);
        let _ = ip(&["netns", "del", &ns]);
        ip_ok(&["netns", "add", &ns]);
        self.nodes.push(ns.clone());
        let (outer, inner) = (self.veth(i), format!("pe{}{i}", self.tag));
        ip_ok(&[
            "link", "add", &outer, "type", "veth", "peer", "name", &inner,
        ]);
        ip_ok(&["link", "set", &inner, "netns", &ns]);
        ip_ok(&["link", "set", &outer, "master", &self.bridge, "up"]);
        let addr = format!("10.213.{}.{i}", self.subnet);
        ip_ok(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            &inner,
        ]);
        ip_ok(&["-n", &ns, "link", "set", &inner, "up"]);
        ip_ok(&["-n", &ns, "link", "set", "lo", "up"]);
        (ns, addr)
    }

    /// Cuts or restores node i's link.
    pub fn link(&self, i: u8, up: bool) {
        ip_ok(&["link", "set", &self.veth(i), if up { "up" } else { "down" }]);
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in &self.nodes {
            let _ = ip(&["netns", "del", ns]);
        }
        let _ = ip(&["link", "del", &self.bridge]);
    }
}

/// A NAT gateway: namespace `gw` (a node of an outer [`Net`]) holds a bridge for an inside
/// network 10.214.N.0/24 and masquerades it out of its outer link. Hosts inside reach the
/// outer network; nothing outside has a route to them. Inside namespaces go on drop.
pub struct Nat {
    gw: String,
    tag: String,
    subnet: u8,
    inside: Vec<String>,
}

impl Nat {
    pub fn new(gw: &str, subnet: u8) -> Self {
        let nat = Nat {
            gw: gw.to_string(),
            tag: format!("{subnet}{}", std::process::id() % 1000),
            subnet,
            inside: Vec::new(),
        };
        ip_ok(&["-n", gw, "link", "add", "brin", "type", "bridge"]);
        ip_ok(&[
            "-n",
            gw,
            "addr",
            "add",
            &format!("10.214.{subnet}.1/24"),
            "dev",
            "brin",
        ]);
        ip_ok(&["-n", gw, "link", "set", "brin", "up"]);
        let sysctl = run(Command::new("ip").args([
            "netns",
            "exec",
            gw,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
        ]));
        assert!(sysctl.status.success(), "ip_forward: {}", text(&sysctl));
        let rules = format!(
            "table ip nat {{
 chain postrouting {{
  type nat hook postrouting priority 100; policy accept;
  ip saddr 10.214.{subnet}.0/24 oifname != \"brin\" masquerade
 }}
}}
"
        );
        let mut nft = Command::new("ip")
            .args(["netns", "exec", gw, "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("nft");
        use std::io::Write;
        nft.stdin
            .take()
            .expect("stdin")
            .write_all(rules.as_bytes())
            .expect("rules");
        let out = nft.wait_with_output().expect("nft");
        assert!(out.status.success(), "nft: {}", text(&out));
        nat
    }

    /// A namespace inside, at 10.214.N.i, its default route through the gateway; returns
    /// (namespace, address).
    pub fn add(&mut self, i: u8) -> (String, String) {
        let ns = format!("pn-{}-{i}", self.tag);
        let _ = ip(&["netns", "del", &ns]);
        ip_ok(&["netns", "add", &ns]);
        self.inside.push(ns.clone());
        let (outer, inner) = (format!("pg{}{i}", self.tag), format!("pi{}{i}", self.tag));
        ip_ok(&[
            "-n", &self.gw, "link", "add", &outer, "type", "veth", "peer", "name", &inner,
        ]);
        ip_ok(&["-n", &self.gw, "link", "set", &inner, "netns", &ns]);
        ip_ok(&[
            "-n", &self.gw, "link", "set", &outer, "master", "brin", "up",
        ]);
        let addr = format!("10.214.{}.{i}", self.subnet);
        ip_ok(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            &inner,
        ]);
        ip_ok(&["-n", &ns, "link", "set", &inner, "up"]);
        ip_ok(&["-n", &ns, "link", "set", "lo", "up"]);
        ip_ok(&[
            "-n",
            &ns,
            "route",
            "add",
            "default",
            "via",
            &format!("10.214.{}.1", self.subnet),
        ]);
        (ns, addr)
    }
}

impl Drop for Nat {
    fn drop(&mut self) {
        for ns in &self.inside {
            let _ = ip(&["netns", "del", ns]);
        }
    }
}

/// Which store a test's controller uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    /// Points the controllers started in `dir` at this store: DIR/controller.db, or a new
    /// database on the test process's PostgreSQL server (its URL kept in DIR/db-url).
    pub fn prepare(self, dir: &Path) {
        if self == Backend::Postgres {
            let url = patch_agent_controller::testing::Server::shared()
                .database()
                .expect("a PostgreSQL database for the test");
            std::fs::write(dir.join("db-url"), url).expect("db-url");
        }
    }

    /// A short tag that keeps the two runs of one test apart (names, subnets).
    pub fn tag(self) -> &'static str {
        match self {
            Backend::Sqlite => "",
            Backend::Postgres => "p",
        }
    }
}

/// The `--db` of the controllers started in `dir` (see [`Backend::prepare`]).
pub fn db_of(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("db-url"))
        .unwrap_or_else(|_| dir.join("controller.db").display().to_string())
}

/// `patchctl serve`, optionally inside a namespace.
pub struct Controller {
    pub child: Child,
    pub log: PathBuf,
    pub addr: String,
}

impl Controller {
    pub fn start(dir: &Path, pki: &Pki, listen: &str, netns: Option<&str>) -> Self {
        Self::start_with(dir, pki, listen, netns, &[])
    }

    /// [`Controller::start`] with more `patchctl serve` arguments.
    pub fn start_with(
        dir: &Path,
        pki: &Pki,
        listen: &str,
        netns: Option<&str>,
        extra: &[String],
    ) -> Self {
        Self::start_env(dir, pki, listen, netns, extra, &[])
    }

    /// [`Controller::start_with`] with environment variables (e.g. RUST_LOG for benches).
    pub fn start_env(
        dir: &Path,
        pki: &Pki,
        listen: &str,
        netns: Option<&str>,
        extra: &[String],
        env: &[(&str, &str)],
    ) -> Self {
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let log = dir.join(format!("controller-{stamp}.log"));
        let logf = std::fs::File::create(&log).expect("log");
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(patchctl());
                c
            }
            None => Command::new(patchctl()),
        };
        cmd.args(["serve", "--listen", listen, "--db"])
            .arg(db_of(dir))
            .arg("--ca")
            .arg(pki.path("ca.pem"))
            .arg("--cert")
            .arg(dir.join("ctl.pem"))
            .arg("--key")
            .arg(dir.join("ctl.key"))
            .args(extra)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(logf.try_clone().expect("dup"))
            .stderr(logf);
        let child = cmd.spawn().expect("patchctl serve");
        let mut c = Controller {
            child,
            log,
            addr: String::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            let t = std::fs::read_to_string(&c.log).unwrap_or_default();
            if let Some(rest) = t.split("listening on ").nth(1) {
                c.addr = rest.split_whitespace().next().unwrap_or_default().into();
                return c;
            }
            if let Ok(Some(st)) = c.child.try_wait() {
                panic!("controller exited {st}: {t}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("controller not listening: {}", c.log_text());
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The controller's certificate (`dir/ctl.pem`, `dir/ctl.key`): controller.fleet and `ip`.
pub fn issue_ctl_cert(dir: &Path, pki: &Pki, ip: &str) {
    pki.issue(
        &dir.join("ctl"),
        &[
            "--name",
            "controller.fleet",
            "--san",
            ip,
            "--usage",
            "server",
        ],
    );
}

/// `patchctl serve` on `listen` with enrolment on: the PKI's CA signs agents' certificates,
/// the keys in `published` (if any) go to enrolled hosts. Issues the controller's own
/// certificate (`dir/ctl.pem`, for the listen address) first.
pub fn enrolling_controller(
    dir: &Path,
    pki: &Pki,
    listen: &str,
    netns: Option<&str>,
    published: Option<&Path>,
    more: &[&str],
) -> Controller {
    issue_ctl_cert(
        dir,
        pki,
        listen.rsplit_once(':').map_or("127.0.0.1", |(h, _)| h),
    );
    let path = |p: &Path| p.to_str().expect("utf-8 path").to_string();
    let mut extra = vec![
        "--enroll-ca-cert".to_string(),
        path(&pki.path("ca.pem")),
        "--enroll-ca-key".to_string(),
        path(&pki.path("ca.key")),
    ];
    if let Some(p) = published {
        extra.extend(["--publish-signing-keys".to_string(), path(p)]);
    }
    extra.extend(more.iter().map(|s| s.to_string()));
    Controller::start_with(dir, pki, listen, netns, &extra)
}

/// `patchctl tokens create --db DB ARGS...`: the token (its last line).
pub fn create_token(db: &Path, args: &[&str]) -> String {
    let out = run(Command::new(patchctl())
        .args(["tokens", "create", "--db"])
        .arg(db)
        .args(args));
    assert!(out.status.success(), "tokens create: {}", text(&out));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .expect("token line")
        .trim()
        .to_string()
}

/// `patchctl ca-hash FILE`.
pub fn ca_hash(ca: &Path) -> String {
    let out = run(Command::new(patchctl()).arg("ca-hash").arg(ca));
    assert!(out.status.success(), "ca-hash: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The rollout id `patchctl rollout` printed ("rollout ID ...").
pub fn created_id(out: &std::process::Output) -> String {
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    all.split("rollout ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .unwrap_or_else(|| panic!("no rollout id in {all}"))
        .to_string()
}
