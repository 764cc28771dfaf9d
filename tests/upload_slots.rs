//! The process's bound on uploads in flight over every stream (its own
//! test binary: the bound is process-wide).

use std::time::Duration;

use tierindex::testing::{Fault, FaultyStore, Op};
use tierindex::{Config, TierIndex};

/// Three streams with a backlog each, in one process bounded to one
/// upload at a time: every segment of every stream is uploaded and
/// committed under one shutdown deadline, and never more than one drive
/// held a slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_share_the_process_bound_and_all_drain() {
    assert_eq!(
        tierindex::set_max_uploads_in_flight_per_process(1).unwrap(),
        64,
        "the default bound"
    );
    let tmp = tempfile::tempdir().unwrap();
    let fs = FaultyStore::memory(3);
    // Each PUT takes a while, so drives of several streams overlap.
    fs.set_random(
        1.0,
        vec![Fault::Latency(Duration::from_millis(5))],
        &[Op::Put],
    );
    let mut streams = Vec::new();
    for n in 0..3u64 {
        let cfg = Config {
            data_dir: tmp.path().join(format!("s{n}")),
            stream: format!("stream-{n}"),
            segment_items: 40,
            slot_count: 64,
            segment_max_age_ms: None,
            tick_ms: 10,
            manifest: false,
            max_uploads_in_flight: 4,
            ..Config::default()
        };
        let (ti, _) = TierIndex::open_with_store(cfg, fs.remote("tier"))
            .await
            .unwrap();
        for o in 0..(40 * 5 + 7) {
            ti.append(
                format!("k{o}").as_bytes(),
                o,
                10,
                1_700_000_000_000 + n * 1000 + o,
            )
            .unwrap();
        }
        ti.flush().unwrap();
        streams.push(ti);
    }
    let reports = futures::future::join_all(
        streams
            .into_iter()
            .map(|ti| ti.shutdown(Duration::from_secs(60))),
    )
    .await;
    for r in &reports {
        assert!(r.fully_drained(), "{r:?}");
    }
    let c = tierindex::upload_slot_counts();
    assert_eq!((c.limit, c.taken, c.waiting), (1, 0, 0), "{c:?}");
    assert_eq!(c.most_taken, 1, "{c:?}");
    assert!(
        c.most_waiting > 1,
        "no drive ever waited for another's slot: {c:?}"
    );
    assert!(
        fs.stats().requests(Op::Put) >= 18,
        "{}",
        fs.stats().requests(Op::Put)
    );
    assert!(
        tierindex::set_max_uploads_in_flight_per_process(0).is_err(),
        "a zero bound is refused"
    );
}
