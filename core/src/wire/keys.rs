//! KV bucket names and keys (semantics §1.6).
//!
//! Five buckets per space, all pre-created by `STRM:setupSpaceStreams`:
//!
//! | bucket | key | builder |
//! | --- | --- | --- |
//! | `cotal_presence_<s>` | the raw agent id | [`presence_key`] |
//! | `cotal_channels_<s>` | the concrete channel, or [`CHANNEL_DEFAULTS_KEY`] | [`channel_key`] |
//! | `cotal_members_<s>` | `<channel>/<owner>` | [`member_key`], [`parse_member_key`] |
//! | `cotal_acl_<s>` | `token(owner)` | [`acl_key`] |
//! | `cotal_delivery_<s>` | `lease.<i>` | [`lease_key`] |
//!
//! A KV bucket `<b>` is the JetStream stream `KV_<b>` ([`kv_stream_name`]), and key `<k>` is stored
//! under the subject `$KV.<b>.<k>` ([`kv_subject`]); both are the NATS KV conventions the reference
//! relies on through `@nats-io/kv`.
//!
//! Every key built here from typed names is a legal NATS KV key (`[-/_=.A-Za-z0-9]+`, no leading or
//! trailing dot): [`ConcreteChannel`] and [`AgentId`] admit nothing else.

use super::token::{AgentId, ChannelError, ConcreteChannel, Space, TokenError, token};
use std::fmt;

/// The reserved registry key of the space-wide channel defaults (`SUBJ:CHANNEL_DEFAULTS_KEY`).
///
/// `=` is a legal KV-key character that `token()` never produces, so no channel can collide with it.
pub const CHANNEL_DEFAULTS_KEY: &str = "=defaults";

/// The prefix of a delivery-lease key: shard `i` holds `lease.<i>` (`SUBJ:leaseKey`).
pub const LEASE_KEY_PREFIX: &str = "lease.";

/// The five per-space KV buckets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum KvBucket {
    /// `cotal_presence_<space>`: one presence record per instance (`SUBJ:presenceBucket`).
    Presence,
    /// `cotal_channels_<space>`: the channel registry (`SUBJ:channelBucket`).
    Channels,
    /// `cotal_members_<space>`: the durable-membership registry (`SUBJ:membersBucket`).
    Members,
    /// `cotal_acl_<space>`: each owner's read ACL (`SUBJ:aclBucket`).
    Acl,
    /// `cotal_delivery_<space>`: the delivery lease(s) (`SUBJ:deliveryBucket`).
    Delivery,
    /// `cotal_losses_<space>`: one loss record per member, written by the daemon, read by the
    /// member's own agent only ([`crate::delivery::losses`]). Not a reference bucket: not in
    /// [`KvBucket::ALL`]; `cotal up` creates it after the five.
    Losses,
}

impl KvBucket {
    /// All five buckets, in the order of semantics §1.6.
    pub const ALL: [KvBucket; 5] = [
        KvBucket::Presence,
        KvBucket::Channels,
        KvBucket::Members,
        KvBucket::Acl,
        KvBucket::Delivery,
    ];

    /// The bucket name up to the space: `cotal_presence_`, `cotal_channels_`, ….
    pub const fn prefix(self) -> &'static str {
        match self {
            KvBucket::Presence => "cotal_presence_",
            KvBucket::Channels => "cotal_channels_",
            KvBucket::Members => "cotal_members_",
            KvBucket::Acl => "cotal_acl_",
            KvBucket::Delivery => "cotal_delivery_",
            KvBucket::Losses => "cotal_losses_",
        }
    }

    /// The bucket's name in `space`, e.g. `cotal_channels_main`.
    ///
    /// The reference writes `token(space)`; a [`Space`] is already a token, so that is the space
    /// itself.
    pub fn name(self, space: &Space) -> String {
        format!("{}{}", self.prefix(), space.as_str())
    }

    /// The JetStream stream behind the bucket in `space`: `KV_<bucket>`.
    pub fn stream_name(self, space: &Space) -> String {
        kv_stream_name(&self.name(space))
    }

    /// The subject key `key` of this bucket in `space` is stored under: `$KV.<bucket>.<key>`.
    pub fn subject(self, space: &Space, key: &str) -> String {
        kv_subject(&self.name(space), key)
    }
}

/// `cotal_presence_<space>`.
pub fn presence_bucket(space: &Space) -> String {
    KvBucket::Presence.name(space)
}

/// `cotal_channels_<space>`.
pub fn channels_bucket(space: &Space) -> String {
    KvBucket::Channels.name(space)
}

/// `cotal_members_<space>`.
pub fn members_bucket(space: &Space) -> String {
    KvBucket::Members.name(space)
}

/// `cotal_acl_<space>`.
pub fn acl_bucket(space: &Space) -> String {
    KvBucket::Acl.name(space)
}

