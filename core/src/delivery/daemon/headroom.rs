//! The consumer headroom of the streams the daemon depends on (issue 22): the parent's glue
//! between a timer, `STREAM.INFO` of CHAT and DLV, the one judgement
//! ([`Headroom::judge`](crate::wire::capacity::Headroom::judge)) and the lease record
//! ([`CONSUMERS_FIELD`]).
//!
//! CHAT carries the agents' history readers and this daemon's catch-up readers, DLV every
//! agent's `dlv_<id>`: once either is full, joins cannot catch up and agents cannot be
//! provisioned. Every [`CONSUMER_HEADROOM_INTERVAL`] while the daemon serves (the first one
//! interval after it starts serving), both are read; a
//! stream whose free share crosses [`LOW_HEADROOM_PERCENT`] either way is reported
//! ([`DeliveryEvent::ConsumerHeadroom`], counted in `consumer_headroom_low` when it falls), and
//! the lease record carries the last reading of each for `cotal health`. A failed read is
//! transient: the next interval reads again.
//!
//! [`LOW_HEADROOM_PERCENT`]: crate::wire::capacity::LOW_HEADROOM_PERCENT

use super::*;
use crate::constants::CONSUMER_HEADROOM_INTERVAL;
use crate::wire::capacity::Headroom;
use crate::wire::config::SpaceStream;

impl Delivery {
    /// The streams whose headroom the daemon reads: CHAT and DLV of its space (the daemon's
    /// grant reads `STREAM.INFO` of both).
    fn headroom_streams(&self) -> [String; 2] {
        [
            SpaceStream::Chat.name(&self.config.space),
            SpaceStream::Dlv.name(&self.config.space),
        ]
    }

    /// The timer: re-arms, and reads both streams while serving.
    pub(super) fn check_headroom(&mut self, now: Now) {
        self.cx
            .timers
            .set(Timer::HeadroomCheck, now.at + CONSUMER_HEADROOM_INTERVAL);
        if !self.serving() {
            return;
        }
        for stream in self.headroom_streams() {
            if self
                .pending
                .values()
                .any(|p| matches!(p, Pending::Headroom(s) if *s == stream))
            {
                continue; // the last read is still out
            }
            let op = self.op(Pending::Headroom(stream.clone()));
            self.cx
                .commands
                .push_back(Command::StreamInfo { op, stream });
        }
    }

    /// A reading of `stream`: a crossing of the low mark either way is an event (a fall is
    /// counted too), and the lease record gets the new reading.
    pub(super) fn on_headroom(&mut self, stream: String, outcome: Outcome<Reply>) {
        let Outcome::Success(Reply::StreamState(state)) = outcome else {
            return; // transient, or not this stream: the next interval reads again
        };
        let headroom = Headroom::judge(state.consumers, state.max_consumers);
        let low = headroom.is_low();
        let was_low = self.headroom.get(&stream).is_some_and(Headroom::is_low);
        if low != was_low {
            if low {
                self.cx.counters.consumer_headroom_low += 1;
            }
            self.emit(DeliveryEvent::ConsumerHeadroom {
                stream: stream.clone(),
                headroom,
                low,
            });
        }
        if self.headroom.insert(stream, headroom) != Some(headroom) {
            let published: serde_json::Map<String, serde_json::Value> = self
                .headroom
                .iter()
                .map(|(s, h)| {
                    (
                        s.clone(),
                        serde_json::json!({
                            "consumers": h.consumers,
                            "cap": h.cap,
                            "serverDefault": h.server_default,
                            "low": h.is_low(),
                        }),
                    )
                })
                .collect();
            self.lease
                .annotate(CONSUMERS_FIELD, serde_json::Value::Object(published));
        }
    }

    /// The last headroom reading of each stream the daemon watches.
    pub fn consumer_headroom(&self) -> &BTreeMap<String, Headroom> {
        &self.headroom
    }
}
