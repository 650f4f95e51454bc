//! Compiles `proto/` with protox (pure Rust, no protoc) and generates tonic code into OUT_DIR,
//! together with an encoded descriptor set that the reflection service serves.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let protos = [
        "proto/patchagent/v1/agent.proto",
        "proto/patchagent/v1/controller.proto",
        "proto/patchagent/v1/jobs.proto",
        "proto/patchagent/v1/packages.proto",
    ];
    let fds = protox::compile(protos, ["proto"])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    let bytes = prost::Message::encode_to_vec(&fds);
    std::fs::write(out.join("patchagent_descriptor.bin"), bytes)?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
