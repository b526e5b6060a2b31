//! The pure domain core: no IO, no clock reads. Every decision is made here.

pub mod clock;
pub mod engagement;
pub mod event;
pub mod replies;
pub mod state;
