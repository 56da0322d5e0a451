//! The daemon's DLV revocation sweep ([`crate::delivery::revoke`]) driven through the machine:
//! triggers (ACL change, ACL delete, start, a transfer racing the narrowing), outcomes (failed,
//! unknown, lost connection) and what it reports.

use super::super::*;
use super::harness::*;
use super::{chat_msg, plant_entry, served};
use crate::delivery::revoke::{SWEEP_ATTEMPTS, SweepEvent};
use crate::time::UnixMillis;
use crate::wire::records::{AclRecord, Plane3Entry};
use bytes::Bytes;

/// Stores a copy of CHAT `seq` straight on `owner`'s DLV subject (transferred by an earlier
/// daemon); returns its DLV sequence.
fn plant_dlv(w: &mut World, owner: &str, seq: u64) -> u64 {
    let msg = chat_msg(w, seq);
    let dlv_seq = w.b.dlv.len() as u64 + 1;
    let id = format!("{}:{owner}:0", msg.id);
    w.b.dlv_ids.insert(id.clone());
    w.b.dlv.push((
        dlv_seq,
        format!("cotal.main.dlv.{owner}"),
        id,
        json::encode(&msg),
    ));
    dlv_seq
}

/// Transfers CHAT `seq` to `owner`'s DLV through the reader (a live-mention entry).
fn transfer(w: &mut World, owner: &str, channel: &str, seq: u64) {
    let msg = chat_msg(w, seq);
    let e = plant_entry(w, owner, &Plane3Entry::live_mention(msg, ch(channel), seq));
    let d = w.reader(e, 1);
    assert_eq!(w.settled(d), vec![AckKind::Ack], "{}", w.log);
}

fn is_dlv_delete(c: &Command) -> bool {
    matches!(c, Command::DeleteStreamMessage { .. })
}

fn is_dlv_read(c: &Command) -> bool {
    matches!(c, Command::ReadStream { stream, .. } if stream == "DLV_main")
}

fn revoked(w: &World) -> Vec<(String, Option<String>, u64)> {
    w.events
        .iter()
        .filter_map(|e| match e {
            DeliveryEvent::DlvRevocation(SweepEvent::Revoked {
                owner,
                channel,
                seq,
            }) => Some((
                owner.as_str().to_owned(),
                channel.as_ref().map(|c| c.as_str().to_owned()),
                *seq,
            )),
            _ => None,
        })
        .collect()
}

fn dlv_reads(w: &World) -> usize {
    w.log.matches("cmd  read cotal.main.dlv.").count()
}

#[test]
fn a_narrowing_revokes_exactly_the_copies_no_longer_admitted() {
    let mut w = served();
    w.acl("alice", &["review", "general"]);
    w.acl("erin", &["review"]);
    let r = w.post("bob", "review", &[]);
    let g = w.post("bob", "general", &[]);
    transfer(&mut w, "alice", "review", r);
    transfer(&mut w, "alice", "general", g);
    transfer(&mut w, "erin", "review", r);
    assert_eq!(w.dlv_ids("alice").len(), 2);
    w.events.clear();

    w.note("alice loses review");
    w.acl("alice", &["general"]);
    assert_eq!(w.dlv_ids("alice"), vec![format!("m{g}:alice:0")]);
    assert_eq!(
        w.dlv_ids("erin").len(),
        1,
        "another owner's copies are untouched"
    );
    assert_eq!(
        revoked(&w),
        vec![("alice".to_owned(), Some("review".to_owned()), 1)]
    );
    assert!(w.events.iter().any(|e| matches!(
        e,
        DeliveryEvent::DlvRevocation(SweepEvent::Finished {
            revoked: 1,
            kept: 1,
            passes: 1,
            ..
        })
    )));
    let c = w.d.counters();
    assert_eq!((c.dlv_revoked, c.dlv_sweeps_failed), (1, 0));
    assert!(w.d.sweeper().idle());
}

#[test]
fn an_acl_delete_revokes_every_copy_fail_closed() {
    let mut w = served();
    w.acl("alice", &["review"]);
    let r = w.post("bob", "review", &[]);
    transfer(&mut w, "alice", "review", r);
    let bucket = KvBucket::Acl.name(&space());
    for i in
        w.b.kv_write(&bucket, "alice", KvOperation::Delete, Bytes::new())
    {
        w.feed(i);
    }
    w.run();
    assert!(w.dlv_ids("alice").is_empty(), "{}", w.log);
    assert_eq!(w.d.counters().dlv_revoked, 1);
}

