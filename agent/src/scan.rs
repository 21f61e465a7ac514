//! The scanner (being written).
