//! dom's wire contract: every event, Raft message and admin call, generated from `dom/v1/*.proto`.
//!
//! Only generated code lives here, the framing that lets the leader send a plan encoded
//! once to many machines (`frame`), and the log set-up every binary shares (`logging`). Conversions to domain types sit beside those types
//! (`dom_storage::event`, `dom_storage::raft_wire`), so prost types never reach the fleet state.

pub mod frame;
pub mod logging;

pub mod v1 {
    tonic::include_proto!("dom.v1");
}

/// The Agent service as the leader serves it: `Sync` answers with `frame::ControllerFrame`s,
/// which put exactly `v1::ControllerMessage`s on the wire. Agents use `v1::agent_client`.
// Generated code builds its codec with `Default::default()`, whatever the codec's shape.
#[allow(clippy::default_constructed_unit_structs)]
pub mod leader {
    include!(concat!(env!("OUT_DIR"), "/frames/dom.v1.rs"));
}
