//! Crash tests for the upload journal.
//!
//! A random history of legal (and some rejected) batches is appended through
//! the real `Journal`, while an independent model in this file tracks what
//! each segment must look like. The file is then "crashed" in the ways a
//! crash can leave it: cut at an arbitrary byte, or with arbitrary bytes after
//! the durable length. Recovery must give exactly the model state after the
//! batches whose frames end at or before the damage, must never panic, and
//! must leave a journal that accepts appends again.
//!
//! `PROPTEST_CASES` raises or lowers the number of histories (default 256, proptest's own).

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence};
use tierindex::journal::{
    Frame, HEADER_LEN, Journal, JournalOptions, Record, SegmentRecord, SegmentState, decode_file,
    encode_frame, encode_header, log_path, replay_bytes,
};
use tierindex::segment::SealedMeta;
use tierindex::{Error, SegmentId};

/// proptest's own default: 256 cases, or `PROPTEST_CASES`. A failing case
/// is persisted in `tests/proptest-regressions/journal_crash.txt` and tried
/// first on every later run: commit that file with the fix.
fn config() -> Config {
    Config {
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource(
            "proptest-regressions",
        ))),
        ..Config::default()
    }
}

fn meta(id: SegmentId) -> SealedMeta {
    SealedMeta {
        id,
        file_len: (1 << 20) | id.0,
        file_crc: (id.0 as u32).wrapping_mul(0x9E37_79B9),
        crc64: None,
        item_count: id.0 * 3,
        min_ts: 1_700_000_000_000 + id.0,
        max_ts: 1_700_000_000_500 + id.0,
        min_offset: id.0 * 1000,
        max_offset: id.0 * 1000 + 999,
        created_ms: 5,
        sealed_ms: 6,
    }
}

/// What the journal must contain, maintained independently of its code.
#[derive(Clone, Debug, Default, PartialEq)]
struct Model {
    segs: BTreeMap<SegmentId, SegmentRecord>,
    max: Option<SegmentId>,
}

impl Model {
    fn without_released(&self) -> Model {
        // Compaction keeps the newest Released segment (the evidence of
        // what was committed, helper-88), and drops the others.
        let mut m = self.clone();
        let newest = m
            .segs
            .values()
            .rev()
            .find(|r| r.state == SegmentState::Released)
            .map(|r| r.meta.id);
        m.segs
            .retain(|_, r| r.state != SegmentState::Released || Some(r.meta.id) == newest);
        m
    }

    fn next_new_id(&self, gap: u8) -> SegmentId {
        SegmentId(self.max.map_or(0, |m| m.0 + 1) + u64::from(gap % 3))
    }
}

/// Random choices from which `next_record` builds one legal record.
#[derive(Clone, Debug)]
struct Op {
    action: u8,
    pick: u16,
    gap: u8,
    text: String,
    flag: bool,
}

fn op() -> impl Strategy<Value = Op> {
    (
        any::<u8>(),
        any::<u16>(),
        any::<u8>(),
        prop::collection::vec(any::<char>(), 0..8).prop_map(|v| v.into_iter().collect()),
        any::<bool>(),
    )
        .prop_map(|(action, pick, gap, text, flag)| Op {
            action,
            pick,
            gap,
            text,
            flag,
        })
}

#[derive(Clone, Debug)]
struct Batch {
    ops: Vec<Op>,
    /// Append an illegal record at the end: the whole batch must be rejected.
    poison_pill: bool,
}

fn history() -> impl Strategy<Value = Vec<Batch>> {
    let batch = (
        prop::collection::vec(op(), 1..=4),
        prop::bool::weighted(0.12),
    )
        .prop_map(|(ops, poison_pill)| Batch { ops, poison_pill });
    prop::collection::vec(batch, 1..=16)
}

