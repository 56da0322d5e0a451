//! The effective channel policy (semantics §1.7, §1.9) and its one resolver (gap G10).
//!
//! A channel's delivery class, replay flag and replay window come from two registry entries in
//! `cotal_channels_<space>`: the channel's own [`ChannelConfig`] (key = the concrete channel) and
//! the space-wide [`ChannelDefaults`] (key [`CHANNEL_DEFAULTS_KEY`](crate::wire::keys::CHANNEL_DEFAULTS_KEY)). The reference resolves them
//! in several places with different inputs (a watch cache for join, leave and the health surface;
//! fresh reads for fan-out and boot), so one channel can get two answers at once (gap G10). Here
//! there is exactly one function, [`effective_policy`]; [`ChannelRegistry::policy_for`] is a thin
//! lookup in front of it, so the cache path and the fresh path cannot disagree for the same inputs.
//!
//! Resolution, as `CHN` defines it:
//!
//! - class = `cfg.deliveryClass ?? defaults.deliveryClass ?? "durable"`;
//! - replay = `cfg.replay ?? defaults.replay ?? true`;
//! - window = `parseDuration(cfg.replayWindow ?? defaults.replayWindow)`, or none (the full
//!   retained history);
//! - a wildcard channel is never a registry key, so it resolves from the defaults alone;
//! - with no registry at all, both entries are absent: durable, replay on, full window.
//!
//! Two outcomes the reference leaves undefined are made explicit:
//!
//! - **A stored value of the wrong type** (for example `"replay": "yes"`, `"deliveryClass": "bogus"`
//!   or `null`) counts as absent for resolution, like JavaScript's `??` treats `null`. The value is
//!   kept verbatim in the record's `extra` map, so a read-modify-write does not lose it, and
//!   [`ChannelConfig::validate_for_write`] reports it (use it as a health check on stored entries).
//! - **A stored `replayWindow` that does not parse** does not make the read fail (the reference
//!   throws). Class and replay still resolve; the window resolves to [`ReplayWindow::Invalid`], and
//!   [`EffectivePolicy::backfill`] turns that into [`Backfill::Skip`]: replaying *more* history than
//!   the operator allowed is the one outcome a window exists to prevent, so a bad window replays
//!   nothing and is reported, rather than silently meaning "no window".
//!
//! The write side ([`ChannelConfig::prepare_write`], [`ChannelDefaults::prepare_write`]) validates
//! the patch as `CHN:validateChannelConfig`/`validateChannelDefaults` do, then merges it over the
//! existing entry like `writeChannelConfig`'s `{...existing, ...patch}`.

use crate::time::Duration;
use crate::wire::keys::ChannelRegistryKey;
use crate::wire::token::{Channel, ChannelError, ConcreteChannel};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::fmt;

// ---------------------------------------------------------------------------------------------
// Delivery class
// ---------------------------------------------------------------------------------------------

/// A channel's delivery class (`TYP:DeliveryClass`), `"live"` or `"durable"` on the wire.
///
/// Deliberately not `#[non_exhaustive]`: the protocol defines exactly these two, and a third class
/// must force every `match` on a class to be revisited.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryClass {
    /// Core-NATS delivery to live subscribers only; no Plane-3 backstop.
    Live,
    /// Live delivery plus the Plane-3 backstop (fan-out → dinbox → reader → dlv).
    Durable,
}

impl DeliveryClass {
    /// The wire spelling: `"live"` or `"durable"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            DeliveryClass::Live => "live",
            DeliveryClass::Durable => "durable",
        }
    }

    /// The class spelled exactly `s`, if any (no trimming, no case folding, as the reference
    /// compares).
    pub fn from_wire(s: &str) -> Option<Self> {
        match s {
            "live" => Some(DeliveryClass::Live),
            "durable" => Some(DeliveryClass::Durable),
            _ => None,
        }
    }
}

impl fmt::Display for DeliveryClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

// ---------------------------------------------------------------------------------------------
// The channel registry's constants (`CHN`; re-exported by `constants`)
// ---------------------------------------------------------------------------------------------

/// Longest channel `description`, in UTF-16 code units as JavaScript's `length` counts them;
/// longer is rejected at write, never clamped (`CHN:MAX_CHANNEL_DESCRIPTION`).
pub const MAX_CHANNEL_DESCRIPTION: usize = 200;

/// Longest channel `instructions`, in UTF-16 code units; longer is rejected at write, never
/// clamped (`CHN:MAX_CHANNEL_INSTRUCTIONS`).
pub const MAX_CHANNEL_INSTRUCTIONS: usize = 2000;

/// The replay-window units of `CHN:parseDuration` (`^(\d+)(s|m|h|d)$` after trim) and what one of
/// each is worth.
pub const REPLAY_WINDOW_UNITS: [(char, Duration); 4] = [
    ('s', Duration::from_millis(1000)),
    ('m', Duration::from_millis(60_000)),
    ('h', Duration::from_millis(3_600_000)),
    ('d', Duration::from_millis(86_400_000)),
];

/// The replay flag a channel gets when neither its config nor the defaults set one (`CHN`).
pub const DEFAULT_REPLAY: bool = true;

/// The delivery class a channel gets when neither its config nor the defaults set one, and the
/// class with no registry at all (`CHN:effectiveDeliveryClass`, `EP:deliveryClassFresh`).
pub const DEFAULT_DELIVERY_CLASS: DeliveryClass = DeliveryClass::Durable;

// ---------------------------------------------------------------------------------------------
// Durations and lengths
// ---------------------------------------------------------------------------------------------

/// Why a duration string did not parse.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum DurationError {
    /// The trimmed text is not `^(\d+)(s|m|h|d)$`.
    Invalid {
        /// The text as given (untrimmed).
        input: String,
    },
    /// The text matches the grammar but the milliseconds do not fit in a `u64`.
    Overflow {
        /// The text as given (untrimmed).
        input: String,
    },
}

impl fmt::Display for DurationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DurationError::Invalid { input } => write!(
                f,
                "invalid duration {input:?} - expected <number><s|m|h|d>, e.g. \"24h\""
            ),
            DurationError::Overflow { input } => {
                write!(f, "duration {input:?} is longer than 2^64-1 milliseconds")
            }
        }
    }
}

impl std::error::Error for DurationError {}

/// JavaScript's `String.prototype.trim` whitespace: WhiteSpace (TAB, VT, FF, SP, NBSP, ZWNBSP and
/// every `Zs` space) plus LineTerminator (LF, CR, LS, PS). It differs from Rust's `char::is_whitespace`
/// on U+0085 (not trimmed by JavaScript) and U+FEFF (trimmed by JavaScript).
fn is_js_whitespace(c: char) -> bool {
    matches!(
        c,
        '\u{9}'..='\u{D}'
            | ' '
            | '\u{A0}'
            | '\u{1680}'
            | '\u{2000}'..='\u{200A}'
            | '\u{2028}'
            | '\u{2029}'
            | '\u{202F}'
            | '\u{205F}'
            | '\u{3000}'
            | '\u{FEFF}'
    )
}