#[test]
fn a_start_sweeps_every_owner_once_and_a_reconnect_sweeps_nothing_new() {
    let mut w = World::new();
    let r = w.post("bob", "review", &[]);
    let g = w.post("bob", "general", &[]);
    w.note("narrowed while no daemon ran: alice's DLV still holds a review copy");
    let stale = plant_dlv(&mut w, "alice", r);
    plant_dlv(&mut w, "alice", g);
    plant_dlv(&mut w, "carol", r);
    let bucket = KvBucket::Acl.name(&space());
    for (owner, allow) in [("alice", vec!["general"]), ("carol", vec!["review"])] {
        let rec = AclRecord {
            allow_subscribe: allow.into_iter().map(str::to_owned).collect(),
            revision: 1,
            updated_at: UnixMillis(1),
            extra: Default::default(),
        };
        let echo =
            w.b.kv_write(&bucket, owner, KvOperation::Put, json::encode(&rec));
        assert!(echo.is_empty(), "no watch before boot");
    }
    w.boot();
    assert!(w.d.serving(), "{}", w.log);
    assert_eq!(dlv_reads(&w), 2, "one sweep per owner: {}", w.log);
    assert_eq!(
        revoked(&w),
        vec![("alice".to_owned(), Some("review".to_owned()), stale)]
    );
    assert_eq!(w.dlv_ids("carol").len(), 1);

    w.note("a reconnect replays the same revisions: no new sweep");
    w.feed(Input::Connection(Connection::Lost));
    w.feed(Input::Connection(Connection::Restored));
    w.run();
    assert!(w.d.serving(), "{}", w.log);
    assert_eq!(dlv_reads(&w), 2, "{}", w.log);
}

#[test]
fn a_failing_delete_reruns_the_pass_with_backoff_then_gives_up_reported() {
    let mut w = served();
    w.acl("alice", &["review"]);
    let r = w.post("bob", "review", &[]);
    transfer(&mut w, "alice", "review", r);
    w.rule(
        is_dlv_delete,
        Effect::Answer(Outcome::Failed(Failure::Other {
            description: "boom".into(),
        })),
        u32::MAX,
    );
    w.log.clear();
    w.acl("alice", &[]);
    assert_eq!(dlv_reads(&w), 1);
    let mut waited = 0;
    for pass in 1..SWEEP_ATTEMPTS {
        let wait = crate::constants::backoff(pass - 1).as_millis();
        w.advance(wait - 1);
        assert_eq!(dlv_reads(&w) as u32, pass, "not before the backoff");
        w.advance(1);
        assert_eq!(dlv_reads(&w) as u32, pass + 1, "{}", w.log);
        waited += wait;
    }
    assert_eq!(waited, 1000 + 2000 + 4000 + 8000);
    let retries = w
        .events
        .iter()
        .filter(|e| matches!(e, DeliveryEvent::DlvRevocation(SweepEvent::Retrying { .. })))
        .count();
    assert_eq!(retries as u32, SWEEP_ATTEMPTS - 1);
    assert!(w.events.iter().any(|e| matches!(
        e,
        DeliveryEvent::DlvRevocation(SweepEvent::Failed { owner, revoked: 0, .. }) if owner.as_str() == "alice"
    )));
    let c = w.d.counters();
    assert_eq!((c.dlv_revoked, c.dlv_sweeps_failed), (0, 1));
    assert_eq!(
        w.dlv_ids("alice").len(),
        1,
        "the copy is still there, and reported"
    );
    assert!(w.d.sweeper().idle());
    assert_eq!(w.d.poll_timeout().map(|t| t > w.now().at), Some(true));
}

