//! `domd`, one controller replica.
//!
//! Operators' calls arrive on the admin service ([`admin`]); the leader checks them against
//! the applied fleet state and commits them through openraft, whose peers talk over the Raft
//! service ([`network`], messages converted in [`raft_wire`]). Storage, the fold and the
//! journal live in `dom-storage`; [`replica`] ties them together and runs until shutdown.

// openraft's error types are large and not ours to shrink.
#![allow(clippy::result_large_err)]

pub mod admin;
pub mod agents;
pub mod cache;
pub mod network;
pub mod objects;
pub mod proposer;
pub mod raft_wire;
pub mod reconcile;
pub mod replica;
