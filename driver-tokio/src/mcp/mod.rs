//! `cotal mcp`: one Cotal agent as a Model Context Protocol server on stdio, so any MCP client
//! (a coding agent) joins a space through the driver's guarantees: the join race closed, the
//! durable backstop, one surfacing per message id, and the durable ack only after the model was
//! handed the message.
//!
//! - [`tools`]: what the model sees (names, descriptions, input schemas) and the argument types;
//! - [`server`]: the [`CotalMcp`] handler, which runs each call on the
//!   [`Agent`](crate::app::Agent);
//! - [`inbox`]: the messages and notices between the agent and the model, and when a message is
//!   acknowledged (its module docs say what the buffer holds and what happens when it is full);
//! - [`roster`]: who is present (the presence bucket) and how a DM recipient resolves;
//! - [`render`]: the JSON of messages, notices, reports and health;
//! - [`transport`]: the stdio transport that reports each response written;
//! - [`serve`]: [`serve_stdio`], the whole server until the client leaves.
//!
//! Logs go to stderr; stdout carries the protocol only.

pub mod inbox;
pub mod render;
pub mod roster;
pub mod serve;
pub mod server;
pub mod tools;
pub mod transport;

pub use serve::{ServeOptions, serve_stdio};
pub use server::CotalMcp;
