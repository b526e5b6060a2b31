//! State storage adapters. The Redis layout is described in `keys.rs`, `blob.rs` and
//! `compact.rs`.

pub mod blob;
pub mod clock;
pub mod compact;
pub mod gauges;
pub mod keys;
pub mod redis;
pub mod timers;

pub use self::redis::{Loaded, StateStore};
