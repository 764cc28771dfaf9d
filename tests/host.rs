//! A [`Host`]: many streams under one directory and one lock (issue 16).
//! What it must exclude: a second host, a stream opened twice, and a
//! process that opens one of its streams on its own, in either order.
//! `flock`s taken through two descriptors exclude each other within one
//! process as between two, so one test process stands for both.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tierindex::{Config, ErrorKind, Host, TierIndex, TimeRange};

fn cfg(data_dir: &Path, store: &Path) -> Config {
    let name = data_dir.file_name().unwrap().to_string_lossy().into_owned();
    cfg_named(data_dir, store, &name)
}

/// [`cfg`] for the stream `stream` (a directory renamed keeps its stream).
fn cfg_named(data_dir: &Path, store: &Path, stream: &str) -> Config {
    Config::builder(data_dir)
        .stream(stream)
        .store(format!("file://{}", store.display()))
        .segment_items(100)
        .slot_count(64)
        .single_writer_mode()
        .build()
        .unwrap()
}

/// The error of an open that must fail.
/// A host at `host/` under `tmp` with its stream `a` open and one entry
/// flushed; the host's root and the store's directory.
async fn host_with_stream_a(tmp: &Path) -> (Host, TierIndex, PathBuf, PathBuf) {
    let (root, store) = (tmp.join("host"), tmp.join("store"));
    let host = Host::open(&root).unwrap();
    let (a, _) = host
        .open_stream(cfg(&root.join("a"), &store))
        .await
        .unwrap();
    a.append(b"k", 1, 1, 1).unwrap();
    a.flush().unwrap();
    (host, a, root, store)
}

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
    // The refused try took its marker back: the other process's directory
    // is as it was.
    assert!(!dir.join("HOSTED").exists());
    assert!(
        alone
            .shutdown(Duration::from_secs(10))
            .await
            .fully_drained()
    );
    let (ti, _) = host.open_stream(cfg(&dir, &store)).await.unwrap();
    assert!(dir.join("HOSTED").is_file());
    assert!(ti.shutdown(Duration::from_secs(10)).await.fully_drained());
    // While the host lives (even with no stream open), an open on its own
    // needs the host's lock.
    let err = refused(TierIndex::open(cfg(&dir, &store)).await);
    assert_eq!(err.kind(), ErrorKind::Locked, "{err}");
    drop(host);
    // With the host gone, on its own again; and a host is refused while
    // that open holds the host's lock (shared).
    let (alone, _) = TierIndex::open(cfg(&dir, &store)).await.unwrap();
    let err = Host::open(&root).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Locked, "{err}");
    assert!(
        alone
            .shutdown(Duration::from_secs(10))
            .await
            .fully_drained()
    );
    Host::open(&root).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_of_a_host_that_is_gone_open_on_their_own_side_by_side() {
    let tmp = tempfile::tempdir().unwrap();
    let (root, store) = (tmp.path().join("host"), tmp.path().join("store"));
    let host = Host::open(&root).unwrap();
    let mut v = Vec::new();
    for name in ["a", "b"] {
        v.push(
            host.open_stream(cfg(&root.join(name), &store))
                .await
                .unwrap()
                .0,
        );
    }
    assert!(
        Host::shutdown_all(v, Duration::from_secs(10))
            .await
            .iter()
            .all(|r| r.fully_drained())
    );
    drop(host);
    let (a, _) = TierIndex::open(cfg(&root.join("a"), &store)).await.unwrap();
    let (b, _) = TierIndex::open(cfg(&root.join("b"), &store)).await.unwrap();
    assert!(a.shutdown(Duration::from_secs(10)).await.fully_drained());
    assert!(b.shutdown(Duration::from_secs(10)).await.fully_drained());
}