/// The reference's `parseDuration` (`CHN`): trims `s` as JavaScript does, requires
/// `^(\d+)(s|m|h|d)$` (ASCII digits; leading zeros allowed), and returns the span with
/// s = 1000, m = 60 000, h = 3 600 000 and d = 86 400 000 ms.
///
/// # Errors
///
/// [`DurationError::Invalid`] for anything outside the grammar, [`DurationError::Overflow`] when
/// the result exceeds `u64::MAX` ms (the reference would compute an imprecise float instead).
pub fn parse_duration(s: &str) -> Result<Duration, DurationError> {
    let invalid = || DurationError::Invalid {
        input: s.to_owned(),
    };
    let overflow = || DurationError::Overflow {
        input: s.to_owned(),
    };
    let t = s.trim_matches(is_js_whitespace);
    let mut chars = t.chars();
    let unit_char = chars.next_back().ok_or_else(invalid)?;
    let digits = chars.as_str();
    let unit = REPLAY_WINDOW_UNITS
        .iter()
        .find(|(c, _)| *c == unit_char)
        .map(|(_, d)| d.as_millis())
        .ok_or_else(invalid)?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid());
    }
    let mut n: u64 = 0;
    for b in digits.bytes() {
        n = n
            .checked_mul(10)
            .and_then(|n| n.checked_add(u64::from(b - b'0')))
            .ok_or_else(overflow)?;
    }
    n.checked_mul(unit)
        .map(Duration::from_millis)
        .ok_or_else(overflow)
}

/// The length JavaScript reports for `s` (`s.length`): its number of UTF-16 code units. A character
/// outside the Basic Multilingual Plane (most emoji) counts 2; everything else counts 1.
pub fn utf16_len(s: &str) -> usize {
    s.chars().map(char::len_utf16).sum()
}

// ---------------------------------------------------------------------------------------------
// Registry records
// ---------------------------------------------------------------------------------------------

/// Why a channel-registry write was refused.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum ChannelConfigError {
    /// `description` is longer than [`MAX_CHANNEL_DESCRIPTION`] UTF-16 code units.
    DescriptionTooLong {
        /// Its length in UTF-16 code units.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// `instructions` is longer than [`MAX_CHANNEL_INSTRUCTIONS`] UTF-16 code units.
    InstructionsTooLong {
        /// Its length in UTF-16 code units.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// `replayWindow` does not parse ([`parse_duration`]).
    InvalidReplayWindow(DurationError),
    /// `deliveryClass` is present but is not `"live"` or `"durable"`.
    InvalidDeliveryClass {
        /// The value found.
        value: Value,
    },
    /// A field the protocol defines holds a value of the wrong JSON type (including `null`).
    InvalidFieldType {
        /// The wire name of the field.
        field: &'static str,
        /// What the field must hold.
        expected: &'static str,
        /// The value found.
        value: Value,
    },
}

impl fmt::Display for ChannelConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ChannelConfigError::DescriptionTooLong { len, max } => {
                write!(f, "channel description too long ({len} > {max} chars)")
            }
            ChannelConfigError::InstructionsTooLong { len, max } => {
                write!(f, "channel instructions too long ({len} > {max} chars)")
            }
            ChannelConfigError::InvalidReplayWindow(e) => write!(f, "{e}"),
            ChannelConfigError::InvalidDeliveryClass { value } => {
                write!(
                    f,
                    "invalid deliveryClass {value} - expected \"live\" or \"durable\""
                )
            }
            ChannelConfigError::InvalidFieldType {
                field,
                expected,
                value,
            } => {
                write!(f, "invalid {field} {value} - expected {expected}")
            }
        }
    }
}

impl std::error::Error for ChannelConfigError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ChannelConfigError::InvalidReplayWindow(e) => Some(e),
            _ => None,
        }
    }
}

const REPLAY: &str = "replay";
const REPLAY_WINDOW: &str = "replayWindow";
const DELIVERY_CLASS: &str = "deliveryClass";
const DESCRIPTION: &str = "description";
const INSTRUCTIONS: &str = "instructions";

/// Where a decoded field value goes: the typed slot when it has the protocol's type, otherwise
/// `extra` (verbatim).
fn take_bool(slot: &mut Option<bool>, key: String, v: Value, extra: &mut BTreeMap<String, Value>) {
    match v {
        Value::Bool(b) => *slot = Some(b),
        other => {
            extra.insert(key, other);
        }
    }
}

fn take_string(
    slot: &mut Option<String>,
    key: String,
    v: Value,
    extra: &mut BTreeMap<String, Value>,
) {
    match v {
        Value::String(s) => *slot = Some(s),
        other => {
            extra.insert(key, other);
        }
    }
}

fn take_class(
    slot: &mut Option<DeliveryClass>,
    key: String,
    v: Value,
    extra: &mut BTreeMap<String, Value>,
) {
    match v.as_str().and_then(DeliveryClass::from_wire) {
        Some(c) => *slot = Some(c),
        None => {
            extra.insert(key, v);
        }
    }
}

/// The first problem with a stored or patch value of a defined field that landed in `extra`.
fn check_extra(
    extra: &BTreeMap<String, Value>,
    defined: &[&'static str],
) -> Result<(), ChannelConfigError> {
    for field in defined {
        let Some(value) = extra.get(*field) else {
            continue;
        };
        let value = value.clone();
        return Err(match *field {
            DELIVERY_CLASS => ChannelConfigError::InvalidDeliveryClass { value },
            REPLAY => ChannelConfigError::InvalidFieldType {
                field: REPLAY,
                expected: "a boolean",
                value,
            },
            other => ChannelConfigError::InvalidFieldType {
                field: other,
                expected: "a string",
                value,
            },
        });
    }
    Ok(())
}

fn check_window(window: Option<&str>) -> Result<(), ChannelConfigError> {
    match window {
        Some(w) => parse_duration(w)
            .map(|_| ())
            .map_err(ChannelConfigError::InvalidReplayWindow),
        None => Ok(()),
    }
}

/// Serializes typed fields in the reference's `TYP` order, then `extra` in key order, never
/// emitting a key twice (a typed value wins over an `extra` entry of the same name).
fn serialize_record<S: Serializer>(
    s: S,
    typed: &[(&str, Option<Value>)],
    extra: &BTreeMap<String, Value>,
) -> Result<S::Ok, S::Error> {
    let mut map = s.serialize_map(None)?;
    for (k, v) in typed {
        if let Some(v) = v {
            map.serialize_entry(k, v)?;
        }
    }
    for (k, v) in extra {
        let shadowed = typed.iter().any(|(tk, tv)| tk == k && tv.is_some());
        if !shadowed {
            map.serialize_entry(k, v)?;
        }
    }
    map.end()
}

/// One channel's registry entry, `ChannelConfig` (`TYP`; key = the concrete channel):
/// `{replay?, replayWindow?, deliveryClass?, description?, instructions?}`.
///
/// Decoding never fails on a JSON object: fields this crate does not model, and defined fields
/// whose value has the wrong type, go to [`extra`](ChannelConfig::extra) verbatim and are written
/// back unchanged. Only a non-object (or invalid JSON) fails to decode; treat that entry as absent,
/// as the reference's `decode` does.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ChannelConfig {
    /// `replay`: whether a join backfills history.
    pub replay: Option<bool>,
    /// `replayWindow`: how far back a backfill reaches, as written (`"24h"`); see
    /// [`parse_duration`].
    pub replay_window: Option<String>,
    /// `deliveryClass`.
    pub delivery_class: Option<DeliveryClass>,
    /// `description`: model-facing text, at most [`MAX_CHANNEL_DESCRIPTION`] UTF-16 units.
    pub description: Option<String>,
    /// `instructions`: model-facing text, at most [`MAX_CHANNEL_INSTRUCTIONS`] UTF-16 units.
    pub instructions: Option<String>,
    /// Every other field as stored, plus defined fields whose stored value has the wrong type.
    pub extra: BTreeMap<String, Value>,
}

