//! A [`Host`]: many streams under one directory and one lock (issue 16).
//! What it must exclude: a second host, a stream opened twice, and a
//! process that opens one of its streams on its own, in either order.
//! `flock`s taken through two descriptors exclude each other within one
//! process as between two, so one test process stands for both.

use std::path::Path;
use std::time::Duration;

use tierindex::{Config, ErrorKind, Host, TierIndex, TimeRange};

fn cfg(data_dir: &Path, store: &Path) -> Config {
    Config::builder(data_dir)
        .stream(data_dir.file_name().unwrap().to_string_lossy().into_owned())
        .store(format!("file://{}", store.display()))
        .segment_items(100)
        .slot_count(64)
        .single_writer_mode()
        .build()
        .unwrap()
}

/// The error of an open that must fail.
fn refused(r: tierindex::Result<(TierIndex, tierindex::OpenReport)>) -> tierindex::Error {
    match r {
        Ok(_) => panic!("opened; expected a refusal"),
        Err(e) => e,
    }
}

fn all() -> TimeRange {
    TimeRange {
        from_ms: 0,
        to_ms: u64::MAX,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_under_a_host_keep_their_entries_and_reopen_on_their_own() {
    let tmp = tempfile::tempdir().unwrap();
    let (root, store) = (tmp.path().join("host"), tmp.path().join("store"));
    let host = Host::open(&root).unwrap();
    let mut streams = Vec::new();
    for i in 0..5u64 {
        let (ti, _) = host
            .open_stream(cfg(&root.join(format!("s{i}")), &store))
            .await
            .unwrap();
        for n in 0..250 {
            ti.append(format!("k{i}").as_bytes(), n, 1, n).unwrap();
        }
        ti.flush().unwrap();
        streams.push(ti);
    }
    // The streams keep the host's lock without the handle.
    drop(host);
    assert_eq!(
        Host::open(&root).unwrap_err().kind(),
        ErrorKind::Locked,
        "the streams hold the host's lock"
    );
    let reports = Host::shutdown_all(streams, Duration::from_secs(30)).await;
    assert_eq!(reports.len(), 5);
    for r in &reports {
        assert!(r.fully_drained(), "{r:?}");
    }
    // Each opens on its own once the host is gone, with all its entries.
    for i in 0..5u64 {
        let dir = root.join(format!("s{i}"));
        assert!(dir.join("HOSTED").is_file());
        let (ti, _) = TierIndex::open(cfg(&dir, &store)).await.unwrap();
        let got = ti.lookup(format!("k{i}").as_bytes(), all());
        assert_eq!(got.entries.len(), 250, "stream {i}");
        assert!(ti.shutdown(Duration::from_secs(10)).await.fully_drained());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_of_a_running_host_cannot_be_opened_on_its_own() {
    let tmp = tempfile::tempdir().unwrap();
    let (root, store) = (tmp.path().join("host"), tmp.path().join("store"));
    let host = Host::open(&root).unwrap();
    let dir = root.join("orders");
    let (ti, _) = host.open_stream(cfg(&dir, &store)).await.unwrap();
    ti.append(b"k", 1, 1, 1).unwrap();
    ti.flush().unwrap();

    let err = refused(TierIndex::open(cfg(&dir, &store)).await);
    assert_eq!(err.kind(), ErrorKind::Locked, "{err}");
    assert!(err.to_string().contains("host"), "says why: {err}");
    // Nor twice through the host, nor by a second host.
    let err = refused(host.open_stream(cfg(&dir, &store)).await);
    assert_eq!(err.kind(), ErrorKind::Locked, "{err}");
    assert_eq!(Host::open(&root).unwrap_err().kind(), ErrorKind::Locked);
    // A standalone command's journal open too (it takes the directory's lock).
    assert_eq!(
        tierindex::journal::Journal::open(&dir, Default::default())
            .unwrap_err()
            .kind(),
        ErrorKind::Locked
    );
    assert!(ti.shutdown(Duration::from_secs(10)).await.fully_drained());
    // The stream closed: the host opens it again.
    let (ti, _) = host.open_stream(cfg(&dir, &store)).await.unwrap();
    assert_eq!(ti.lookup(b"k", all()).entries.len(), 1);
    assert!(ti.shutdown(Duration::from_secs(10)).await.fully_drained());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_cannot_take_a_stream_another_process_holds_on_its_own() {
    let tmp = tempfile::tempdir().unwrap();
    let (root, store) = (tmp.path().join("host"), tmp.path().join("store"));
    std::fs::create_dir(&root).unwrap();
    let dir = root.join("orders");
    // Opened on its own before any host existed: no marker yet.
    let (alone, _) = TierIndex::open(cfg(&dir, &store)).await.unwrap();
    let host = Host::open(&root).unwrap();
    let err = refused(host.open_stream(cfg(&dir, &store)).await);
    assert_eq!(err.kind(), ErrorKind::Locked, "{err}");
    // The host's refused try left its marker: from now on an open on its
    // own needs the host's lock.
    assert!(
        alone
            .shutdown(Duration::from_secs(10))
            .await
            .fully_drained()
    );
    let err = refused(TierIndex::open(cfg(&dir, &store)).await);
    assert_eq!(err.kind(), ErrorKind::Locked, "{err}");
    let (ti, _) = host.open_stream(cfg(&dir, &store)).await.unwrap();
    assert!(ti.shutdown(Duration::from_secs(10)).await.fully_drained());
    drop(host);
    // With the host gone, on its own again; and a host is refused while
    // that open holds its lock.
    let (alone, _) = TierIndex::open(cfg(&dir, &store)).await.unwrap();
    assert_eq!(Host::open(&root).unwrap_err().kind(), ErrorKind::Locked);
    assert!(
        alone
            .shutdown(Duration::from_secs(10))
            .await
            .fully_drained()
    );
    Host::open(&root).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_refuses_what_is_not_one_of_its_data_directories() {
    let tmp = tempfile::tempdir().unwrap();
    let (root, store) = (tmp.path().join("host"), tmp.path().join("store"));
    let host = Host::open(&root).unwrap();
    // Outside its directory, or nested below a stream.
    for dir in [tmp.path().join("elsewhere"), root.join("a").join("b")] {
        let err = refused(host.open_stream(cfg(&dir, &store)).await);
        assert_eq!(
            err.kind(),
            ErrorKind::InvalidInput,
            "{}: {err}",
            dir.display()
        );
    }
    // A symlink named like a stream, to a directory outside.
    std::fs::create_dir(tmp.path().join("target")).unwrap();
    std::os::unix::fs::symlink(tmp.path().join("target"), root.join("link")).unwrap();
    let err = refused(host.open_stream(cfg(&root.join("link"), &store)).await);
    assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");
    assert!(
        std::fs::read_dir(tmp.path().join("target"))
            .unwrap()
            .next()
            .is_none(),
        "nothing written through the link"
    );
    // A data directory is no host's directory.
    let dd = tmp.path().join("dd");
    let (ti, _) = TierIndex::open(cfg(&dd, &store)).await.unwrap();
    assert!(ti.shutdown(Duration::from_secs(10)).await.fully_drained());
    let err = Host::open(&dd).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");
}
