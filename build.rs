//! Build script of the `patch-agent-wire` crate (agent/wire): compiles `proto/` with protox (pure
//! Rust, no protoc) and generates tonic code into OUT_DIR, together with an encoded descriptor set
//! that the reflection service serves. It sits at the top of the repository next to `proto/`.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // agent/wire -> the repository root, where proto/ is.
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../..");
    let include = root.join("proto");
    println!("cargo:rerun-if-changed={}", include.display());
    let protos = [
        "agent",
        "controller",
        "enrollment",
        "jobs",
        "operator",
        "packages",
    ]
    .map(|p| include.join(format!("patchagent/v1/{p}.proto")));
    let fds = protox::compile(protos, [&include])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let bytes = prost::Message::encode_to_vec(&fds);
    std::fs::write(out.join("patchagent_descriptor.bin"), bytes)?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // No `XClient::connect(addr)` constructors: every client is built on a channel that
        // patch_agent_service::tls made (mutual TLS), and `Controller/Connect` needs the name.
        .build_transport(false)
        // Small starting buffers for every call (agent/wire/src/codec.rs).
        .codec_path("crate::codec::SmallBufferCodec")
        .compile_fds(fds)?;
    Ok(())
}
