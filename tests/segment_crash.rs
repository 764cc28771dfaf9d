//! Crash simulation for the active segment: append, flush at random points,
//! then damage everything after the last flush the way a power cut can
//! (cut the file, garble bytes, tear a 4 KiB page), reopen, and check that
//! every flushed entry is found and nothing invented appears.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;

use proptest::prelude::*;
use tierindex::segment::active::ActiveSegment;
use tierindex::segment::format::{ACTIVE_ITEM_LEN, ActiveLayout, PAGE};
use tierindex::segment::sealed::SealedSegment;
use tierindex::segment::{Entry, SegmentId, TimeRange};

const KEYS: u64 = 13;
const CAPACITY: u32 = 2000;

/// proptest's own default: 256 cases, or `PROPTEST_CASES`. A failing case
/// is persisted in `tests/proptest-regressions/segment_crash.txt` and tried
/// first on every later run: commit that file with the fix.
fn config() -> ProptestConfig {
    ProptestConfig {
        failure_persistence: Some(Box::new(
            proptest::test_runner::FileFailurePersistence::WithSource("proptest-regressions"),
        )),
        ..ProptestConfig::default()
    }
}

#[derive(Clone, Debug)]
enum Damage {
    /// Cut the file at this fraction of the unflushed tail.
    Truncate(f64),
    /// Overwrite bytes from this fraction of the unflushed tail with noise.
    Garble(f64, u8),
    /// Replace the unflushed part of one 4 KiB page (chosen by fraction).
    TearPage(f64, u8),
    /// Keep everything written (process crash, page cache survives).
    None,
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        (0.0..1.0f64).prop_map(Damage::Truncate),
        (0.0..1.0f64, any::<u8>()).prop_map(|(f, b)| Damage::Garble(f, b)),
        (0.0..1.0f64, any::<u8>()).prop_map(|(f, b)| Damage::TearPage(f, b)),
        Just(Damage::None),
    ]
}

/// (key index, flush after this append?)
fn ops() -> impl Strategy<Value = Vec<(u64, bool)>> {
    prop::collection::vec(
        (0..KEYS, prop::bool::weighted(0.05)),
        1..(CAPACITY as usize),
    )
}

