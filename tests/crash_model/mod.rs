//! The expected-state model shared by the crash-point harness
//! (`tests/crash_points.rs`) and the random kill loop (`tests/kill_loop.rs`).
//!
//! A `Rig` is one data directory + one `file://` store driven by the real
//! `tierindex` binary. The `Model` is what the parent process knows: the
//! entries each child reported as flushed (`start S` / `flushed F` lines of
//! `demo --print-flushed`), the journal states and remote objects seen so
//! far. `Rig::check` runs after every child process (crashed or not) and
//! checks the invariants that must hold at any instant; `Rig::check_final`
//! runs after the last clean drain. Both read the files directly, not
//! through the code under test, except the parsers whose output they check
//! (journal replay, sealed-segment reader).

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tierindex::SegmentId;
use tierindex::journal::{Journal, SegmentState};
use tierindex::segment::KeySum;
use tierindex::segment::sealed::SealedSegment;

/// The binary under test, copied once per test process: a campaign runs
/// for minutes and must not pick up a binary that another build writes to
/// `target/` meanwhile (the copy is removed by [`remove_bin_copy`]).
pub fn bin() -> &'static Path {
    static BIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    static COPY: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let dst = BIN.get_or_init(|| {
        std::env::temp_dir().join(format!("tierindex-under-test-{}", std::process::id()))
    });
    // Copied again after `remove_bin_copy` (a later test in the same
    // process, e.g. the second crash-point campaign with --test-threads=1).
    let _g = COPY.lock().unwrap_or_else(|p| p.into_inner());
    if !dst.exists() {
        let tmp = dst.with_extension("tmp");
        std::fs::copy(env!("CARGO_BIN_EXE_tierindex"), &tmp).expect("copy the tierindex binary");
        std::fs::rename(&tmp, dst).expect("move the tierindex binary copy in place");
    }
    dst
}

pub fn remove_bin_copy() {
    let _ = std::fs::remove_file(bin());
}
pub const KEYS: u64 = 16;
pub const STREAM: &str = "stream-0";

/// What one child process did.
pub struct Run {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// The last lines of stderr, for failure messages.
    pub fn tail(&self) -> String {
        let lines: Vec<&str> = self.stderr.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

pub struct Rig {
    pub dir: PathBuf,
    pub data: PathBuf,
    pub store: PathBuf,
    pub cfg: PathBuf,
    /// `manifest = true` in the config (else `manifest = false`, explicitly).
    pub manifest: bool,
}

impl Rig {
    /// A fresh data directory and store under `root/name`. Small segments
    /// (300 items), multipart above 8 KiB in 4 KiB parts (so full segments
    /// take the multipart path and the last, partial one a single PUT),
    /// journal compaction every 2 KiB, local copies released after commit:
    /// every persist step is reached in a run of a few thousand entries.
    pub fn new(root: &Path, name: &str) -> Rig {
        Rig::with_manifest(root, name, false)
    }

    /// As [`Rig::new`]; with `manifest`, commits go through the stream's
    /// manifest (`allow_unconditional_store`: the probe is off here, and
    /// `file://` creates are conditional anyway), and [`Rig::check`] also
    /// checks the manifest against the journal and the store.
    pub fn with_manifest(root: &Path, name: &str, manifest: bool) -> Rig {
        let dir = root.join(name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let data = dir.join("data");
        let store = dir.join("store");
        let cfg = dir.join("tierindex.toml");
        std::fs::write(
            &cfg,
            format!(
                "data_dir = {:?}\nstore = \"file://{}\"\nstream = \"{STREAM}\"\n\
                 release_after_commit = true\njournal_compact_after_bytes = 2048\n\
                 multipart_threshold_bytes = 8192\npart_size_bytes = 4096\n\
                 probe_store = false\nshutdown_deadline_ms = 20000\ntick_ms = 20\n\
                 request_timeout_ms = 10000\n{}",
                data.display().to_string(),
                store.display(),
                if manifest {
                    "manifest = true\nallow_unconditional_store = true\n\
                     owner_id = \"crash-owner\"\n"
                } else {
                    // Single-writer mode, explicitly: the journal-only
                    // campaign (the default, the manifest, is the other
                    // variant).
                    "manifest = false\n"
                }
            ),
        )
        .unwrap();
        Rig {
            dir,
            data,
            store,
            cfg,
            manifest,
        }
    }

    pub fn remove(&self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }

    fn command(&self, args: &[&str], env: &[(&str, &str)]) -> Command {
        let mut c = Command::new(bin());
        c.arg("--config").arg(&self.cfg).args(args);
        c.env_remove("TIERINDEX_FAILPOINTS")
            .env_remove("TIERINDEX_FAILPOINTS_COUNTS")
            .env_remove("TIERINDEX_DATA_DIR")
            .env_remove("TIERINDEX_STORE")
            .env("RUST_LOG", "warn");
        for (k, v) in env {
            c.env(k, v);
        }
        c
    }

    /// The demo workload: 2,000 entries over 16 keys at 40,000/s, flushed
    /// every 50, then the shutdown drain.
    pub fn demo_args() -> Vec<&'static str> {
        vec![
            "demo",
            "--segment-items",
            "300",
            "--slots",
            "64",
            "--entries",
            "2000",
            "--rate",
            "40000",
            "--flush-every",
            "50",
            "--keys",
            "16",
            "--print-flushed",
        ]
    }

    pub fn demo(&self, env: &[(&str, &str)]) -> Run {
        self.run(
            self.command(&Self::demo_args(), env),
            Duration::from_secs(120),
        )
    }

    pub fn drain(&self, env: &[(&str, &str)]) -> Run {
        self.run(
            self.command(&["drain", "--deadline", "60s"], env),
            Duration::from_secs(120),
        )
    }

    /// Start a child (stdout/stderr to files, so no pipe can fill up).
    pub fn spawn(&self, mut c: Command, tag: &str) -> (std::process::Child, PathBuf, PathBuf) {
        let out = self.dir.join(format!("{tag}.out"));
        let err = self.dir.join(format!("{tag}.err"));
        c.stdin(Stdio::null())
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&err).unwrap());
        let child = c.spawn().expect("spawn tierindex");
        (child, out, err)
    }

