//! Compiles the KV Connect and backup `.proto` files with `protox` (pure Rust, no `protoc`).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/datapath.proto", "proto/backup.proto"];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let descriptors = protox::compile(protos, ["proto"])?;
    prost_build::Config::new()
        .bytes(["."])
        .compile_fds(descriptors)?;
    Ok(())
}
