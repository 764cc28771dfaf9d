//! Ownership campaign (issue 15, item 5): three broker processes (the real
//! `tierindex demo`, each with its own owner id and data directory) and the
//! recovery tool (`tierindex drain` and `tierindex owner take` as owner
//! `recovery`) compete for ONE stream, `manifest = true`, short leases.
//! Random events: start a broker, SIGSTOP one for longer than the lease,
//! SIGCONT it, SIGKILL, SIGTERM, move a data directory from one broker to
//! another, run the recovery tool. After every step a model checks:
//!
//! 1. at most one owner publishes per epoch (the lease holder of every
//!    manifest version seen, per epoch);
//! 2. no manifest version is written by a fenced owner: in version order,
//!    epochs never go down (a version written after its writer's epoch was
//!    superseded would carry a lower epoch than the version before it).
//!    A paused writer may re-create an old version slot that clean-up
//!    deleted (`src/remote/manifest.rs`, "stale slot"); such a version is
//!    never the newest and is counted, not a violation, unless it is seen
//!    as the newest;
//! 3. every acknowledged entry (the `start S` / `flushed N` lines of
//!    `demo --print-flushed`) of every data directory is committed (listed
//!    in the manifest) at most once, and otherwise still pending in its data
//!    directory (a journal segment not yet committed, a sealed file, or
//!    an active segment above everything sealed);
//! 4. nothing held only in the store is deleted: a segment the manifest
//!    ever listed stays listed with the same checksum, and its object stays
//!    in the store's listing (local copies are released after commit, so
//!    the store holds the only copy).
//!
//! At the end every broker is stopped, each data directory is drained by
//! the recovery tool, and every acknowledged entry must be in the manifest
//! exactly once. A background thread lists the manifest versions every few
//! milliseconds, so versions that clean-up deletes are still seen.
//!
//! The manifest is read through `tierindex::remote::manifest` and segment
//! keys through `tierindex::remote::keys`, never by parsing keys here.
//!
//! Knobs (`scripts/ownership-campaign.sh` sets them):
//! * `TIERINDEX_OWNERSHIP_STEPS=N` (default 12; the script's CI size is
//!   120). Cargo.toml marks this target `test = false`: it runs only by
//!   name (`cargo test --test ownership_campaign`), as the script does;
//! * `TIERINDEX_OWNERSHIP_SEED=S` (default random, printed);
//! * `TIERINDEX_OWNERSHIP_STORE=file|s3` (default `file`); `s3` needs the
//!   server variables of `scripts/s3-server.sh env KIND` and FAILS without
//!   them (no skip), and on a server that ignores conditional creates;
//! * `TIERINDEX_OWNERSHIP_TTL_MS=T` (default 1000): the lease. Requests
//!   time out after 250 ms with 2 attempts, so a renewal lands within the
//!   lease (the open warns otherwise).
//!
//! On a violation the directory is kept and its path printed. A data
//! directory whose final drain cannot finish (a pending segment's id taken
//! in the manifest by another directory's segment, so its acknowledged
//! entries can never be published) fails the run too, after the summary
//! line (`unpublishable-data-dirs=N`).

mod crash_model;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use object_store::ObjectStoreExt as _;
use object_store::path::Path as ObjPath;
use tierindex::journal::{Journal, SegmentState};
use tierindex::remote::manifest::{self, ManifestOptions, ManifestStore};
use tierindex::remote::{RemoteStore, StoreOptions, keys};
use tierindex::segment::sealed::SealedSegment;
use tierindex::segment::{KeySum, SegmentId};

const STREAM: &str = "own-0";
const BROKERS: usize = 3;
const RECOVERY: &str = "recovery";

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: plain syscall on our own child's pid, not reaped yet (so it
    // cannot have been reused).
    unsafe {
        libc::kill(pid as i32, sig);
    }
}

/// Where the stream lives and how a child reaches it.
struct Target {
    kind: String,
    url: String,
    opts: StoreOptions,
    /// Extra config lines (endpoint, region, allow_http).
    cfg_lines: String,
    /// Environment for children (credentials come from the harness's env).
    env: Vec<(String, String)>,
}