/// `cotal_delivery_<space>`.
pub fn delivery_bucket(space: &Space) -> String {
    KvBucket::Delivery.name(space)
}

/// The JetStream stream that backs KV bucket `bucket`: `KV_<bucket>`.
pub fn kv_stream_name(bucket: &str) -> String {
    format!("KV_{bucket}")
}

/// The subject a put of `key` into `bucket` goes to (and the stored message's subject):
/// `$KV.<bucket>.<key>`.
pub fn kv_subject(bucket: &str, key: &str) -> String {
    format!("$KV.{bucket}.{key}")
}

/// The key inside a `$KV.<bucket>.<key>` subject of the given bucket, or `None` when the subject
/// belongs to another bucket or carries an empty key.
pub fn parse_kv_subject<'a>(subject: &'a str, bucket: &str) -> Option<&'a str> {
    let key = subject
        .strip_prefix("$KV.")?
        .strip_prefix(bucket)?
        .strip_prefix('.')?;
    (!key.is_empty()).then_some(key)
}

/// An instance's presence key: its id as is (the reference does not pass it through `token()`).
pub fn presence_key(id: &AgentId) -> &str {
    id.as_str()
}

/// A channel's registry key: the concrete channel name as given (`team.backend`).
///
/// Wildcard channels have no registry key; they resolve from [`CHANNEL_DEFAULTS_KEY`] alone.
pub fn channel_key(channel: &ConcreteChannel) -> &str {
    channel.as_str()
}

/// What a key of the channels bucket names.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum ChannelRegistryKey {
    /// [`CHANNEL_DEFAULTS_KEY`], the space-wide defaults.
    Defaults,
    /// One concrete channel's config.
    Channel(ConcreteChannel),
}

impl ChannelRegistryKey {
    /// Classifies a key read from the channels bucket (for example from a watch).
    ///
    /// # Errors
    ///
    /// The [`ChannelError`] when the key is neither the defaults key nor a valid concrete channel;
    /// such an entry configures nothing and should be ignored (and may be reported).
    pub fn parse(key: &str) -> Result<Self, ChannelError> {
        if key == CHANNEL_DEFAULTS_KEY {
            Ok(ChannelRegistryKey::Defaults)
        } else {
            ConcreteChannel::new(key).map(ChannelRegistryKey::Channel)
        }
    }

    /// The key as stored.
    pub fn as_str(&self) -> &str {
        match self {
            ChannelRegistryKey::Defaults => CHANNEL_DEFAULTS_KEY,
            ChannelRegistryKey::Channel(c) => c.as_str(),
        }
    }
}

/// A membership record's key: `<channel>/<owner>` (`SUBJ:memberKey`).
pub fn member_key(channel: &ConcreteChannel, owner: &AgentId) -> String {
    format!("{}/{}", channel.as_str(), owner.as_str())
}

/// The reference's `parseMemberKey` split, unvalidated: the text before and after the first `/`,
/// or `None` when there is no `/`, it is the first character, or it is the last one.
///
/// Everything after the first `/` is the owner, even if it holds another `/`; use
/// [`parse_member_key`] to get typed, validated halves.
pub fn split_member_key(key: &str) -> Option<(&str, &str)> {
    let i = key.find('/')?;
    if i == 0 || i + 1 >= key.len() {
        return None;
    }
    Some((&key[..i], &key[i + 1..]))
}

/// A parsed membership key: the concrete channel and the owner it belongs to.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MemberKey {
    /// The concrete channel of the membership.
    pub channel: ConcreteChannel,
    /// The owner (an agent's nkey in auth mode).
    pub owner: AgentId,
}

impl MemberKey {
    /// The key as stored, `<channel>/<owner>`.
    pub fn key(&self) -> String {
        member_key(&self.channel, &self.owner)
    }
}

impl fmt::Display for MemberKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.channel, self.owner)
    }
}

impl std::str::FromStr for MemberKey {
    type Err = MemberKeyError;
    fn from_str(s: &str) -> Result<Self, MemberKeyError> {
        parse_member_key(s)
    }
}

/// Why a members-bucket key is not a membership key.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum MemberKeyError {
    /// No `/`, or the first `/` is the first or last character (the reference returns `null`).
    Malformed {
        /// The key as read.
        key: String,
    },
    /// The part before the first `/` is not a valid concrete channel.
    Channel(ChannelError),
    /// The part after the first `/` is not a valid agent id (this includes a second `/`).
    Owner(TokenError),
}

impl fmt::Display for MemberKeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MemberKeyError::Malformed { key } => {
                write!(f, "member key {key:?} is not <channel>/<owner>")
            }
            MemberKeyError::Channel(e) => write!(f, "member key channel: {e}"),
            MemberKeyError::Owner(e) => write!(f, "member key owner: {e}"),
        }
    }
}