impl ChannelConfig {
    /// Builds a config from a JSON object, sorting each field into its typed slot or `extra`.
    pub fn from_object(object: Map<String, Value>) -> Self {
        let mut c = ChannelConfig::default();
        for (k, v) in object {
            match k.as_str() {
                REPLAY => take_bool(&mut c.replay, k, v, &mut c.extra),
                REPLAY_WINDOW => take_string(&mut c.replay_window, k, v, &mut c.extra),
                DELIVERY_CLASS => take_class(&mut c.delivery_class, k, v, &mut c.extra),
                DESCRIPTION => take_string(&mut c.description, k, v, &mut c.extra),
                INSTRUCTIONS => take_string(&mut c.instructions, k, v, &mut c.extra),
                _ => {
                    c.extra.insert(k, v);
                }
            }
        }
        c
    }

    /// The config as a JSON object (what [`Serialize`] writes).
    pub fn to_object(&self) -> Map<String, Value> {
        let mut m: Map<String, Value> = self
            .extra
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if let Some(v) = self.replay {
            m.insert(REPLAY.into(), Value::Bool(v));
        }
        if let Some(v) = &self.replay_window {
            m.insert(REPLAY_WINDOW.into(), Value::String(v.clone()));
        }
        if let Some(v) = self.delivery_class {
            m.insert(DELIVERY_CLASS.into(), Value::String(v.as_str().into()));
        }
        if let Some(v) = &self.description {
            m.insert(DESCRIPTION.into(), Value::String(v.clone()));
        }
        if let Some(v) = &self.instructions {
            m.insert(INSTRUCTIONS.into(), Value::String(v.clone()));
        }
        m
    }

    /// `CHN:validateChannelConfig`, strict: `description` ≤ [`MAX_CHANNEL_DESCRIPTION`] and
    /// `instructions` ≤ [`MAX_CHANNEL_INSTRUCTIONS`] UTF-16 code units (JavaScript `length`;
    /// longer is rejected, never clamped), `replayWindow` parses, `deliveryClass` is `live` or
    /// `durable`, and every defined field present has its protocol type.
    ///
    /// Stricter than the reference in one way: a defined field of the wrong type (for example a
    /// non-boolean `replay`, or `null`) is rejected, where the reference lets some through.
    /// Unknown fields are allowed. Also usable as a health check on a stored entry.
    ///
    /// # Errors
    ///
    /// The first problem, in the reference's order: description, instructions, replay window,
    /// delivery class, then field types.
    pub fn validate_for_write(&self) -> Result<(), ChannelConfigError> {
        if let Some(d) = &self.description {
            let len = utf16_len(d);
            if len > MAX_CHANNEL_DESCRIPTION {
                return Err(ChannelConfigError::DescriptionTooLong {
                    len,
                    max: MAX_CHANNEL_DESCRIPTION,
                });
            }
        }
        if let Some(i) = &self.instructions {
            let len = utf16_len(i);
            if len > MAX_CHANNEL_INSTRUCTIONS {
                return Err(ChannelConfigError::InstructionsTooLong {
                    len,
                    max: MAX_CHANNEL_INSTRUCTIONS,
                });
            }
        }
        check_window(self.replay_window.as_deref())?;
        check_extra(
            &self.extra,
            &[
                DESCRIPTION,
                INSTRUCTIONS,
                REPLAY_WINDOW,
                DELIVERY_CLASS,
                REPLAY,
            ],
        )
    }

    /// `self` (a patch) merged over `existing`, as `{...existing, ...patch}`: every field the patch
    /// carries replaces the existing one, every other existing field (unknown ones included) is
    /// kept. A `None` in the patch keeps the existing value; there is no way to delete a field
    /// through a merge (edit the merged result instead).
    pub fn merged_over(&self, existing: Option<&ChannelConfig>) -> ChannelConfig {
        let mut m = existing.map(ChannelConfig::to_object).unwrap_or_default();
        m.extend(self.to_object());
        ChannelConfig::from_object(m)
    }

    /// `CHN:writeChannelConfig` without the IO: validates `patch` ([`validate_for_write`]) and
    /// returns the entry to put, `patch` merged over `existing` ([`merged_over`]).
    ///
    /// Like the reference, only the patch is validated; a bad field already stored and not touched
    /// by the patch is carried over (and still resolves as documented in the module).
    ///
    /// # Errors
    ///
    /// The patch's first [`ChannelConfigError`].
    ///
    /// [`validate_for_write`]: ChannelConfig::validate_for_write
    /// [`merged_over`]: ChannelConfig::merged_over
    pub fn prepare_write(
        existing: Option<&ChannelConfig>,
        patch: &ChannelConfig,
    ) -> Result<ChannelConfig, ChannelConfigError> {
        patch.validate_for_write()?;
        Ok(patch.merged_over(existing))
    }
}

impl Serialize for ChannelConfig {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        serialize_record(
            s,
            &[
                (REPLAY, self.replay.map(Value::Bool)),
                (REPLAY_WINDOW, self.replay_window.clone().map(Value::String)),
                (
                    DELIVERY_CLASS,
                    self.delivery_class
                        .map(|c| Value::String(c.as_str().into())),
                ),
                (DESCRIPTION, self.description.clone().map(Value::String)),
                (INSTRUCTIONS, self.instructions.clone().map(Value::String)),
            ],
            &self.extra,
        )
    }
}

impl<'de> Deserialize<'de> for ChannelConfig {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Map::<String, Value>::deserialize(d).map(ChannelConfig::from_object)
    }
}

