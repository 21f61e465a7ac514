//! subd, the agent on each machine: it scans the machine's tree, describes it to the leader as
//! a difference from an image, fetches objects and applies updates nearly atomically.

pub mod fetch;
pub mod scan;
pub mod sweep;
pub mod sync;
pub mod update;
