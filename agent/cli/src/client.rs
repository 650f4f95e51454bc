//! Connecting `patchctl` to an agent: `HOST:PORT` over mutual TLS, or `unix:PATH`.

use anyhow::{Context, Result, bail};
use patch_agent_wire::ids::host_part;
use std::path::PathBuf;
use std::time::Duration;
use tonic::transport::{Channel, Endpoint};

/// How to reach an agent; shared by every command that talks to one.
#[derive(Debug, Clone, clap::Args)]
pub struct AgentArgs {
    /// The agent: HOST:PORT (gRPC over mutual TLS) or unix:PATH (the local socket).
    #[arg(long, env = "PATCHCTL_AGENT")]
    pub agent: String,
    #[command(flatten)]
    pub tls: TlsArgs,
}

/// Client TLS files.
#[derive(Debug, Clone, clap::Args)]
pub struct TlsArgs {
    /// CA certificate (PEM) the agent's certificate must chain to.
    #[arg(long, env = "PATCHCTL_CA")]
    pub ca: Option<PathBuf>,
    /// Client certificate (PEM).
    #[arg(long, env = "PATCHCTL_CERT")]
    pub cert: Option<PathBuf>,
    /// Client private key (PEM).
    #[arg(long, env = "PATCHCTL_KEY")]
    pub key: Option<PathBuf>,
    /// Name to verify in the agent's certificate. Default: the host part of --agent.
    #[arg(long)]
    pub server_name: Option<String>,
    /// Connection timeout.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub connect_timeout: Duration,
}

impl AgentArgs {
    /// Opens one connection (HTTP/2 multiplexes calls over it).
    pub async fn connect(&self) -> Result<Channel> {
        if let Some(path) = self.agent.strip_prefix("unix:") {
            return connect_unix(PathBuf::from(path), self.tls.connect_timeout).await;
        }
        let (Some(ca), Some(cert), Some(key)) = (&self.tls.ca, &self.tls.cert, &self.tls.key)
        else {
            bail!(
                "{} is reached over mutual TLS: pass --ca, --cert and --key (or set PATCHCTL_CA, PATCHCTL_CERT, PATCHCTL_KEY), or use --agent unix:PATH on the host",
                self.agent
            );
        };
        let host = host_part(&self.agent)
            .with_context(|| format!("--agent {:?} is not HOST:PORT or unix:PATH", self.agent))?;
        let name = self
            .tls
            .server_name
            .clone()
            .unwrap_or_else(|| host.to_string());
        let config =
            patch_agent_service::tls::client_config(ca, cert, key).map_err(anyhow::Error::msg)?;
        let endpoint = Endpoint::from_shared(format!("http://{}", self.agent))
            .with_context(|| format!("--agent {:?} is not HOST:PORT", self.agent))?
            .connect_timeout(self.tls.connect_timeout)
            .tcp_nodelay(true);
        patch_agent_service::tls::connect(endpoint, &self.agent, &name, config)
            .await
            .with_context(|| format!("cannot connect to {} (TLS 1.3)", self.agent))
    }
}

async fn connect_unix(path: PathBuf, timeout: Duration) -> Result<Channel> {
    let shown = path.display().to_string();
    // The URI is required by the API but unused: the connector below decides where to go.
    let endpoint = Endpoint::from_static("http://localhost").connect_timeout(timeout);
    endpoint
        .connect_with_connector(tower::service_fn(move |_: http::Uri| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(&path).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await
        .with_context(|| format!("cannot connect to the local socket {shown}"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn host_part() {
        assert_eq!(
            patch_agent_wire::ids::host_part("agent1:7443"),
            Some("agent1")
        );
        assert_eq!(patch_agent_wire::ids::host_part("[::1]:7443"), Some("::1"));
        assert_eq!(
            patch_agent_wire::ids::host_part("127.0.0.1:1"),
            Some("127.0.0.1")
        );
        assert_eq!(patch_agent_wire::ids::host_part(":1"), None);
        assert_eq!(patch_agent_wire::ids::host_part("nohost"), None);
    }
}
