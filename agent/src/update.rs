//! The update applier (being written).
