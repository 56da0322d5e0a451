#![allow(clippy::unwrap_used)]

use super::*;
use crate::io::KvEntry;
use crate::io::KvOperation;
use crate::time::UnixMillis;
use crate::wire::message::{Part, Route, Sender};
use crate::wire::records::AclRecord;
use crate::wire::shard::ShardMap;
use bytes::Bytes;
use proptest::prelude::*;

fn space() -> Space {
    Space::new("main").unwrap()
}

fn id(s: &str) -> AgentId {
    AgentId::new(s).unwrap()
}

fn ch(s: &str) -> ConcreteChannel {
    ConcreteChannel::new(s).unwrap()
}

fn message(route: Route) -> Bytes {
    json::encode(&CotalMessage::new(
        "m1".to_owned(),
        UnixMillis(1),
        space(),
        Sender::new(id("bob"), "bob"),
        route,
        vec![Part::text("hi")],
    ))
}

fn copy(channel: &str) -> Bytes {
    message(Route::Channel(ch(channel)))
}

fn acls(entries: &[(&str, Option<&[&str]>)]) -> AclIndex {
    let mut index = AclIndex::new();
    for (revision, (owner, allow)) in entries.iter().enumerate() {
        let (operation, value) = match allow {
            Some(allow) => (
                KvOperation::Put,
                json::encode(&AclRecord {
                    allow_subscribe: allow.iter().map(|s| (*s).to_owned()).collect(),
                    revision: 1,
                    updated_at: UnixMillis(1),
                    extra: Default::default(),
                }),
            ),
            None => (KvOperation::Delete, Bytes::new()),
        };
        index.apply(&KvEntry {
            key: (*owner).to_owned(),
            revision: revision as u64 + 1,
            operation,
            value,
        });
    }
    index
}

fn read_acl(allow: &[&str]) -> ReadAcl {
    ReadAcl::from_allow_subscribe(allow).unwrap()
}

#[test]
fn judge_keeps_only_what_the_readers_rule_admits_and_fails_closed() {
    let acl = read_acl(&["team.>", "general"]);
    assert_eq!(judge_copy(Some(&acl), &copy("general")), CopyVerdict::Keep);
    assert_eq!(judge_copy(Some(&acl), &copy("team.a")), CopyVerdict::Keep);
    assert_eq!(
        judge_copy(Some(&acl), &copy("secret")),
        CopyVerdict::Revoke {
            channel: Some(ch("secret"))
        }
    );
    assert_eq!(
        judge_copy(None, &copy("general")),
        CopyVerdict::Revoke {
            channel: Some(ch("general"))
        },
        "no ACL on record: revoke"
    );
    assert_eq!(
        judge_copy(Some(&acl), b"{not json"),
        CopyVerdict::Revoke { channel: None }
    );
    assert_eq!(
        judge_copy(Some(&acl), &message(Route::To(id("alice")))),
        CopyVerdict::Revoke { channel: None },
        "a DLV copy that is not a channel message is authorized by nothing"
    );
    let nothing = ReadAcl::nothing();
    assert!(matches!(
        judge_copy(Some(&nothing), &copy("general")),
        CopyVerdict::Revoke { .. }
    ));
}

#[test]
fn sweep_reader_names_follow_the_shard_naming() {
    assert_eq!(dlv_sweep_reader(0, 1), "dlvsweep");
    assert_eq!(dlv_sweep_reader(1, 3), "dlvsweep_1");
}

/// A fake DLV stream answering the sweeper's commands.
struct Fake {
    sweeper: DlvSweeper,
    ops: OpIds,
    /// seq → (subject, payload)
    dlv: BTreeMap<u64, (String, Bytes)>,
    acls: AclIndex,
    reads: Vec<u64>,
    events: Vec<SweepEvent>,
}

impl Fake {
    fn new(page: u32, acls: AclIndex) -> Self {
        let shard = ShardMap::SINGLE.shard(0).unwrap();
        Fake {
            sweeper: DlvSweeper::new(&space(), shard).with_page(page),
            ops: OpIds::new(),
            dlv: BTreeMap::new(),
            acls,
            reads: Vec::new(),
            events: Vec::new(),
        }
    }

