//! `patchctl`: see the `patchctl` library.

use clap::Parser;

fn main() -> std::process::ExitCode {
    patch_agent_service::tls::install_default_provider();
    let cli = patchctl::Cli::parse();
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = cli.worker_threads() {
        builder.worker_threads(n);
    }
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("patchctl: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(patchctl::run(cli)) {
        Ok(()) => std::process::ExitCode::from(patchctl::failure::OK),
        Err(e) => {
            eprintln!("patchctl: {e:#}");
            std::process::ExitCode::from(patchctl::failure::exit_code(&e))
        }
    }
}