/// An operator renames or moves a running stream's directory, or reaches
/// it through another path: no second writer, and a message that says
/// what to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_moved_or_renamed_under_a_running_host_gets_no_second_writer() {
    let tmp = tempfile::tempdir().unwrap();
    let (host, ti, root, store) = host_with_stream_a(tmp.path()).await;
    // Renamed under the host: the same directory, not a second stream.
    std::fs::rename(root.join("a"), root.join("b")).unwrap();
    let err = refused(
        host.open_stream(cfg_named(&root.join("b"), &store, "a"))
            .await,
    );
    assert_eq!(err.kind(), ErrorKind::Locked, "{err}");
    // Moved out of the host's directory: on its own it still needs the
    // host's lock, found where the marker says.
    std::fs::create_dir(tmp.path().join("elsewhere")).unwrap();
    let out = tmp.path().join("elsewhere").join("b");
    std::fs::rename(root.join("b"), &out).unwrap();
    let err = refused(TierIndex::open(cfg_named(&out, &store, "a")).await);
    assert_eq!(err.kind(), ErrorKind::Locked, "{err}");
    assert!(err.to_string().contains("host"), "{err}");
    // Back in place, the running stream shuts down with its entry.
    std::fs::rename(&out, root.join("a")).unwrap();
    assert!(ti.shutdown(Duration::from_secs(10)).await.fully_drained());
    drop(host);

    // A stream whose host's directory is gone (renamed away): refused with
    // what to check; without the marker (the operator's choice), it opens.
    std::fs::rename(&root, tmp.path().join("host-old")).unwrap();
    std::fs::create_dir(&root).unwrap();
    let moved = tmp.path().join("host-old").join("a");
    std::fs::rename(&moved, &out).unwrap();
    // Another directory at the recorded path is not that host's.
    let err = refused(TierIndex::open(cfg_named(&out, &store, "a")).await);
    assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");
    std::fs::remove_dir(&root).unwrap();
    let err = refused(TierIndex::open(cfg_named(&out, &store, "a")).await);
    assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");
    assert!(err.to_string().contains("HOSTED"), "{err}");
    std::fs::remove_file(out.join("HOSTED")).unwrap();
    let (ti, _) = TierIndex::open(cfg_named(&out, &store, "a")).await.unwrap();
    assert_eq!(ti.lookup(b"k", all()).entries.len(), 1);
    assert!(ti.shutdown(Duration::from_secs(10)).await.fully_drained());
}

/// helper-75 F1: a running host's stream whose `HOSTED` names another,
/// stopped host's directory (a marker restored from a backup taken when
/// the stream lived there, or copied by hand) was opened on its own beside
/// its host (only the marker's host's lock was taken): that `drain` sealed
/// and removed the host's live active file, and acknowledged entries were
/// lost. The parent's lock is taken too: refused while the host runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_hosts_stream_whose_marker_names_another_host_gets_no_second_writer() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    let (old_root, root) = (tmp.path().join("old-host"), tmp.path().join("host"));
    {
        let old = Host::open(&old_root).unwrap();
        let (s, _) = old
            .open_stream(cfg(&old_root.join("x"), &store))
            .await
            .unwrap();
        assert!(s.shutdown(Duration::from_secs(10)).await.fully_drained());
    }
    let host = Host::open(&root).unwrap();
    let (a, _) = host
        .open_stream(cfg(&root.join("a"), &store))
        .await
        .unwrap();
    a.append(b"k", 1, 1, 1).unwrap();
    a.flush().unwrap();
    std::fs::copy(
        old_root.join("x").join("HOSTED"),
        root.join("a").join("HOSTED"),
    )
    .unwrap();
    let err = refused(TierIndex::open(cfg(&root.join("a"), &store)).await);
    assert_eq!(err.kind(), ErrorKind::Locked, "{err}");
    assert!(err.to_string().contains("names another"), "{err}");
    assert_eq!(
        tierindex::journal::Journal::open(&root.join("a"), Default::default())
            .unwrap_err()
            .kind(),
        ErrorKind::Locked
    );
    a.append(b"k", 2, 1, 1).unwrap();
    a.flush().unwrap();
    assert_eq!(a.lookup(b"k", all()).entries.len(), 2);
    assert!(a.shutdown(Duration::from_secs(10)).await.fully_drained());
}