impl std::error::Error for MemberKeyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            MemberKeyError::Malformed { .. } => None,
            MemberKeyError::Channel(e) => Some(e),
            MemberKeyError::Owner(e) => Some(e),
        }
    }
}

/// Parses a members-bucket key into a [`MemberKey`].
///
/// Splits as the reference does ([`split_member_key`]), then validates both halves: the channel
/// must be a [`ConcreteChannel`] and the owner an [`AgentId`]. The reference returns the raw
/// halves; this crate refuses a key it could never have written itself (every membership write goes
/// through [`member_key`] with typed names), so a stray or hostile key is never taken for a
/// membership.
///
/// # Errors
///
/// [`MemberKeyError`] saying which rule failed.
pub fn parse_member_key(key: &str) -> Result<MemberKey, MemberKeyError> {
    let (channel, owner) = split_member_key(key).ok_or_else(|| MemberKeyError::Malformed {
        key: key.to_owned(),
    })?;
    let channel = ConcreteChannel::new(channel).map_err(MemberKeyError::Channel)?;
    let owner = AgentId::new(owner).map_err(MemberKeyError::Owner)?;
    Ok(MemberKey { channel, owner })
}

/// An owner's read-ACL key: `token(owner)` (`SUBJ:aclKey`).
///
/// For a validated [`AgentId`] `token()` changes nothing, so this is the id itself.
pub fn acl_key(owner: &AgentId) -> String {
    token(owner.as_str())
}

/// The delivery-lease key of shard `shard`: `lease.<shard>` (`lease.0` when there is one shard).
pub fn lease_key(shard: u32) -> String {
    format!("{LEASE_KEY_PREFIX}{shard}")
}

