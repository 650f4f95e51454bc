//! Metrics and the dashboard, end to end, against real parts: three real agents (one on an apt
//! sandbox, two on dnf sandboxes) report to a real `patchctl serve --http`; a real Prometheus
//! (Debian's package) scrapes the agents' `[metrics] listen` and the controller's `/metrics`;
//! a real headless Chromium loads every dashboard page; `tidy` checks the HTML. Expected values
//! come from the hosts themselves (`apt-get -s upgrade`, `dnf check-update`, `rpm -q`, the
//! reboot-required file) and from `patchctl compliance --json`, never from the agent's word.

mod common;

use common::http;
use common::net::{Controller, db_of, issue_ctl_cert};
use common::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Host {
    id: String,
    sandbox: PathBuf,
    agent: Agent,
    /// Where its `/metrics` listens.
    metrics: String,
}

fn packages(kind: &str, s: &Path) -> String {
    let s = s.display();
    match kind {
        "apt" => format!(
            "[packages]\nmanager = \"apt\"\nscan_on_start = true\napt_config = \"{s}/apt.conf\"\ndpkg_status = \"{s}/root/var/lib/dpkg/status\"\nreboot_required_file = \"{s}/root/run/reboot-required\"\ndpkg_args = [\"--root={s}/root\", \"--force-not-root\", \"--force-script-chrootless\", \"--log={s}/root/var/log/dpkg.log\"]\n"
        ),
        _ => format!(
            "[packages]\nmanager = \"dnf\"\nscan_on_start = true\nrpm_root = \"{s}/root\"\ndnf_args = [{}]\n",
            dnf_args(Path::new(&s.to_string()))
                .iter()
                .map(|a| format!("{a:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

fn dnf_args(s: &Path) -> Vec<String> {
    let s = s.display();
    vec![
        "-c".into(),
        format!("{s}/dnf.conf"),
        format!("--installroot={s}/root"),
        "--releasever=1".into(),
        format!("--setopt=reposdir={s}/repos.d"),
        format!("--setopt=cachedir={s}/cache"),
    ]
}

fn start_host(
    tmp: &Path,
    pki: &Pki,
    ctl: &Controller,
    trusted: &Path,
    kind: &'static str,
    id: &str,
    env: &str,
) -> Host {
    let dir = tmp.join(id);
    let sandbox = dir.join(kind);
    let script =
        Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/fixtures/{kind}-sandbox.sh"));
    let out = run(Command::new("bash").arg(script).arg(&sandbox));
    assert!(out.status.success(), "{kind} sandbox: {}", text(&out));
    std::fs::create_dir_all(dir.join("hooks")).expect("hooks");
    pki.issue(
        &dir.join("agent"),
        &["--name", id, "--san", "127.0.0.1", "--usage", "server"],
    );
    let d = dir.display();
    let config = format!(
        "[agent]\nstate_dir = \"{d}/state\"\nhost_id = \"{id}\"\nlabels = {{ environment = \"{env}\" }}\n\
         [server]\nlisten = \"127.0.0.1:0\"\nlocal_socket = \"{d}/agent.sock\"\ndrain_grace = \"100ms\"\ndrain_timeout = \"1s\"\n\
         [tls]\nca = \"{ca}\"\ncert = \"{d}/agent.pem\"\nkey = \"{d}/agent.key\"\n\
         [auth]\ncontrollers = [\"controller\"]\n\
         {packages}\
         [jobs]\ntrusted_keys_dir = \"{t}\"\nmin_free_mib = 1\nhooks_dir = \"{d}/hooks\"\n\
         [report]\ncontroller = \"{ctl}\"\nserver_name = \"controller.fleet\"\nretry_initial = \"200ms\"\nretry_max = \"1s\"\ntimeout = \"5s\"\n\
         [metrics]\nlisten = \"127.0.0.1:0\"\n",
        ca = pki.path("ca.pem").display(),
        packages = packages(kind, &sandbox),
        t = trusted.display(),
        ctl = ctl.addr,
    );
    let agent = Agent::start(&dir, &config);
    agent.wait_log("Serving metrics at /metrics", 1);
    let metrics = agent
        .log_text()
        .lines()
        .find(|l| l.contains("Serving metrics at /metrics"))
        .and_then(|l| l.split("address=").nth(1))
        .and_then(|a| a.split_whitespace().next())
        .expect("metrics address in the log")
        .to_string();
    Host {
        id: id.to_string(),
        sandbox,
        agent,
        metrics,
    }
}

fn patchctl_json(args: &[&str]) -> Value {
    let out = run(Command::new(patchctl()).args(args));
    assert!(out.status.success(), "patchctl {args:?}: {}", text(&out));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{args:?}: {e}: {}", text(&out)))
}

/// Polls `check` until it returns Some, or fails with `what` and the last value seen.
fn eventually<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        match check() {
            Ok(v) => return v,
            Err(last) if Instant::now() >= deadline => panic!("{what}: {last}"),
            Err(_) => std::thread::sleep(Duration::from_millis(250)),
        }
    }
}

/// `apt-get -s upgrade` on the sandbox: the `Inst` lines are what apt.sh counts as pending.
fn apt_pending(sandbox: &Path) -> usize {
    let out = run(Command::new("apt-get")
        .arg("-c")
        .arg(sandbox.join("apt.conf"))
        .args(["-s", "upgrade"]));
    assert!(out.status.success(), "apt-get -s upgrade: {}", text(&out));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with("Inst "))
        .count()
}

/// Packages dpkg holds on the sandbox.
fn apt_held(sandbox: &Path) -> usize {
    let out = run(Command::new("dpkg")
        .arg(format!(
            "--admindir={}/root/var/lib/dpkg",
            sandbox.display()
        ))
        .arg("--get-selections"));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.split_whitespace().nth(1) == Some("hold"))
        .count()
}

/// `dnf check-update` on the sandbox: one line per pending update.
fn dnf_pending(sandbox: &Path) -> usize {
    let out = run(Command::new("dnf")
        .args(dnf_args(sandbox))
        .args(["-q", "-C", "check-update"]));
    assert!(
        matches!(out.status.code(), Some(0 | 100)),
        "dnf check-update: {}",
        text(&out)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.split_whitespace().count() == 3)
        .count()
}

fn rpm_version(sandbox: &Path, name: &str) -> String {
    let out = run(Command::new("rpm")
        .arg("--root")
        .arg(sandbox.join("root"))
        .args(["-q", "--qf", "%{VERSION}", name]));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

struct Prometheus {
    child: Child,
    addr: String,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    fn start(dir: &Path, jobs: &[(&str, Vec<String>)]) -> Self {
        let mut config = String::from(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\nscrape_configs:\n",
        );
        for (job, targets) in jobs {
            config.push_str(&format!(
                "  - job_name: {job}\n    static_configs:\n      - targets: [{}]\n",
                targets
                    .iter()
                    .map(|t| format!("'{t}'"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        std::fs::create_dir_all(dir).expect("prometheus dir");
        std::fs::write(dir.join("prometheus.yml"), config).expect("config");
        let addr = format!("127.0.0.1:{}", http::free_port());
        let log = std::fs::File::create(dir.join("prometheus.log")).expect("log");
        let child = Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup"))
            .stderr(log)
            .spawn()
            .expect("prometheus (Debian's package)");
        Prometheus { child, addr }
    }

    /// An instant query's vector: (labels, value) per series.
    fn query(&self, q: &str) -> Result<Vec<(Value, f64)>, String> {
        let r = http::try_get(
            &self.addr,
            &format!("/api/v1/query?query={}", http::encode(q)),
        )
        .map_err(|e| format!("Prometheus at {}: {e}", self.addr))?;
        if r.status != 200 {
            return Err(format!("{q}: HTTP {} {}", r.status, r.body));
        }
        let v: Value = serde_json::from_str(&r.body).map_err(|e| format!("{q}: {e}"))?;
        Ok(v["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .map(|s| {
                let value = s["value"][1]
                    .as_str()
                    .and_then(|x| x.parse().ok())
                    .unwrap_or(f64::NAN);
                (s["metric"].clone(), value)
            })
            .collect())
    }

    /// Waits until `q` is one series equal to `want`.
    fn expect(&self, q: &str, want: f64) {
        eventually(
            &format!("Prometheus {q} == {want}"),
            Duration::from_secs(60),
            || match self.query(q)?.as_slice() {
                [(_, v)] if (v - want).abs() < 1e-9 => Ok(()),
                other => Err(format!("got {other:?}")),
            },
        );
    }
}

/// `data-figure="NAME">VALUE<` occurrences in a page, in order.
fn figures<'a>(html: &'a str, name: &str) -> Vec<&'a str> {
    let needle = format!("data-figure=\"{name}\">");
    html.match_indices(&needle)
        .map(|(i, _)| {
            let rest = &html[i + needle.len()..];
            let rest = rest
                .strip_prefix("<a href=")
                .map_or(rest, |r| r.split_once('>').map_or(r, |(_, after)| after));
            rest.split('<').next().unwrap_or_default()
        })
        .collect()
}

/// How the pages write a percentage.
fn pct(v: &Value) -> String {
    v.as_f64()
        .map_or_else(|| "n/a".to_string(), |v| format!("{v:.1} %"))
}

/// The fleet page's figures equal `compliance --json`'s.
fn assert_fleet_figures(html: &str, d: &Value, page: &str) {
    assert_eq!(
        figures(html, "overall_compliance_percent"),
        [pct(&d["overall_compliance_percent"])],
        "{page}"
    );
    for key in [
        "hosts",
        "hosts_known",
        "hosts_unknown",
        "hosts_reboot_required",
    ] {
        assert_eq!(figures(html, key), [d[key].to_string()], "{page}: {key}");
    }
    assert_eq!(
        figures(html, "hosts_overdue")[0],
        (d["hosts_known"].as_u64().unwrap_or(0) - d["hosts_compliant"].as_u64().unwrap_or(0))
            .to_string(),
        "{page}"
    );
    let classes = d["by_class"].as_array().expect("classes");
    let per_class = figures(html, "compliance_percent");
    for (i, c) in classes.iter().enumerate() {
        assert_eq!(
            per_class[i],
            pct(&c["compliance_percent"]),
            "{page}: {}",
            c["class"]
        );
        assert_eq!(
            figures(html, "pending")[i],
            c["pending"].to_string(),
            "{page}: {}",
            c["class"]
        );
        assert_eq!(
            figures(html, "overdue")[i],
            c["overdue"].to_string(),
            "{page}: {}",
            c["class"]
        );
    }
    // Then one per environment, in the JSON's (sorted) order.
    let envs: Vec<String> = d["by_environment"]
        .as_object()
        .expect("envs")
        .values()
        .map(|e| pct(&e["compliance_percent"]))
        .collect();
    assert_eq!(per_class[classes.len()..], envs[..], "{page}");
}

/// `tidy` finds no error and no warning in `html`.
fn assert_valid_html(html: &str, dir: &Path, name: &str) {
    let file = dir.join(format!("{name}.html"));
    std::fs::write(&file, html).expect("write page");
    let out = run(Command::new("tidy")
        .args(["-q", "-e", "-utf8", "--drop-empty-elements", "no"])
        .arg(&file));
    assert_eq!(out.status.code(), Some(0), "tidy {name}: {}", text(&out));
}

/// Loads `url` in headless Chromium: the DOM after load, and a screenshot under
/// target/dashboard/. Fails on any console message (there is no script, so any is an error:
/// a blocked resource, a CSP violation).
fn chromium(url: &str, shot: &Path) -> String {
    let base = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        "--enable-logging=stderr",
        "--v=0",
        "--window-size=1280,1600",
    ];
    let out = run(Command::new("chromium")
        .args(base)
        .arg("--dump-dom")
        .arg(url));
    assert!(out.status.success(), "chromium {url}: {}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let console: Vec<&str> = stderr.lines().filter(|l| l.contains(":CONSOLE")).collect();
    assert!(
        console.is_empty(),
        "console messages on {url}: {console:#?}"
    );
    let shot_out = run(Command::new("chromium")
        .args(base)
        .arg(format!("--screenshot={}", shot.display()))
        .arg(url));
    assert!(
        shot_out.status.success() && shot.exists(),
        "screenshot {url}: {}",
        text(&shot_out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn prometheus_scrapes_agents_and_controller_and_the_dashboard_shows_the_same_figures() {
    let (tmp, pki) = setup("obs");
    let ctl_dir = tmp.path().join("ctl");
    std::fs::create_dir_all(&ctl_dir).expect("ctl dir");
    issue_ctl_cert(&ctl_dir, &pki, "127.0.0.1");
    let ctl = Controller::start_with(
        &ctl_dir,
        &pki,
        "127.0.0.1:0",
        None,
        &strings(&["--http", "127.0.0.1:0", "--operators", "operator"]),
    );
    let dashboard = eventually("the dashboard's address", Duration::from_secs(10), || {
        ctl.log_text()
            .split("dashboard and /metrics on http://")
            .nth(1)
            .and_then(|r| r.split('/').next())
            .map(str::to_string)
            .ok_or_else(|| ctl.log_text())
    });
    let db = db_of(&ctl_dir);
    let (key, trusted) = signing_key(tmp.path());
    let hosts = [
        start_host(
            tmp.path(),
            &pki,
            &ctl,
            &trusted,
            "apt",
            "apt-host",
            "production",
        ),
        start_host(
            tmp.path(),
            &pki,
            &ctl,
            &trusted,
            "dnf",
            "dnf-a",
            "production",
        ),
        start_host(tmp.path(), &pki, &ctl, &trusted, "dnf", "dnf-b", "staging"),
    ];
    eventually(
        "three inventories at the controller",
        Duration::from_secs(120),
        || {
            let d = patchctl_json(&["compliance", "--db", &db, "--json"]);
            (d["hosts_with_inventory"] == 3)
                .then_some(())
                .ok_or_else(|| d.to_string())
        },
    );

    // A real job on dnf-b: security updates only. rpm says what it did.
    let dnf_b = &hosts[2];
    let job = tmp.path().join("sec.job");
    let out = run(Command::new(patchctl())
        .args(["job", "sign", "--signing-key"])
        .arg(&key)
        .arg("-o")
        .arg(&job)
        .args([
            "--id",
            "obs-sec",
            "--target",
            "dnf-b",
            "--upgrade",
            "security",
        ]));
    assert!(out.status.success(), "sign: {}", text(&out));
    let agent = format!("unix:{}", dnf_b.agent.socket.display());
    let out = run(Command::new(patchctl())
        .args(["submit", "--agent", &agent])
        .arg(&job));
    assert!(out.status.success(), "submit: {}", text(&out));
    let out = run(Command::new(patchctl()).args(["watch", "--agent", &agent, "obs-sec"]));
    assert!(out.status.success(), "watch: {}", text(&out));
    for (name, want) in [
        ("crit", "1.1"),
        ("imp", "1.1"),
        ("mod", "1.1"),
        ("low", "1.1"),
        ("bug", "1.0"),
        ("plain", "1.0"),
    ] {
        assert_eq!(rpm_version(&dnf_b.sandbox, name), want, "{name} on dnf-b");
    }
    // The controller has the job's result and dnf-b's inventory after it.
    eventually(
        "dnf-b's job and its new inventory at the controller",
        Duration::from_secs(60),
        || {
            let jobs = patchctl_json(&["history", "--db", &db, "--job", "obs-sec", "--json"]);
            let host = http::get(&dashboard, "/hosts/dnf-b?format=json");
            let v: Value = serde_json::from_str(&host.body).map_err(|e| e.to_string())?;
            let pending = v["updates"].as_array().map_or(usize::MAX, Vec::len);
            (jobs[0]["final"] == true && pending == dnf_pending(&dnf_b.sandbox))
                .then_some(())
                .ok_or_else(|| format!("jobs {jobs}, {pending} pending"))
        },
    );

    // Prometheus: every target up, then each figure against the hosts and the controller.
    let prom = Prometheus::start(
        &tmp.path().join("prometheus"),
        &[
            ("apt", vec![hosts[0].metrics.clone()]),
            (
                "dnf",
                vec![hosts[1].metrics.clone(), hosts[2].metrics.clone()],
            ),
            ("controller", vec![dashboard.clone()]),
        ],
    );
    prom.expect("count(up == 1)", 4.0);
    let apt = &hosts[0];
    prom.expect(
        "sum(apt_upgrades_pending)",
        apt_pending(&apt.sandbox) as f64,
    );
    prom.expect("sum(apt_upgrades_held)", apt_held(&apt.sandbox) as f64);
    assert!(apt.sandbox.join("root/run/reboot-required").exists());
    prom.expect("node_reboot_required{job=\"apt\"}", 1.0);
    for h in &hosts[1..] {
        prom.expect(
            &format!("sum(yum_upgrades_pending{{instance=\"{}\"}})", h.metrics),
            dnf_pending(&h.sandbox) as f64,
        );
    }
    prom.expect(
        &format!(
            "patchagent_jobs_total{{instance=\"{}\",state=\"SUCCEEDED\"}}",
            dnf_b.metrics
        ),
        1.0,
    );
    prom.expect("count(patchagent_build_info)", 3.0);
    prom.expect("count(process_resident_memory_bytes > 0)", 3.0);
    let d = patchctl_json(&["compliance", "--db", &db, "--json"]);
    prom.expect(
        "patchctl_compliance_percent",
        d["overall_compliance_percent"].as_f64().expect("percent"),
    );
    prom.expect("patchctl_hosts", 3.0);
    prom.expect(
        "patchctl_hosts_overdue",
        (d["hosts_known"].as_u64().expect("n") - d["hosts_compliant"].as_u64().expect("n")) as f64,
    );
    prom.expect(
        "patchctl_hosts_reboot_required",
        d["hosts_reboot_required"].as_f64().expect("n"),
    );
    prom.expect(
        "sum(patchctl_reports_ingested_total{kind=\"job\"}) > bool 0",
        1.0,
    );
    prom.expect(
        "sum(patchctl_reports_ingested_total{kind=\"inventory\"}) >= bool 3",
        1.0,
    );

    // The CVE search finds exactly the hosts whose root still has the vulnerable version.
    for (cve, package) in [
        ("CVE-2026-0001", "crit"),
        ("CVE-2026-0003", "imp"),
        ("CVE-2026-0005", "low"),
    ] {
        let mut want: Vec<String> = hosts[1..]
            .iter()
            .filter(|h| rpm_version(&h.sandbox, package) == "1.0")
            .map(|h| h.id.clone())
            .collect();
        want.sort();
        let rows = patchctl_json(&[
            "hosts",
            "list",
            "--db",
            &db,
            "--cve",
            &cve.to_lowercase(),
            "--json",
        ]);
        let mut got: Vec<String> = rows
            .as_array()
            .expect("rows")
            .iter()
            .map(|r| r["host_id"].as_str().expect("id").to_string())
            .collect();
        got.sort();
        assert_eq!(got, want, "{cve}: {rows}");
        assert!(
            rows.as_array()
                .expect("rows")
                .iter()
                .all(|r| r["package"] == package && r["deadline"].is_i64()),
            "{rows}"
        );
        let page: Value = serde_json::from_str(
            &http::get(&dashboard, &format!("/cve?id={cve}&format=json")).body,
        )
        .expect("json");
        assert_eq!(page["hosts"], want.len(), "{page}");
    }
    assert_eq!(exposed_to_an_unknown_cve(&db), 0);

    // Every page in a real browser: figures equal compliance --json, valid HTML, no console
    // message, a screenshot each.
    let shots = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/dashboard");
    std::fs::create_dir_all(&shots).expect("target/dashboard");
    let pages = [
        ("fleet", "/".to_string()),
        ("hosts", "/hosts".to_string()),
        ("hosts-overdue", "/hosts?compliance=overdue".to_string()),
        ("host-apt", "/hosts/apt-host".to_string()),
        ("host-dnf-a", "/hosts/dnf-a".to_string()),
        ("job", "/jobs/obs-sec".to_string()),
        ("rollouts", "/rollouts".to_string()),
        ("cve", "/cve?id=CVE-2026-0003".to_string()),
    ];
    let d = patchctl_json(&["compliance", "--db", &db, "--json"]);
    for (name, path) in &pages {
        let served = http::get(&dashboard, path);
        assert_eq!(served.status, 200, "{path}: {}", served.body);
        assert_valid_html(&served.body, tmp.path(), name);
        let dom = chromium(
            &format!("http://{dashboard}{path}"),
            &shots.join(format!("{name}.png")),
        );
        match *name {
            "fleet" => assert_fleet_figures(&dom, &d, path),
            "hosts" => assert_eq!(figures(&dom, "matched"), ["3"], "{path}"),
            "hosts-overdue" => {
                let overdue = d["hosts_known"].as_u64().expect("n")
                    - d["hosts_compliant"].as_u64().expect("n");
                assert_eq!(figures(&dom, "matched"), [overdue.to_string()], "{path}");
            }
            "host-apt" => {
                assert_eq!(
                    figures(&dom, "pending"),
                    [apt_pending(&apt.sandbox).to_string()],
                    "{path}"
                );
                assert_eq!(figures(&dom, "reboot_required"), ["yes"], "{path}");
            }
            "host-dnf-a" => assert_eq!(
                figures(&dom, "pending"),
                [dnf_pending(&hosts[1].sandbox).to_string()],
                "{path}"
            ),
            "job" => {
                assert_eq!(figures(&dom, "state"), ["SUCCEEDED"], "{path}");
                for p in ["crit", "imp", "mod", "low"] {
                    assert!(
                        dom.contains(&format!("data-package=\"{p}\"")),
                        "{p} in the job page"
                    );
                }
            }
            _ => {}
        }
        // The JSON twin of every page parses.
        let sep = if path.contains('?') { '&' } else { '?' };
        let twin = http::get(&dashboard, &format!("{path}{sep}format=json"));
        assert_eq!(twin.status, 200, "{path} json");
        serde_json::from_str::<Value>(&twin.body).unwrap_or_else(|e| panic!("{path} json: {e}"));
    }

    // Audit exports: CSV and HTML hold the JSON's figures.
    let out = run(Command::new(patchctl()).args(["compliance", "--db", &db, "--format", "csv"]));
    assert!(out.status.success(), "csv: {}", text(&out));
    let csv = String::from_utf8_lossy(&out.stdout).into_owned();
    let cell = |scope: &str, name: &str, figure: &str| -> String {
        csv.lines()
            .find_map(|l| l.strip_prefix(&format!("{scope},{name},{figure},")))
            .unwrap_or_else(|| panic!("no {scope},{name},{figure} in {csv}"))
            .to_string()
    };
    let same = |cell: String, json: &Value, what: &str| match json.as_f64() {
        Some(v) => assert!(
            (cell.parse::<f64>().expect(what) - v).abs() < 1e-9,
            "{what}: {cell} vs {v}"
        ),
        None => assert_eq!(cell, "", "{what}"),
    };
    for key in [
        "hosts",
        "hosts_known",
        "hosts_compliant",
        "overall_compliance_percent",
        "patch_failure_rate_percent",
        "hosts_reboot_required",
        "jobs_ran",
    ] {
        same(cell("fleet", "", key), &d[key], key);
    }
    for c in d["by_class"].as_array().expect("classes") {
        let class = c["class"].as_str().expect("class");
        for key in ["compliance_percent", "pending", "overdue", "hosts_overdue"] {
            same(
                cell("class", class, key),
                &c[key],
                &format!("{class} {key}"),
            );
        }
    }
    for (env, e) in d["by_environment"].as_object().expect("envs") {
        same(
            cell("environment", env, "compliance_percent"),
            &e["compliance_percent"],
            env,
        );
    }
    let out = run(Command::new(patchctl()).args(["compliance", "--db", &db, "--format", "html"]));
    assert!(out.status.success(), "html: {}", text(&out));
    let report = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        !report.contains("src=")
            && !report.contains("href=\"/")
            && !report.contains("href=\"http")
            && !report.contains("url("),
        "the report fetches nothing and links nowhere"
    );
    assert_valid_html(&report, tmp.path(), "report");
    let file = tmp.path().join("report.html");
    let dom = chromium(
        &format!("file://{}", file.display()),
        &shots.join("report.png"),
    );
    assert_fleet_figures(&dom, &d, "report.html");
    drop(hosts);
}

/// A CVE no host is exposed to finds nobody (and says so).
fn exposed_to_an_unknown_cve(db: &str) -> usize {
    let rows = patchctl_json(&[
        "hosts",
        "list",
        "--db",
        db,
        "--cve",
        "CVE-2099-99999",
        "--json",
    ]);
    rows.as_array().map_or(usize::MAX, Vec::len)
}

/// `GET path` over TLS with `openssl s_client` (HTTP/1.1 by ALPN), as `who` (a certificate
/// and key pair) or with no certificate; the server's reply, empty when it closed the
/// connection first.
fn https_get(addr: &str, ca: &Path, who: Option<(&Path, &Path)>, path: &str) -> String {
    let mut cmd = Command::new("openssl");
    cmd.args([
        "s_client",
        "-quiet",
        "-verify_return_error",
        "-alpn",
        "http/1.1",
        "-connect",
        addr,
    ])
    .arg("-CAfile")
    .arg(ca)
    .args(["-servername", "controller.fleet"]);
    if let Some((cert, key)) = who {
        cmd.arg("-cert").arg(cert).arg("-key").arg(key);
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("openssl");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin");
        let _ = write!(
            stdin,
            "GET {path} HTTP/1.1\r\nHost: controller.fleet\r\nConnection: close\r\n\r\n"
        );
        // Keep stdin open until the reply is in: s_client stops at EOF on stdin otherwise.
        std::thread::sleep(Duration::from_millis(1500));
    }
    let out = child.wait_with_output().expect("openssl output");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_dashboard_over_tls_admits_operators_only_and_plain_http_stays_on_loopback() {
    let (tmp, pki) = setup("obs-tls");
    let ctl_dir = tmp.path().join("ctl");
    std::fs::create_dir_all(&ctl_dir).expect("ctl dir");
    issue_ctl_cert(&ctl_dir, &pki, "127.0.0.1");

    // Plain HTTP on an address other than loopback is refused at start, naming the fix.
    let out = run(Command::new(patchctl())
        .args(["serve", "--listen", "127.0.0.1:0", "--db"])
        .arg(ctl_dir.join("refused.db"))
        .arg("--ca")
        .arg(pki.path("ca.pem"))
        .arg("--cert")
        .arg(ctl_dir.join("ctl.pem"))
        .arg("--key")
        .arg(ctl_dir.join("ctl.key"))
        .args(["--http", "0.0.0.0:0"]));
    assert!(
        !out.status.success(),
        "plain HTTP on 0.0.0.0 must be refused"
    );
    assert!(text(&out).contains("--http-tls"), "{}", text(&out));

    let ctl = Controller::start_with(
        &ctl_dir,
        &pki,
        "127.0.0.1:0",
        None,
        &strings(&[
            "--http",
            "127.0.0.1:0",
            "--http-tls",
            "--operators",
            "operator",
        ]),
    );
    let addr = eventually("the dashboard's address", Duration::from_secs(10), || {
        ctl.log_text()
            .split("dashboard and /metrics on https://")
            .nth(1)
            .and_then(|r| r.split('/').next())
            .map(str::to_string)
            .ok_or_else(|| ctl.log_text())
    });
    let (op_cert, op_key) = pki.issue(
        &tmp.path().join("operator"),
        &["--name", "operator", "--usage", "client"],
    );
    let ca = pki.path("ca.pem");
    let reply = https_get(&addr, &ca, Some((&op_cert, &op_key)), "/?format=json");
    assert!(
        reply.starts_with("HTTP/1.1 200"),
        "an operator reads the dashboard: {reply}"
    );
    assert!(reply.contains("\"hosts\": 0"), "{reply}");
    assert!(
        reply
            .to_ascii_lowercase()
            .contains("content-security-policy: default-src 'none'"),
        "{reply}"
    );
    // A certificate from the same CA that names no operator (an agent's, a viewer's): closed.
    for who in ["agent", "viewer"] {
        let reply = https_get(
            &addr,
            &ca,
            Some((
                &pki.path(&format!("{who}.pem")),
                &pki.path(&format!("{who}.key")),
            )),
            "/",
        );
        assert!(
            !reply.contains("HTTP/1.1"),
            "{who} must not read the dashboard: {reply}"
        );
    }
    // No certificate at all: the handshake fails.
    let reply = https_get(&addr, &ca, None, "/");
    assert!(!reply.contains("HTTP/1.1"), "no certificate: {reply}");
    // Plain HTTP to the TLS port gets nothing either.
    let plain = http::try_get(&addr, "/").map(|r| r.status).unwrap_or(0);
    assert_ne!(plain, 200);
}
