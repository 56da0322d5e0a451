//! The wire layer of protocol v0.3 as the reference 0.6.0 speaks it (semantics §1).
//!
//! Everything here is data and pure functions: parsing and formatting subjects, validating names,
//! encoding and decoding the JSON records, building `Nats-Msg-Id` values, and describing the
//! streams, consumers, KV buckets and permission sets a driver applies. Decoders accept unknown
//! JSON fields (SPEC §11) and never panic on hostile input; they return typed errors.

pub mod capacity;
pub mod config;
pub mod control;
pub mod json;
pub mod keys;
pub mod message;
pub mod msgid;
pub mod permissions;
pub mod records;
pub mod shard;
pub mod subject;
pub mod token;

pub use control::{ControlReply, ControlRequest, DeliveryRequest, DeliveryRequestError};
pub use json::{DecodeError, decode, encode};
pub use message::{CotalMessage, Part, Presence, Route, Sender};
pub use msgid::Plane3MsgId;
pub use records::{AclRecord, DeliveryLease, MembershipRecord, Plane3Entry};
pub use subject::{ParsedSubject, Subject, SubjectError, SubjectKind, parse_subject};
pub use token::{
    AgentId, Channel, ChannelError, ConcreteChannel, Role, Space, TokenError, channel_path,
    is_concrete_channel, route_token, token, validate_channel,
};