impl Target {
    fn from_env(root: &Path) -> Target {
        let mode = std::env::var("TIERINDEX_OWNERSHIP_STORE").unwrap_or_else(|_| "file".into());
        match mode.as_str() {
            "file" => {
                let store = root.join("store");
                std::fs::create_dir_all(&store).unwrap();
                Target {
                    kind: "file".into(),
                    url: format!("file://{}", store.display()),
                    opts: StoreOptions::default(),
                    cfg_lines: String::new(),
                    env: Vec::new(),
                }
            }
            "s3" => {
                let get = |k: &str| std::env::var(format!("TIERINDEX_S3_{k}")).ok();
                let (Some(kind), Some(endpoint), Some(bucket)) =
                    (get("KIND"), get("ENDPOINT"), get("BUCKET"))
                else {
                    panic!(
                        "TIERINDEX_OWNERSHIP_STORE=s3 but no S3 server configured \
                         (TIERINDEX_S3_KIND, _ENDPOINT, _BUCKET): start one with \
                         `eval \"$(scripts/s3-server.sh start s3s)\"` or run \
                         scripts/ownership-campaign.sh"
                    )
                };
                if get("CONDITIONAL_CREATE").as_deref() == Some("ignored") {
                    panic!(
                        "server {kind} ignores conditional creates: ownership cannot be \
                         fenced there, the campaign needs a store that honours them"
                    );
                }
                let region = get("REGION").unwrap_or_else(|| "us-east-1".into());
                let prefix = format!("own-{}-{:08x}", std::process::id(), fastrand::u32(..));
                let mut env = Vec::new();
                if let (Some(a), Some(s)) = (get("ACCESS_KEY"), get("SECRET_KEY")) {
                    env.push(("AWS_ACCESS_KEY_ID".to_string(), a));
                    env.push(("AWS_SECRET_ACCESS_KEY".to_string(), s));
                }
                env.push(("AWS_REGION".into(), region.clone()));
                Target {
                    kind,
                    url: format!("s3://{bucket}/{prefix}"),
                    opts: StoreOptions {
                        endpoint: Some(endpoint.clone()),
                        allow_http: Some(true),
                        region: Some(region.clone()),
                        ..StoreOptions::default()
                    },
                    cfg_lines: format!(
                        "endpoint = {endpoint:?}\nallow_http = true\nregion = {region:?}\n"
                    ),
                    env,
                }
            }
            other => panic!("TIERINDEX_OWNERSHIP_STORE={other:?}: expected file or s3"),
        }
    }

    fn store(&self) -> RemoteStore {
        // The harness's own reads use the same credentials as the children.
        for (k, v) in &self.env {
            if std::env::var(k).ok().as_deref() != Some(v) {
                // SAFETY: set before any other thread of this test starts.
                unsafe { std::env::set_var(k, v) };
            }
        }
        RemoteStore::from_url(&self.url, &self.opts).expect("store from url")
    }
}

/// One data directory, wherever it currently is, and what its runs
/// acknowledged.
struct Lineage {
    path: PathBuf,
    moves: u32,
    /// Offset ranges `start..end` acknowledged by runs on this directory.
    acked: Vec<(u64, u64)>,
    /// Every (id, checksum) its journal ever recorded -> (min, max offset).
    segs: BTreeMap<(SegmentId, KeySum), (u64, u64)>,
    /// The final drain cannot finish (see [`Campaign::final_drains`]).
    stuck: bool,
}

struct Proc {
    child: Child,
    out: PathBuf,
    err: PathBuf,
    lineage: usize,
    paused_since: Option<Instant>,
    /// SIGTERM sent (a second one would make it exit at once, with 5).
    termed: bool,
    what: &'static str,
}

struct Broker {
    owner: String,
    lineage: usize,
    proc: Option<Proc>,
}

#[derive(Clone, Debug)]
struct VersionSeen {
    epoch: u64,
    owner: Option<String>,
    e_tag: Option<String>,
    /// Highest version listed when this one was first seen.
    newest_then: u64,
}

#[derive(Default)]
struct History {
    /// version -> every distinct object seen under its slot.
    versions: BTreeMap<u64, Vec<VersionSeen>>,
    errors: Vec<String>,
    polls: u64,
    /// Re-created old slots (stale writers), seen and never the newest.
    void_slots: u64,
}

#[derive(Default)]
struct Counts {
    steps: u64,
    starts: u64,
    refused: u64,
    pauses: u64,
    resumes: u64,
    kills: u64,
    terms: u64,
    moves: u64,
    drains: u64,
    takes: u64,
    fenced: u64,
    store_timeouts: u64,
    exits: BTreeMap<String, u64>,
}

struct Campaign {
    root: PathBuf,
    target: Target,
    ttl_ms: u64,
    lineages: Vec<Lineage>,
    brokers: Vec<Broker>,
    counts: Counts,
    runs: u64,
    store: RemoteStore,
    rt: tokio::runtime::Runtime,
    history: Arc<Mutex<History>>,
    /// Segments the manifest ever listed: id -> (checksum, key).
    ever_listed: BTreeMap<SegmentId, (KeySum, String)>,
    /// Offset runs of committed segments whose offsets are not one
    /// contiguous range (a resealed segment's entries copied in beside
    /// newer ones), read from their objects once.
    run_cache: BTreeMap<(SegmentId, KeySum), Vec<(u64, u64)>>,
}

fn keep_versions() -> u64 {
    ManifestOptions::default().keep_versions
}