/// Two operator mistakes that used to let a second writer beside a running
/// host (helper-51, session 27): a stream's `HOSTED` removed by hand, and
/// the host's directory renamed (the refusal then advised removing
/// `HOSTED`). Both are refused now as a marked stream in place is; once the
/// host is gone the stream opens on its own with its entries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_hosts_stream_without_its_marker_or_in_a_renamed_host_gets_no_second_writer() {
    let tmp = tempfile::tempdir().unwrap();
    let (root, store) = (tmp.path().join("host"), tmp.path().join("store"));
    let host = Host::open(&root).unwrap();
    let (a, _) = host
        .open_stream(cfg(&root.join("a"), &store))
        .await
        .unwrap();
    let (b, _) = host
        .open_stream(cfg(&root.join("b"), &store))
        .await
        .unwrap();
    for s in [&a, &b] {
        s.append(b"k", 1, 1, 1).unwrap();
        s.flush().unwrap();
    }
    std::fs::remove_file(root.join("a").join("HOSTED")).unwrap();
    let err = refused(TierIndex::open(cfg(&root.join("a"), &store)).await);
    assert_eq!(err.kind(), ErrorKind::Locked, "{err}");
    assert!(err.to_string().contains("HOSTED was removed"), "{err}");
    assert_eq!(
        tierindex::journal::Journal::open(&root.join("a"), Default::default())
            .unwrap_err()
            .kind(),
        ErrorKind::Locked
    );

    let renamed = tmp.path().join("host-renamed");
    std::fs::rename(&root, &renamed).unwrap();
    let err = refused(TierIndex::open(cfg(&renamed.join("b"), &store)).await);
    assert_eq!(err.kind(), ErrorKind::Locked, "{err}");
    assert!(
        !err.to_string().contains("remove"),
        "no advice to remove the marker: {err}"
    );
    std::fs::rename(&renamed, &root).unwrap();
    for s in [a, b] {
        assert!(s.shutdown(Duration::from_secs(10)).await.fully_drained());
    }
    drop(host);

    // The host is gone: both open on their own, with their entries (the
    // renamed host's directory too).
    std::fs::rename(&root, &renamed).unwrap();
    for name in ["a", "b"] {
        let (s, _) = TierIndex::open(cfg(&renamed.join(name), &store))
            .await
            .unwrap();
        assert_eq!(s.lookup(b"k", all()).entries.len(), 1, "{name}");
        assert!(s.shutdown(Duration::from_secs(10)).await.fully_drained());
    }
}

/// helper-60: a running host's stream whose `HOSTED` and the host's
/// `TIERINDEX_HOST` were both removed by hand opened beside the host (the
/// host's directory was locked only when `TIERINDEX_HOST` said a host ran
/// there), and the host's writer was poisoned. The host's directory is
/// tried now in any case: refused while the host runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_hosts_stream_without_either_marker_gets_no_second_writer() {
    let tmp = tempfile::tempdir().unwrap();
    let (host, a, root, store) = host_with_stream_a(tmp.path()).await;
    std::fs::remove_file(root.join("a").join("HOSTED")).unwrap();
    std::fs::remove_file(root.join("TIERINDEX_HOST")).unwrap();
    let err = refused(TierIndex::open(cfg(&root.join("a"), &store)).await);
    assert_eq!(err.kind(), ErrorKind::Locked, "{err}");
    assert!(
        err.to_string().contains("as a running tierindex host does"),
        "{err}"
    );
    assert!(a.shutdown(Duration::from_secs(10)).await.fully_drained());
    drop(host);
    // The host is gone: the stream opens on its own, with its entry; a
    // sibling in a directory no host ever ran in opens as before.
    let (s, _) = TierIndex::open(cfg(&root.join("a"), &store)).await.unwrap();
    assert_eq!(s.lookup(b"k", all()).entries.len(), 1);
    let (t, _) = TierIndex::open(cfg(&root.join("c"), &store)).await.unwrap();
    assert!(s.shutdown(Duration::from_secs(10)).await.fully_drained());
    assert!(t.shutdown(Duration::from_secs(10)).await.fully_drained());
}

