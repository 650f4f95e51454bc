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
    /// Check the configuration and TLS files; print every problem and exit 2, or exit 0.
    CheckConfig {
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
                    for w in daemon::warnings(&checked) {
                        println!("warning: {w}");
                    }
                    if let Some(keys) = patch_agent::reload::restart_needed(&checked.config)
                        && !keys.is_empty()
                    {
                        println!("restart needed for: {}", keys.join(", "));
                    }
                    println!("{}: OK", config.display());
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
    };
    std::process::exit(code);
}
