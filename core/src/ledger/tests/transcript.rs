//! A readable transcript of the main flows (R21): inputs on the left, decisions on the right.

use super::super::*;
use std::fmt::Write;

struct Script {
    ledger: Ledger<&'static str>,
    out: String,
}

impl Script {
    fn new(config: LedgerConfig) -> Self {
        Script {
            ledger: Ledger::new(config).unwrap(),
            out: String::new(),
        }
    }

    fn line(&mut self, now: u64, input: String, result: String) {
        let _ = writeln!(self.out, "t={now:<6} {input:<44} -> {result}");
    }

    fn note(&mut self, text: &str) {
        let _ = writeln!(self.out, "\n# {text}");
    }

    fn ingest(&mut self, now: u64, id: &'static str, source: CopySource) {
        let input = match source {
            CopySource::Durable(d) => format!(
                "ingest {id} durable {}{}",
                d.handle,
                d.stream_seq
                    .map(|s| format!(" seq={s}"))
                    .unwrap_or_default()
            ),
            other => format!("ingest {id} {}", other.kind()),
        };
        let result =
            match self
                .ledger
                .ingest(Instant::from_millis(now), MessageId::from(id), source, id)
            {
                Ok(d) => d.to_string(),
                Err(e) => format!("error: {e}"),
            };
        self.line(now, input, result);
    }

    fn surface(&mut self, now: u64, limit: usize) {
        let items = self.ledger.surface(Instant::from_millis(now), limit);
        let list: Vec<String> = items
            .iter()
            .map(|s| {
                let handle = if s.durable {
                    "durable handle"
                } else {
                    "no handle"
                };
                format!("{} (first {}, {handle})", s.id, s.origin)
            })
            .collect();
        self.line(
            now,
            format!("surface {limit}"),
            format!("[{}]", list.join(", ")),
        );
    }

    fn handled(&mut self, now: u64, id: &str) {
        let result = match self
            .ledger
            .handled(Instant::from_millis(now), &MessageId::from(id))
        {
            Ok(s) => format!(
                "{}{}{}",
                s.settlement,
                s.ack.map(|a| format!(": {a}")).unwrap_or_default(),
                s.evicted
                    .map(|e| format!(", evicted {e}"))
                    .unwrap_or_default()
            ),
            Err(e) => format!("error: {e}"),
        };
        self.line(now, format!("handled {id}"), result);
    }

    fn counters(&mut self) {
        let c = *self.ledger.counters();
        let _ = writeln!(
            self.out,
            "pending={} horizon={} | buffered={} surfaced={} handled={} upgraded={} \
             superseded(acked={}, forgotten={}) settled_dup(acked={}, dropped={}) \
             overflow(deferred={}, displaced={}, lost={})",
            self.ledger.pending_len(),
            self.ledger.horizon_len(),
            c.buffered,
            c.surfaced,
            c.handled,
            c.handles_upgraded,
            c.superseded_acked,
            c.superseded_forgotten,
            c.settled_duplicates_acked,
            c.settled_duplicates_dropped,
            c.overflow_deferred,
            c.overflow_displaced,
            c.overflow_lost,
        );
    }
}

fn durable(h: u64, seq: u64) -> CopySource {
    CopySource::Durable(DurableDelivery::new(DeliveryId(h)).with_stream_seq(seq))
}

#[test]
fn transcript_of_the_main_flows() {
    let mut s = Script::new(LedgerConfig {
        max_pending: 2,
        horizon_capacity: 8,
        overflow_nak_delay: Duration::from_millis(5000),
    });

    s.note("E2: live copy, then durable copy (dual path), then handled");
    s.ingest(0, "m1", CopySource::Live);
    s.ingest(5, "m1", durable(1, 100));
    s.surface(10, 10);
    s.ingest(12, "m1", CopySource::Live);
    s.handled(20, "m1");

    s.note("E5: durable redelivery after handled, and a backfill copy");
    s.ingest(60_000, "m1", durable(2, 100));
    s.ingest(60_001, "m1", CopySource::Backfill);

    s.note("E3: redelivery of a pending durable copy, same stream message, then a distinct one");
    s.ingest(60_010, "m2", durable(3, 101));
    s.ingest(120_010, "m2", durable(4, 101));
    s.ingest(120_020, "m2", durable(5, 180));
    s.surface(120_025, 10);
    s.handled(120_026, "m2");
    s.handled(120_027, "m9");

    s.note("E8: overflow (max_pending = 2): never ack an unsurfaced copy");
    s.ingest(120_030, "m3", durable(6, 102));
    s.ingest(120_040, "m4", CopySource::Live);
    s.ingest(120_050, "m5", durable(7, 103));
    s.ingest(120_060, "m6", CopySource::Live);
    s.surface(120_070, 10);
    s.ingest(120_080, "m7", CopySource::Live);
    s.handled(120_090, "m4");
    s.handled(120_100, "m6");
    s.ingest(125_060, "m3", durable(8, 102));
    s.ingest(125_070, "m5", durable(9, 103));
    s.counters();

    insta::assert_snapshot!(s.out);
}
