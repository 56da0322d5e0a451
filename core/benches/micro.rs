//! Core micro-benchmarks: a plain `harness = false` bench timed with `std::time::Instant` (no
//! criterion: it is not in the local registry). Each line prints nanoseconds per operation, the
//! best of five rounds. Run with `cargo bench -p cotal-core --bench micro`.
//!
//! - fan-out routing (`delivery::route`) of one durable message for 1, 100 and 10,000 members;
//! - the reader's re-authorization (`delivery::authorize`) of one durable entry;
//! - the ledger: `ingest` of a new live copy (with the `surface` + `handled` that settle it,
//!   amortized in batches of 64), and `ingest` of a copy already settled;
//! - subject parse (`wire::subject::Subject::parse` and `parse_subject`) of a chat subject;
//! - the wire codec: `CotalMessage::decode` of a chat message and `json::encode` of a dinbox
//!   entry (what every copy costs the agent and the fan-out).

#![allow(
    clippy::unwrap_used,
    clippy::print_stdout,
    clippy::disallowed_types,
    clippy::disallowed_methods,
    missing_docs
)]

use cotal_core::acl::ReadAcl;
use cotal_core::delivery::route::MentionResolution;
use cotal_core::delivery::{authorize, route};
use cotal_core::ledger::{CopySource, Ledger, LedgerConfig, MessageId};
use cotal_core::policy::DeliveryClass;
use cotal_core::time::{Instant, UnixMillis};
use cotal_core::wire::message::{CotalMessage, Part, Route, Sender};
use cotal_core::wire::records::{MembershipRecord, Plane3Entry};
use cotal_core::wire::subject::{Subject, parse_subject};
use cotal_core::wire::token::{AgentId, ConcreteChannel, Space};
use std::hint::black_box;
use std::time::Instant as Clock;

/// Runs `f` `iters` times per round, five rounds; returns the best ns per op.
fn measure(iters: u64, mut f: impl FnMut(u64)) -> f64 {
    let mut best = f64::INFINITY;
    for round in 0..5 {
        let start = Clock::now();
        for i in 0..iters {
            f(round * iters + i);
        }
        let ns = start.elapsed().as_nanos() as f64 / iters as f64;
        best = best.min(ns);
    }
    best
}

fn report(name: &str, ns: f64) {
    println!("{name:<52} {ns:>14.1} ns/op");
}

fn channel() -> ConcreteChannel {
    ConcreteChannel::new("team.backend").unwrap()
}

fn message() -> CotalMessage {
    CotalMessage::new(
        "0b9d4c1e-7a51-4c43-9d0e-2f4f6b1e9a10",
        UnixMillis(1_700_000_000_000),
        Space::new("main").unwrap(),
        Sender::new(AgentId::new("alice").unwrap(), "alice"),
        Route::Channel(channel()),
        vec![Part::text(
            "a message of about the usual size for a chat line",
        )],
    )
}

fn members(n: usize) -> Vec<MembershipRecord> {
    (0..n)
        .map(|i| {
            MembershipRecord::fresh_join(
                channel(),
                AgentId::new(format!("member{i:05}")).unwrap(),
                1,
                1,
                "D",
                UnixMillis(1),
            )
        })
        .collect()
}

fn bench_route() {
    let msg = message();
    let ch = channel();
    let acl = ReadAcl::from_allow_subscribe(&[">"]).unwrap();
    for n in [1usize, 100, 10_000] {
        let recs = members(n);
        let iters = (200_000 / n as u64).max(20);
        let ns = measure(iters, |i| {
            let d = route(
                black_box(&msg),
                &ch,
                10 + i,
                DeliveryClass::Durable,
                recs.iter(),
                |_| MentionResolution::Unknown,
                |_| Some(&acl),
            );
            black_box(d.entries.len());
        });
        report(&format!("route durable, {n} members (per message)"), ns);
        report(
            &format!("route durable, {n} members (per copy)"),
            ns / n as f64,
        );
    }
}

fn bench_authorize() {
    let owner = AgentId::new("bob").unwrap();
    let entry = Plane3Entry::durable_channel(message(), channel(), 50, 1);
    let acl = ReadAcl::from_allow_subscribe(&["team.*", "general"]).unwrap();
    let record = MembershipRecord::fresh_join(channel(), owner.clone(), 1, 1, "D", UnixMillis(1));
    let ns = measure(1_000_000, |_| {
        black_box(authorize(
            black_box(&entry),
            &owner,
            Some(&acl),
            Some(&record),
            1,
        ));
    });
    report("authorize durable entry (reader)", ns);
}

fn bench_ledger() {
    let mut ledger: Ledger<u64> = Ledger::new(LedgerConfig::default()).unwrap();
    let ids: Vec<MessageId> = (0..2_000_000u64)
        .map(|i| MessageId::new(format!("m{i}")))
        .collect();
    let mut next = 0usize;
    let ns = measure(200_000, |i| {
        let now = Instant::from_millis(i / 1000);
        let id = ids[next].clone();
        next += 1;
        let _ = black_box(ledger.ingest(now, id, CopySource::Live, i).unwrap());
        if next.is_multiple_of(64) {
            for s in ledger.surface(now, 64) {
                let _ = ledger.handled(now, &s.id);
            }
        }
    });
    report("ledger ingest new live copy (+surface+handled)", ns);
    // A copy of an id already settled: the duplicate path.
    let settled = ids[next - 100].clone();
    let ns = measure(1_000_000, |i| {
        let now = Instant::from_millis(1_000 + i / 1000);
        let _ = black_box(
            ledger
                .ingest(now, settled.clone(), CopySource::Live, i)
                .unwrap(),
        );
    });
    report("ledger ingest settled duplicate", ns);
}

fn bench_subject() {
    let s = "cotal.main.chat.alice.team.backend";
    let ns = measure(1_000_000, |_| {
        black_box(Subject::parse(black_box(s)).unwrap());
    });
    report("Subject::parse chat subject", ns);
    let ns = measure(1_000_000, |_| {
        black_box(parse_subject(black_box(s)).unwrap());
    });
    report("parse_subject chat subject", ns);
}

fn bench_codec() {
    let msg = message();
    let bytes = cotal_core::wire::json::encode(&msg);
    let ns = measure(100_000, |_| {
        black_box(CotalMessage::decode(black_box(&bytes)).unwrap());
    });
    report(&format!("CotalMessage::decode ({} bytes)", bytes.len()), ns);
    let entry = Plane3Entry::durable_channel(msg.clone(), channel(), 42, 1);
    let ns = measure(100_000, |_| {
        black_box(cotal_core::wire::json::encode(black_box(&entry)));
    });
    report("dinbox entry encode", ns);
    let ns = measure(100_000, |_| {
        black_box(black_box(&msg).clone());
    });
    report("CotalMessage clone", ns);
}

fn main() {
    bench_route();
    bench_authorize();
    bench_ledger();
    bench_subject();
    bench_codec();
}
