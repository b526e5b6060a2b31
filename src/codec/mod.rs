//! Avro codec for the input topics and the output records.
//!
//! * [`framing`]: Confluent (`0x00` + schema id) and single-object (`C3 01` +
//!   fingerprint) framings, detected per record.
//! * [`canonical`]: Parsing Canonical Form and CRC-64-AVRO, as the specification
//!   and Java compute them.
//! * [`schemas`]: the `schemas/` directory (reader schemas, writer versions by fingerprint).
//! * [`registry`]: Confluent Schema Registry client with a bounded cache.
//! * [`decode`]: bytes → validated [`crate::domain::event::Event`]; reply text is
//!   classified and dropped there.
//! * [`encode`]: events and output values → framed bytes.
//! * [`error`]: per-record [`DecodeError`] (with metric reason) and start-up [`CodecError`].

pub mod canonical;
pub mod decode;
pub mod encode;
pub mod error;
pub mod framing;
mod prescan;
pub mod registry;
mod resolve;
pub mod schemas;

pub use decode::{set_allocation_limit, DecodeLimits, Decoder};
pub use encode::{encode_with_schema, event_value, Encoder};
pub use error::{CodecError, DecodeError};
pub use framing::{frame_confluent, frame_single_object, parse_frame, Frame, Framing};
pub(crate) use registry::percent_decode;
pub use registry::{RegistryClient, RegistryOptions};
pub use schemas::{
    fingerprint, SchemaSet, OUTPUT_SCHEMAS, RECALL_OUTCOME, RECALL_TRIGGER, THROTTLE_EVENT,
};