    pub fn command_for(&self, args: &[&str], env: &[(&str, &str)]) -> Command {
        self.command(args, env)
    }

    /// Run to completion; a child still alive after `limit` is killed and
    /// reported as a hang (code None).
    pub fn run(&self, c: Command, limit: Duration) -> Run {
        let (mut child, out, err) = self.spawn(c, "last");
        let until = Instant::now() + limit;
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break Some(s);
            }
            if Instant::now() >= until {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        collect(status.and_then(|s| s.code()), &out, &err)
    }

    fn local_segments_dir(&self) -> PathBuf {
        self.data.join(tierindex::datadir::SEGMENTS_DIR)
    }

    fn objects_dir(&self) -> PathBuf {
        self.store.join(STREAM).join("segments")
    }

    /// `(file name, checksum of bytes, bytes)` of every object under the
    /// stream's segment prefix. LocalFileSystem's staging files (`#N`) are
    /// not objects.
    pub fn objects(&self) -> Result<BTreeMap<String, (KeySum, Vec<u8>)>, String> {
        let mut out = BTreeMap::new();
        let Ok(rd) = std::fs::read_dir(self.objects_dir()) else {
            return Ok(out);
        };
        for e in rd.filter_map(|e| e.ok()) {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.contains('#') {
                continue;
            }
            let bytes = std::fs::read(e.path()).map_err(|x| format!("read object {name}: {x}"))?;
            out.insert(name.clone(), (sum_of(&name, &bytes), bytes));
        }
        Ok(out)
    }