/// Picks a legal next record for the model and applies it to the model.
fn next_record(m: &mut Model, op: &Op) -> Record {
    use SegmentState as S;
    let live: Vec<SegmentId> = m
        .segs
        .values()
        .filter(|r| !matches!(r.state, S::Released | S::Quarantined | S::Resealed))
        .map(|r| r.meta.id)
        .collect();
    if live.is_empty() || op.action.is_multiple_of(4) {
        let id = m.next_new_id(op.gap);
        m.segs.insert(
            id,
            SegmentRecord {
                meta: meta(id),
                state: S::Sealed,
                attempt: 0,
                key: None,
                multipart_id: None,
                etag: None,
                version: None,
                reason: None,
                resealed_into: None,
            },
        );
        m.max = Some(id);
        return Record::Sealed { meta: meta(id) };
    }
    let id = live[op.pick as usize % live.len()];
    let Some(r) = m.segs.get_mut(&id) else {
        unreachable!("live ids come from the map")
    };
    let choice = op.action / 4;
    if choice.is_multiple_of(13) {
        r.state = S::Quarantined;
        r.reason = Some(op.text.clone());
        return Record::Quarantined {
            id,
            reason: op.text.clone(),
        };
    }
    let new_attempt = |r: &mut SegmentRecord| {
        let attempt = r.attempt + 1 + u32::from(op.gap % 2);
        let key = format!("k/{}", op.text);
        let multipart_id = op.flag.then(|| format!("mp-{}", op.text));
        r.state = S::Uploading;
        r.attempt = attempt;
        r.key = Some(key.clone());
        r.multipart_id = multipart_id.clone();
        r.etag = None;
        r.version = None;
        Record::Uploading {
            id,
            attempt,
            key,
            multipart_id,
        }
    };
    match r.state {
        S::Sealed => new_attempt(r),
        S::Uploading if choice.is_multiple_of(3) => new_attempt(r),
        S::Uploading if choice % 3 == 1 && r.multipart_id.is_some() => {
            let multipart_id = r.multipart_id.take().unwrap_or_default();
            Record::MultipartAborted { id, multipart_id }
        }
        S::Uploading => {
            let etag = op.flag.then(|| format!("\"{}\"", op.text));
            let version = (!op.flag).then(|| op.text.clone());
            r.state = S::Uploaded;
            r.multipart_id = None;
            r.etag = etag.clone();
            r.version = version.clone();
            Record::Uploaded { id, etag, version }
        }
        S::Uploaded if choice.is_multiple_of(4) => new_attempt(r),
        S::Uploaded => {
            r.state = S::Verified;
            Record::Verified { id }
        }
        S::Verified if choice % 5 == 4 => {
            let into = SegmentId(id.0 + 1);
            r.state = S::Resealing;
            r.resealed_into = Some(into);
            r.reason = Some(op.text.clone());
            Record::Resealing {
                id,
                into,
                reason: op.text.clone(),
            }
        }
        S::Verified => {
            r.state = S::Committed;
            Record::Committed { id }
        }
        S::Resealing => {
            r.state = S::Resealed;
            Record::Resealed { id }
        }
        S::Committed => {
            r.state = S::Released;
            Record::Released { id }
        }
        S::Released | S::Quarantined | S::Resealed => unreachable!("filtered out above"),
    }
}

/// An illegal record for `m`, of a kind chosen by `n`.
fn illegal_record(m: &Model, n: u8) -> Record {
    let unknown = SegmentId(m.max.map_or(0, |x| x.0) + 1000);
    match (n % 3, m.max) {
        (0, Some(max)) => Record::Sealed { meta: meta(max) },
        (1, _) => Record::Verified { id: unknown },
        _ => Record::Released { id: unknown },
    }
}

/// The committed history: state after each acknowledged batch and the file
/// length at which that batch's frame ends (index 0: the starting point).
struct Run {
    states: Vec<Model>,
    ends: Vec<u64>,
    bytes: Vec<u8>,
}

impl Run {
    /// Index of the last state whose frame ends at or before `offset`.
    fn expected_at(&self, offset: u64) -> Option<usize> {
        self.ends.iter().rposition(|e| *e <= offset)
    }
}