/// The space-wide defaults, `ChannelDefaults` (`TYP`; key [`CHANNEL_DEFAULTS_KEY`](crate::wire::keys::CHANNEL_DEFAULTS_KEY)):
/// `{replay?, replayWindow?, deliveryClass?}`.
///
/// Decoded as leniently as [`ChannelConfig`]; `description` and `instructions` are not defined
/// here and, if present, are kept in `extra` like any unknown field.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ChannelDefaults {
    /// `replay`: the space's default for whether a join backfills history.
    pub replay: Option<bool>,
    /// `replayWindow`: the space's default backfill reach, as written.
    pub replay_window: Option<String>,
    /// `deliveryClass`: the space's default class.
    pub delivery_class: Option<DeliveryClass>,
    /// Every other field as stored, plus defined fields whose stored value has the wrong type.
    pub extra: BTreeMap<String, Value>,
}

impl ChannelDefaults {
    /// Builds defaults from a JSON object, sorting each field into its typed slot or `extra`.
    pub fn from_object(object: Map<String, Value>) -> Self {
        let mut c = ChannelDefaults::default();
        for (k, v) in object {
            match k.as_str() {
                REPLAY => take_bool(&mut c.replay, k, v, &mut c.extra),
                REPLAY_WINDOW => take_string(&mut c.replay_window, k, v, &mut c.extra),
                DELIVERY_CLASS => take_class(&mut c.delivery_class, k, v, &mut c.extra),
                _ => {
                    c.extra.insert(k, v);
                }
            }
        }
        c
    }

    /// The defaults as a JSON object (what [`Serialize`] writes).
    pub fn to_object(&self) -> Map<String, Value> {
        let mut m: Map<String, Value> = self
            .extra
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if let Some(v) = self.replay {
            m.insert(REPLAY.into(), Value::Bool(v));
        }
        if let Some(v) = &self.replay_window {
            m.insert(REPLAY_WINDOW.into(), Value::String(v.clone()));
        }
        if let Some(v) = self.delivery_class {
            m.insert(DELIVERY_CLASS.into(), Value::String(v.as_str().into()));
        }
        m
    }

    /// `CHN:validateChannelDefaults`, strict: `replayWindow` parses, `deliveryClass` is `live` or
    /// `durable`, and `replay` (if present) is a boolean.
    ///
    /// # Errors
    ///
    /// The first problem: replay window, delivery class, then field types.
    pub fn validate_for_write(&self) -> Result<(), ChannelConfigError> {
        check_window(self.replay_window.as_deref())?;
        check_extra(&self.extra, &[REPLAY_WINDOW, DELIVERY_CLASS, REPLAY])
    }

    /// `self` (a patch) merged over `existing`, as `{...existing, ...patch}` (see
    /// [`ChannelConfig::merged_over`]).
    pub fn merged_over(&self, existing: Option<&ChannelDefaults>) -> ChannelDefaults {
        let mut m = existing.map(ChannelDefaults::to_object).unwrap_or_default();
        m.extend(self.to_object());
        ChannelDefaults::from_object(m)
    }

    /// `CHN:writeChannelDefaults` without the IO: validates `patch` and returns it merged over
    /// `existing`.
    ///
    /// # Errors
    ///
    /// The patch's first [`ChannelConfigError`].
    pub fn prepare_write(
        existing: Option<&ChannelDefaults>,
        patch: &ChannelDefaults,
    ) -> Result<ChannelDefaults, ChannelConfigError> {
        patch.validate_for_write()?;
        Ok(patch.merged_over(existing))
    }
}

impl Serialize for ChannelDefaults {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        serialize_record(
            s,
            &[
                (REPLAY, self.replay.map(Value::Bool)),
                (REPLAY_WINDOW, self.replay_window.clone().map(Value::String)),
                (
                    DELIVERY_CLASS,
                    self.delivery_class
                        .map(|c| Value::String(c.as_str().into())),
                ),
            ],
            &self.extra,
        )
    }
}

impl<'de> Deserialize<'de> for ChannelDefaults {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Map::<String, Value>::deserialize(d).map(ChannelDefaults::from_object)
    }
}

// ---------------------------------------------------------------------------------------------
// The resolver
// ---------------------------------------------------------------------------------------------

/// How far back a join's backfill may reach.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ReplayWindow {
    /// No window is configured: the full retained history.
    Full,
    /// At most this far back from the join.
    Bounded(Duration),
    /// The configured window does not parse; see the module docs for what that means.
    Invalid(DurationError),
}

/// What a join should replay, decided once from an [`EffectivePolicy`].
///
/// Not `#[non_exhaustive]`: a driver acts on every variant, and a new one must not fall into a
/// wildcard arm unnoticed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backfill {
    /// Replay nothing: replay is off, or the configured window is invalid.
    Skip,
    /// Replay the full retained history.
    Full,
    /// Replay messages no older than this.
    Window(Duration),
}

/// A channel's resolved policy: the one answer every path (join, leave, fan-out, reader, reporting)
/// uses for a channel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EffectivePolicy {
    /// The delivery class.
    pub delivery_class: DeliveryClass,
    /// Whether a join backfills history.
    pub replay: bool,
    /// How far a backfill reaches.
    pub replay_window: ReplayWindow,
}

impl EffectivePolicy {
    /// The policy with no registry at all (and of a channel with no config in a space with no
    /// defaults): durable, replay on, full window (`EP:deliveryClassFresh` returns `"durable"`).
    pub const WITHOUT_REGISTRY: EffectivePolicy = EffectivePolicy {
        delivery_class: DEFAULT_DELIVERY_CLASS,
        replay: DEFAULT_REPLAY,
        replay_window: ReplayWindow::Full,
    };

    /// True when the class is [`DeliveryClass::Durable`].
    pub fn is_durable(&self) -> bool {
        self.delivery_class == DeliveryClass::Durable
    }

    /// What a join replays: [`Backfill::Skip`] when replay is off or the window is invalid,
    /// otherwise the full history or the bounded window.
    pub fn backfill(&self) -> Backfill {
        if !self.replay {
            return Backfill::Skip;
        }
        match &self.replay_window {
            ReplayWindow::Full => Backfill::Full,
            ReplayWindow::Bounded(d) => Backfill::Window(*d),
            ReplayWindow::Invalid(_) => Backfill::Skip,
        }
    }
}

/// THE effective-channel-policy resolver (semantics §1.9; the single source gap G10 asks for).
///
/// `config` is the channel's registry entry and `defaults` the [`CHANNEL_DEFAULTS_KEY`](crate::wire::keys::CHANNEL_DEFAULTS_KEY) entry,
/// each `None` when missing, deleted, purged or undecodable (the reference's `decode`), or when
/// there is no registry at all. For a wildcard `channel`, `config` is ignored: a wildcard is never
/// a registry key and resolves from the defaults alone. The rules and the two edge cases (values of
/// the wrong type, an unparseable window) are in the module docs.
pub fn effective_policy(
    channel: &Channel,
    config: Option<&ChannelConfig>,
    defaults: Option<&ChannelDefaults>,
) -> EffectivePolicy {
    let config = if channel.is_concrete() { config } else { None };
    let delivery_class = config
        .and_then(|c| c.delivery_class)
        .or_else(|| defaults.and_then(|d| d.delivery_class))
        .unwrap_or(DEFAULT_DELIVERY_CLASS);
    let replay = config
        .and_then(|c| c.replay)
        .or_else(|| defaults.and_then(|d| d.replay))
        .unwrap_or(DEFAULT_REPLAY);
    let window = config
        .and_then(|c| c.replay_window.as_deref())
        .or_else(|| defaults.and_then(|d| d.replay_window.as_deref()));
    let replay_window = match window.map(parse_duration) {
        None => ReplayWindow::Full,
        Some(Ok(d)) => ReplayWindow::Bounded(d),
        Some(Err(e)) => ReplayWindow::Invalid(e),
    };
    EffectivePolicy {
        delivery_class,
        replay,
        replay_window,
    }
}

