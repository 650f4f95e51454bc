//! A real PostgreSQL server for tests and benchmarks: Debian's `postgresql` package,
//! `initdb` and `pg_ctl` in a temporary directory, as an unprivileged user (`nobody` when the
//! tests run as root), listening on a Unix socket in that directory only. Each test takes a
//! database of its own ([`Server::database`]). A watchdog stops the server when the process
//! that started it exits, however it exits.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

pub struct Server {
    dir: PathBuf,
    bin: PathBuf,
    options: String,
    next: AtomicU32,
}

/// The superuser `initdb` makes; tests connect as it.
const USER: &str = "patchctl";

/// Where the server binaries are: `$PG_BIN`, else the newest /usr/lib/postgresql/N/bin.
fn bin_dir() -> Result<PathBuf, String> {
    if let Some(dir) = std::env::var_os("PG_BIN") {
        return Ok(PathBuf::from(dir));
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .map_err(|e| {
            format!("no PostgreSQL server here (/usr/lib/postgresql: {e}); apt-get install postgresql, or set PG_BIN")
        })?
        .filter_map(|e| {
            let e = e.ok()?;
            let v = e.file_name().to_str()?.parse().ok()?;
            Some((v, e.path().join("bin")))
        })
        .filter(|(_, p)| p.join("pg_ctl").is_file())
        .collect();
    versions.sort();
    versions.pop().map(|(_, p)| p).ok_or_else(|| {
        "no pg_ctl under /usr/lib/postgresql/*/bin; apt-get install postgresql".into()
    })
}

fn is_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false)
}

/// `program` as the unprivileged user when running as root, in a directory it may enter.
fn unprivileged(program: &Path) -> Command {
    let mut c = if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "nobody", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    };
    c.current_dir("/");
    c
}

fn run(mut c: Command, what: &str) -> Result<(), String> {
    let out = c.output().map_err(|e| format!("cannot run {what}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn pg_ctl_start(bin: &Path, dir: &Path, options: &str) -> Result<(), String> {
    let mut start = unprivileged(&bin.join("pg_ctl"));
    start
        .args(["-D"])
        .arg(dir.join("data"))
        .args(["-l"])
        .arg(dir.join("log"))
        .args(["-o", options, "-w", "-t", "60", "start"]);
    run(start, "pg_ctl start")
}

impl Server {
    /// Starts a server. `durable` keeps PostgreSQL's defaults (fsync on: for benchmarks);
    /// otherwise fsync is off, which changes nothing a test asserts and saves it time.
    pub fn start(durable: bool) -> Result<Self, String> {
        static N: AtomicU32 = AtomicU32::new(0);
        let bin = bin_dir()?;
        let dir = std::env::temp_dir().join(format!(
            "pgt-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        if is_root() {
            run(
                {
                    let mut c = Command::new("chown");
                    c.arg("nobody:nogroup").arg(&dir);
                    c
                },
                "chown",
            )?;
        }
        let data = dir.join("data");
        let mut init = unprivileged(&bin.join("initdb"));
        init.args(["-A", "trust", "-U", USER, "-E", "UTF8", "--no-sync", "-D"])
            .arg(&data);
        run(init, "initdb")?;
        let mut options = format!(
            "-k {} -c listen_addresses='' -c max_connections=300 -c shared_buffers=128MB",
            dir.display()
        );
        if !durable {
            options.push_str(" -c fsync=off -c full_page_writes=off");
        }
        pg_ctl_start(&bin, &dir, &options)?;
        // Stops the server when this process is gone, whatever ends it.
        let stop = format!(
            "while [ -d /proc/{pid} ]; do sleep 1; done; {ctl} -D {data} -m immediate stop >/dev/null 2>&1; rm -rf {dir}",
            pid = std::process::id(),
            ctl = bin.join("pg_ctl").display(),
            data = data.display(),
            dir = dir.display()
        );
        let mut watchdog = unprivileged(Path::new("sh"));
        watchdog.args(["-c", &stop]);
        watchdog
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start the server's watchdog: {e}"))?;
        Ok(Self {
            dir,
            bin,
            options,
            next: AtomicU32::new(0),
        })
    }

    /// One server for the whole test process (fsync off).
    pub fn shared() -> &'static Server {
        static SERVER: OnceLock<Server> = OnceLock::new();
        SERVER.get_or_init(|| match Server::start(false) {
            Ok(s) => s,
            Err(e) => panic!("cannot start PostgreSQL for the tests: {e}"),
        })
    }

    /// The URL of database `db` on this server (over its Unix socket).
    pub fn url(&self, db: &str) -> String {
        let socket: String = self
            .dir
            .display()
            .to_string()
            .replace('%', "%25")
            .replace('/', "%2F");
        format!("postgres://{USER}@{socket}/{db}")
    }

    /// A new, empty database; its URL.
    pub fn database(&self) -> Result<String, String> {
        let name = format!("t{}", self.next.fetch_add(1, Ordering::Relaxed));
        let psql = self.bin.join("psql");
        let mut c = unprivileged(if psql.is_file() {
            &psql
        } else {
            Path::new("psql")
        });
        c.args(["-q", "-v", "ON_ERROR_STOP=1", "-h"])
            .arg(&self.dir)
            .args(["-U", USER, "-d", "postgres", "-c"])
            .arg(format!("CREATE DATABASE {name}"));
        run(c, "CREATE DATABASE")?;
        Ok(self.url(&name))
    }

    /// The server's directory (its socket, data and log).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Starts the server again after [`Server::stop`], on the same data.
    pub fn restart(&self) -> Result<(), String> {
        pg_ctl_start(&self.bin, &self.dir, &self.options)
    }

    /// Stops the server now.
    pub fn stop(&self) {
        let mut c = unprivileged(&self.bin.join("pg_ctl"));
        c.arg("-D")
            .arg(self.dir.join("data"))
            .args(["-m", "fast", "stop"]);
        let _ = c.output();
    }
}
