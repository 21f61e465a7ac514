//! Compiles proto/dom/v1/*.proto with protox (a pure-Rust protobuf compiler), so building needs
//! no system `protoc`.

use std::path::PathBuf;

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
        .compile_fds(descriptors.clone())?;

    // The leader's side of the Agent service once more, sending `frame::ControllerFrame`s:
    // the same wire messages, but a plan's bulk can be encoded once for every machine. Only
    // the service is generated here; every message is the one generated above.
    let mut agent_only = descriptors;
    for file in &mut agent_only.file {
        if file.name() != "dom/v1/agent.proto" {
            file.service.clear();
        }
    }
    let out = PathBuf::from(std::env::var("OUT_DIR")?).join("frames");
    std::fs::create_dir_all(&out)?;
    tonic_prost_build::configure()
        .build_client(false)
        .extern_path(".dom.v1", "crate::v1")
        .extern_path(".dom.v1.ControllerMessage", "crate::frame::ControllerFrame")
        .codec_path("crate::frame::FrameCodec")
        .out_dir(&out)
        .compile_fds(agent_only)?;
    Ok(())
}
