//! State storage adapters. Keyed records and their backends are in `record.rs`
//! (Redis: `redis.rs`, memory: `memory.rs`); the Redis layout is described in
//! `keys.rs`, `blob.rs` and `compact.rs`.

pub mod blob;
pub mod cluster;
pub mod compact;
pub mod durability;
pub mod event_time;
pub mod experiment_stops;
pub mod fault;
pub mod gauges;
pub mod keys;
pub mod memory;
pub mod record;
pub mod redis;
pub mod scan;
pub mod slots;
pub mod timers;

pub use self::memory::MemoryBackend;
pub use self::record::{Backend, Record};
pub use self::redis::{Loaded, StateStore};