/// A stream moved from one host's directory to another's: taken over only
/// while its first host does not run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_moved_to_another_host_is_taken_over_only_when_its_host_is_down() {
    let tmp = tempfile::tempdir().unwrap();
    let (one, two, store) = (
        tmp.path().join("one"),
        tmp.path().join("two"),
        tmp.path().join("store"),
    );
    let h1 = Host::open(&one).unwrap();
    let (ti, _) = h1.open_stream(cfg(&one.join("s"), &store)).await.unwrap();
    ti.append(b"k", 1, 1, 1).unwrap();
    ti.flush().unwrap();
    let h2 = Host::open(&two).unwrap();
    std::fs::rename(one.join("s"), two.join("s")).unwrap();
    let err = refused(h2.open_stream(cfg(&two.join("s"), &store)).await);
    assert_eq!(err.kind(), ErrorKind::Locked, "{err}");
    std::fs::rename(two.join("s"), one.join("s")).unwrap();
    assert!(ti.shutdown(Duration::from_secs(10)).await.fully_drained());
    drop(h1);
    std::fs::rename(one.join("s"), two.join("s")).unwrap();
    let (ti, _) = h2.open_stream(cfg(&two.join("s"), &store)).await.unwrap();
    assert_eq!(ti.lookup(b"k", all()).entries.len(), 1);
    assert!(ti.shutdown(Duration::from_secs(10)).await.fully_drained());
    // Now the second host's: the first, running again, cannot take it back
    // while the second runs.
    let h1 = Host::open(&one).unwrap();
    std::fs::rename(two.join("s"), one.join("s")).unwrap();
    let err = refused(h1.open_stream(cfg(&one.join("s"), &store)).await);
    assert_eq!(err.kind(), ErrorKind::Locked, "{err}");
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

/// Files under `dir`, recursively (relative paths, sorted).
fn files_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                todo.push(p);
            } else {
                out.push(p.strip_prefix(dir).unwrap().display().to_string());
            }
        }
    }
    out.sort();
    out
}

/// A host's streams in manifest mode (the default) keep their leases with
/// one host lease: each writes one renewal of its own, at its take, and
/// the host renews for all of them (issue 16: 10,000 streams renewing
/// each cost 1,000 writes a second). A stream that stops without shutdown
/// is held no more; shutdown releases the others and the host deletes its
/// renewals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hosts_streams_in_manifest_mode_share_one_lease() {
    use tierindex::remote::manifest::{ManifestOptions, ManifestStore};
    use tierindex::remote::{RemoteStore, StoreOptions};
    let tmp = tempfile::tempdir().unwrap();
    let (root, store) = (tmp.path().join("host"), tmp.path().join("store"));
    std::fs::create_dir_all(&store).unwrap();
    let host = Host::open(&root).unwrap();
    let mut streams = Vec::new();
    for i in 0..4u64 {
        let dir = root.join(format!("s{i}"));
        let cfg = Config::builder(&dir)
            .stream(format!("s{i}"))
            .store(format!("file://{}", store.display()))
            .segment_items(100)
            .slot_count(64)
            .lease_ttl(Duration::from_secs(3))
            .build()
            .unwrap();
        assert!(cfg.manifest, "manifest mode is the default");
        let (ti, _) = host.open_stream(cfg).await.unwrap();
        for n in 0..150 {
            ti.append(format!("k{i}").as_bytes(), n, 1, n).unwrap();
        }
        ti.flush().unwrap();
        streams.push(ti);
    }
    // Two of the host's renewals (a second apart), none of the streams'.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let hosts = files_under(&store.join("_hosts"));
    assert!(
        (1..=3).contains(&hosts.len()) && hosts.iter().all(|h| h.ends_with(".lease")),
        "{hosts:?}"
    );
    for i in 0..4 {
        let own = files_under(&store.join(format!("s{i}/manifest/leases")));
        assert_eq!(own.len(), 1, "stream {i}: {own:?}");
    }
    let url = url::Url::from_directory_path(&store).unwrap();
    let remote = RemoteStore::from_url(url.as_str(), &StoreOptions::default()).unwrap();
    let lease_of = |i: u64| {
        let ms =
            ManifestStore::reader(&remote, &format!("s{i}"), ManifestOptions::default()).unwrap();
        async move {
            let m = ms.load().await.unwrap().unwrap();
            ms.current_lease(&m).await.unwrap()
        }
    };
    for i in 0..4 {
        let cur = lease_of(i).await.expect("a lease");
        assert!(cur.host_seq.is_some(), "stream {i}: {cur:?}");
        assert!(
            cur.lease.expires_ms > cur.lease.acquired_ms + 3_000,
            "{cur:?}"
        );
    }
    // Stream 3 stops without shutdown: the host's next renewal drops it.
    drop(streams.pop());
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let cur = lease_of(3).await.expect("a lease (not released)");
    assert_eq!(cur.host_seq, None, "{cur:?}");
    // Its own renewal's expiry, written just after the take.
    assert!(
        cur.lease.expires_ms < cur.lease.acquired_ms + 3_500,
        "{cur:?}"
    );
    assert!(lease_of(0).await.unwrap().host_seq.is_some());

    let reports = Host::shutdown_all(streams, Duration::from_secs(30)).await;
    for r in &reports {
        assert!(r.fully_drained(), "{r:?}");
    }
    for i in 0..3 {
        assert!(lease_of(i).await.is_none(), "stream {i} released");
    }
    // The host holds nothing: it deletes its renewals.
    let mut left = files_under(&store.join("_hosts"));
    for _ in 0..50 {
        if left.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        left = files_under(&store.join("_hosts"));
    }
    assert_eq!(left, Vec::<String>::new());
    drop(host);
}