    /// `file name -> (checksum, length)` of every object, like [`Rig::objects`]
    /// but reading only files not seen before or whose identity changed:
    /// a CRC is reused only while the file keeps its inode, length and
    /// modification time (an object replaced or rewritten in place gets a
    /// new inode (LocalFileSystem renames a staged file) or a new mtime, so
    /// it is read again). Reading every object after every kill made a
    /// long kill loop quadratic.
    pub fn object_crcs(
        &self,
        cache: &mut BTreeMap<String, (FileStamp, KeySum)>,
    ) -> Result<BTreeMap<String, (KeySum, u64)>, String> {
        use std::os::unix::fs::MetadataExt;
        let mut out = BTreeMap::new();
        let Ok(rd) = std::fs::read_dir(self.objects_dir()) else {
            cache.clear();
            return Ok(out);
        };
        for e in rd.filter_map(|e| e.ok()) {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.contains('#') {
                continue;
            }
            let md = std::fs::metadata(e.path()).map_err(|x| format!("stat object {name}: {x}"))?;
            let stamp = FileStamp {
                ino: md.ino(),
                len: md.len(),
                mtime_ns: md.mtime() as i128 * 1_000_000_000 + md.mtime_nsec() as i128,
            };
            let (crc, len) = match cache.get(&name) {
                Some((s, crc)) if *s == stamp => (*crc, s.len),
                _ => {
                    let bytes =
                        std::fs::read(e.path()).map_err(|x| format!("read object {name}: {x}"))?;
                    // Length from the bytes read, not the stat before it.
                    let stamp = FileStamp {
                        len: bytes.len() as u64,
                        ..stamp
                    };
                    let crc = sum_of(&name, &bytes);
                    cache.insert(name.clone(), (stamp, crc));
                    (crc, stamp.len)
                }
            };
            out.insert(name, (crc, len));
        }
        cache.retain(|n, _| out.contains_key(n));
        Ok(out)
    }

    /// Invariants that hold after any process ends, however it ended.
    pub fn check(&self, model: &mut Model) -> Result<(), String> {
        // Start-up must be possible: the journal replays (read-only here).
        let view = if tierindex::journal::log_path(&self.data).exists() {
            Some(
                Journal::open_read_only(&self.data)
                    .map_err(|e| format!("journal does not replay: {e}"))?
                    .0,
            )
        } else {
            None
        };
        let mut cache = std::mem::take(&mut model.crc_cache);
        let objects = self.object_crcs(&mut cache);
        model.crc_cache = cache;
        let objects = objects?;

        // Objects: the CRC in the name is the CRC of the bytes (so no key
        // ever holds other content: nothing overwritten), and an object,
        // once seen, never changes or disappears.
        for (name, (crc, len)) in &objects {
            let (id, named) = tierindex::remote::keys::parse_segment_object_name(name)
                .ok_or_else(|| format!("unexpected object {name}"))?;
            if *crc != named {
                return Err(format!(
                    "object {name} ({len} bytes) has checksum {crc}, its key says {named}"
                ));
            }
            let _ = id;
        }
        for (name, crc) in &model.objects {
            match objects.get(name) {
                Some((c, _)) if c == crc => {}
                Some((c, _)) => return Err(format!("object {name} changed: {crc} -> {c}")),
                None => return Err(format!("object {name} disappeared")),
            }
        }
        model.objects = objects.iter().map(|(n, (c, _))| (n.clone(), *c)).collect();

        let Some(view) = view else {
            if !model.states.is_empty() {
                return Err("the journal disappeared".into());
            }
            return Ok(());
        };
        let mut states = BTreeMap::new();
        for (id, rec) in view.segments() {
            if rec.state == SegmentState::Quarantined {
                return Err(format!(
                    "segment {id} quarantined after a crash: {:?}",
                    rec.reason
                ));
            }
            let r = rank(rec.state);
            // Verified or later: the object is there, under its key, whole.
            if r >= rank(SegmentState::Verified) {
                let key = rec
                    .key
                    .as_deref()
                    .ok_or_else(|| format!("segment {id} {:?} without a key", rec.state))?;
                let name = key.rsplit('/').next().unwrap_or(key);
                match objects.get(name) {
                    Some((crc, len)) if *crc == rec.meta.key_sum() && *len == rec.meta.file_len => {
                    }
                    Some((crc, len)) => {
                        return Err(format!(
                            "segment {id} is {:?} but object {name} is {len} bytes checksum {crc}, \
                             journal says {} bytes checksum {}",
                            rec.state,
                            rec.meta.file_len,
                            rec.meta.key_sum()
                        ));
                    }
                    None => {
                        return Err(format!(
                            "segment {id} is {:?} but the store has no {name}",
                            rec.state
                        ));
                    }
                }
            } else {
                // Not verified yet: the local copy must still be there.
                let local = self
                    .local_segments_dir()
                    .join(tierindex::segment::sealed::sealed_file_name(*id));
                if !local.exists() {
                    return Err(format!(
                        "segment {id} is {:?} but its local copy {} is gone",
                        rec.state,
                        local.display()
                    ));
                }
            }
            states.insert(*id, (r, rec.meta.key_sum()));
        }
        // The journal only moves forward; compaction drops Released only.
        // (id, crc) of every object, once: scanning the objects per
        // segment made each check O(segments x objects).
        let in_store: std::collections::BTreeSet<(SegmentId, KeySum)> = objects
            .keys()
            .filter_map(|n| tierindex::remote::keys::parse_segment_object_name(n))
            .collect();
        for (id, (before, crc)) in &model.states {
            match states.get(id).map(|(r, _)| r) {
                Some(now) if now >= before => {}
                Some(now) => {
                    return Err(format!(
                        "segment {id} went back from {} to {}",
                        name_of(*before),
                        name_of(*now)
                    ));
                }
                // Released (then dropped by compaction) in a process we
                // did not observe between: then its object is in the store
                // with the journaled CRC and the local copy is gone.
                None if in_store.contains(&(*id, *crc))
                    && !self
                        .local_segments_dir()
                        .join(tierindex::segment::sealed::sealed_file_name(*id))
                        .exists() => {}
                None => {
                    return Err(format!(
                        "segment {id} ({}) vanished from the journal (not released: object \
                         missing or local copy still there)",
                        name_of(*before)
                    ));
                }
            }
        }
        for (id, v) in &states {
            model.states.insert(*id, *v);
        }
        if self.manifest {
            self.check_manifest(model, &objects, &states)?;
        }
        Ok(())
    }

