//! lapse: engagement, frequency-control and recall pipeline for medical-aesthetics
//! clinics. Kafka in, Redis state, Kafka out. See `doc/DESIGN.md`.
//!
//! `domain` is the pure core that makes every decision; everything else adapts
//! bytes (codec, kafka, store, http) around it.

pub mod backtest;
pub mod cli;
pub mod codec;
pub mod config;
pub mod dead_letters;
pub mod domain;
pub mod error;
pub mod experiment_monitor;
pub mod experiment_report;
pub mod histories;
pub mod http;
pub mod inspect;
pub mod kafka;
pub mod metrics;
pub mod outputs;
pub mod pipeline;
pub mod processor;
pub mod retry;
pub mod secret;
pub mod service;
pub mod state_write;
pub mod store;
pub mod timer_loop;
pub mod timer_sweep;
pub mod wall_clock;
pub mod write_fence;