fn run_history(dir: &Path, batches: &[Batch], compact_at: Option<usize>) -> Run {
    let (mut j, _) = Journal::open(dir, JournalOptions::default()).unwrap();
    let mut model = Model::default();
    let mut states = vec![model.clone()];
    let mut ends = vec![j.file_len()];
    for (i, batch) in batches.iter().enumerate() {
        if compact_at == Some(i) {
            j.compact().unwrap();
            model = model.without_released();
            // Bytes before the snapshot's end were fsynced before the rename:
            // no crash can cut into them, so history restarts here.
            states = vec![model.clone()];
            ends = vec![j.file_len()];
            assert_eq!(j.segments(), &model.segs);
        }
        let mut next = model.clone();
        let mut records: Vec<Record> = batch
            .ops
            .iter()
            .map(|op| next_record(&mut next, op))
            .collect();
        let len_before = j.file_len();
        if batch.poison_pill {
            records.push(illegal_record(&next, batch.ops[0].gap));
            let r = j.append(&records);
            assert!(matches!(r, Err(Error::InvalidInput(_))), "{r:?}");
            assert_eq!(j.file_len(), len_before, "a rejected batch writes nothing");
            assert!(!j.is_poisoned());
            continue;
        }
        j.append(&records).unwrap();
        model = next;
        assert_eq!(j.segments(), &model.segs, "after batch {i}");
        assert_eq!(j.max_segment_id(), model.max);
        states.push(model.clone());
        ends.push(j.file_len());
    }
    drop(j);
    let bytes = fs::read(log_path(dir)).unwrap();
    assert_eq!(bytes.len() as u64, *ends.last().unwrap());
    Run {
        states,
        ends,
        bytes,
    }
}

/// Replays `bytes` in memory and checks it recovers the state for `offset`.
fn assert_replays_to(run: &Run, bytes: &[u8], offset: u64) {
    let want = run
        .expected_at(offset)
        .expect("offset is past the first end");
    let r = replay_bytes(bytes).unwrap();
    assert_eq!(
        r.state.segments(),
        &run.states[want].segs,
        "damage at {offset}"
    );
    assert_eq!(r.state.max_segment_id(), run.states[want].max);
    assert_eq!(r.valid_len, run.ends[want]);
    assert_eq!(
        r.report.torn_tail_at.is_some(),
        r.valid_len < bytes.len() as u64
    );
}

