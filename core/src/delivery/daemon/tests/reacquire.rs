//! A lost lease ridden out in process (issue 19, [`DeliveryConfig::reacquire_lease`]): the daemon
//! stops writing at the loss, starts over as a new incarnation, contends while another daemon
//! holds the key, and serves again, with a new fencing token, once the key is free. An outage
//! longer than the lease window ends the same way after the reconnect.

use super::super::*;
use super::harness::*;
use super::{lease_bucket, member_bucket, served};
use bytes::Bytes;

/// A successor's lease record in the key.
pub(super) fn successor_takes_the_key(w: &mut World) {
    let successor =
        crate::wire::records::DeliveryLease::new("D2", crate::time::UnixMillis(1), true);
    let echo = w.b.kv_write(
        &lease_bucket(),
        "lease.0",
        KvOperation::Put,
        json::encode(&successor),
    );
    for input in echo {
        w.feed(input);
    }
    w.run();
}

/// The lease key expires (the bucket's `max_age` removed its holder's last write).
fn key_expires(w: &mut World) {
    let echo = w.b.kv_write(
        &lease_bucket(),
        "lease.0",
        KvOperation::Delete,
        Bytes::new(),
    );
    for input in echo {
        w.feed(input);
    }
    w.run();
}

fn acquired(w: &World) -> usize {
    w.events
        .iter()
        .filter(|e| matches!(e, DeliveryEvent::Lease(LeaseEvent::Acquired { .. })))
        .count()
}

fn run_for(w: &mut World, ms: u64) {
    for _ in 0..ms / 500 {
        w.advance(500);
    }
}

#[test]
fn a_lost_lease_is_reacquired_in_process_once_the_key_is_free_and_never_before() {
    let mut w = served();
    w.acl("alice", &["review"]);
    let first_token = w.d.lease.fencing_token(w.now().at).expect("held");
    successor_takes_the_key(&mut w);
    // The next renewal's CAS fails: lost. The new incarnation contends for as long as the
    // successor holds the key, and writes nothing.
    run_for(&mut w, 40_000);
    assert_eq!(w.d.counters().lease_lost, 1, "{}", w.log);
    assert!(w.d.incarnation() >= 1, "{}", w.log);
    assert!(
        w.events
            .iter()
            .any(|e| matches!(e, DeliveryEvent::Reincarnated { incarnation: 1 }))
    );
    assert!(!w.d.serving());
    let members_before = w.b.kv_seq.get(&member_bucket()).copied();
    w.join("alice", "review", Some(0), "while-contending");
    run_for(&mut w, 2_000);
    assert_eq!(
        w.b.kv_seq.get(&member_bucket()).copied(),
        members_before,
        "no registry write while another daemon holds the lease"
    );
    assert_eq!(acquired(&w), 1, "{}", w.log);
    // The key expires: the contending incarnation takes it, with a new token, and serves.
    key_expires(&mut w);
    run_for(&mut w, 20_000);
    assert_eq!(acquired(&w), 2, "{}", w.log);
    assert!(w.d.serving(), "{}", w.log);
    assert_eq!(*w.d.health(), DeliveryHealth::Active, "{}", w.log);
    let token = w.d.lease.fencing_token(w.now().at).expect("held again");
    assert_ne!(
        token, first_token,
        "a new incarnation writes under a new fencing token"
    );
    w.join("alice", "review", Some(0), "after");
    assert!(
        w.reply("after").is_some_and(|r| r.ok),
        "a join is served again: {}",
        w.log
    );
}

#[test]
fn an_outage_longer_than_the_lease_window_ends_in_a_new_incarnation_after_the_reconnect() {
    let mut w = served();
    // While disconnected every command fails at once, as the executor answers it.
    w.rule(
        |_| true,
        Effect::Answer(Outcome::Failed(Failure::Other {
            description: "not connected".into(),
        })),
        u32::MAX,
    );
    w.feed(Input::Connection(Connection::Lost));
    w.run();
    // Disconnected past the lease deadline: lost, and the start-over waits for the connection.
    run_for(&mut w, 45_000);
    assert_eq!(w.d.counters().lease_lost, 1, "{}", w.log);
    assert_eq!(
        w.d.incarnation(),
        0,
        "nothing starts over while disconnected"
    );
    assert!(
        matches!(w.d.health(), DeliveryHealth::Degraded(r) if !r.contains(&DegradedReason::Stopped)),
        "waiting to start over reads as not held, not stopped: {:?}",
        w.d.health()
    );
    // Our own last write expired meanwhile on the server.
    key_expires(&mut w);
    w.rules.clear();
    w.feed(Input::Connection(Connection::Restored));
    w.run();
    run_for(&mut w, 5_000);
    assert_eq!(w.d.incarnation(), 1, "{}", w.log);
    assert_eq!(acquired(&w), 2, "{}", w.log);
    assert!(w.d.serving(), "{}", w.log);
}