    /// Every entry of the stream's manifest (decoded with every check),
    /// `None` before the first version.
    pub fn manifest_entries(
        &self,
    ) -> Result<Option<Vec<tierindex::remote::manifest::SegmentEntry>>, String> {
        use tierindex::remote::manifest::ManifestStore;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        rt.block_on(async {
            let url = format!("file://{}", self.store.display());
            let store = tierindex::remote::RemoteStore::from_url(
                &url,
                &tierindex::remote::StoreOptions::default(),
            )
            .map_err(|e| format!("store: {e}"))?;
            let ms = ManifestStore::reader(&store, STREAM, Default::default())
                .map_err(|e| format!("manifest store: {e}"))?;
            let Some(m) = ms
                .load()
                .await
                .map_err(|e| format!("manifest does not load: {e}"))?
            else {
                return Ok(None);
            };
            ms.all_segments(&m)
                .await
                .map(Some)
                .map_err(|e| format!("manifest entries do not load: {e}"))
        })
    }

    /// The manifest against the journal and the store: every entry's
    /// object is there with its CRC and length; every journal segment at
    /// `Committed` or later is listed with its CRC; nothing once listed is
    /// ever unlisted.
    fn check_manifest(
        &self,
        model: &mut Model,
        objects: &BTreeMap<String, (KeySum, u64)>,
        states: &BTreeMap<SegmentId, (u8, KeySum)>,
    ) -> Result<(), String> {
        let entries = self.manifest_entries()?.unwrap_or_default();
        let listed: BTreeMap<SegmentId, KeySum> =
            entries.iter().map(|e| (e.id, e.key_sum())).collect();
        for e in &entries {
            let name = e.key.rsplit('/').next().unwrap_or(&e.key);
            match objects.get(name) {
                Some((crc, len)) if *crc == e.key_sum() && *len == e.file_len => {}
                other => {
                    return Err(format!(
                        "manifest lists segment {} ({name}) but the store has {other:?}",
                        e.id
                    ));
                }
            }
        }
        for (id, (rank_now, crc)) in states {
            if is_committed(*rank_now) && listed.get(id) != Some(crc) {
                return Err(format!(
                    "segment {id} is {} in the journal but the manifest lists {:?}",
                    name_of(*rank_now),
                    listed.get(id)
                ));
            }
        }
        for (id, crc) in &model.manifest_listed {
            if listed.get(id) != Some(crc) {
                return Err(format!(
                    "segment {id} (checksum {crc}) was in the manifest and is not any more: {:?}",
                    listed.get(id)
                ));
            }
        }
        model.manifest_listed = listed;
        Ok(())
    }

