//! Images: what a machine must look like.
//!
//! An image is a [`Manifest`] (every path with its kind, metadata and content hash), a
//! [`Filter`] of paths it leaves alone and [`Trigger`]s naming services to restart, all in
//! Dominator's formats. Its identity is the Merkle [`root_hash`](Manifest::root_hash) over the
//! managed tree, which an agent can compute the same way from a live directory. Everything here
//! is pure: no I/O.

mod diff;
mod filter;
mod manifest;
mod merkle;
mod triggers;

pub use diff::{diff, Difference};
pub use filter::{Filter, FilterError};
pub use manifest::{
    entry_from_pb, entry_to_pb, is_normalized, normalize_path, tree_cmp, Entry, Kind, Manifest,
    ManifestError,
};
pub use triggers::{parse_triggers, Trigger, TriggerError};