    fn store(&mut self, owner: &str, channel: &str) -> u64 {
        let seq = self.dlv.keys().next_back().map_or(1, |s| s + 1);
        self.dlv
            .insert(seq, (format!("cotal.main.dlv.{owner}"), copy(channel)));
        seq
    }

    fn answer(&mut self, cmd: &Command) -> (OpId, Outcome<Reply>) {
        match cmd {
            Command::ReadStream {
                op,
                stream,
                filter,
                start: ReadStart::Seq(from),
                max,
                reader,
                ..
            } => {
                assert_eq!(stream, "DLV_main");
                assert_eq!(reader.as_deref(), Some("dlvsweep"));
                self.reads.push(*from);
                let page = self
                    .dlv
                    .range(*from..)
                    .filter(|(_, (s, _))| s == filter)
                    .take(*max as usize)
                    .map(|(seq, (subject, payload))| StoredMessage {
                        seq: *seq,
                        subject: subject.clone(),
                        headers: Vec::new(),
                        payload: payload.clone(),
                        stored_at: UnixMillis(1),
                    })
                    .collect();
                (*op, Outcome::Success(Reply::Stored(page)))
            }
            Command::DeleteStreamMessage { op, seq, .. } => match self.dlv.remove(seq) {
                Some(_) => (*op, Outcome::Success(Reply::Done)),
                None => (*op, Outcome::Failed(Failure::NotFound)),
            },
            other => panic!("unexpected {other:?}"),
        }
    }

    /// Runs until the sweeper has nothing in flight or due at `now`.
    fn run(&mut self, now: Instant) {
        for _ in 0..10_000 {
            let cmds = self.sweeper.pump(now, &mut self.ops);
            if cmds.is_empty() {
                break;
            }
            for cmd in cmds {
                let (op, outcome) = self.answer(&cmd);
                self.sweeper.on_completion(op, outcome, &self.acls);
            }
        }
        while let Some(e) = self.sweeper.poll_event() {
            self.events.push(e);
        }
    }
}

#[test]
fn pages_through_the_whole_subject_and_deletes_only_the_unadmitted() {
    let mut f = Fake::new(2, acls(&[("alice", Some(&["general"]))]));
    let mut revoke = Vec::new();
    for i in 0..5 {
        let channel = if i % 2 == 0 { "secret" } else { "general" };
        let seq = f.store("alice", channel);
        f.store("carol", "secret");
        if channel == "secret" {
            revoke.push(seq);
        }
    }
    f.sweeper.request(id("alice"));
    f.sweeper.request(id("alice"));
    assert_eq!(
        f.sweeper.queued(),
        1,
        "a request while queued is idempotent"
    );
    f.run(Instant::from_millis(0));
    // 5 copies of alice at seqs 1,3,5,7,9: pages [1,3] [5,7] [9].
    assert_eq!(f.reads, vec![1, 4, 8]);
    let revoked: Vec<u64> = f
        .events
        .iter()
        .filter_map(|e| match e {
            SweepEvent::Revoked { seq, .. } => Some(*seq),
            _ => None,
        })
        .collect();
    assert_eq!(revoked, revoke);
    assert_eq!(
        f.events.last(),
        Some(&SweepEvent::Finished {
            owner: id("alice"),
            revoked: 3,
            kept: 2,
            passes: 1
        })
    );
    assert_eq!(
        f.dlv.len(),
        7,
        "carol's copies and alice's general ones stay"
    );
    assert!(f.sweeper.idle());
}

#[test]
fn a_request_during_the_pass_runs_it_again_and_stale_completions_are_ignored() {
    let mut f = Fake::new(10, acls(&[("alice", Some(&["general"]))]));
    f.store("alice", "secret");
    f.sweeper.request(id("alice"));
    let cmds = f.sweeper.pump(Instant::from_millis(0), &mut f.ops);
    assert_eq!(cmds.len(), 1);
    f.sweeper.request(id("alice"));
    assert_eq!(
        f.sweeper.queued(),
        0,
        "marked on the running sweep, not queued"
    );
    f.sweeper.interrupt();
    let (op, outcome) = f.answer(&cmds[0]);
    f.sweeper.on_completion(op, outcome, &f.acls);
    assert!(
        f.sweeper.poll_event().is_none(),
        "a forgotten read is ignored"
    );
    f.run(Instant::from_millis(0));
    let finished = f
        .events
        .iter()
        .filter(|e| matches!(e, SweepEvent::Finished { .. }))
        .count();
    assert_eq!(
        finished, 2,
        "the pass ran again for the request: {:?}",
        f.events
    );
    assert!(f.dlv.is_empty());
}

