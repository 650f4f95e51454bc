//! `patch-agent`: the daemon. Thin: parse arguments, then hand over to `patch_agent::daemon`.

use clap::{Parser, Subcommand};
use patch_agent::config::{self, LogFormat};
use patch_agent::daemon;
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(
    name = "patch-agent",
    version = patch_agent::VERSION,
    about = "Patch agent daemon: host facts and signed patch jobs over mTLS gRPC"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the agent until SIGTERM.
    Run {
        #[arg(long, short = 'c', default_value = config::DEFAULT_PATH)]
        config: PathBuf,
        /// Log format; overrides [log] format.
        #[arg(long, value_enum)]
        log_format: Option<LogFormat>,
    },
    /// Check the configuration and TLS files; print every problem and exit 2, or print each
    /// effective value with where it came from (agent.toml, enrolled.toml, default) and exit 0.
    CheckConfig {
        #[arg(long, short = 'c', default_value = config::DEFAULT_PATH)]
        config: PathBuf,
    },
    /// Join a fleet: make a key on this host, check the controller by its CA hash, trade a
    /// join token for a certificate, and write key, certificate, CA, signing keys and
    /// enrolled.toml. Writes nothing unless all of it succeeds. Exit 0 enrolled, 1 refused or
    /// unreachable, 2 bad arguments or configuration.
    Enroll {
        /// The controller, HOST:PORT. Or PATCH_AGENT_CONTROLLER.
        #[arg(long)]
        controller: Option<String>,
        /// The join token from `patchctl tokens create`. Prefer PATCH_AGENT_TOKEN in the
        /// environment or the env file: command lines are visible to every user of the host.
        #[arg(long)]
        token: Option<String>,
        /// sha256:HEX of the controller CA's public key (`patchctl ca-hash ca.pem`). Or
        /// PATCH_AGENT_CA_HASH.
        #[arg(long)]
        ca_hash: Option<String>,
        /// The host id to enroll as. Or PATCH_AGENT_HOST_ID. Default: [agent] host_id, else
        /// the FQDN.
        #[arg(long)]
        host_id: Option<String>,
        /// Another DNS name for the certificate (repeatable).
        #[arg(long = "san")]
        sans: Vec<String>,
        /// KEY=VALUE file with the PATCH_AGENT_* variables (0600), read for what neither a
        /// flag nor the environment sets; a missing file is ignored.
        #[arg(long)]
        env_file: Option<PathBuf>,
        #[arg(long, short = 'c', default_value = config::DEFAULT_PATH)]
        config: PathBuf,
    },
}

fn main() {
    let cli = Cli::parse();
    let code = match cli.command {
        Command::Run { config, log_format } => daemon::run(config, log_format),
        Command::CheckConfig { config } => {
            patch_agent_service::tls::install_default_provider();
            match daemon::check(&config) {
                Ok(checked) => {
                    let mut out = String::new();
                    for w in daemon::warnings(&checked) {
                        out.push_str(&format!("warning: {w}\n"));
                    }
                    if let Some(keys) = patch_agent::reload::restart_needed(&checked.config)
                        && !keys.is_empty()
                    {
                        out.push_str(&format!("restart needed for: {}\n", keys.join(", ")));
                    }
                    if let Ok((effective, layers)) = config::load_layers(&config) {
                        out.push_str("effective configuration (key = value  # from):\n");
                        for (key, value, from) in config::layers::origins(&effective, &layers) {
                            out.push_str(&format!("  {key} = {value}  # {from}\n"));
                        }
                    }
                    out.push_str(&format!("{}: OK\n", config.display()));
                    // A reader that goes away early (`| head`) is not an error of ours.
                    let _ =
                        std::io::Write::write_all(&mut std::io::stdout().lock(), out.as_bytes());
                    0
                }
                Err(problems) => {
                    for p in &problems {
                        println!("{p}");
                    }
                    eprintln!("{} problem(s) found", problems.len());
                    daemon::exit::CONFIG
                }
            }
        }
        Command::Enroll {
            controller,
            token,
            ca_hash,
            host_id,
            sans,
            env_file,
            config,
        } => enroll(patch_agent::enroll::Args {
            controller,
            token,
            ca_hash,
            host_id,
            sans,
            config,
            env_file,
        }),
    };
    std::process::exit(code);
}

fn enroll(args: patch_agent::enroll::Args) -> i32 {
    patch_agent_service::tls::install_default_provider();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("patch-agent enroll: cannot start: {e}");
            return 1;
        }
    };
    match runtime.block_on(patch_agent::enroll::enroll(args)) {
        Ok(e) => {
            println!(
                "enrolled as {} (certificate {} valid until {}; labels {:?})",
                e.host_id, e.serial, e.not_after, e.labels
            );
            for path in &e.written {
                println!("wrote {}", path.display());
            }
            0
        }
        Err(e) => {
            eprintln!("patch-agent enroll: {e}");
            match e {
                patch_agent::enroll::Error::Invalid(_) => daemon::exit::CONFIG,
                patch_agent::enroll::Error::Failed(_) => 1,
            }
        }
    }
}
