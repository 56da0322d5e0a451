//! The identities the [`Ledger`](super::Ledger) works with: the logical message id (the unit of
//! dedup), the durable delivery handle, and where a copy came from (live, backfill, durable).

use serde::{Deserialize, Serialize};
use std::fmt;

// ---------------------------------------------------------------------------------------------
// Identities and copies
// ---------------------------------------------------------------------------------------------

/// A logical message id (`CotalMessage.id`): the unit of dedup.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct MessageId(String);

impl MessageId {
    /// Wraps a message id as received.
    pub fn new(id: impl Into<String>) -> Self {
        MessageId(id.into())
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl From<String> for MessageId {
    fn from(id: String) -> Self {
        MessageId(id)
    }
}

impl From<&str> for MessageId {
    fn from(id: &str) -> Self {
        MessageId(id.to_owned())
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An opaque handle the driver assigns to one JetStream delivery (one received DLV/DM/TASK
/// message, with its reply subject) and maps back to it when told to ack, nak or term.
///
/// A redelivery is a new delivery and gets a new handle. The ledger rejects a handle that it still
/// holds ([`LedgerError::HandleInUse`](super::LedgerError::HandleInUse)); it cannot detect the
/// reuse of a handle it already resolved, so the driver should never reuse one (a counter is
/// enough).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DeliveryId(pub u64);

impl fmt::Display for DeliveryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "d{}", self.0)
    }
}

/// A durable delivery: its handle, plus what JetStream said about it when the driver knows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DurableDelivery {
    /// The driver's handle for this delivery.
    pub handle: DeliveryId,
    /// The stream sequence of the underlying message, if known. Two deliveries with the same stream
    /// sequence are treated as the same JetStream message (a redelivery). Sequences of different
    /// streams (DLV and DM) may collide; a collision only makes the ledger choose the safe
    /// [`Action::Forget`](super::Action::Forget) over an ack, so the driver may pass them
    /// unqualified.
    pub stream_seq: Option<u64>,
    /// JetStream's delivery count, if known (1 = first delivery, more = redelivery).
    pub delivery_count: Option<u64>,
}

impl DurableDelivery {
    /// A delivery with no known stream sequence or delivery count.
    pub fn new(handle: DeliveryId) -> Self {
        DurableDelivery {
            handle,
            stream_seq: None,
            delivery_count: None,
        }
    }

    /// The same delivery with its stream sequence.
    pub fn with_stream_seq(self, stream_seq: u64) -> Self {
        DurableDelivery {
            stream_seq: Some(stream_seq),
            ..self
        }
    }

    /// The same delivery with its delivery count.
    pub fn with_delivery_count(self, delivery_count: u64) -> Self {
        DurableDelivery {
            delivery_count: Some(delivery_count),
            ..self
        }
    }

    /// Whether JetStream says this is a redelivery (a delivery count above 1).
    pub fn is_redelivery(&self) -> bool {
        self.delivery_count.is_some_and(|n| n > 1)
    }

    /// Whether `self` and `other` are certainly different stream messages.
    pub(super) fn distinct_message_from(&self, other: &DurableDelivery) -> bool {
        matches!((self.stream_seq, other.stream_seq), (Some(a), Some(b)) if a != b)
    }
}

/// Where a copy came from (semantics §2(f), "copy sources").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CopySource {
    /// The live core subscription: no ack, at-most-once.
    Live,
    /// The join backfill (historical copy): no ack.
    Backfill,
    /// A durable JetStream delivery (DLV, DM, TASK), first delivery or redelivery: owns the ack.
    Durable(DurableDelivery),
}

impl CopySource {
    /// The source without its delivery details.
    pub fn kind(&self) -> SourceKind {
        match self {
            CopySource::Live => SourceKind::Live,
            CopySource::Backfill => SourceKind::Backfill,
            CopySource::Durable(_) => SourceKind::Durable,
        }
    }

    /// The durable delivery, for a durable copy.
    pub fn durable(&self) -> Option<&DurableDelivery> {
        match self {
            CopySource::Durable(d) => Some(d),
            CopySource::Live | CopySource::Backfill => None,
        }
    }
}

/// The kind of a [`CopySource`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum SourceKind {
    /// From the live core subscription.
    Live,
    /// From the join backfill.
    Backfill,
    /// From a durable consumer.
    Durable,
}

impl fmt::Display for SourceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SourceKind::Live => "live",
            SourceKind::Backfill => "backfill",
            SourceKind::Durable => "durable",
        })
    }
}
