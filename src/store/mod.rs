//! State storage adapters. The Redis layout is described in `keys.rs` and `blob.rs`.

pub mod blob;
pub mod keys;
pub mod redis;

pub use self::redis::{Loaded, StateStore};