/// A view of the whole channels bucket: the defaults and every channel's config.
///
/// This is what a watch-fed cache holds. [`ChannelRegistry::policy_for`] only looks the entries up
/// and calls [`effective_policy`], so it agrees with a fresh two-key read for the same entries. An
/// empty registry is not "unknown": it resolves every channel to
/// [`EffectivePolicy::WITHOUT_REGISTRY`], so a driver must not consult a cache that has not
/// finished its initial load (the reference's cache is empty right after a reconnect, gap G10).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ChannelRegistry {
    /// The `=defaults` entry, if present and decodable.
    pub defaults: Option<ChannelDefaults>,
    /// Each concrete channel's config.
    pub channels: BTreeMap<ConcreteChannel, ChannelConfig>,
}

impl ChannelRegistry {
    /// The effective policy of `channel` ([`effective_policy`] over this registry's entries).
    pub fn policy_for(&self, channel: &Channel) -> EffectivePolicy {
        let config = channel.to_concrete().and_then(|c| self.channels.get(&c));
        effective_policy(channel, config, self.defaults.as_ref())
    }

    /// Applies one KV entry of the channels bucket: `value` is the stored bytes, or `None` for a
    /// delete or purge. A value that is not a JSON object removes the entry (it is absent, as in
    /// the reference's `decode`).
    ///
    /// # Errors
    ///
    /// The [`ChannelError`] when `key` is neither [`CHANNEL_DEFAULTS_KEY`](crate::wire::keys::CHANNEL_DEFAULTS_KEY) nor a concrete channel;
    /// the registry is left unchanged.
    pub fn apply(&mut self, key: &str, value: Option<&[u8]>) -> Result<(), ChannelError> {
        match ChannelRegistryKey::parse(key)? {
            ChannelRegistryKey::Defaults => {
                self.defaults = value.and_then(|v| serde_json::from_slice(v).ok());
            }
            ChannelRegistryKey::Channel(c) => {
                match value.and_then(|v| serde_json::from_slice::<ChannelConfig>(v).ok()) {
                    Some(cfg) => {
                        self.channels.insert(c, cfg);
                    }
                    None => {
                        self.channels.remove(&c);
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn ch(s: &str) -> Channel {
        Channel::new(s).unwrap()
    }

    fn cfg(v: Value) -> ChannelConfig {
        serde_json::from_value(v).unwrap()
    }

    fn defs(v: Value) -> ChannelDefaults {
        serde_json::from_value(v).unwrap()
    }

    // ---- parse_duration ----

    #[test]
    fn parse_duration_accepts_the_grammar() {
        let ms = |s: &str| parse_duration(s).map(Duration::as_millis);
        assert_eq!(ms("90s"), Ok(90_000));
        assert_eq!(ms("30m"), Ok(1_800_000));
        assert_eq!(ms("24h"), Ok(86_400_000));
        assert_eq!(ms("7d"), Ok(604_800_000));
        assert_eq!(ms("0s"), Ok(0));
        assert_eq!(ms("007m"), Ok(420_000));
        assert_eq!(ms("  24h\n"), Ok(86_400_000));
        assert_eq!(
            ms("\u{FEFF}1s\u{3000}"),
            Ok(1000),
            "JavaScript trims BOM and ideographic space"
        );
        assert_eq!(ms("\u{A0}1s\u{2028}"), Ok(1000));
    }

    #[test]
    fn parse_duration_rejects_everything_else() {
        for bad in [
            "",
            " ",
            "h",
            "24",
            "24H",
            "24 h",
            "1.5h",
            "-1h",
            "+1h",
            "1hh",
            "h1",
            "1w",
            "1ms",
            "٣s",         // Arabic-Indic digit: JavaScript's \d is ASCII only
            "\u{85}1s",   // NEL: Rust trims it, JavaScript does not
            "1s\u{200B}", // zero-width space is not whitespace
        ] {
            assert_eq!(
                parse_duration(bad),
                Err(DurationError::Invalid {
                    input: bad.to_owned()
                }),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn parse_duration_overflow_is_typed() {
        let max_s = u64::MAX / 1000;
        assert_eq!(
            parse_duration(&format!("{max_s}s")).unwrap().as_millis(),
            max_s * 1000
        );
        assert!(matches!(
            parse_duration(&format!("{}s", max_s + 1)),
            Err(DurationError::Overflow { .. })
        ));
        assert!(matches!(
            parse_duration("99999999999999999999999999s"),
            Err(DurationError::Overflow { .. })
        ));
        assert_eq!(
            parse_duration("0000000000000000000000000000001d")
                .unwrap()
                .as_millis(),
            86_400_000
        );
        let e = parse_duration("soon").unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid duration \"soon\" - expected <number><s|m|h|d>, e.g. \"24h\""
        );
    }

    proptest! {
        #[test]
        fn parse_duration_never_panics(s in any::<String>()) {
            let _ = parse_duration(&s);
        }

        #[test]
        fn parse_duration_round_trips(n in any::<u64>(), unit in 0usize..4, pad in "[ \t\n]{0,3}") {
            let (c, per) = REPLAY_WINDOW_UNITS[unit];
            let text = format!("{pad}{n}{c}{pad}");
            match n.checked_mul(per.as_millis()) {
                Some(ms) => prop_assert_eq!(parse_duration(&text), Ok(Duration::from_millis(ms))),
                None => {
                    let overflowed = matches!(parse_duration(&text), Err(DurationError::Overflow { .. }));
                    prop_assert!(overflowed);
                }
            }
        }
    }

    // ---- lengths and write validation ----

    #[test]
    fn lengths_count_utf16_code_units() {
        assert_eq!(utf16_len("abc"), 3);
        assert_eq!(utf16_len("é"), 1, "BMP: one unit, although two UTF-8 bytes");
        assert_eq!(utf16_len("😀"), 2, "astral: a surrogate pair");
        assert_eq!(utf16_len(""), 0);
    }

    #[test]
    fn description_limit_is_200_utf16_units_and_never_clamped() {
        let at_limit = ChannelConfig {
            description: Some("é".repeat(200)),
            ..Default::default()
        };
        assert_eq!(
            at_limit.validate_for_write(),
            Ok(()),
            "200 units, 400 bytes: accepted"
        );
        let emoji = ChannelConfig {
            description: Some("😀".repeat(100)),
            ..Default::default()
        };
        assert_eq!(emoji.validate_for_write(), Ok(()), "100 emoji = 200 units");
        let over = ChannelConfig {
            description: Some(format!("{}a", "😀".repeat(100))),
            ..Default::default()
        };
        assert_eq!(
            over.validate_for_write(),
            Err(ChannelConfigError::DescriptionTooLong { len: 201, max: 200 })
        );
        // 101 chars but 202 units: JavaScript rejects it, so must we.
        let sneaky = ChannelConfig {
            description: Some("😀".repeat(101)),
            ..Default::default()
        };
        assert!(matches!(
            sneaky.validate_for_write(),
            Err(ChannelConfigError::DescriptionTooLong { len: 202, .. })
        ));
        // Rejected patches are not merged.
        assert!(ChannelConfig::prepare_write(None, &over).is_err());
    }

    #[test]
    fn instructions_limit_is_2000_utf16_units() {
        let ok = ChannelConfig {
            instructions: Some("x".repeat(2000)),
            ..Default::default()
        };
        assert_eq!(ok.validate_for_write(), Ok(()));
        let over = ChannelConfig {
            instructions: Some("x".repeat(2001)),
            ..Default::default()
        };
        assert_eq!(
            over.validate_for_write(),
            Err(ChannelConfigError::InstructionsTooLong {
                len: 2001,
                max: 2000
            })
        );
        assert_eq!(
            over.validate_for_write().unwrap_err().to_string(),
            "channel instructions too long (2001 > 2000 chars)"
        );
    }

    #[test]
    fn write_validation_of_window_class_and_types() {
        assert_eq!(
            cfg(json!({"replayWindow": "24h", "deliveryClass": "live"})).validate_for_write(),
            Ok(())
        );
        assert_eq!(
            cfg(json!({"replayWindow": "1 day"})).validate_for_write(),
            Err(ChannelConfigError::InvalidReplayWindow(
                DurationError::Invalid {
                    input: "1 day".into()
                }
            ))
        );
        let bogus = cfg(json!({"deliveryClass": "bogus"}));
        assert_eq!(bogus.delivery_class, None);
        assert_eq!(
            bogus.validate_for_write(),
            Err(ChannelConfigError::InvalidDeliveryClass {
                value: json!("bogus")
            })
        );
        assert_eq!(
            bogus.validate_for_write().unwrap_err().to_string(),
            "invalid deliveryClass \"bogus\" - expected \"live\" or \"durable\""
        );
        assert!(matches!(
            cfg(json!({"deliveryClass": "Durable"})).validate_for_write(),
            Err(ChannelConfigError::InvalidDeliveryClass { .. })
        ));
        assert_eq!(
            cfg(json!({"replay": "yes"})).validate_for_write(),
            Err(ChannelConfigError::InvalidFieldType {
                field: "replay",
                expected: "a boolean",
                value: json!("yes")
            })
        );
        assert!(matches!(
            cfg(json!({"description": 5})).validate_for_write(),
            Err(ChannelConfigError::InvalidFieldType {
                field: "description",
                ..
            })
        ));
        assert!(matches!(
            cfg(json!({"replayWindow": null})).validate_for_write(),
            Err(ChannelConfigError::InvalidFieldType {
                field: "replayWindow",
                ..
            })
        ));
        // Unknown fields are fine.
        assert_eq!(
            cfg(json!({"owner": "ops", "x": [1]})).validate_for_write(),
            Ok(())
        );
        // Reference order: description is checked before the window.
        let both = ChannelConfig {
            description: Some("d".repeat(201)),
            replay_window: Some("nope".into()),
            ..Default::default()
        };
        assert!(matches!(
            both.validate_for_write(),
            Err(ChannelConfigError::DescriptionTooLong { .. })
        ));
    }

    #[test]
    fn defaults_validation() {
        assert_eq!(
            defs(json!({"deliveryClass": "durable", "replay": true})).validate_for_write(),
            Ok(())
        );
        assert!(matches!(
            defs(json!({"replayWindow": "forever"})).validate_for_write(),
            Err(ChannelConfigError::InvalidReplayWindow(_))
        ));
        assert!(matches!(
            defs(json!({"deliveryClass": 1})).validate_for_write(),
            Err(ChannelConfigError::InvalidDeliveryClass { .. })
        ));
        // description is not a defaults field: kept as unknown, not length-checked.
        let d = defs(json!({"description": "x".repeat(500)}));
        assert!(d.extra.contains_key("description"));
        assert_eq!(d.validate_for_write(), Ok(()));
    }

    // ---- merge ----

    #[test]
    fn merge_overlays_the_patch_and_keeps_the_rest() {
        let existing = cfg(json!({
            "replay": false, "description": "old", "deliveryClass": "durable", "owner": "ops"
        }));
        let patch = cfg(json!({"description": "new", "replayWindow": "2h"}));
        let merged = ChannelConfig::prepare_write(Some(&existing), &patch).unwrap();
        assert_eq!(
            serde_json::to_value(&merged).unwrap(),
            json!({
                "replay": false, "replayWindow": "2h", "deliveryClass": "durable",
                "description": "new", "owner": "ops"
            })
        );
        // No existing entry: the patch is the entry.
        assert_eq!(ChannelConfig::prepare_write(None, &patch).unwrap(), patch);
        // A patch value replaces a wrong-typed stored value of the same field.
        let broken = cfg(json!({"replay": "yes", "description": "d"}));
        let fixed = cfg(json!({"replay": true})).merged_over(Some(&broken));
        assert_eq!(fixed.replay, Some(true));
        assert!(fixed.extra.is_empty());
        assert_eq!(
            serde_json::to_value(&fixed).unwrap(),
            json!({"replay": true, "description": "d"})
        );
        // An untouched bad stored field is carried over, as the reference does.
        let carried = cfg(json!({"description": "x"})).merged_over(Some(&broken));
        assert_eq!(carried.extra.get("replay"), Some(&json!("yes")));
    }

    #[test]
    fn defaults_merge() {
        let existing = defs(json!({"deliveryClass": "durable", "replay": true}));
        let merged = ChannelDefaults::prepare_write(
            Some(&existing),
            &defs(json!({"deliveryClass": "live"})),
        )
        .unwrap();
        assert_eq!(merged.delivery_class, Some(DeliveryClass::Live));
        assert_eq!(merged.replay, Some(true));
        assert!(
            ChannelDefaults::prepare_write(Some(&existing), &defs(json!({"replayWindow": "x"})))
                .is_err()
        );
    }

    // ---- serde ----

    #[test]
    fn serde_is_lossless_and_ordered() {
        let v = json!({
            "instructions": "be brief", "description": "d", "deliveryClass": "live",
            "replayWindow": "1h", "replay": false, "zz": {"nested": true}, "aa": null
        });
        let c = cfg(v.clone());
        assert_eq!(c.delivery_class, Some(DeliveryClass::Live));
        assert_eq!(serde_json::to_value(&c).unwrap(), v);
        assert_eq!(
            serde_json::to_string(&c).unwrap(),
            r#"{"replay":false,"replayWindow":"1h","deliveryClass":"live","description":"d","instructions":"be brief","aa":null,"zz":{"nested":true}}"#
        );
        // Wrong-typed defined fields survive a round trip verbatim.
        let odd = json!({"replay": "yes", "deliveryClass": "bogus", "replayWindow": null});
        assert_eq!(serde_json::to_value(cfg(odd.clone())).unwrap(), odd);
        assert_eq!(serde_json::to_value(defs(odd.clone())).unwrap(), odd);
        // A typed value shadows a same-named extra entry instead of writing the key twice.
        let mut shadow = ChannelConfig {
            replay: Some(true),
            ..Default::default()
        };
        shadow.extra.insert("replay".into(), json!("stale"));
        assert_eq!(
            serde_json::to_string(&shadow).unwrap(),
            r#"{"replay":true}"#
        );
        // Non-objects do not decode.
        assert!(serde_json::from_str::<ChannelConfig>("[]").is_err());
        assert!(serde_json::from_str::<ChannelDefaults>("\"durable\"").is_err());
        assert_eq!(
            serde_json::to_string(&DeliveryClass::Durable).unwrap(),
            "\"durable\""
        );
        assert_eq!(
            serde_json::from_str::<DeliveryClass>("\"live\"").unwrap(),
            DeliveryClass::Live
        );
        assert!(serde_json::from_str::<DeliveryClass>("\"LIVE\"").is_err());
    }

    // ---- the resolver ----

    use DeliveryClass::{Durable, Live};

    /// class = cfg ?? defaults ?? durable, over every present/absent combination; `None` for a
    /// whole record means the entry is missing, `Some(None)` an entry without the field.
    #[test]
    fn class_resolution_table() {
        type Row = (
            Option<Option<DeliveryClass>>,
            Option<Option<DeliveryClass>>,
            DeliveryClass,
        );
        let rows: [Row; 16] = [
            (None, None, Durable),
            (None, Some(None), Durable),
            (None, Some(Some(Live)), Live),
            (None, Some(Some(Durable)), Durable),
            (Some(None), None, Durable),
            (Some(None), Some(None), Durable),
            (Some(None), Some(Some(Live)), Live),
            (Some(None), Some(Some(Durable)), Durable),
            (Some(Some(Live)), None, Live),
            (Some(Some(Live)), Some(None), Live),
            (Some(Some(Live)), Some(Some(Live)), Live),
            (Some(Some(Live)), Some(Some(Durable)), Live),
            (Some(Some(Durable)), None, Durable),
            (Some(Some(Durable)), Some(None), Durable),
            (Some(Some(Durable)), Some(Some(Live)), Durable),
            (Some(Some(Durable)), Some(Some(Durable)), Durable),
        ];
        for (c, d, want) in rows {
            let c = c.map(|x| ChannelConfig {
                delivery_class: x,
                ..Default::default()
            });
            let d = d.map(|x| ChannelDefaults {
                delivery_class: x,
                ..Default::default()
            });
            let got = effective_policy(&ch("team.a"), c.as_ref(), d.as_ref());
            assert_eq!(got.delivery_class, want, "cfg={c:?} defaults={d:?}");
            assert_eq!(got.is_durable(), want == Durable);
        }
    }

    #[test]
    fn replay_resolution_table() {
        type Row = (Option<Option<bool>>, Option<Option<bool>>, bool);
        let rows: [Row; 16] = [
            (None, None, true),
            (None, Some(None), true),
            (None, Some(Some(false)), false),
            (None, Some(Some(true)), true),
            (Some(None), None, true),
            (Some(None), Some(None), true),
            (Some(None), Some(Some(false)), false),
            (Some(None), Some(Some(true)), true),
            (Some(Some(false)), None, false),
            (Some(Some(false)), Some(None), false),
            (Some(Some(false)), Some(Some(false)), false),
            (Some(Some(false)), Some(Some(true)), false),
            (Some(Some(true)), None, true),
            (Some(Some(true)), Some(None), true),
            (Some(Some(true)), Some(Some(false)), true),
            (Some(Some(true)), Some(Some(true)), true),
        ];
        for (c, d, want) in rows {
            let c = c.map(|x| ChannelConfig {
                replay: x,
                ..Default::default()
            });
            let d = d.map(|x| ChannelDefaults {
                replay: x,
                ..Default::default()
            });
            let got = effective_policy(&ch("team.a"), c.as_ref(), d.as_ref());
            assert_eq!(got.replay, want, "cfg={c:?} defaults={d:?}");
        }
    }

    #[test]
    fn window_resolution_table() {
        let h = |n: u64| ReplayWindow::Bounded(Duration::from_millis(n * 3_600_000));
        let bad = |s: &str| ReplayWindow::Invalid(DurationError::Invalid { input: s.into() });
        type Row = (
            Option<Option<&'static str>>,
            Option<Option<&'static str>>,
            ReplayWindow,
        );
        let rows: Vec<Row> = vec![
            (None, None, ReplayWindow::Full),
            (None, Some(None), ReplayWindow::Full),
            (None, Some(Some("2h")), h(2)),
            (None, Some(Some("x")), bad("x")),
            (Some(None), None, ReplayWindow::Full),
            (Some(None), Some(None), ReplayWindow::Full),
            (Some(None), Some(Some("2h")), h(2)),
            (Some(None), Some(Some("x")), bad("x")),
            (Some(Some("1h")), None, h(1)),
            (Some(Some("1h")), Some(None), h(1)),
            (Some(Some("1h")), Some(Some("2h")), h(1)),
            (Some(Some("1h")), Some(Some("x")), h(1)),
            // The channel's own bad window does not fall back to the defaults' good one.
            (Some(Some("y")), None, bad("y")),
            (Some(Some("y")), Some(None), bad("y")),
            (Some(Some("y")), Some(Some("2h")), bad("y")),
            (Some(Some("y")), Some(Some("x")), bad("y")),
        ];
        for (c, d, want) in rows {
            let c = c.map(|x| ChannelConfig {
                replay_window: x.map(Into::into),
                ..Default::default()
            });
            let d = d.map(|x| ChannelDefaults {
                replay_window: x.map(Into::into),
                ..Default::default()
            });
            let got = effective_policy(&ch("team.a"), c.as_ref(), d.as_ref());
            assert_eq!(got.replay_window, want, "cfg={c:?} defaults={d:?}");
        }
    }

    #[test]
    fn backfill_is_decided_once() {
        let p = |replay, replay_window| EffectivePolicy {
            delivery_class: Durable,
            replay,
            replay_window,
        };
        let two_h = Duration::from_millis(7_200_000);
        let bad = ReplayWindow::Invalid(DurationError::Invalid { input: "x".into() });
        assert_eq!(p(true, ReplayWindow::Full).backfill(), Backfill::Full);
        assert_eq!(
            p(true, ReplayWindow::Bounded(two_h)).backfill(),
            Backfill::Window(two_h)
        );
        assert_eq!(p(true, bad.clone()).backfill(), Backfill::Skip);
        assert_eq!(p(false, ReplayWindow::Full).backfill(), Backfill::Skip);
        assert_eq!(
            p(false, ReplayWindow::Bounded(two_h)).backfill(),
            Backfill::Skip
        );
        assert_eq!(p(false, bad).backfill(), Backfill::Skip);
    }

    #[test]
    fn no_registry_is_durable_with_replay() {
        let got = effective_policy(&ch("general"), None, None);
        assert_eq!(got, EffectivePolicy::WITHOUT_REGISTRY);
        assert_eq!(got.delivery_class, Durable);
        assert!(got.replay);
        assert_eq!(got.backfill(), Backfill::Full);
        assert_eq!(ChannelRegistry::default().policy_for(&ch("team.>")), got);
    }

    #[test]
    fn wildcards_resolve_from_the_defaults_alone() {
        let c = ChannelConfig {
            delivery_class: Some(Live),
            replay: Some(false),
            replay_window: Some("1h".into()),
            ..Default::default()
        };
        let d = ChannelDefaults {
            replay_window: Some("3h".into()),
            ..Default::default()
        };
        for wildcard in ["team.*", "team.>", ">", "*.a"] {
            let got = effective_policy(&ch(wildcard), Some(&c), Some(&d));
            assert_eq!(got.delivery_class, Durable, "{wildcard}");
            assert!(got.replay, "{wildcard}");
            assert_eq!(
                got.replay_window,
                ReplayWindow::Bounded(Duration::from_millis(10_800_000))
            );
        }
        // The same config on a concrete channel applies.
        assert_eq!(
            effective_policy(&ch("team.a"), Some(&c), Some(&d)).delivery_class,
            Live
        );
    }

    #[test]
    fn wrong_typed_stored_values_count_as_absent() {
        let d = defs(json!({"deliveryClass": "live", "replay": false}));
        let c = cfg(json!({"deliveryClass": "bogus", "replay": "yes", "description": "d"}));
        let got = effective_policy(&ch("lobby"), Some(&c), Some(&d));
        assert_eq!(got.delivery_class, Live);
        assert!(!got.replay);
        let nulls = cfg(json!({"deliveryClass": null, "replay": null}));
        assert_eq!(
            effective_policy(&ch("lobby"), Some(&nulls), None),
            EffectivePolicy::WITHOUT_REGISTRY
        );
    }

    #[test]
    fn a_bad_stored_window_does_not_break_the_read() {
        let c = cfg(json!({"deliveryClass": "live", "replayWindow": "24 hours"}));
        let got = effective_policy(&ch("review"), Some(&c), None);
        assert_eq!(got.delivery_class, Live);
        assert!(got.replay);
        assert_eq!(
            got.replay_window,
            ReplayWindow::Invalid(DurationError::Invalid {
                input: "24 hours".into()
            })
        );
        assert_eq!(got.backfill(), Backfill::Skip);
    }

    #[test]
    fn registry_apply_follows_the_watch() {
        let mut r = ChannelRegistry::default();
        r.apply("=defaults", Some(br#"{"deliveryClass":"live"}"#))
            .unwrap();
        r.apply(
            "review",
            Some(br#"{"deliveryClass":"durable","replayWindow":"24h"}"#),
        )
        .unwrap();
        assert_eq!(r.policy_for(&ch("general")).delivery_class, Live);
        assert_eq!(r.policy_for(&ch("review")).delivery_class, Durable);
        // Undecodable = absent.
        r.apply("review", Some(b"not json")).unwrap();
        assert_eq!(r.policy_for(&ch("review")).delivery_class, Live);
        r.apply("review", Some(br#"{"deliveryClass":"durable"}"#))
            .unwrap();
        // Delete.
        r.apply("review", None).unwrap();
        assert!(r.channels.is_empty());
        r.apply("=defaults", None).unwrap();
        assert_eq!(r, ChannelRegistry::default());
        // A key that is not a registry key changes nothing.
        assert!(r.apply("team.*", Some(b"{}")).is_err());
        assert_eq!(r, ChannelRegistry::default());
    }

    // ---- G10: one resolver, one answer ----

    fn arb_class() -> impl Strategy<Value = Option<DeliveryClass>> {
        prop_oneof![Just(None), Just(Some(Live)), Just(Some(Durable))]
    }

    fn arb_window() -> impl Strategy<Value = Option<String>> {
        prop_oneof![
            Just(None),
            Just(Some("24h".to_owned())),
            Just(Some("junk".to_owned())),
            "[0-9]{1,3}[smhd]".prop_map(Some)
        ]
    }

    fn arb_config() -> impl Strategy<Value = Option<ChannelConfig>> {
        proptest::option::of(
            (
                arb_class(),
                proptest::option::of(any::<bool>()),
                arb_window(),
            )
                .prop_map(|(delivery_class, replay, replay_window)| ChannelConfig {
                    delivery_class,
                    replay,
                    replay_window,
                    ..Default::default()
                }),
        )
    }

    fn arb_defaults() -> impl Strategy<Value = Option<ChannelDefaults>> {
        proptest::option::of(
            (
                arb_class(),
                proptest::option::of(any::<bool>()),
                arb_window(),
            )
                .prop_map(|(delivery_class, replay, replay_window)| ChannelDefaults {
                    delivery_class,
                    replay,
                    replay_window,
                    ..Default::default()
                }),
        )
    }

    proptest! {
        /// The fresh path (two KV reads), the cache path (a registry fed by a watch, holding other
        /// channels too) and a round trip through the wire all give the same policy.
        #[test]
        fn one_resolver_one_answer(
            target in arb_config(),
            other in arb_config(),
            defaults in arb_defaults(),
            concrete in any::<bool>(),
        ) {
            let channel = ch(if concrete { "team.backend" } else { "team.*" });
            let fresh = effective_policy(&channel, target.as_ref(), defaults.as_ref());

            let mut cache = ChannelRegistry::default();
            if let Some(d) = &defaults {
                cache.apply("=defaults", Some(&serde_json::to_vec(d).unwrap())).unwrap();
            }
            if let Some(c) = &target {
                cache.apply("team.backend", Some(&serde_json::to_vec(c).unwrap())).unwrap();
            }
            if let Some(o) = &other {
                cache.apply("team.frontend", Some(&serde_json::to_vec(o).unwrap())).unwrap();
            }
            prop_assert_eq!(cache.policy_for(&channel), fresh.clone());
            // Deterministic: asking again gives the same answer.
            prop_assert_eq!(effective_policy(&channel, target.as_ref(), defaults.as_ref()), fresh);
        }
    }
}
