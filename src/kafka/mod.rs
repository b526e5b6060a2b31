//! Kafka adapters: the group consumer loop, the output producer, topic admin.

pub mod admin;
pub mod client;
pub mod consumer;
pub mod offset_gate;
pub mod producer;
pub mod record;
pub mod tls_check;

pub use client::ClientErrors;
