#!/usr/bin/env python3
"""Writes the committed seed corpus fuzz/seeds/<target>/ from the vendored reference fixtures.

Every seed is a real record or subject the TypeScript reference put on the wire, plus a few
hostile inputs per target. `cargo test` replays these seeds through the fuzz entry points
(tests/tests/fuzz_corpus.rs); `cargo fuzz run <target> fuzz/corpus/<target> fuzz/seeds/<target>`
starts a fuzzing run from them. File names are the SHA-1 of the content, as cargo-fuzz names its
own corpus entries. Run from the repository root: python3 fuzz/make_seeds.py
"""
import hashlib
import json
import os
import re

F = 'tests/fixtures/reference-0.6.0/'
ROOT = 'fuzz/seeds'


def put(target, obj):
    data = obj if isinstance(obj, bytes) else json.dumps(obj, separators=(',', ':')).encode()
    d = os.path.join(ROOT, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, hashlib.sha1(data).hexdigest()), 'wb') as f:
        f.write(data)


def load(name):
    with open(F + name) as f:
        return json.load(f)


ids = load('identities.json')
template = {
    '<alice>': ids['agents']['alice']['id'], '<bob>': ids['agents']['bob']['id'],
    '<carol>': ids['agents']['carol']['id'], '<dave>': ids['agents']['dave']['id'],
    '<delivery-daemon>': ids['deliveryDaemon'], '<provisioner>': ids['provisioner'],
    '<uuid>': '0b1c2d3e-4f50-4617-8293-a4b5c6d7e8f9', '<nuid>': 'Xb2kQ9mN1pLr4sTv6wYz8a',
    '<generation>': '1',
}
A = 'UAQGWOEVJKMIO4WXSYOTLARXYOZTCXFK67JASEH6AFFFYK6FOPSKQCAD'
B = 'UDI36ZKVNUM5WMO4QQ6HDQU7F4OH2RCXOJRX6GAIOS5SKVNNSKCDNLJA'

# Subjects: every cotal.* line of subjects-seen.txt (templates filled), conformance vectors, edges.
subjects = {
    f'cotal.main.chat.{A}.team.backend', f'cotal.main.inst.{B}.{A}', f'cotal.main.svc.reviewer.{A}',
    f'cotal.main.ctl.manager.{A}', f'cotal.main.chat.{A}', f'cotal.main.ctl.delivery.{A}.reply.abc',
    f'cotal.main.dinbox.{A}', f'cotal.main.dlv.{A}', 'cotal.main.trace.x', 'cotal.main.control.x',
    '', '.', 'cotal..chat..x', 'cotal.main.chat.*.>', '$JS.API.INFO', '_INBOX.abc',
    'cotal.main.chat.A.b\u00e9', ' cotal.main.chat.A.b ',
}
with open(F + 'subjects-seen.txt') as f:
    for line in f:
        if line.startswith('#'):
            continue
        s = line.split('\t')[1]
        if not s.startswith('cotal.'):
            continue
        for k, v in template.items():
            s = s.replace(k, v)
        subjects.add(re.sub(r'<[a-z_]+>', '7', s))
for s in sorted(subjects):
    put('subject', s.encode())

for c in ['general', 'review', 'lobby', 'team.backend', 'team.*', 'team.>', '>', '*', 'a..b', '.a',
          'a.', '>.a', 'foo/bar', 'a* ', '', 'x' * 513, 'a.*.>', 'team. backend',
          '\u00e9t\u00e9', 'a\x00b', '-_-.x_1']:
    put('channel', c.encode())
put('channel', b'\xff\xfe.a')

for m in load('chat-messages.json')['messages'][:20]:
    put('message', m['data'])
for m in load('dm-task-messages.json')['DM_wirefix']:
    put('message', m['data'])
for m in load('dlv-messages.json')['messages'][:5]:
    put('message', m['data'])
for m in load('dinbox-entries.json')['messages'][:20]:
    put('plane3_entry', m['data'])
    msg_id = m['headers']['Nats-Msg-Id']
    put('msg_id', (msg_id[0] if isinstance(msg_id, list) else msg_id).encode())
for records in load('kv-members-records.json')['snapshots'].values():
    for r in records:
        if isinstance(r.get('data'), dict):
            put('membership_record', r['data'])
for w in load('kv-members-writes.json'):
    put('membership_record', w['payload'])
acl = load('kv-acl-records.json')
for r in acl['stored']:
    put('acl_record', r['data'])
for w in acl['writes']:
    put('acl_record', w['payload'])
for w in load('kv-delivery-lease.json')['writes']:
    if w.get('payload') is not None:
        put('delivery_lease', w['payload'])