fn noise(seed: u8, len: usize) -> Vec<u8> {
    let mut x = u32::from(seed) | 0x9e37_0000;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

proptest! {
    // PROPTEST_CASES=5000 for a long run; CI uses proptest's default.
    #![proptest_config(config())]

    #[test]
    fn flushed_entries_survive_any_damage_after_the_flush(
        slot_count in 1u32..64,
        ops in ops(),
        dmg in damage(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let id = SegmentId(7);
        let mut seg = ActiveSegment::create(dir.path(), id, slot_count, CAPACITY, 1).unwrap();
        let mut appended: Vec<Entry> = Vec::new();
        let mut flushed = 0usize;
        for (i, (k, flush)) in ops.iter().enumerate() {
            let e = Entry {
                key_hash: tierindex::key_hash(&k.to_le_bytes()),
                offset: i as u64,
                size: (*k as u32) * 10,
                timestamp_ms: 1_000 + i as u64,
            };
            seg.append_entry(e).unwrap();
            appended.push(e);
            if *flush {
                seg.flush().unwrap();
                flushed = appended.len();
            }
        }
        let path = seg.path().to_path_buf();
        drop(seg);

        let layout = ActiveLayout::new(slot_count, CAPACITY).unwrap();
        let flushed_end = layout.item_offset(flushed as u32) as u64;
        let written_end = layout.item_offset(appended.len() as u32) as u64;
        let tail = written_end - flushed_end;
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        match dmg {
            Damage::Truncate(frac) => {
                f.set_len(flushed_end + (tail as f64 * frac) as u64).unwrap();
            }
            Damage::Garble(frac, seed) => {
                let from = flushed_end + (tail as f64 * frac) as u64;
                let len = (layout.file_len - from).min(4 * PAGE as u64) as usize;
                f.write_all_at(&noise(seed, len), from).unwrap();
            }
            Damage::TearPage(frac, seed) => {
                let first_page = flushed_end / PAGE as u64;
                let last_page = written_end.div_ceil(PAGE as u64);
                let page = first_page + ((last_page - first_page) as f64 * frac) as u64;
                let start = (page * PAGE as u64).max(flushed_end);
                let end = ((page + 1) * PAGE as u64).min(layout.file_len);
                if end > start {
                    f.write_all_at(&noise(seed, (end - start) as usize), start).unwrap();
                }
            }
            Damage::None => {}
        }
        f.sync_all().unwrap();
        drop(f);

        let (seg, rec) = ActiveSegment::open(&path, None).unwrap();
        let n = rec.valid_items as usize;
        prop_assert!(n >= flushed, "lost flushed entries: kept {n}, flushed {flushed}");
        prop_assert!(n <= appended.len(), "invented entries: kept {n}, appended {}", appended.len());
        prop_assert_eq!(seg.entries(), appended[..n].to_vec());
        for k in 0..KEYS {
            let h = tierindex::key_hash(&k.to_le_bytes());
            let want: Vec<Entry> = appended[..n].iter().filter(|e| e.key_hash == h).copied().collect();
            let got = seg.lookup(h, TimeRange::ALL, u32::MAX);
            prop_assert!(!got.truncated);
            prop_assert_eq!(got.entries, want);
        }
        // Appending after recovery continues the prefix; a second reopen
        // keeps exactly what the first one kept plus the new flushed entry.
        let mut seg = seg;
        if n < CAPACITY as usize {
            let e = Entry { key_hash: 1, offset: 999_999, size: 1, timestamp_ms: 1 };
            seg.append_entry(e).unwrap();
            seg.flush().unwrap();
            drop(seg);
            let (seg, rec) = ActiveSegment::open(&path, None).unwrap();
            prop_assert_eq!(rec.valid_items as usize, n + 1);
            prop_assert_eq!(rec.torn_bytes_zeroed, 0);
            prop_assert_eq!(seg.entries().last().copied(), Some(e));
        }
    }

    #[test]
    fn random_bytes_never_parse_as_a_segment_and_never_panic(
        bytes in prop::collection::vec(any::<u8>(), 0..20_000),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("00000000000000000001.seg");
        std::fs::write(&p, &bytes).unwrap();
        prop_assert!(SealedSegment::open(&p).is_err());
        let p = dir.path().join("00000000000000000001.active");
        std::fs::write(&p, &bytes).unwrap();
        prop_assert!(ActiveSegment::open(&p, None).is_err());
        prop_assert!(tierindex::segment::format::check_sealed(&bytes).is_err());
        if bytes.len() >= 128 {
            let _ = tierindex::segment::format::Footer::decode(&bytes[bytes.len() - 128..]);
        }
    }

    #[test]
    fn mutated_sealed_files_are_rejected_without_panic(
        n in 0usize..300,
        slots in 1u32..40,
        flips in prop::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 1..8),
    ) {
        let entries: Vec<Entry> = (0..n as u64)
            .map(|i| Entry { key_hash: i * 7919, offset: i, size: 3, timestamp_ms: i })
            .collect();
        let (mut bytes, _) =
            tierindex::segment::sealed::build_sealed(SegmentId(2), 0, 0, slots, &entries).unwrap();
        for (at, x) in &flips {
            let i = at.index(bytes.len());
            bytes[i] ^= x;
        }
        prop_assert!(tierindex::segment::format::check_sealed(&bytes).is_err());
    }
}

#[test]
fn torn_item_in_the_middle_of_the_unflushed_tail() {
    // Items after a torn one carry valid checksums; they must not be kept.
    let dir = tempfile::tempdir().unwrap();
    let mut seg = ActiveSegment::create(dir.path(), SegmentId(1), 8, 1000, 0).unwrap();
    for i in 0..100u64 {
        seg.append(&i.to_le_bytes(), i, 1, i).unwrap();
    }
    seg.flush().unwrap();
    for i in 100..200u64 {
        seg.append(&i.to_le_bytes(), i, 1, i).unwrap();
    }
    let path = seg.path().to_path_buf();
    drop(seg);
    let layout = ActiveLayout::new(8, 1000).unwrap();
    let f = OpenOptions::new().write(true).open(&path).unwrap();
    f.write_all_at(&[0u8; ACTIVE_ITEM_LEN], layout.item_offset(150) as u64)
        .unwrap();
    drop(f);
    let (seg, rec) = ActiveSegment::open(&path, None).unwrap();
    assert_eq!(rec.valid_items, 150);
    assert!(
        seg.lookup(
            tierindex::key_hash(&170u64.to_le_bytes()),
            TimeRange::ALL,
            100
        )
        .entries
        .is_empty()
    );
}