/// A host whose renewals stop landing for longer than the lease (a paused
/// process, a store out of reach) may have lost streams to another owner
/// meanwhile. When its renewals land again, each of its streams checks
/// once whether it was taken, and a taken one is fenced then, not at its
/// next commit (which, for a quiet stream, may be many minutes away).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hosts_streams_learn_of_a_takeover_when_its_renewals_land_again() {
    use tierindex::remote::manifest::{ManifestOptions, ManifestStore};
    use tierindex::testing::{Fault, FaultyStore, Op};
    let tmp = tempfile::tempdir().unwrap();
    let (root, store) = (tmp.path().join("host"), tmp.path().join("store"));
    std::fs::create_dir_all(&store).unwrap();
    let url = format!("file://{}/tier", store.display());
    // The host's writes go through a fault injector; another owner's go
    // straight to the same directory.
    let faulty = FaultyStore::local(&store, 7);
    let host = Host::open(&root).unwrap();
    let mut streams = Vec::new();
    for i in 0..2u64 {
        let cfg = Config::builder(root.join(format!("s{i}")))
            .stream(format!("s{i}"))
            .store(&url)
            .segment_items(100)
            .slot_count(64)
            .lease_ttl(Duration::from_secs(3))
            .build()
            .unwrap();
        let st = tierindex::Store::new(faulty.clone(), None, "tier", &url);
        let (ti, _) = host.open_stream_with(cfg, st).await.unwrap();
        for n in 0..150 {
            ti.append(format!("k{i}").as_bytes(), n, 1, n).unwrap();
        }
        ti.flush().unwrap();
        streams.push(ti);
    }
    // The host renews (a second apart) and both streams' segments are
    // committed; then every write fails.
    let started = Instant::now();
    while (files_under(&store.join("tier/_hosts")).is_empty()
        || streams.iter().any(|s| s.status().pending_segments > 0))
        && started.elapsed() < Duration::from_secs(20)
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!files_under(&store.join("tier/_hosts")).is_empty());
    assert!(streams.iter().all(|s| s.status().pending_segments == 0));
    faulty.set_random(1.0, vec![Fault::Unavailable], &[Op::Put]);
    // Another owner takes stream 0 once the lease has expired.
    let other = ManifestStore::open(
        &FaultyStore::local(&store, 8).remote("tier"),
        "s0",
        ManifestOptions::default(),
    )
    .await
    .unwrap();
    let started = Instant::now();
    let taken = loop {
        match other.take_ownership("b", Duration::from_secs(30)).await {
            Ok(w) => break w,
            Err(tierindex::Error::Claimed(_)) if started.elapsed() < Duration::from_secs(15) => {
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => panic!("take: {e}"),
        }
    };
    assert_eq!(taken.epoch(), 2);
    // Nothing committed since, nor to commit: stream 0 does not know yet.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(streams[0].status().fenced, None, "not known yet");
    // The host's renewals land again: stream 0 learns within a renewal or
    // two; stream 1, which nobody took, stays.
    faulty.set_random(0.0, vec![], &[]);
    let started = Instant::now();
    while streams[0].status().fenced.is_none() && started.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let why = streams[0]
        .status()
        .fenced
        .expect("stream 0 fenced after the gap");
    assert!(why.contains("epoch 2"), "{why}");
    assert_eq!(streams[1].status().fenced, None);
    drop(taken);
    let reports = Host::shutdown_all(streams, Duration::from_secs(30)).await;
    assert!(reports[0].fenced.is_some(), "{:?}", reports[0]);
    assert!(reports[1].fully_drained(), "{:?}", reports[1]);
    drop(host);
}