presence = load('kv-presence-records.json')
for r in presence['stored_while_live'] + presence['stored_after_agents_stop']:
    put('presence', r['data'])
for r in load('kv-channels-registry.json')['stored']:
    put('channel_config', r['data'])
for x in load('ctl-delivery-exchanges.json'):
    put('control_request', x['request']['payload'])
    put('control_reply', x['reply']['payload'])

hostile = [
    b'', b'{', b'[]', b'null', b'"x"', b'\xff\xfe', b'[' * 200 + b']' * 200,
    b'{"a":' * 70 + b'1' + b'}' * 70, b'{"id":1e400}', b'{"ok":true,"data":null}',
    b'{"op":"durableLeave","args":{"channel":"general","generation":1.5},"from":{"id":"U1","name":"x"}}',
    b'{"op":"durableJoin","args":{"channel":"team.>"},"from":{"id":"U1","name":"x"}}',
    b'{"op":"durableJoin","args":{"channel":"general","joinCursor":42},"from":{"id":"U1","name":"x"}}',
]
for t in ['message', 'plane3_entry', 'membership_record', 'acl_record', 'delivery_lease', 'presence',
          'channel_config', 'control_request', 'control_reply']:
    for h in hostile:
        put(t, h)
for s in [b'a:b:0', b'a:b:c:1', b'::1', b'x:U1:01', b'x:U1:-1', b'x:U1:18446744073709551616']:
    put('msg_id', s)

# The daemon's gate: "<subject>\n<reply>\n<payload>" (the request seeds on bound, unbound and
# hostile reply subjects) and the reader: "<subject>\n<payload>" (plane3 entries on dinbox subjects).
lane = f'cotal.main.ctl.delivery.{A}'
replies = [f'{lane}.reply.r1', '', f'cotal.main.ctl.delivery.{B}.reply.x', f'{lane}.reply.a.b',
           f'{lane}.reply.', f'_INBOX_{B}.x', f'{lane}x.reply.y']
gate_payloads = [x['request']['payload'] for x in load('ctl-delivery-exchanges.json')][:4] + hostile
for i, p in enumerate(gate_payloads):
    body = p if isinstance(p, bytes) else json.dumps(p, separators=(',', ':')).encode()
    for r in replies[: (len(replies) if i < 2 else 2)]:
        put('control_gate', f'{lane}\n{r}\n'.encode() + body)
for subj in [f'cotal.main.ctl.delivery.{A}.x', 'cotal.other.ctl.delivery.U1', f'cotal.main.ctl.manager.{A}']:
    put('control_gate', f'{subj}\n{subj}.reply.r\n{{}}'.encode())
entries = [p for p in os.listdir(os.path.join(ROOT, 'plane3_entry'))]
for name in sorted(entries)[:8]:
    with open(os.path.join(ROOT, 'plane3_entry', name), 'rb') as f:
        body = f.read()
    for subj in [f'cotal.main.dinbox.{A}', f'cotal.main.dinbox.{A}.x', 'cotal.main.dinbox.*',
                 f'cotal.main.dlv.{A}']:
        put('reader_entry', f'{subj}\n'.encode() + body)

# Loss records (issue 21 item 5): the daemon writes them, the member's agent reads its own.
R = lambda stamp, ch, first, last, count, reason, **kw: dict(stamp=stamp, channel=ch, first=first, last=last,
                                                         count=count, reason=reason, **kw)
put('loss_record', {'owner': 'bob', 'stamp': 7, 'ranges': [R(7, 'general', 751, 1010, 260, 'dlv-full', exact=True)],
                    'more': {'ranges': 0, 'count': 0}})
put('loss_record', {'owner': 'bob', 'stamp': 2, 'ranges': [R(1, 'team.a', 5, 9, 2, 'evicted-before-fanout', exact=False),
                    R(2, 'team.b', 3, 3, 1, 'a-newer-reason')]})
put('loss_record', {'owner': 'bob'})
put('loss_record', {'owner': 'bob', 'stamp': 18446744073709551615,
                    'ranges': [R(1, 'general', 0, 18446744073709551615, 18446744073709551615, 'dlv-full'),
                               R(2, 'general', 9, 1, 18446744073709551615, 'redelivery-ceiling')],
                    'more': {'ranges': 18446744073709551615, 'count': 18446744073709551615}})
put('loss_record', {'owner': 'bob', 'stamp': 100,
                    'ranges': [R(i, f'c{i % 3}', i * 10, i * 10 + 4, 5, 'dlv-full') for i in range(100)]})
put('loss_record', b'{"owner":"bob","ranges":[{"stamp":1}]}')
put('loss_record', b'[]')

for t in sorted(os.listdir(ROOT)):
    print(t, len(os.listdir(os.path.join(ROOT, t))))