/// The poller: list the versions, read each new one, remember it.
fn poll_versions(store: RemoteStore, history: Arc<Mutex<History>>, stop: Arc<AtomicBool>) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let ms = ManifestStore::reader(&store, STREAM, ManifestOptions::default()).unwrap();
    let dir = ms.versions_dir();
    let os = store.object_store().clone();
    let max = ManifestOptions::default().max_object_bytes;
    while !stop.load(Ordering::SeqCst) {
        let r: Result<(), String> = rt.block_on(async {
            let listed: Vec<object_store::ObjectMeta> = os
                .list(Some(&dir))
                .try_collect()
                .await
                .map_err(|e| format!("list versions: {e}"))?;
            let mut found: Vec<(u64, object_store::ObjectMeta)> = listed
                .into_iter()
                .filter_map(|m| {
                    let v = manifest::parse_version_name(m.location.filename()?)?;
                    Some((v, m))
                })
                .collect();
            found.sort_by_key(|(v, _)| *v);
            let newest = found.last().map_or(0, |(v, _)| *v);
            for (v, meta) in found {
                let known = {
                    let h = history.lock().unwrap();
                    h.versions
                        .get(&v)
                        .is_some_and(|seen| seen.iter().any(|s| s.e_tag == meta.e_tag))
                };
                if known {
                    continue;
                }
                let bytes = match os.get(&meta.location).await {
                    Ok(g) => g
                        .bytes()
                        .await
                        .map_err(|e| format!("read version {v}: {e}"))?,
                    // Deleted by clean-up between the LIST and the GET.
                    Err(object_store::Error::NotFound { .. }) => continue,
                    Err(e) => return Err(format!("get version {v}: {e}")),
                };
                let m = manifest::decode_manifest(&bytes, STREAM, v, max)
                    .map_err(|e| format!("manifest version {v} does not decode: {e}"))?;
                let mut h = history.lock().unwrap();
                let seen = VersionSeen {
                    epoch: m.epoch,
                    owner: m.lease.as_ref().map(|l| l.owner.clone()),
                    e_tag: meta.e_tag.clone(),
                    newest_then: newest,
                };
                let slot = h.versions.entry(v).or_default();
                let first = slot.is_empty();
                slot.push(seen);
                if !first || newest >= v + keep_versions() {
                    if v == newest {
                        h.errors.push(format!(
                            "version {v} was re-created (a stale slot) and is the newest"
                        ));
                    }
                    h.void_slots += 1;
                }
            }
            Ok(())
        });
        let mut h = history.lock().unwrap();
        h.polls += 1;
        if let Err(e) = r {
            h.errors.push(e);
        }
        drop(h);
        std::thread::sleep(Duration::from_millis(5));
    }
}

impl Campaign {
    fn config(&self, owner: &str, lineage: usize, tag: &str) -> PathBuf {
        let p = self.root.join(format!("{tag}.toml"));
        std::fs::write(
            &p,
            format!(
                "data_dir = {:?}\nstore = {:?}\n{}stream = \"{STREAM}\"\n\
                 manifest = true\nowner_id = {owner:?}\nlease_ttl_ms = {}\n\
                 release_after_commit = true\nshutdown_deadline_ms = 5000\ntick_ms = 20\n\
                 request_timeout_ms = 250\nmax_attempts = 2\n",
                self.lineages[lineage].path.display().to_string(),
                self.target.url,
                self.target.cfg_lines,
                self.ttl_ms
            ),
        )
        .unwrap();
        p
    }

    fn command(&self, cfg: &Path, args: &[&str]) -> Command {
        let mut c = Command::new(crash_model::bin());
        c.arg("--config").arg(cfg).args(args);
        for k in [
            "TIERINDEX_DATA_DIR",
            "TIERINDEX_STORE",
            "TIERINDEX_STREAM",
            "TIERINDEX_ENDPOINT",
            "TIERINDEX_CONFIG",
            "TIERINDEX_FAILPOINTS",
            "TIERINDEX_FAILPOINTS_COUNTS",
        ] {
            c.env_remove(k);
        }
        c.env("RUST_LOG", "warn").env_remove("TIERINDEX_LOG");
        for (k, v) in &self.target.env {
            c.env(k, v);
        }
        c
    }

