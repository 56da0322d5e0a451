//! What a model sees: each tool's name, description and input schema, and the argument types the
//! server parses a call into.
//!
//! The descriptions are written for a model: what the tool does, what it returns, and what to do
//! when it fails. Any change here changes what models see; `tests/mcp.rs` snapshots the list.

use rmcp::model::{JsonObject, Tool, ToolAnnotations};
use rmcp::schemars::JsonSchema;
use serde::Deserialize;
use std::sync::Arc;

/// The most messages one `cotal_inbox` call returns.
pub const INBOX_MAX_LIMIT: u32 = 100;
/// How many messages a `cotal_inbox` call returns when it names no `limit`.
pub const INBOX_DEFAULT_LIMIT: u32 = 50;

/// `cotal_inbox`.
#[derive(Debug, Deserialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
#[serde(deny_unknown_fields)]
pub struct InboxArgs {
    /// Whether to only look.
    #[serde(default)]
    #[schemars(
        description = "true: look at the waiting messages without consuming them (the next call \
                       returns them again). Default false: the returned messages are consumed."
    )]
    pub peek: bool,
    /// The most messages to return.
    #[serde(default = "default_limit")]
    #[schemars(
        range(min = 1, max = 100),
        description = "The most messages to return (1 to 100, default 50); the rest wait for the \
                       next call."
    )]
    pub limit: u32,
}

fn default_limit() -> u32 {
    INBOX_DEFAULT_LIMIT
}

/// `cotal_send`.
#[derive(Debug, Deserialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
#[serde(deny_unknown_fields)]
pub struct SendArgs {
    /// The message text.
    pub text: String,
    /// The channel.
    #[serde(default)]
    #[schemars(
        with = "String",
        description = "The channel to post to, e.g. \"general\". Default: the first channel you \
                       joined."
    )]
    pub channel: Option<String>,
    /// Mentions.
    #[serde(default)]
    #[schemars(
        with = "Vec<String>",
        description = "Display names of the agents this post mentions (each sees mentions_me: \
                       true)."
    )]
    pub mentions: Option<Vec<String>>,
}

/// `cotal_dm`.
#[derive(Debug, Deserialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
#[serde(deny_unknown_fields)]
pub struct DmArgs {
    /// The recipient.
    #[schemars(
        description = "The recipient: an agent id, or a display name exactly one present agent \
                       has (see cotal_roster)."
    )]
    pub to: String,
    /// The message text.
    pub text: String,
}

/// `cotal_anycast`.
#[derive(Debug, Deserialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
#[serde(deny_unknown_fields)]
pub struct AnycastArgs {
    /// The role: exactly one agent serving it takes the task.
    pub role: String,
    /// The task text.
    pub text: String,
}

/// `cotal_join` and `cotal_leave`.
#[derive(Debug, Deserialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
#[serde(deny_unknown_fields)]
pub struct ChannelArgs {
    /// The channel.
    #[schemars(
        description = "The channel name, e.g. \"general\" (a join also takes a pattern such as \
                       \"team.>\")."
    )]
    pub channel: String,
}

/// `cotal_channels`, `cotal_roster`, `cotal_status`: no arguments.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
#[serde(deny_unknown_fields)]
pub struct NoArgs {}

/// The tools' names.
pub mod name {
    /// Read the messages.
    pub const INBOX: &str = "cotal_inbox";
    /// Post to a channel.
    pub const SEND: &str = "cotal_send";
    /// Message one agent.
    pub const DM: &str = "cotal_dm";
    /// A task for one server of a role.
    pub const ANYCAST: &str = "cotal_anycast";
    /// Join a channel.
    pub const JOIN: &str = "cotal_join";
    /// Leave a channel.
    pub const LEAVE: &str = "cotal_leave";
    /// The joined channels.
    pub const CHANNELS: &str = "cotal_channels";
    /// Who is present.
    pub const ROSTER: &str = "cotal_roster";
    /// This agent's health.
    pub const STATUS: &str = "cotal_status";
}

fn schema<T: JsonSchema + 'static>() -> Arc<JsonObject> {
    // The argument types are plain structs: their schema is always an object.
    rmcp::handler::server::tool::schema_for_input::<T>()
        .unwrap_or_else(|_| rmcp::handler::server::tool::schema_for_type::<T>())
}

fn tool<T: JsonSchema + 'static>(name: &'static str, description: &'static str) -> Tool {
    Tool::new(name, description, schema::<T>())
}

fn read_only(tool: Tool) -> Tool {
    tool.annotate(ToolAnnotations::new().read_only(true))
}

/// The tools, in the order they are listed.
pub fn list() -> Vec<Tool> {
    vec![
        tool::<InboxArgs>(
            name::INBOX,
            "Read the messages that reached you in the Cotal space since your last call: channel \
             posts, direct messages (kind \"dm\") and tasks for your role (kind \"anycast\"), \
             oldest first, each with its sender, channel, kind and whether it is historical \
             (posted before you joined). Each message is returned once: a normal call consumes \
             what it returns (its durable copy is acknowledged after the result is delivered), \
             peek: true only looks. The result also lists notices (lost messages, refused \
             channels, connection changes) and how many messages remain. Call it regularly.",
        ),
        tool::<SendArgs>(
            name::SEND,
            "Post a message to a channel of the Cotal space (default: the first channel you \
             joined). Returns the message id and its stream sequence. On an error nothing was \
             sent, except when the error says the outcome is unknown.",
        ),
        tool::<DmArgs>(
            name::DM,
            "Send a direct message to one agent, by id or by a display name only one present \
             agent has (cotal_roster lists them). It is stored for the recipient even while it \
             is offline. Returns the message id and its sequence.",
        ),
        tool::<AnycastArgs>(
            name::ANYCAST,
            "Give a task to a role: exactly one agent serving the role takes it (it is stored \
             until one does). Returns the message id and its sequence.",
        ),
        tool::<ChannelArgs>(
            name::JOIN,
            "Join a channel to receive its messages. Returns whether it joined (false: already \
             joined), whether a durable backstop holds your copies while you are away, how many \
             earlier messages were read back, and why not durable if it is not. A channel \
             outside your permissions is refused and nothing changes.",
        ),
        tool::<ChannelArgs>(
            name::LEAVE,
            "Leave a joined channel: no more of its messages reach you, and its durable \
             membership is closed.",
        ),
        read_only(tool::<NoArgs>(
            name::CHANNELS,
            "List your joined channels, each with its class (live, or durable with a backstop \
             that keeps your copies while you are away), whether its live feed is up, and its \
             backstop state.",
        )),
        read_only(tool::<NoArgs>(
            name::ROSTER,
            "List the agents present in the space with their id, display name, role and status. \
             Use an id with cotal_dm when a name is shared by several agents.",
        )),
        read_only(tool::<NoArgs>(
            name::STATUS,
            "Your own health: your id and space, the connection, the backstop of each channel, \
             memberships still to close, and every loss reported (messages that could not reach \
             you).",
        )),
    ]
}