    /// After the last clean drain: everything is in the store, verified,
    /// and the store holds exactly the entries a correct system holds.
    pub fn check_final(&self, model: &Model) -> Result<(), String> {
        let view = Journal::open_read_only(&self.data)
            .map_err(|e| format!("journal does not replay: {e}"))?
            .0;
        for (id, rec) in view.segments() {
            if !is_committed(rank(rec.state)) && rec.state != SegmentState::Resealed {
                return Err(format!(
                    "segment {id} still {:?} after a clean drain",
                    rec.state
                ));
            }
        }
        let q = self.data.join(tierindex::datadir::QUARANTINE_DIR);
        if let Ok(rd) = std::fs::read_dir(&q)
            && let Some(e) = rd.filter_map(|e| e.ok()).next()
        {
            return Err(format!(
                "quarantine holds {} after crashes only",
                e.path().display()
            ));
        }
        let objects = self.objects()?;
        let mut found: BTreeMap<u64, SegmentId> = BTreeMap::new();
        for (name, (_, bytes)) in &objects {
            let path = self.objects_dir().join(name);
            let seg = SealedSegment::open(&path)
                .map_err(|e| format!("object {name} does not open as a segment: {e}"))?;
            let id = seg.id();
            // A local copy still held must be the same bytes.
            let local = self
                .local_segments_dir()
                .join(tierindex::segment::sealed::sealed_file_name(id));
            if let Ok(lb) = std::fs::read(&local)
                && lb != *bytes
            {
                return Err(format!(
                    "local {} differs from object {name}",
                    local.display()
                ));
            }
            for e in seg.entries() {
                let want = tierindex::key_hash(format!("key-{}", e.offset % KEYS).as_bytes());
                if e.key_hash != want || e.size != 100 + (e.offset % 900) as u32 {
                    return Err(format!(
                        "object {name}: entry at offset {} is not what was appended: {e:?}",
                        e.offset
                    ));
                }
                if let Some(other) = found.insert(e.offset, id) {
                    return Err(format!(
                        "offset {} is in segment {other} and in object {name}",
                        e.offset
                    ));
                }
            }
        }
        // A prefix of what was appended: contiguous from 0.
        if let Some((&last, _)) = found.iter().next_back()
            && found.len() as u64 != last + 1
        {
            let gap = (0..=last).find(|o| !found.contains_key(o));
            return Err(format!(
                "offsets in the store are not contiguous: {} entries up to {last}, first gap {gap:?}",
                found.len()
            ));
        }
        for &(start, end) in &model.acked {
            if let Some(o) = (start..end).find(|o| !found.contains_key(o)) {
                return Err(format!(
                    "offset {o} was acknowledged by flush ({start}..{end}) but is not in the store \
                     ({} entries there)",
                    found.len()
                ));
            }
        }
        // The manifest lists every segment the journal committed. It may
        // list more: Released segments whose records compaction dropped
        // (each listed entry's object was checked by `check_manifest`).
        if self.manifest {
            let entries = self.manifest_entries()?.unwrap_or_default();
            let listed: BTreeMap<SegmentId, KeySum> =
                entries.iter().map(|e| (e.id, e.key_sum())).collect();
            let committed: BTreeMap<SegmentId, KeySum> = view
                .segments()
                .iter()
                .filter(|(_, r)| is_committed(rank(r.state)))
                .map(|(id, r)| (*id, r.meta.key_sum()))
                .collect();
            for (id, crc) in &committed {
                if listed.get(id) != Some(crc) {
                    return Err(format!("committed segment {id} not in the manifest"));
                }
            }
            if listed.len() < committed.len() {
                return Err(format!(
                    "manifest lists {} segments, the journal committed {}",
                    listed.len(),
                    committed.len()
                ));
            }
        }
        // Nothing local left unsealed.
        if let Ok(rd) = std::fs::read_dir(self.local_segments_dir()) {
            for e in rd.filter_map(|e| e.ok()) {
                let n = e.file_name().to_string_lossy().into_owned();
                if n.ends_with(".active") || n.ends_with(".tmp") {
                    return Err(format!(
                        "{n} left in the data directory after a clean drain"
                    ));
                }
            }
        }
        Ok(())
    }
}