#[test]
fn a_daemon_configured_to_end_at_the_loss_ends_there() {
    let mut config = DeliveryConfig::new(space(), shard0(), "D1");
    config.reacquire_lease = false;
    let mut w = World::with_config(config);
    w.boot();
    assert!(w.d.serving(), "{}", w.log);
    successor_takes_the_key(&mut w);
    run_for(&mut w, 40_000);
    assert_eq!(w.d.lease_state(), LeaseState::Lost, "{}", w.log);
    assert_eq!(w.d.incarnation(), 0);
    assert!(
        matches!(w.d.health(), DeliveryHealth::Degraded(r) if r.contains(&DegradedReason::Stopped))
    );
    key_expires(&mut w);
    run_for(&mut w, 20_000);
    assert_eq!(acquired(&w), 1, "it never acquires again: {}", w.log);
}

#[test]
fn a_shut_down_daemon_never_starts_over() {
    let mut w = served();
    w.d.shutdown(w.now());
    w.collect();
    w.run();
    successor_takes_the_key(&mut w);
    key_expires(&mut w);
    run_for(&mut w, 40_000);
    assert_eq!(w.d.incarnation(), 0, "{}", w.log);
    assert_eq!(acquired(&w), 1, "{}", w.log);
}

/// The outage of `an_outage_longer_than_the_lease_window…`, but the server still holds our last
/// write at the reconnect (a cluster whose KV could not be reached, whose TTL had not run out):
/// the new incarnation writes over its own record at once instead of waiting for it to expire.
#[test]
fn a_new_incarnation_reclaims_its_own_unexpired_record_at_once() {
    let mut w = served();
    w.acl("alice", &["review"]);
    let first_token = w.d.lease.fencing_token(w.now().at).expect("held");
    w.rule(
        |_| true,
        Effect::Answer(Outcome::Failed(Failure::Other {
            description: "not connected".into(),
        })),
        u32::MAX,
    );
    w.feed(Input::Connection(Connection::Lost));
    w.run();
    run_for(&mut w, 26_000);
    assert_eq!(w.d.counters().lease_lost, 1, "{}", w.log);
    w.rules.clear();
    w.feed(Input::Connection(Connection::Restored));
    w.run();
    run_for(&mut w, 2_000);
    assert_eq!(w.d.incarnation(), 1, "{}", w.log);
    assert_eq!(w.d.counters().lease_reclaims, 1, "{}", w.log);
    assert_eq!(acquired(&w), 2, "reclaimed within 2 s: {}", w.log);
    assert!(w.d.serving(), "{}", w.log);
    let token = w.d.lease.fencing_token(w.now().at).expect("held again");
    assert!(
        token > first_token,
        "the reclaim's revision is a newer token"
    );
    w.join("alice", "review", Some(0), "after");
    assert!(w.reply("after").is_some_and(|r| r.ok), "{}", w.log);
}

/// A record under our own daemon id but from another hold (a second process started with the
/// same id) is never written over: the new incarnation contends until it expires.
#[test]
fn a_record_under_our_id_from_another_hold_is_not_reclaimed() {
    let mut w = served();
    let impostor = crate::wire::records::DeliveryLease::new("D1", crate::time::UnixMillis(1), true);
    let echo = w.b.kv_write(
        &lease_bucket(),
        "lease.0",
        KvOperation::Put,
        json::encode(&impostor),
    );
    for input in echo {
        w.feed(input);
    }
    w.run();
    run_for(&mut w, 40_000);
    assert_eq!(w.d.counters().lease_lost, 1, "{}", w.log);
    assert!(w.d.incarnation() >= 1, "{}", w.log);
    assert_eq!(w.d.counters().lease_reclaims, 0, "{}", w.log);
    assert_eq!(acquired(&w), 1, "{}", w.log);
    assert!(!w.d.serving());
    key_expires(&mut w);
    run_for(&mut w, 20_000);
    assert_eq!(acquired(&w), 2, "{}", w.log);
    assert_eq!(w.d.counters().lease_reclaims, 0, "{}", w.log);
}