/// A host reopening one of its streams while a descriptor of the stream's
/// directory it closed lives on in a child between `fork` and `exec` (or a
/// process on its own holds the stream's lock for the moment before it
/// finds the host's held): the host holds its own lock, so such a holder
/// is transient and is waited out (briefly), not a refusal. Stood in for
/// by a second descriptor's `flock`, let go after 700 ms (helper-55 found
/// the claim refused at once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_waits_out_a_transient_holder_of_its_streams_lock() {
    let tmp = tempfile::tempdir().unwrap();
    let (root, store) = (tmp.path().join("host"), tmp.path().join("store"));
    let host = Host::open(&root).unwrap();
    let dir = root.join("orders");
    let (ti, _) = host.open_stream(cfg(&dir, &store)).await.unwrap();
    ti.append(b"k", 1, 10, 1_000).unwrap();
    ti.flush().unwrap();
    assert!(ti.shutdown(Duration::from_secs(10)).await.fully_drained());

    let copy = std::fs::File::open(&dir).unwrap();
    copy.try_lock().unwrap();
    let held = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(700));
        drop(copy);
    });
    let t = Instant::now();
    let (ti, _) = host.open_stream(cfg(&dir, &store)).await.unwrap();
    assert!(
        t.elapsed() >= Duration::from_millis(500),
        "{:?}",
        t.elapsed()
    );
    held.join().unwrap();
    let found = ti.lookup_remote(b"k", all()).await.unwrap();
    assert_eq!(found.entries.len(), 1, "{found:?}");
    assert!(ti.shutdown(Duration::from_secs(10)).await.fully_drained());
}

