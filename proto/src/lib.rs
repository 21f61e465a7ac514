//! dom's wire contract: every event, Raft message and admin call, generated from `dom/v1/*.proto`.
//!
//! Only generated code lives here. Conversions to domain types sit beside those types
//! (`dom_storage::event`, `dom_storage::raft_wire`), so prost types never reach the fleet state.

pub mod v1 {
    tonic::include_proto!("dom.v1");
}