#[test]
fn an_unknown_delete_is_settled_by_the_re_read() {
    let mut w = served();
    w.acl("alice", &["review"]);
    let r = w.post("bob", "review", &[]);
    transfer(&mut w, "alice", "review", r);
    w.rule(is_dlv_delete, Effect::ExecuteThenUnknown, 1);
    w.log.clear();
    w.acl("alice", &[]);
    assert!(w.dlv_ids("alice").is_empty(), "the delete landed");
    assert!(!w.d.sweeper().idle(), "but the sweep does not know it yet");
    w.advance(1000);
    assert!(w.d.sweeper().idle(), "{}", w.log);
    assert_eq!(dlv_reads(&w), 2);
    assert!(w.events.iter().any(|e| matches!(
        e,
        DeliveryEvent::DlvRevocation(SweepEvent::Finished { passes: 2, .. })
    )));
    assert_eq!(w.d.counters().dlv_sweeps_failed, 0);
}

#[test]
fn a_failed_or_unknown_read_is_retried() {
    let mut w = served();
    w.acl("alice", &["review"]);
    let r = w.post("bob", "review", &[]);
    transfer(&mut w, "alice", "review", r);
    w.rule(is_dlv_read, Effect::Answer(Outcome::Unknown), 1);
    w.rule(
        is_dlv_read,
        Effect::Answer(Outcome::Failed(Failure::Timeout)),
        1,
    );
    w.acl("alice", &[]);
    assert_eq!(w.dlv_ids("alice").len(), 1);
    w.advance(1000);
    assert_eq!(w.dlv_ids("alice").len(), 1);
    w.advance(2000);
    assert!(w.dlv_ids("alice").is_empty(), "{}", w.log);
    assert_eq!(w.d.counters().dlv_revoked, 1);
}

#[test]
fn a_transfer_that_lands_after_the_narrowing_is_swept() {
    let mut w = served();
    w.acl("alice", &["review"]);
    let r = w.post("bob", "review", &[]);
    let msg = chat_msg(&w, r);
    let e = plant_entry(
        &mut w,
        "alice",
        &Plane3Entry::live_mention(msg, ch("review"), r),
    );
    w.rule(
        |c| matches!(c, Command::JsPublish { subject, .. } if subject.contains(".dlv.")),
        Effect::Hold,
        1,
    );
    let d = w.reader(e, 1);
    w.log.clear();
    w.note("the reader judged under the old ACL; the narrowing is swept before the copy lands");
    w.acl("alice", &[]);
    assert_eq!(dlv_reads(&w), 1);
    w.release(0, None);
    assert_eq!(w.settled(d), vec![AckKind::Ack]);
    assert_eq!(dlv_reads(&w), 2, "{}", w.log);
    assert!(w.dlv_ids("alice").is_empty(), "{}", w.log);
}

#[test]
fn a_change_during_a_pass_runs_it_again_and_a_lost_connection_restarts_it() {
    let mut w = served();
    w.acl("alice", &["review", "general"]);
    let r = w.post("bob", "review", &[]);
    let g = w.post("bob", "general", &[]);
    transfer(&mut w, "alice", "review", r);
    transfer(&mut w, "alice", "general", g);
    w.rule(is_dlv_read, Effect::Hold, 1);
    w.acl("alice", &["general"]);
    assert_eq!(w.d.sweeper().active().map(AgentId::as_str), Some("alice"));
    w.note("the connection drops with the read in flight");
    w.feed(Input::Connection(Connection::Lost));
    w.held.clear();
    w.feed(Input::Connection(Connection::Restored));
    w.run();
    assert_eq!(
        w.dlv_ids("alice"),
        vec![format!("m{g}:alice:0")],
        "{}",
        w.log
    );
    w.rule(is_dlv_read, Effect::Hold, 1);
    w.acl("alice", &["general", "ops"]);
    w.note("narrowed again while that pass reads: the pass runs once more");
    w.acl("alice", &["ops"]);
    w.release(0, None);
    assert!(w.dlv_ids("alice").is_empty(), "{}", w.log);
    assert!(w.d.sweeper().idle());
}

#[test]
fn revocation_sweep_transcript() {
    let mut w = served();
    w.acl("alice", &["review", "general"]);
    let r = w.post("bob", "review", &[]);
    let g = w.post("bob", "general", &[]);
    transfer(&mut w, "alice", "review", r);
    transfer(&mut w, "alice", "general", g);
    w.log.clear();
    w.note("alice's ACL loses review: her DLV subject is swept, the review copy deleted");
    w.acl("alice", &["general"]);
    insta::assert_snapshot!(w.log);
}
