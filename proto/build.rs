//! Compiles `tandem/v1/*.proto` with a vendored protoc, so no system protoc is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "tandem/v1/coordinator.proto",
        "tandem/v1/cluster.proto",
        "tandem/v1/raft.proto",
        "tandem/v1/debug.proto",
        "tandem/v1/participant.proto",
    ];
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    let vendored_include = protoc_bin_vendored::include_path()?;
    let vendored_include = vendored_include
        .to_str()
        .ok_or("the vendored protoc include path is not UTF-8")?;
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("tandem_descriptor.bin"))
        .compile_with_config(config, &protos, &[".", vendored_include])?;
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    Ok(())
}
