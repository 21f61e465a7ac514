//! Compiles proto/dom/v1/*.proto with protox (a pure-Rust protobuf compiler), so building needs
//! no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "dom/v1/image.proto",
        "dom/v1/events.proto",
        "dom/v1/raft.proto",
        "dom/v1/admin.proto",
        "dom/v1/agent.proto",
    ];
    for file in files {
        println!("cargo:rerun-if-changed={file}");
    }
    let descriptors = protox::compile(files, ["."])?;
    tonic_prost_build::configure()
        // Maps encode in key order, so an event always encodes to the same bytes.
        .btree_map(".")
        .compile_fds(descriptors)?;
    Ok(())
}