fn collect(code: Option<i32>, out: &Path, err: &Path) -> Run {
    Run {
        code,
        stdout: std::fs::read_to_string(out).unwrap_or_default(),
        stderr: std::fs::read_to_string(err).unwrap_or_default(),
    }
}

/// True when every loss a recovery reported is a torn tail of an active
/// segment (and there is at least one). A crash or SIGKILL can land while
/// the appender writes an item into the map: that item is torn, and
/// recovery reports it as "possibly acknowledged" (exit 4), since it cannot
/// tell an append cut mid-write from damage. The model check decides
/// whether anything acknowledged is missing.
pub fn only_torn_tails(stderr: &str) -> bool {
    let torn = stderr
        .lines()
        .filter(|l| l.contains("torn tail, possibly acknowledged"))
        .count();
    let lost = stderr
        .lines()
        .filter(|l| l.contains("entries lost to local damage"))
        .count();
    torn > 0
        && torn == lost
        && !stderr.contains("no item could be located")
        && !stderr.contains("quarantined from=")
}

/// Position of a state on the forward-only path.
pub fn rank(s: SegmentState) -> u8 {
    match s {
        SegmentState::Sealed => 0,
        SegmentState::Uploading => 1,
        SegmentState::Uploaded => 2,
        SegmentState::Verified => 3,
        SegmentState::Committed => 4,
        SegmentState::Released => 5,
        SegmentState::Quarantined => 6,
        // A branch off Verified: never Committed (see `is_committed`).
        SegmentState::Resealing => 7,
        SegmentState::Resealed => 8,
    }
}

/// Committed or Released: the manifest lists the segment.
pub fn is_committed(rank_now: u8) -> bool {
    rank_now == rank(SegmentState::Committed) || rank_now == rank(SegmentState::Released)
}

fn name_of(r: u8) -> &'static str {
    [
        "Sealed",
        "Uploading",
        "Uploaded",
        "Verified",
        "Committed",
        "Released",
        "Quarantined",
        "Resealing",
        "Resealed",
    ]
    .get(r as usize)
    .copied()
    .unwrap_or("?")
}

/// What the parent knows.
#[derive(Default)]
pub struct Model {
    /// Offset ranges `start..end` some child acknowledged (flush returned).
    pub acked: Vec<(u64, u64)>,
    /// Last seen state rank and sealed CRC per segment.
    pub states: BTreeMap<SegmentId, (u8, KeySum)>,
    /// Objects seen: name -> checksum.
    pub objects: BTreeMap<String, KeySum>,
    /// CRCs already computed, by file identity (see [`Rig::object_crcs`]).
    pub crc_cache: BTreeMap<String, (FileStamp, KeySum)>,
    /// Segments the manifest listed (id -> file CRC): never unlisted.
    pub manifest_listed: BTreeMap<SegmentId, KeySum>,
}

/// What identifies one version of an object file without reading it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileStamp {
    pub ino: u64,
    pub len: u64,
    pub mtime_ns: i128,
}

impl Model {
    /// Record what a `demo --print-flushed` child acknowledged.
    pub fn observe_demo(&mut self, run: &Run) -> Result<(), String> {
        let mut start = None;
        let mut flushed = 0u64;
        for l in run.stdout.lines() {
            if let Some(s) = l.strip_prefix("start ") {
                start = Some(s.trim().parse::<u64>().map_err(|e| format!("{l:?}: {e}"))?);
            } else if let Some(f) = l.strip_prefix("flushed ") {
                flushed = f.trim().parse().map_err(|e| format!("{l:?}: {e}"))?;
            }
        }
        match start {
            Some(s) if flushed > 0 => self.acked.push((s, s + flushed)),
            Some(_) => {}
            // Died before it printed anything: it acknowledged nothing.
            None if flushed == 0 => {}
            None => return Err("flushed lines without a start line".into()),
        }
        Ok(())
    }
}

/// The checksum an object's bytes have, of the kind its name uses: format-2
/// names carry a CRC-64/NVME, format-1 names a CRC32.
pub fn sum_of(name: &str, bytes: &[u8]) -> KeySum {
    match tierindex::remote::keys::parse_segment_object_name(name) {
        Some((_, KeySum::Crc32(_))) => KeySum::Crc32(crc32fast::hash(bytes)),
        _ => KeySum::Crc64(tierindex::segment::format::crc64(bytes)),
    }
}
