//! `domadm image ...`

use clap::Subcommand;
use dom_proto::v1::ListImagesRequest;
use serde::Serialize;

use crate::cluster::hex;
use crate::output::{self, rfc3339};
use crate::Context;

#[derive(Subcommand, Debug)]
pub enum ImageCommand {
    /// Every image the cluster knows, deleted ones marked.
    #[command(after_help = "Example:\n  domadm image list -o json")]
    List,
}

#[derive(Serialize)]
struct Image {
    name: String,
    root_hash: String,
    files: u64,
    bytes: u64,
    created_at: String,
    deleted: bool,
}

impl ImageCommand {
    pub async fn run(self, ctx: &mut Context) -> anyhow::Result<()> {
        match self {
            ImageCommand::List => {
                let reply = ctx
                    .cluster
                    .call(|mut c| async move { c.list_images(ListImagesRequest {}).await })
                    .await?;
                let images: Vec<Image> = reply
                    .images
                    .into_iter()
                    .map(|i| Image {
                        name: i.name,
                        root_hash: hex(&i.root_hash),
                        files: i.files,
                        bytes: i.bytes,
                        created_at: rfc3339(i.created_at_unix_ms),
                        deleted: i.deleted,
                    })
                    .collect();
                let rows = images
                    .iter()
                    .map(|i| {
                        vec![
                            i.name.clone(),
                            i.root_hash.chars().take(16).collect(),
                            i.files.to_string(),
                            i.bytes.to_string(),
                            i.created_at.clone(),
                            if i.deleted {
                                "deleted".into()
                            } else {
                                String::new()
                            },
                        ]
                    })
                    .collect();
                output::print(
                    ctx.output,
                    &images,
                    &["NAME", "ROOT HASH", "FILES", "BYTES", "CREATED", ""],
                    rows,
                )
            }
        }
    }
}