    fn spawn(&mut self, owner: &str, lineage: usize, args: &[&str], what: &'static str) -> Proc {
        self.runs += 1;
        let tag = format!("run-{:05}-{owner}", self.runs);
        let cfg = self.config(owner, lineage, &tag);
        let out = self.root.join(format!("{tag}.out"));
        let err = self.root.join(format!("{tag}.err"));
        let mut c = self.command(&cfg, args);
        c.stdin(Stdio::null())
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&err).unwrap());
        let child = c.spawn().expect("spawn tierindex");
        Proc {
            child,
            out,
            err,
            lineage,
            paused_since: None,
            termed: false,
            what,
        }
    }

    fn demo_args() -> Vec<&'static str> {
        vec![
            "demo",
            "--segment-items",
            "250",
            "--slots",
            "64",
            "--rate",
            "2000",
            "--flush-every",
            "50",
            "--keys",
            "16",
            "--print-flushed",
            "--deadline",
            "5s",
        ]
    }

    /// A finished process: record what it acknowledged and how it ended.
    fn finish(&mut self, p: &Proc, code: Option<i32>) -> Result<(), String> {
        let stdout = std::fs::read_to_string(&p.out).unwrap_or_default();
        let stderr = std::fs::read_to_string(&p.err).unwrap_or_default();
        let run = crash_model::Run {
            code,
            stdout,
            stderr,
        };
        let mut m = crash_model::Model::default();
        m.observe_demo(&run)?;
        self.lineages[p.lineage].acked.extend(m.acked);
        let label = match code {
            None => "signal".to_string(),
            Some(c) => c.to_string(),
        };
        *self
            .counts
            .exits
            .entry(format!("{}:{label}", p.what))
            .or_default() += 1;
        match code {
            None | Some(0) | Some(3) => Ok(()),
            Some(6) => {
                self.counts.fenced += 1;
                Ok(())
            }
            Some(1) if run.stderr.contains("ownership refused") => {
                self.counts.refused += 1;
                Ok(())
            }
            // The store did not answer within the short request timeouts
            // (250 ms x 2) on a loaded machine: the command changed nothing
            // and said so. Counted, not a violation.
            Some(1) if run.stderr.contains("no answer within") => {
                self.counts.store_timeouts += 1;
                Ok(())
            }
            Some(c) => Err(format!(
                "{} {} exited {c} unexpectedly:\n{}",
                p.what,
                p.err.display(),
                run.tail()
            )),
        }
    }

    /// Reap every broker that exited.
    fn reap(&mut self) -> Result<(), String> {
        for b in 0..BROKERS {
            let done = match &mut self.brokers[b].proc {
                Some(p) => p.child.try_wait().unwrap(),
                None => None,
            };
            if let Some(status) = done {
                let p = self.brokers[b].proc.take().unwrap();
                self.finish(&p, status.code())?;
            }
        }
        Ok(())
    }

    /// Run a recovery-tool command to completion (bounded).
    fn run_tool(&mut self, lineage: usize, args: &[&str]) -> Result<Option<i32>, String> {
        let mut p = self.spawn(RECOVERY, lineage, args, "tool");
        let until = Instant::now() + Duration::from_secs(90);
        let code = loop {
            if let Some(s) = p.child.try_wait().unwrap() {
                break s.code();
            }
            if Instant::now() > until {
                let _ = p.child.kill();
                let _ = p.child.wait();
                return Err(format!("{args:?} hung for 90 s ({})", p.err.display()));
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        self.finish(&p, code)?;
        Ok(code)
    }

    /// A broker has created it (the recovery tool does not create one).
    fn is_data_dir(&self, l: usize) -> bool {
        self.lineages[l].path.join("IDENTITY").exists()
    }

    fn lineage_in_use(&self, l: usize) -> bool {
        self.brokers
            .iter()
            .any(|b| b.proc.as_ref().is_some_and(|p| p.lineage == l))
    }

    /// One random event.
    fn step(&mut self, rng: &mut fastrand::Rng) -> Result<String, String> {
        let ttl = Duration::from_millis(self.ttl_ms);
        let dead: Vec<usize> = (0..BROKERS)
            .filter(|b| self.brokers[*b].proc.is_none())
            .collect();
        let running: Vec<usize> = (0..BROKERS)
            .filter(|b| {
                self.brokers[*b]
                    .proc
                    .as_ref()
                    .is_some_and(|p| p.paused_since.is_none() && !p.termed)
            })
            .collect();
        let paused: Vec<usize> = (0..BROKERS)
            .filter(|b| {
                self.brokers[*b]
                    .proc
                    .as_ref()
                    .is_some_and(|p| p.paused_since.is_some_and(|t| t.elapsed() > ttl * 3 / 2))
            })
            .collect();
        let alive: Vec<usize> = (0..BROKERS)
            .filter(|b| self.brokers[*b].proc.is_some())
            .collect();
        loop {
            match rng.u32(0..100) {
                0..30 if !dead.is_empty() => {
                    let b = dead[rng.usize(..dead.len())];
                    let (owner, l) = (self.brokers[b].owner.clone(), self.brokers[b].lineage);
                    let p = self.spawn(&owner, l, &Self::demo_args(), "broker");
                    self.brokers[b].proc = Some(p);
                    self.counts.starts += 1;
                    return Ok(format!("start {owner}"));
                }
                30..45 if !running.is_empty() => {
                    let b = running[rng.usize(..running.len())];
                    let p = self.brokers[b].proc.as_mut().unwrap();
                    signal(p.child.id(), libc::SIGSTOP);
                    p.paused_since = Some(Instant::now());
                    self.counts.pauses += 1;
                    return Ok(format!("pause {}", self.brokers[b].owner));
                }
                45..62 if !paused.is_empty() => {
                    let b = paused[rng.usize(..paused.len())];
                    let p = self.brokers[b].proc.as_mut().unwrap();
                    let held = p.paused_since.take().unwrap().elapsed();
                    signal(p.child.id(), libc::SIGCONT);
                    self.counts.resumes += 1;
                    return Ok(format!(
                        "resume {} after {} ms",
                        self.brokers[b].owner,
                        held.as_millis()
                    ));
                }
                62..72 if !alive.is_empty() => {
                    let b = alive[rng.usize(..alive.len())];
                    let mut p = self.brokers[b].proc.take().unwrap();
                    signal(p.child.id(), libc::SIGKILL);
                    let status = p.child.wait().unwrap();
                    self.finish(&p, status.code())?;
                    self.counts.kills += 1;
                    return Ok(format!("kill {}", self.brokers[b].owner));
                }
                72..77 if !running.is_empty() => {
                    let b = running[rng.usize(..running.len())];
                    let p = self.brokers[b].proc.as_mut().unwrap();
                    signal(p.child.id(), libc::SIGTERM);
                    p.termed = true;
                    self.counts.terms += 1;
                    return Ok(format!("term {}", self.brokers[b].owner));
                }
                77..87 if dead.len() >= 2 => {
                    // Move data directories between two stopped brokers.
                    let i = rng.usize(..dead.len());
                    let mut j = rng.usize(..dead.len() - 1);
                    if j >= i {
                        j += 1;
                    }
                    let (a, b) = (dead[i], dead[j]);
                    for x in [a, b] {
                        let l = self.brokers[x].lineage;
                        let lin = &mut self.lineages[l];
                        lin.moves += 1;
                        let to = self.root.join(format!("data-{l}-{}", lin.moves));
                        if lin.path.exists() {
                            std::fs::rename(&lin.path, &to).map_err(|e| {
                                format!("move {} -> {}: {e}", lin.path.display(), to.display())
                            })?;
                        }
                        lin.path = to;
                    }
                    let la = self.brokers[a].lineage;
                    self.brokers[a].lineage = self.brokers[b].lineage;
                    self.brokers[b].lineage = la;
                    self.counts.moves += 1;
                    return Ok(format!(
                        "move data {} <-> {}",
                        self.brokers[a].owner, self.brokers[b].owner
                    ));
                }
                87..95 if !dead.is_empty() => {
                    let b = dead[rng.usize(..dead.len())];
                    let l = self.brokers[b].lineage;
                    if self.lineage_in_use(l) || !self.is_data_dir(l) {
                        continue;
                    }
                    let code = self.run_tool(l, &["drain", "--deadline", "3s"])?;
                    self.counts.drains += 1;
                    return Ok(format!("recovery drain of data-{l}: exit {code:?}"));
                }
                95..100 => {
                    let l = rng.usize(..self.lineages.len());
                    if self.lineage_in_use(l) || !self.is_data_dir(l) {
                        continue;
                    }
                    let ttl = self.ttl_ms.to_string();
                    let code = self.run_tool(
                        l,
                        // The recovery tool is never left running: its
                        // own earlier lease is fenced on purpose.
                        &[
                            "owner",
                            "take",
                            "--owner-id",
                            RECOVERY,
                            "--ttl-ms",
                            &ttl,
                            "--fence-live",
                        ],
                    )?;
                    self.counts.takes += 1;
                    return Ok(format!("owner take: exit {code:?}"));
                }
                _ => {}
            }
        }
    }

    /// The model's checks; `fin`: after the final drains.
    fn check(&mut self, fin: bool) -> Result<(), String> {
        // 1 and 2: the versions seen so far.
        {
            let h = self.history.lock().unwrap();
            if let Some(e) = h.errors.first() {
                return Err(format!("manifest versions: {e}"));
            }
            let mut owners: BTreeMap<u64, BTreeSet<String>> = BTreeMap::new();
            let mut prev: Option<(u64, u64)> = None;
            for (v, seen) in &h.versions {
                for s in seen {
                    if let Some(o) = &s.owner {
                        owners.entry(s.epoch).or_default().insert(o.clone());
                    }
                }
                // The first object of the slot, unless it was already a
                // stale slot when first seen.
                let s = &seen[0];
                if s.newest_then >= v + keep_versions() {
                    continue;
                }
                if let Some((pv, pe)) = prev
                    && s.epoch < pe
                {
                    return Err(format!(
                        "version {v} carries epoch {} ({:?}) after version {pv} with epoch {pe}: \
                         written by a fenced owner",
                        s.epoch, s.owner
                    ));
                }
                prev = Some((*v, s.epoch));
            }
            if let Some((e, o)) = owners.iter().find(|(_, o)| o.len() > 1) {
                return Err(format!("epoch {e} published by several owners: {o:?}"));
            }
        }
        // 4: the manifest's entries, never unlisted, objects all there.
        let (entries, objects) = self.rt.block_on(async {
            let ms = ManifestStore::reader(&self.store, STREAM, ManifestOptions::default())
                .map_err(|e| e.to_string())?;
            let entries = match ms.load().await.map_err(|e| format!("load manifest: {e}"))? {
                Some(m) => ms
                    .all_segments(&m)
                    .await
                    .map_err(|e| format!("manifest entries: {e}"))?,
                None => Vec::new(),
            };
            let prefix =
                keys::segments_prefix(self.store.prefix(), STREAM).map_err(|e| e.to_string())?;
            let objs: Vec<object_store::ObjectMeta> = self
                .store
                .object_store()
                .list(Some(&prefix))
                .try_collect()
                .await
                .map_err(|e| format!("list segments: {e}"))?;
            let objects: BTreeSet<String> =
                objs.into_iter().map(|m| m.location.to_string()).collect();
            Ok::<_, String>((entries, objects))
        })?;
        let listed: BTreeMap<SegmentId, &manifest::SegmentEntry> =
            entries.iter().map(|e| (e.id, e)).collect();
        for (id, (sum, key)) in &self.ever_listed {
            match listed.get(id) {
                Some(e) if e.key_sum() == *sum => {}
                other => {
                    return Err(format!(
                        "segment {id} ({key}) was in the manifest and now is {:?}",
                        other.map(|e| &e.key)
                    ));
                }
            }
        }
        for e in &entries {
            if !objects.contains(&ObjPath::from(e.key.as_str()).to_string()) {
                return Err(format!(
                    "manifest lists segment {} but its object {} is gone from the store",
                    e.id, e.key
                ));
            }
            if keys::parse_segment_key(self.store.prefix(), &ObjPath::from(e.key.as_str()))
                .is_none_or(|(s, id, sum)| s != STREAM || id != e.id || sum != e.key_sum())
            {
                return Err(format!(
                    "manifest entry {} has a key that does not name it",
                    e.key
                ));
            }
            self.ever_listed.insert(e.id, (e.key_sum(), e.key.clone()));
        }
        // 3: per data directory.
        for l in 0..self.lineages.len() {
            // A process (running or stopped) may be mid-write: its data
            // directory is checked once it has ended.
            if self.lineage_in_use(l) && !fin {
                continue;
            }
            // A stuck directory still holds its pending entries locally.
            let fin_l = fin && !self.lineages[l].stuck;
            self.check_lineage(l, &entries, fin_l)?;
        }
        Ok(())
    }

    /// The offsets a committed segment's object holds, as sorted
    /// contiguous runs (each offset once per run; a repeat starts a run).
    fn offset_runs(&mut self, e: &manifest::SegmentEntry) -> Result<Vec<(u64, u64)>, String> {
        let k = (e.id, e.key_sum());
        if let Some(r) = self.run_cache.get(&k) {
            return Ok(r.clone());
        }
        let key = ObjPath::from(e.key.as_str());
        let bytes = self.rt.block_on(async {
            let got = self
                .store
                .object_store()
                .get(&key)
                .await
                .map_err(|x| format!("read {key}: {x}"))?;
            got.bytes().await.map_err(|x| format!("read {key}: {x}"))
        })?;
        let path = self.root.join(format!("runs-{}.seg", e.id.0));
        std::fs::write(&path, &bytes).map_err(|x| format!("write {}: {x}", path.display()))?;
        let seg = SealedSegment::open(&path).map_err(|x| format!("object {key}: {x}"))?;
        let mut offsets: Vec<u64> = seg.entries().iter().map(|en| en.offset).collect();
        drop(seg);
        let _ = std::fs::remove_file(&path);
        offsets.sort_unstable();
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for o in offsets {
            match runs.last_mut() {
                Some((_, b)) if *b + 1 == o => *b = o,
                _ => runs.push((o, o)),
            }
        }
        self.run_cache.insert(k, runs.clone());
        Ok(runs)
    }

    fn check_lineage(
        &mut self,
        l: usize,
        entries: &[manifest::SegmentEntry],
        fin: bool,
    ) -> Result<(), String> {
        let data = self.lineages[l].path.clone();
        let name = format!("data-{l} ({})", data.display());
        // Pending ranges in the data directory.
        let mut pending: Vec<(u64, u64)> = Vec::new();
        let mut max_sealed: Option<u64> = None;
        let mut journal_committed: Vec<(SegmentId, KeySum)> = Vec::new();
        if tierindex::journal::log_path(&data).exists() {
            let view = Journal::open_read_only(&data)
                .map_err(|e| format!("{name}: journal does not replay: {e}"))?
                .0;
            for (id, rec) in view.segments() {
                let m = &rec.meta;
                if rec.state == SegmentState::Quarantined {
                    return Err(format!(
                        "{name}: segment {id} quarantined: {:?}",
                        rec.reason
                    ));
                }
                self.lineages[l]
                    .segs
                    .insert((*id, m.key_sum()), (m.min_offset, m.max_offset));
                if m.item_count > 0 {
                    max_sealed = max_sealed.max(Some(m.max_offset));
                }
                if matches!(rec.state, SegmentState::Committed | SegmentState::Released) {
                    journal_committed.push((*id, m.key_sum()));
                } else if rec.state == SegmentState::Resealed {
                    // Its entries are in the segments it was resealed
                    // into (committed or pending there), not here.
                } else if m.item_count > 0 {
                    pending.push((m.min_offset, m.max_offset));
                    if fin {
                        return Err(format!(
                            "{name}: segment {id} still {:?} after the final drain",
                            rec.state
                        ));
                    }
                }
            }
        }
        let mut active = false;
        let segdir = data.join(tierindex::datadir::SEGMENTS_DIR);
        if let Ok(rd) = std::fs::read_dir(&segdir) {
            for e in rd.filter_map(|e| e.ok()) {
                let n = e.file_name().to_string_lossy().into_owned();
                if let Some(stem) = n.strip_suffix(".active") {
                    active = true;
                    // What an active file holds counts as pending (read as
                    // the next start reads it). A reseal copies a segment's
                    // entries into the active segment, so an active file
                    // may hold offsets below the sealed ones' highest: the
                    // floor below alone would miss them.
                    if let (Ok(id), Ok(bytes)) = (stem.parse::<u64>(), std::fs::read(e.path()))
                        && let Ok(scan) =
                            tierindex::segment::salvage::scan_active(&bytes, SegmentId(id), None)
                    {
                        let mut offs: Vec<u64> =
                            scan.items.iter().map(|(_, en)| en.offset).collect();
                        offs.sort_unstable();
                        offs.dedup();
                        for o in offs {
                            match pending.last_mut() {
                                Some((_, b)) if *b + 1 == o => *b = o,
                                _ => pending.push((o, o)),
                            }
                        }
                    }
                } else if n.ends_with(".seg")
                    && let Ok(s) = SealedSegment::open(&e.path())
                {
                    let m = s.meta();
                    if m.item_count > 0 {
                        pending.push((m.min_offset, m.max_offset));
                        max_sealed = max_sealed.max(Some(m.max_offset));
                    }
                }
            }
        }
        // Committed entries of this directory, each offset at most once.
        // A segment holds one contiguous offset range, unless entries of a
        // resealed segment were copied into it: then its exact runs.
        let mut committed: Vec<(u64, u64, SegmentId)> = Vec::new();
        for e in entries {
            if !self.lineages[l].segs.contains_key(&(e.id, e.key_sum())) {
                continue;
            }
            if e.item_count == 0 || e.max_offset.saturating_sub(e.min_offset) + 1 == e.item_count {
                committed.push((e.min_offset, e.max_offset, e.id));
            } else {
                for (a, b) in self.offset_runs(e)? {
                    committed.push((a, b, e.id));
                }
            }
        }
        committed.sort();
        for w in committed.windows(2) {
            if let [a, b] = w
                && b.0 <= a.1
            {
                return Err(format!(
                    "{name}: offsets {}..={} are committed twice (segments {} and {})",
                    b.0,
                    a.1.min(b.1),
                    a.2,
                    b.2
                ));
            }
        }
        let listed: BTreeSet<(SegmentId, KeySum)> =
            entries.iter().map(|e| (e.id, e.key_sum())).collect();
        if let Some((id, _)) = journal_committed.iter().find(|k| !listed.contains(k)) {
            return Err(format!(
                "{name}: segment {id} is committed in the journal but not in the manifest"
            ));
        }
        // Every acknowledged offset is committed or pending.
        let mut have: Vec<(u64, u64)> = committed.iter().map(|(a, b, _)| (*a, *b)).collect();
        if !fin {
            have.extend(pending.iter().copied());
        }
        have.sort();
        let floor = if active && !fin {
            Some(max_sealed.map_or(0, |m| m + 1))
        } else {
            None
        };
        for &(s, e) in &self.lineages[l].acked {
            let mut o = s;
            while o < e {
                if floor.is_some_and(|f| o >= f) {
                    break;
                }
                // The range that covers o, if any.
                match have.iter().find(|(a, b)| *a <= o && o <= *b) {
                    Some((_, b)) => o = b + 1,
                    None => {
                        return Err(format!(
                            "{name}: offset {o} was acknowledged ({s}..{e}) but is neither \
                             committed nor pending{}",
                            if fin { " after the final drain" } else { "" }
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// Stop everything: resume the paused, SIGTERM, wait (SIGKILL after 30 s).
    fn stop_all(&mut self) -> Result<(), String> {
        for b in 0..BROKERS {
            if let Some(p) = &mut self.brokers[b].proc {
                if p.paused_since.take().is_some() {
                    signal(p.child.id(), libc::SIGCONT);
                }
                if !p.termed {
                    signal(p.child.id(), libc::SIGTERM);
                    p.termed = true;
                }
            }
        }
        for b in 0..BROKERS {
            if let Some(mut p) = self.brokers[b].proc.take() {
                let until = Instant::now() + Duration::from_secs(30);
                let status = loop {
                    if let Some(s) = p.child.try_wait().unwrap() {
                        break s;
                    }
                    if Instant::now() > until {
                        signal(p.child.id(), libc::SIGKILL);
                        break p.child.wait().unwrap();
                    }
                    std::thread::sleep(Duration::from_millis(10));
                };
                self.finish(&p, status.code())?;
            }
        }
        Ok(())
    }

    /// Drain every data directory with the recovery tool until each exits
    /// 0. A directory whose drain cannot finish because a pending segment's
    /// id is taken in the manifest by another directory's segment is marked
    /// stuck (its entries must still be pending locally) and returned.
    fn final_drains(&mut self) -> Result<Vec<String>, String> {
        let mut stuck = Vec::new();
        for l in 0..self.lineages.len() {
            if !self.is_data_dir(l) {
                continue;
            }
            let mut tries = 0;
            loop {
                tries += 1;
                let code = self.run_tool(l, &["drain", "--deadline", "10s"])?;
                self.counts.drains += 1;
                if code == Some(0) {
                    break;
                }
                let err = self
                    .root
                    .join(format!("run-{:05}-{RECOVERY}.err", self.runs));
                let err = std::fs::read_to_string(&err).unwrap_or_default();
                if let Some(line) = err
                    .lines()
                    .find(|x| x.contains("is already in the manifest"))
                {
                    self.lineages[l].stuck = true;
                    stuck.push(format!(
                        "data-{l}: its drain cannot finish: a pending segment's id is taken in \
                         the manifest by another data directory's segment: {}",
                        line.split("error=").nth(1).unwrap_or(line)
                    ));
                    break;
                }
                if tries >= 10 {
                    return Err(format!("final drain of data-{l} exited {code:?} 10 times"));
                }
                // A lease still live (or a fenced run): wait it out.
                std::thread::sleep(Duration::from_millis(self.ttl_ms * 2));
            }
        }
        Ok(stuck)
    }
}

#[test]
fn brokers_and_recovery_tool_competing_for_one_stream() {
    let steps = env_u64("TIERINDEX_OWNERSHIP_STEPS").unwrap_or(12);
    let seed = env_u64("TIERINDEX_OWNERSHIP_SEED").unwrap_or_else(|| fastrand::u64(..));
    let ttl_ms = env_u64("TIERINDEX_OWNERSHIP_TTL_MS").unwrap_or(1000);
    let mut rng = fastrand::Rng::with_seed(seed);
    let root = tempfile::Builder::new()
        .prefix("tierindex-ownership-")
        .tempdir()
        .unwrap();
    let target = Target::from_env(root.path());
    let store = target.store();
    let history = Arc::new(Mutex::new(History::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let poller = {
        let (s, h, st) = (store.clone(), history.clone(), stop.clone());
        std::thread::spawn(move || poll_versions(s, h, st))
    };
    eprintln!(
        "ownership-campaign: seed={seed} steps={steps} store={} ({}) ttl={ttl_ms}ms dir={}",
        target.kind,
        target.url,
        root.path().display()
    );
    let mut c = Campaign {
        root: root.path().to_path_buf(),
        ttl_ms,
        lineages: (0..BROKERS)
            .map(|l| Lineage {
                path: root.path().join(format!("data-{l}-0")),
                moves: 0,
                acked: Vec::new(),
                segs: BTreeMap::new(),
                stuck: false,
            })
            .collect(),
        brokers: (0..BROKERS)
            .map(|b| Broker {
                owner: format!("broker-{b}"),
                lineage: b,
                proc: None,
            })
            .collect(),
        target,
        run_cache: BTreeMap::new(),
        counts: Counts::default(),
        runs: 0,
        store,
        rt: tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap(),
        history: history.clone(),
        ever_listed: BTreeMap::new(),
    };
    let started = Instant::now();
    let mut violation: Option<String> = None;
    let mut stuck: Vec<String> = Vec::new();
    let mut last = String::new();
    for k in 0..steps {
        let r = c.step(&mut rng).and_then(|what| {
            last = what;
            std::thread::sleep(Duration::from_millis(rng.u64(50..=ttl_ms)));
            c.reap()?;
            c.check(false)
        });
        c.counts.steps += 1;
        if let Err(e) = r {
            violation = Some(format!("step {k} ({last}): {e}"));
            break;
        }
        if (k + 1) % 100 == 0 {
            eprintln!(
                "ownership-campaign: progress steps={} elapsed={:.1}s",
                k + 1,
                started.elapsed().as_secs_f64()
            );
        }
    }
    if violation.is_none() {
        let r = c
            .stop_all()
            .and_then(|()| c.check(false))
            .and_then(|()| c.final_drains())
            .and_then(|s| {
                stuck = s;
                // Let the poller see the last versions.
                std::thread::sleep(Duration::from_millis(200));
                c.check(true)
            });
        if let Err(e) = r {
            violation = Some(format!("final: {e}"));
        }
    } else {
        let _ = c.stop_all();
    }
    stop.store(true, Ordering::SeqCst);
    poller.join().unwrap();
    let h = history.lock().unwrap();
    let mut epochs: BTreeMap<u64, Option<String>> = BTreeMap::new();
    let mut seen_versions = 0usize;
    for seen in h.versions.values() {
        seen_versions += seen.len();
        for s in seen {
            let o = epochs.entry(s.epoch).or_default();
            if o.is_none() {
                o.clone_from(&s.owner);
            }
        }
    }
    let newest = h.versions.keys().next_back().copied().unwrap_or(0);
    let missed = (1..=newest).filter(|v| !h.versions.contains_key(v)).count();
    let owners: Vec<&Option<String>> = epochs.values().collect();
    let takeovers = owners
        .windows(2)
        .filter(|w| matches!(w, [a, b] if a != b))
        .count();
    let acked: u64 = c
        .lineages
        .iter()
        .flat_map(|l| l.acked.iter().map(|(s, e)| e - s))
        .sum();
    // Segments whose id another directory had committed (sealed while
    // ownership was pending), copied into a new segment.
    let resealed: usize = c
        .lineages
        .iter()
        .filter(|l| tierindex::journal::log_path(&l.path).exists())
        .filter_map(|l| Journal::open_read_only(&l.path).ok())
        .map(|(v, _)| {
            v.segments()
                .values()
                .filter(|r| r.state == SegmentState::Resealed)
                .count()
        })
        .sum();
    let n = &c.counts;
    eprintln!(
        "ownership-campaign: steps={} starts={} pauses={} resumes={} kills={} sigterms={} \
         moves={} recovery-drains={} owner-takes={} epochs={} takeovers={takeovers} \
         fenced-attempts={} refused-opens={} store-timeouts={} stale-slot-writes={} versions-seen={seen_versions} \
         versions-missed={missed} committed-segments={} resealed-segments={resealed} acknowledged-entries={acked} \
         violations={} unpublishable-data-dirs={} seed={seed} store={} elapsed={:.1}s",
        n.steps,
        n.starts,
        n.pauses,
        n.resumes,
        n.kills,
        n.terms,
        n.moves,
        n.drains,
        n.takes,
        epochs.len(),
        n.fenced,
        n.refused,
        n.store_timeouts,
        h.void_slots,
        c.ever_listed.len(),
        u8::from(violation.is_some()),
        stuck.len(),
        c.target.kind,
        started.elapsed().as_secs_f64()
    );
    eprintln!("ownership-campaign: exits {:?}", n.exits);
    drop(h);
    crash_model::remove_bin_copy();
    if let Some(v) = violation {
        let kept = root.keep();
        panic!("violation (directory kept: {}): {v}", kept.display());
    }
    if !stuck.is_empty() {
        // Safety held (every entry is committed or still pending), but
        // acknowledged entries can never reach the manifest: a failure.
        let kept = root.keep();
        panic!(
            "acknowledged entries that can never be published (directory kept: {}):\n{}",
            kept.display(),
            stuck.join("\n")
        );
    }
}