/// Writes `bytes` as the journal, reopens for real, and checks the recovered
/// state, the cut, and that the journal takes appends and replays them.
fn assert_reopens_to(dir: &Path, run: &Run, bytes: &[u8], offset: u64) {
    let want = run.expected_at(offset).unwrap();
    let expected = &run.states[want];
    fs::write(log_path(dir), bytes).unwrap();
    let (mut j, report) = Journal::open(dir, JournalOptions::default()).unwrap();
    assert_eq!(
        j.segments(),
        &expected.segs,
        "reopen after damage at {offset}"
    );
    assert_eq!(j.max_segment_id(), expected.max);
    assert_eq!(j.file_len(), run.ends[want]);
    assert_eq!(
        fs::metadata(log_path(dir)).unwrap().len(),
        run.ends[want],
        "tail cut"
    );
    assert_eq!(report.truncated_bytes, bytes.len() as u64 - run.ends[want]);

    let id = expected.next_new_id(0);
    j.append(&[Record::Sealed { meta: meta(id) }]).unwrap();
    drop(j);
    let (j, report) = Journal::open(dir, JournalOptions::default()).unwrap();
    assert_eq!(report.torn_tail_at, None);
    assert_eq!(j.get(id).map(|r| r.state), Some(SegmentState::Sealed));
    assert_eq!(j.segments().len(), expected.segs.len() + 1);
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn crash_recovers_exactly_the_acknowledged_prefix(
        batches in history(),
        compact_at in prop::option::weighted(0.3, 0usize..16),
        cut_picks in prop::collection::vec(any::<prop::sample::Index>(), 48),
        garbles in prop::collection::vec(
            (any::<prop::sample::Index>(), any::<prop::sample::Index>(), 1u8..=255),
            8,
        ),
        reopen_picks in prop::collection::vec(any::<prop::sample::Index>(), 3),
    ) {
        let tmp = tempfile::tempdir().unwrap();
        let run = run_history(tmp.path(), &batches, compact_at);
        let len = run.bytes.len();
        let first_end = run.ends[0] as usize;

        // Truncation: at every frame boundary and its neighbours, and at
        // random offsets; all offsets from the first durable end onwards.
        let mut cuts: Vec<usize> = run
            .ends
            .iter()
            .flat_map(|e| [*e as usize, *e as usize + 1, (*e as usize).saturating_sub(1)])
            .chain(cut_picks.iter().map(|ix| first_end + ix.index(len - first_end + 1)))
            .filter(|c| (first_end..=len).contains(c))
            .collect();
        cuts.sort_unstable();
        cuts.dedup();
        for &cut in &cuts {
            assert_replays_to(&run, &run.bytes[..cut], cut as u64);
        }

        // Cuts before the first durable end cannot come from a crash (that
        // part was fsynced before it was renamed into place), but must still
        // be handled: an error or a subset of the snapshot, never a panic.
        for cut in cut_picks.iter().map(|ix| ix.index(first_end + 1)) {
            if let Ok(r) = replay_bytes(&run.bytes[..cut]) {
                for (id, rec) in r.state.segments() {
                    prop_assert_eq!(Some(rec), run.states[0].segs.get(id));
                }
            } else {
                prop_assert!(cut < HEADER_LEN);
            }
        }

        // Garbage after the durable length: everything up to the batch that
        // holds the first bad byte survives, nothing after it.
        for (durable, at, xor) in &garbles {
            let durable = run.ends[durable.index(run.ends.len())] as usize;
            if durable >= len {
                continue;
            }
            let pos = durable + at.index(len - durable);
            let mut bad = run.bytes.clone();
            bad[pos] ^= xor;
            assert_replays_to(&run, &bad, pos as u64);
        }

        // The real open path, on a few of the damaged files.
        for (i, pick) in reopen_picks.iter().enumerate() {
            let cut = cuts[pick.index(cuts.len())];
            let mut bytes = run.bytes[..cut].to_vec();
            let mut damage = cut as u64;
            if i == 0 && cut > first_end {
                // A torn write that left garbage rather than nothing.
                let pos = cut - 1;
                bytes[pos] ^= 0x5a;
                damage = pos as u64;
            }
            assert_reopens_to(tmp.path(), &run, &bytes, damage);
        }
    }
}

/// Every single byte offset of one fixed, varied history.
#[test]
fn crash_at_every_byte_offset() {
    let ops = |n: u8| Op {
        action: n.wrapping_mul(37),
        pick: u16::from(n) * 7,
        gap: n,
        text: format!("t\"{n}\\é"),
        flag: n.is_multiple_of(2),
    };
    let batches: Vec<Batch> = (0..24u8)
        .map(|b| Batch {
            ops: (0..=(b % 3)).map(|k| ops(b * 3 + k)).collect(),
            poison_pill: b % 7 == 6,
        })
        .collect();
    let tmp = tempfile::tempdir().unwrap();
    let run = run_history(tmp.path(), &batches, Some(10));
    assert!(
        run.states.len() > 10,
        "history is long enough to mean something"
    );
    assert!(run.states.last().unwrap().segs.len() > 3);
    for cut in run.ends[0] as usize..=run.bytes.len() {
        assert_replays_to(&run, &run.bytes[..cut], cut as u64);
    }
}