/// helper-75 F3 and F5: a host's directory inside a data directory (its
/// `segments/`) was accepted, and that data directory's next start moved
/// the running host's streams and store into its `quarantine/`; a data
/// directory opened on a host's directory turned it into one, and the host
/// then refused to start. Both are refused, naming what to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_and_a_data_directory_do_not_nest() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    let (dd, _) = TierIndex::open(cfg(&tmp.path().join("dd"), &store))
        .await
        .unwrap();
    for inside in ["dd/segments", "dd/segments/x", "dd/journal"] {
        let err = Host::open(tmp.path().join(inside)).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput, "{inside}: {err}");
        assert!(
            err.to_string().contains("inside the data directory"),
            "{err}"
        );
    }
    assert!(
        !tmp.path().join("dd/segments/x").exists(),
        "nothing created"
    );
    assert!(dd.shutdown(Duration::from_secs(10)).await.fully_drained());
    // Put there another way (by hand, a host started before the directory
    // above became a data directory, a symlinked segments/), at any depth:
    // the data directory's start leaves a directory in segments/ where it
    // is (helper-76 F2, helper-77 F2), and stops, moving nothing, when
    // segments/ itself is a host's directory, a data directory or a stream
    // (helper-77 F3).
    let segs = tmp.path().join("dd/segments");
    for (marker, depth) in [("TIERINDEX_HOST", "nested"), ("IDENTITY", "a/b")] {
        let nested = segs.join(depth);
        std::fs::create_dir_all(&nested).unwrap();
        std::fs::write(nested.join(marker), b"x").unwrap();
        let (dd, _) = TierIndex::open(cfg(&tmp.path().join("dd"), &store))
            .await
            .unwrap();
        assert!(dd.shutdown(Duration::from_secs(10)).await.fully_drained());
        assert!(nested.join(marker).exists(), "left in place");
        std::fs::remove_dir_all(segs.join(depth.split('/').next().unwrap())).unwrap();
    }
    for marker in ["TIERINDEX_HOST", "IDENTITY", "HOSTED"] {
        std::fs::write(segs.join(marker), b"x").unwrap();
        let before: Vec<_> = std::fs::read_dir(&segs)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        let err = refused(TierIndex::open(cfg(&tmp.path().join("dd"), &store)).await);
        assert_eq!(err.kind(), ErrorKind::InvalidInput, "{marker}: {err}");
        assert!(err.to_string().contains("nothing was moved"), "{err}");
        let after: Vec<_> = std::fs::read_dir(&segs)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(before.len(), after.len(), "nothing moved");
        std::fs::remove_file(segs.join(marker)).unwrap();
    }
    let (dd, _) = TierIndex::open(cfg(&tmp.path().join("dd"), &store))
        .await
        .unwrap();
    assert!(dd.shutdown(Duration::from_secs(10)).await.fully_drained());
    // A data directory an older build made on a host's directory still
    // opens (to drain it).
    let legacy = tmp.path().join("legacy");
    let (l, _) = TierIndex::open(cfg(&legacy, &store)).await.unwrap();
    assert!(l.shutdown(Duration::from_secs(10)).await.fully_drained());
    std::fs::write(legacy.join("TIERINDEX_HOST"), b"host: pid=1").unwrap();
    let (l, _) = TierIndex::open(cfg(&legacy, &store)).await.unwrap();
    assert!(l.shutdown(Duration::from_secs(10)).await.fully_drained());

    let root = tmp.path().join("host");
    {
        let host = Host::open(&root).unwrap();
        let (s, _) = host
            .open_stream(cfg(&root.join("a"), &store))
            .await
            .unwrap();
        assert!(s.shutdown(Duration::from_secs(10)).await.fully_drained());
    }
    let err = refused(TierIndex::open(cfg(&root, &store)).await);
    assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");
    assert!(err.to_string().contains("host's directory"), "{err}");
    assert!(!root.join("IDENTITY").exists() && !root.join("journal").exists());
    let host = Host::open(&root).unwrap();
    let (s, _) = host
        .open_stream(cfg(&root.join("a"), &store))
        .await
        .unwrap();
    assert!(s.shutdown(Duration::from_secs(10)).await.fully_drained());
}

/// helper-77: a host with a stream named `segments` or `journal` looked like
/// a data directory (its root has such a directory) and could not restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_with_streams_named_like_a_data_directorys_parts_restarts() {
    let tmp = tempfile::tempdir().unwrap();
    let (root, store) = (tmp.path().join("host"), tmp.path().join("store"));
    for round in 0..2 {
        let host = Host::open(&root).unwrap_or_else(|e| panic!("round {round}: {e}"));
        let mut streams = Vec::new();
        for name in ["segments", "journal", "quarantine"] {
            let (s, _) = host
                .open_stream(cfg(&root.join(name), &store))
                .await
                .unwrap();
            s.append(b"k", round, 1, 1).unwrap();
            s.flush().unwrap();
            assert_eq!(s.lookup(b"k", all()).entries.len(), round as usize + 1);
            streams.push(s);
        }
        for r in Host::shutdown_all(streams, Duration::from_secs(10)).await {
            assert!(r.fully_drained());
        }
    }
}