/// The shard index of a lease key, or `None` when `key` is not exactly `lease.<decimal u32>` in the
/// form [`lease_key`] writes (no sign, no leading zero except `lease.0`).
pub fn parse_lease_key(key: &str) -> Option<u32> {
    let digits = key.strip_prefix(LEASE_KEY_PREFIX)?;
    if digits.is_empty()
        || !digits.bytes().all(|b| b.is_ascii_digit())
        || (digits.len() > 1 && digits.starts_with('0'))
    {
        return None;
    }
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn space() -> Space {
        Space::new("wirefix").unwrap()
    }

    const ALICE: &str = "UDHQN2VXGF5T7O3GSPVKMV6VFFHD3XQTWFY3M5P7ELIK4ICOADTOEJ5S";

    #[test]
    fn bucket_names_streams_and_subjects() {
        let s = space();
        assert_eq!(presence_bucket(&s), "cotal_presence_wirefix");
        assert_eq!(channels_bucket(&s), "cotal_channels_wirefix");
        assert_eq!(members_bucket(&s), "cotal_members_wirefix");
        assert_eq!(acl_bucket(&s), "cotal_acl_wirefix");
        assert_eq!(delivery_bucket(&s), "cotal_delivery_wirefix");
        assert_eq!(
            KvBucket::Members.stream_name(&s),
            "KV_cotal_members_wirefix"
        );
        assert_eq!(kv_stream_name("cotal_acl_x"), "KV_cotal_acl_x");
        assert_eq!(
            KvBucket::Delivery.subject(&s, &lease_key(0)),
            "$KV.cotal_delivery_wirefix.lease.0"
        );
        assert_eq!(kv_subject("b", "=defaults"), "$KV.b.=defaults");
        let names: Vec<String> = KvBucket::ALL.iter().map(|b| b.name(&s)).collect();
        assert_eq!(names.len(), 5);
        assert!(
            names
                .iter()
                .all(|n| n.starts_with("cotal_") && n.ends_with("_wirefix"))
        );
    }

    #[test]
    fn kv_subjects_parse_back_to_their_key() {
        assert_eq!(
            parse_kv_subject("$KV.cotal_acl_w.U1", "cotal_acl_w"),
            Some("U1")
        );
        assert_eq!(
            parse_kv_subject("$KV.cotal_members_w.general/U1", "cotal_members_w"),
            Some("general/U1")
        );
        assert_eq!(parse_kv_subject("$KV.cotal_acl_w.U1", "cotal_acl"), None);
        assert_eq!(parse_kv_subject("$KV.cotal_acl_w.", "cotal_acl_w"), None);
        assert_eq!(parse_kv_subject("$KV.cotal_acl_wU1", "cotal_acl_w"), None);
        assert_eq!(parse_kv_subject("KV.cotal_acl_w.U1", "cotal_acl_w"), None);
    }

    #[test]
    fn registry_keys() {
        let review = ConcreteChannel::new("team.review").unwrap();
        assert_eq!(channel_key(&review), "team.review");
        assert_eq!(
            ChannelRegistryKey::parse("=defaults"),
            Ok(ChannelRegistryKey::Defaults)
        );
        assert_eq!(
            ChannelRegistryKey::parse("team.review"),
            Ok(ChannelRegistryKey::Channel(review.clone()))
        );
        assert_eq!(ChannelRegistryKey::Defaults.as_str(), "=defaults");
        assert_eq!(ChannelRegistryKey::Channel(review).as_str(), "team.review");
        assert!(ChannelRegistryKey::parse("team.*").is_err());
        assert!(ChannelRegistryKey::parse("=other").is_err());
        // The defaults key can never be a channel.
        assert!(ConcreteChannel::new(CHANNEL_DEFAULTS_KEY).is_err());
    }

    #[test]
    fn member_keys_follow_the_reference_split() {
        assert_eq!(split_member_key("general/U1"), Some(("general", "U1")));
        assert_eq!(split_member_key("a.b/U1/x"), Some(("a.b", "U1/x")));
        assert_eq!(split_member_key("/U1"), None);
        assert_eq!(split_member_key("general/"), None);
        assert_eq!(split_member_key("/"), None);
        assert_eq!(split_member_key("general"), None);
        assert_eq!(split_member_key(""), None);
    }

    #[test]
    fn member_keys_validate_both_halves() {
        let owner = AgentId::new(ALICE).unwrap();
        let ch = ConcreteChannel::new("team.backend").unwrap();
        let key = member_key(&ch, &owner);
        assert_eq!(key, format!("team.backend/{ALICE}"));
        let parsed = parse_member_key(&key).unwrap();
        assert_eq!(parsed, MemberKey { channel: ch, owner });
        assert_eq!(parsed.to_string(), key);
        assert_eq!(parsed.key(), key);
        assert_eq!(key.parse::<MemberKey>().unwrap(), parsed);

        assert_eq!(
            parse_member_key("general"),
            Err(MemberKeyError::Malformed {
                key: "general".into()
            })
        );
        assert!(matches!(
            parse_member_key("team.*/U1"),
            Err(MemberKeyError::Channel(_))
        ));
        assert!(matches!(
            parse_member_key("a..b/U1"),
            Err(MemberKeyError::Channel(_))
        ));
        assert!(matches!(
            parse_member_key("general/U1/x"),
            Err(MemberKeyError::Owner(TokenError::InvalidChar {
                ch: '/',
                ..
            }))
        ));
        assert!(matches!(
            parse_member_key("general/U.1"),
            Err(MemberKeyError::Owner(_))
        ));
        let err = parse_member_key("/U1").unwrap_err();
        assert_eq!(
            err.to_string(),
            "member key \"/U1\" is not <channel>/<owner>"
        );
    }

    #[test]
    fn acl_presence_and_lease_keys() {
        let owner = AgentId::new(ALICE).unwrap();
        assert_eq!(acl_key(&owner), ALICE);
        assert_eq!(presence_key(&owner), ALICE);
        assert_eq!(lease_key(0), "lease.0");
        assert_eq!(lease_key(12), "lease.12");
        assert_eq!(parse_lease_key("lease.0"), Some(0));
        assert_eq!(parse_lease_key("lease.12"), Some(12));
        assert_eq!(parse_lease_key("lease.012"), None);
        assert_eq!(parse_lease_key("lease."), None);
        assert_eq!(parse_lease_key("lease.+1"), None);
        assert_eq!(parse_lease_key("lease.4294967296"), None);
        assert_eq!(parse_lease_key("lease0"), None);
    }

    fn is_kv_key(k: &str) -> bool {
        !k.is_empty()
            && !k.starts_with('.')
            && !k.ends_with('.')
            && k.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-/_=.".contains(&b))
    }

    proptest! {
        #[test]
        fn member_key_round_trips(
            segs in proptest::collection::vec("[A-Za-z0-9_-]{1,12}", 1..5),
            owner in "[A-Za-z0-9_-]{1,60}",
        ) {
            let ch = ConcreteChannel::new(segs.join(".")).unwrap();
            let owner = AgentId::new(owner).unwrap();
            let key = member_key(&ch, &owner);
            prop_assert!(is_kv_key(&key));
            let back = parse_member_key(&key).unwrap();
            prop_assert_eq!(&back.channel, &ch);
            prop_assert_eq!(&back.owner, &owner);
            prop_assert_eq!(split_member_key(&key), Some((ch.as_str(), owner.as_str())));
        }

        #[test]
        fn parse_member_key_never_panics(key in any::<String>()) {
            let _ = parse_member_key(&key);
        }

        #[test]
        fn lease_keys_round_trip(i in any::<u32>()) {
            prop_assert!(is_kv_key(&lease_key(i)));
            prop_assert_eq!(parse_lease_key(&lease_key(i)), Some(i));
        }
    }
}