/// Frames with a good CRC whose records break the rules: replay stops at
/// the first bad one and never panics.
fn record() -> impl Strategy<Value = Record> {
    let id = (0u64..6).prop_map(SegmentId);
    let s = "[a-z\"]{0,4}";
    prop_oneof![
        id.clone().prop_map(|id| Record::Sealed { meta: meta(id) }),
        (id.clone(), 0u32..3, s, any::<Option<bool>>()).prop_map(|(id, attempt, key, mp)| {
            Record::Uploading {
                id,
                attempt,
                key,
                multipart_id: mp.map(|b| b.to_string()),
            }
        }),
        (id.clone(), any::<bool>()).prop_map(|(id, b)| Record::MultipartAborted {
            id,
            multipart_id: b.to_string()
        }),
        (id.clone(), proptest::option::of(s)).prop_map(|(id, etag)| Record::Uploaded {
            id,
            etag,
            version: None
        }),
        id.clone().prop_map(|id| Record::Verified { id }),
        id.clone().prop_map(|id| Record::Committed { id }),
        id.clone().prop_map(|id| Record::Released { id }),
        (id, s).prop_map(|(id, reason)| Record::Quarantined { id, reason }),
    ]
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn random_bytes_never_panic(
        bytes in prop::collection::vec(any::<u8>(), 0..2048),
        with_header in any::<bool>(),
    ) {
        let mut file = if with_header { encode_header(1).to_vec() } else { Vec::new() };
        file.extend_from_slice(&bytes);
        let decoded = decode_file(&file);
        match replay_bytes(&file) {
            Ok(r) => {
                prop_assert!(r.valid_len <= file.len() as u64);
                prop_assert!(r.valid_len >= HEADER_LEN as u64);
                prop_assert!(decoded.is_ok());
            }
            Err(e) => {
                prop_assert!(matches!(e, Error::Corrupt { .. }), "{e:?}");
                prop_assert!(decoded.is_err());
            }
        }
    }

    #[test]
    fn intact_but_random_records_never_panic(
        batches in prop::collection::vec(prop::collection::vec(record(), 1..4), 1..12),
    ) {
        let mut file = encode_header(1).to_vec();
        let mut ends = vec![file.len() as u64];
        for b in &batches {
            encode_frame(&Frame::Batch(b.clone()), &mut file).unwrap();
            ends.push(file.len() as u64);
        }
        let r = replay_bytes(&file).unwrap();
        // Stops exactly at a frame boundary, at the first batch that does not
        // apply, and keeps all before it.
        let kept = ends.iter().position(|e| *e == r.valid_len).expect("frame boundary");
        let mut state = tierindex::journal::JournalState::default();
        let mut expect_kept = batches.len();
        for (i, b) in batches.iter().enumerate() {
            if state.apply(b).is_err() {
                expect_kept = i;
                break;
            }
        }
        prop_assert_eq!(kept, expect_kept);
        prop_assert_eq!(&r.state, &state);
        prop_assert_eq!(r.report.records_replayed, batches[..kept].iter().map(|b| b.len() as u64).sum::<u64>());
    }
}

proptest! {
    #![proptest_config(config())]

    /// The real open path on garbage: an error (bad header) or an empty or
    /// partial journal, never a panic, and after an Ok the file is clean.
    #[test]
    fn opening_random_files_never_panics(
        bytes in prop::collection::vec(any::<u8>(), 0..1024),
        with_header in any::<bool>(),
    ) {
        let tmp = tempfile::tempdir().unwrap();
        let mut file = if with_header { encode_header(1).to_vec() } else { Vec::new() };
        file.extend_from_slice(&bytes);
        fs::create_dir(tmp.path().join("journal")).unwrap();
        fs::write(log_path(tmp.path()), &file).unwrap();
        let ro = Journal::open_read_only(tmp.path());
        match Journal::open(tmp.path(), JournalOptions::default()) {
            Ok((j, report)) => {
                prop_assert!(ro.is_ok());
                prop_assert_eq!(fs::metadata(log_path(tmp.path())).unwrap().len(), j.file_len());
                prop_assert_eq!(report.truncated_bytes + j.file_len(), file.len() as u64);
            }
            Err(e) => {
                prop_assert!(matches!(e, Error::Corrupt { .. }), "{e:?}");
                prop_assert!(ro.is_err());
                prop_assert_eq!(fs::read(log_path(tmp.path())).unwrap(), file, "left alone");
            }
        }
    }
}