#[test]
fn a_trouble_pass_waits_its_backoff_and_not_found_is_no_trouble() {
    let mut f = Fake::new(10, acls(&[("alice", Some(&[]))]));
    f.store("alice", "secret");
    f.sweeper.request(id("alice"));
    let t0 = Instant::from_millis(0);
    let cmds = f.sweeper.pump(t0, &mut f.ops);
    let (op, outcome) = f.answer(&cmds[0]);
    f.sweeper.on_completion(op, outcome, &f.acls);
    let cmds = f.sweeper.pump(t0, &mut f.ops);
    let Command::DeleteStreamMessage { op, .. } = &cmds[0] else {
        panic!("{cmds:?}")
    };
    f.sweeper.on_completion(*op, Outcome::Unknown, &f.acls);
    assert!(f.sweeper.pump(t0, &mut f.ops).is_empty());
    assert_eq!(f.sweeper.poll_timeout(), Some(t0 + backoff(0)));
    assert!(matches!(
        f.sweeper.poll_event(),
        Some(SweepEvent::Retrying { pass: 1, .. })
    ));
    assert!(
        f.sweeper
            .pump(Instant::from_millis(999), &mut f.ops)
            .is_empty()
    );
    // Here the unknown delete did not land: the second pass, after the backoff, re-reads the
    // subject and deletes the copy (had it landed, the re-read would find nothing).
    assert_eq!(f.dlv.len(), 1);
    f.run(Instant::from_millis(1000));
    assert!(f.dlv.is_empty());
    assert!(matches!(
        f.events.last(),
        Some(SweepEvent::Finished { passes: 2, .. })
    ));
    // NotFound on a delete: already gone, the pass ends cleanly.
    f.events.clear();
    let seq = f.store("alice", "secret");
    f.sweeper.request(id("alice"));
    let cmds = f.sweeper.pump(Instant::from_millis(2000), &mut f.ops);
    let (op, outcome) = f.answer(&cmds[0]);
    f.sweeper.on_completion(op, outcome, &f.acls);
    f.dlv.remove(&seq);
    f.run(Instant::from_millis(2000));
    assert!(matches!(
        f.events.last(),
        Some(SweepEvent::Finished {
            revoked: 0,
            passes: 1,
            ..
        })
    ));
}

#[test]
fn a_deleted_acl_record_revokes_everything() {
    let mut f = Fake::new(10, acls(&[("alice", Some(&["general"])), ("alice", None)]));
    f.store("alice", "general");
    f.sweeper.request(id("alice"));
    f.run(Instant::from_millis(0));
    assert!(f.dlv.is_empty());
}

proptest! {
    /// Whatever the copies and the ACL, a sweep leaves exactly the copies the reader's rule
    /// admits (and never touches another owner's subject).
    #[test]
    fn a_sweep_leaves_exactly_the_admitted_copies(
        copies in proptest::collection::vec((0usize..2, 0usize..4), 0..40),
        allow in proptest::collection::btree_set(0usize..4, 0..4),
        page in 1u32..8,
    ) {
        let channels = ["general", "team.a", "team.b", "secret"];
        let patterns = ["general", "team.>", "team.a", "secret"];
        let allow: Vec<&str> = allow.iter().map(|i| patterns[*i]).collect();
        let mut f = Fake::new(page, acls(&[("alice", Some(&allow))]));
        for (owner, c) in &copies {
            f.store(["alice", "carol"][*owner], channels[*c]);
        }
        let before = f.dlv.clone();
        f.sweeper.request(id("alice"));
        f.run(Instant::from_millis(0));
        let acl = read_acl(&allow);
        let expected: BTreeMap<u64, (String, Bytes)> = before
            .into_iter()
            .filter(|(_, (subject, payload))| {
                subject != "cotal.main.dlv.alice"
                    || judge_copy(Some(&acl), payload) == CopyVerdict::Keep
            })
            .collect();
        prop_assert_eq!(&f.dlv, &expected);
        prop_assert!(f.sweeper.idle());
    }
}
