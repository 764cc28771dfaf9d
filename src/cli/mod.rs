//! The `tierindex` command line: the recovery tool and the demo broker.
//!
//! Every command that touches a data directory or a store takes
//! `--data-dir` / `--store` (or `TIERINDEX_DATA_DIR` / `TIERINDEX_STORE`, or
//! a `--config` TOML file). Exit codes are in [`crate::lifecycle`].

mod demo;
mod drain;
mod identity;
mod local;
mod output;
mod quarantine;
mod remote;
mod table;

use std::path::PathBuf;

use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use serde::Serialize;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::lifecycle::{EXIT_ERROR, EXIT_USAGE};

pub use output::stdout_closed;
pub(crate) use output::{note, out_line};

#[derive(Parser, Debug)]
#[command(
    name = "tierindex",
    version,
    about = "Tiered-storage index uploader and recovery tool"
)]
pub struct Cli {
    /// Data directory (segments, journal, quarantine).
    #[arg(
        long,
        global = true,
        env = "TIERINDEX_DATA_DIR",
        hide_env_values = true
    )]
    pub data_dir: Option<PathBuf>,
    /// Store URL: file:///abs/path, s3://bucket/prefix, memory://.
    // hide_env_values: `--help` would otherwise print the variable's value,
    // and a URL is where a credential ends up when one is misplaced.
    #[arg(long, global = true, env = "TIERINDEX_STORE", hide_env_values = true)]
    pub store: Option<String>,
    /// S3 endpoint, http://host:port (MinIO, Garage, ...); else AWS_ENDPOINT_URL.
    #[arg(
        long,
        global = true,
        env = "TIERINDEX_ENDPOINT",
        hide_env_values = true
    )]
    pub endpoint: Option<String>,
    /// TOML configuration file (flags and variables override it).
    #[arg(long, global = true, env = "TIERINDEX_CONFIG", hide_env_values = true)]
    pub config: Option<PathBuf>,
    /// Stream name (part of every remote key).
    #[arg(long, global = true, env = "TIERINDEX_STREAM", hide_env_values = true)]
    pub stream: Option<String>,
    /// The remote manifest (ownership, lease, fencing of a second writer):
    /// on by default. `--manifest false` is single-writer mode, an explicit
    /// weaker choice (nothing fences a second writer of the stream; needed
    /// on a store without conditional creates, e.g. Garage). Overrides the
    /// config file's `manifest`.
    #[arg(long, global = true, env = "TIERINDEX_MANIFEST", value_name = "BOOL")]
    pub manifest: Option<bool>,
    /// Machine-readable output.
    #[arg(long, global = true)]
    pub json: bool,
    /// Use --store (or --stream) although the data directory's IDENTITY
    /// records another one.
    #[arg(long, global = true)]
    pub store_override: bool,
    /// Open the data directory in the mode --manifest names although its
    /// IDENTITY records the other one, and record the new mode (segments
    /// committed in one mode are not in the other's record: see
    /// docs/crash-safety.md "Switching modes").
    #[arg(long, global = true)]
    pub switch_mode: bool,
    #[command(subcommand)]
    pub cmd: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Simulated broker on the embedded default store: append, seal, upload;
    /// Ctrl-C / SIGTERM drains and prints the report.
    Demo(demo::DemoArgs),
    /// Upload and verify everything pending in a data directory whose broker
    /// is down, then exit (0 drained, 3 pending, 4 needs an operator).
    Drain(drain::DrainArgs),
    /// Per-segment state from the journal, totals, oldest pending.
    Status {
        /// Also show the remote state: the stream's manifest (version,
        /// epoch, owner and lease, committed count, damage notes) and, per
        /// journal segment, whether the manifest lists it and its object is
        /// in the bucket listing (one manifest read and one LIST; read only).
        #[arg(long)]
        remote: bool,
    },
    /// Re-check every verified/committed segment against the store.
    Verify,
    /// Decode a segment or journal file.
    Inspect { file: PathBuf },
    /// Start-up checks without uploading; --repair truncates/quarantines.
    Fsck {
        /// Truncate torn tails, quarantine bad files, remove finished leftovers.
        #[arg(long)]
        repair: bool,
    },
    /// Find entries for KEY in local segments (and remote ones with --remote).
    Lookup {
        /// The message key (bytes of the string).
        key: String,
        /// Earliest timestamp, ms since the epoch (inclusive).
        #[arg(long, default_value_t = 0)]
        from: u64,
        /// Latest timestamp, ms since the epoch (inclusive).
        #[arg(long, default_value_t = u64::MAX)]
        to: u64,
        /// Also search committed remote segments not held locally (the
        /// manifest's list with `manifest = true`, else the journal's
        /// released segments), by range GETs.
        #[arg(long)]
        remote: bool,
    },
    /// The stream's remote manifest owner: epoch, lease, committed count;
    /// take (fences the current owner once its lease has expired) or
    /// release ownership.
    Owner {
        #[command(subcommand)]
        action: Option<OwnerAction>,
    },
    /// Compare the journal, the remote manifest and a LIST of the stream's
    /// segment objects; report every disagreement (exit 4 when something is
    /// lost or left unrepaired). --repair re-uploads from local copies and
    /// restores the manifest; objects of unknown origin are reported, never
    /// deleted (deletions need proof: docs/format/remote-layout.md).
    Reconcile {
        /// Repair what can be repaired (the broker must be down).
        #[arg(long)]
        repair: bool,
        /// Orphans younger than this many ms are kept (default 1 h; at most
        /// 365 days).
        #[arg(long, default_value_t = 3_600_000,
              value_parser = clap::value_parser!(u64).range(0..=365 * 86_400_000))]
        grace_ms: u64,
        /// Also read every journaled object back in full (CRC check).
        #[arg(long)]
        deep: bool,
        #[command(flatten)]
        accept: AcceptLoss,
    },
    /// What is quarantined and why; retry a quarantined file once its
    /// cause is gone.
    Quarantine {
        #[command(subcommand)]
        action: quarantine::QuarantineAction,
    },
    /// Probe a store: conditional writes, multipart, range GET, metadata.
    StoreCheck {
        /// Store URL (default: --store / the config's store).
        url: Option<String>,
    },
}

/// `reconcile --accept-loss`: the operator's acceptance of a loss.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct AcceptLoss {
    /// Accept the loss of this segment (repeatable; with --repair --deep):
    /// recorded in the manifest only if this run reads its object in full,
    /// finds it missing or damaged and holds no intact local copy. Readers
    /// go on skipping it; reports then name it as an accepted loss instead
    /// of exiting 4 on every run. A copy found later still repairs it.
    #[arg(long, value_name = "SEGMENT_ID")]
    pub accept_loss: Vec<u64>,
    /// Why the loss is accepted (kept in the manifest, at most 512 bytes).
    #[arg(long, requires = "accept_loss")]
    pub reason: Option<String>,
}

#[derive(Subcommand, Debug, Clone)]
pub enum OwnerAction {
    /// Show the manifest's epoch, version, lease and committed segments
    /// (the default).
    Show,
    /// Take ownership: epoch + 1, a lease for --ttl-ms. Refused while
    /// another owner's lease is live. Fences the previous owner.
    Take {
        /// Owner id (default: the config's `owner_id`, else host + data dir).
        #[arg(long)]
        owner_id: Option<String>,
        /// Lease length in ms (default: the config's `lease_ttl_ms`;
        /// 100 ms to 24 h).
        #[arg(long, value_parser = clap::value_parser!(u64).range(
            crate::config::LEASE_TTL_MS_MIN..=crate::config::LEASE_TTL_MS_MAX))]
        ttl_ms: Option<u64>,
        /// Act even though --owner-id's own lease is live and no data
        /// directory lock shows its broker is down: a broker still running
        /// under that id is fenced (it stops at its next write, exit 6).
        #[arg(long)]
        fence_live: bool,
    },
    /// Release ownership held by --owner-id (refused if someone else holds
    /// a live lease, or if that id's own lease is live and its broker is
    /// not shown down by its data directory's lock: see --fence-live).
    Release {
        #[arg(long)]
        owner_id: Option<String>,
        /// As for `take`: release a live lease of that id anyway, fencing
        /// a broker still running under it.
        #[arg(long)]
        fence_live: bool,
    },
}

impl Cli {
    /// Build the effective config: file, then flags/variables.
    /// Whether `--manifest` or the config file's `manifest` key chose the
    /// mode (else an existing data directory's recorded mode is used).
    pub fn mode_given(&self) -> Result<bool> {
        Ok(self.manifest.is_some()
            || match &self.config {
                Some(p) => Config::from_file_keys(p)?.1.iter().any(|k| k == "manifest"),
                None => false,
            })
    }

    pub fn config(&self) -> Result<Config> {
        let (mut c, file_keys) = match &self.config {
            Some(p) => Config::from_file_keys(p)?,
            None => (Config::default(), Vec::new()),
        };
        if let Some(d) = &self.data_dir {
            c.data_dir = d.clone();
        }
        if let Some(s) = &self.store {
            c.store = Some(s.clone());
        }
        if let Some(e) = &self.endpoint {
            c.endpoint = Some(e.clone());
        }
        let mode_given = self.manifest.is_some() || file_keys.iter().any(|k| k == "manifest");
        if let Some(m) = self.manifest {
            c.manifest = m;
        }
        if self.switch_mode {
            c.switch_mode = true;
        }
        if self.store_override {
            c.store_override = true;
        }
        let stream_given = self.stream.is_some() || c.stream != Config::default().stream;
        if let Some(s) = &self.stream {
            c.stream = s.clone();
        }
        let mut intent = identity::CliIntent {
            mode_given,
            // The flag or the config file's key.
            store_override: c.store_override,
            ..self.identity_intent(stream_given)
        };
        // `owner` on a data directory acts on its stream in its store: the
        // recorded ones, as for the inspecting commands (it used the
        // default store beside the working directory, and `take` created a
        // manifest there: helper-49). Without one it needs --store.
        if matches!(self.cmd, Command::Owner { .. }) && crate::datadir::is_data_dir(&c.data_dir) {
            intent.inspects = true;
            intent.needs_store = true;
        }
        identity::resolve_cli(&mut c, intent)?;
        c.validate()?;
        Ok(c)
    }

    /// What the command does with the data directory and the store, for
    /// the identity check (`identity::resolve_cli`).
    fn identity_intent(&self, stream_given: bool) -> identity::CliIntent {
        let (inspects, needs_store) = match &self.cmd {
            Command::Drain(_) | Command::Verify | Command::Reconcile { .. } => (true, true),
            Command::Status { remote } | Command::Lookup { remote, .. } => (true, *remote),
            Command::Fsck { .. } => (true, false),
            _ => (false, false),
        };
        identity::CliIntent {
            inspects,
            needs_store,
            broker_run: matches!(self.cmd, Command::Demo(_)),
            stream_given,
            store_override: self.store_override,
            mode_given: false,
        }
    }

    fn require_data_dir(&self) -> Result<()> {
        if self.data_dir.is_none() && self.config.is_none() {
            return Err(Error::InvalidInput(
                "--data-dir (or TIERINDEX_DATA_DIR, or a --config file) is required".into(),
            ));
        }
        Ok(())
    }
}

/// Set once a command printed its JSON document: an error after it goes
/// to stderr only, so stdout stays one document.
static JSON_EMITTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// A command that fails: its message on stderr and, with `--json` and no
/// document printed yet, `{"error": ..., "exit": ...}` on stdout, so a
/// script reading stdout always gets one document (helper-60: it got
/// nothing). Returns `code`.
fn fail(json: bool, code: i32, msg: &str) -> i32 {
    note(&format!("tierindex: {msg}"));
    if json && !JSON_EMITTED.load(std::sync::atomic::Ordering::Relaxed) {
        let doc = serde_json::json!({ "error": crate::error::scrub(msg), "exit": code });
        if let Ok(s) = serde_json::to_string_pretty(&doc) {
            out_line(&s);
        }
    }
    code
}

/// Print `v` as JSON or with `human` on stdout. A closed stdout is noted
/// (see [`stdout_closed`]), never a panic.
pub(crate) fn emit<T: Serialize>(json: bool, v: &T, human: impl FnOnce(&T) -> String) {
    if json {
        match serde_json::to_string_pretty(v) {
            Ok(s) => {
                // Under stdout's (reentrant) lock, which a second signal's
                // forced exit takes before it looks at the flag: it prints
                // its document before this one, or not at all.
                let _out = std::io::stdout().lock();
                JSON_EMITTED.store(true, std::sync::atomic::Ordering::Relaxed);
                crate::lifecycle::FORCED_EXIT_JSON
                    .store(false, std::sync::atomic::Ordering::Relaxed);
                out_line(&s);
            }
            Err(e) => note(&format!("tierindex: cannot encode output: {e}")),
        }
    } else {
        out_line(&human(v));
    }
}

/// An input error's message without its kind's prefix, to follow a flag's
/// name.
fn bare_message(e: Error) -> String {
    match e {
        Error::InvalidInput(m) => m,
        other => other.to_string(),
    }
}

/// Where a flag's value came from, for error messages: the flag or its
/// environment variable.
fn field_name(
    m: &clap::ArgMatches,
    id: &str,
    flag: &'static str,
    var: &'static str,
) -> &'static str {
    match m.value_source(id) {
        Some(ValueSource::EnvVariable) => var,
        _ => flag,
    }
}

impl Cli {
    /// Validates the values of flags and `TIERINDEX_*` variables that clap
    /// takes as plain strings (URLs, the stream, the data directory), so a
    /// bad one is a usage error (exit 2) naming the flag or variable, before
    /// anything is opened. Values from a `--config` file are checked by
    /// [`Config::validate`] (exit 1, naming the key).
    fn check_flags(&self, m: &clap::ArgMatches) -> Result<()> {
        use crate::remote::url::{parse_endpoint, parse_store};
        if let Some(s) = &self.store {
            parse_store(field_name(m, "store", "--store", "TIERINDEX_STORE"), s)?;
        }
        if let Some(e) = &self.endpoint {
            parse_endpoint(
                field_name(m, "endpoint", "--endpoint", "TIERINDEX_ENDPOINT"),
                e,
            )?;
        }
        if let Some(d) = &self.data_dir
            && d.as_os_str().is_empty()
        {
            return Err(Error::InvalidInput(format!(
                "{} is empty: name the data directory",
                field_name(m, "data_dir", "--data-dir", "TIERINDEX_DATA_DIR")
            )));
        }
        if let Some(st) = &self.stream {
            crate::remote::keys::validate_stream(st).map_err(|e| {
                Error::InvalidInput(format!(
                    "{}: {}",
                    field_name(m, "stream", "--stream", "TIERINDEX_STREAM"),
                    bare_message(e)
                ))
            })?;
        }
        match &self.cmd {
            Command::StoreCheck { url: Some(u) } => {
                parse_store("store-check URL", u)?;
            }
            Command::Demo(a) => {
                if let Some(addr) = &a.metrics_addr {
                    crate::config::check_listen_addr("--metrics-addr", addr)?;
                }
                // Lines and a document on one stdout are neither (helper-61).
                if a.print_flushed && self.json {
                    return Err(Error::InvalidInput(
                        "--print-flushed prints `start`/`flushed` lines on stdout and --json one \
                         JSON document there: choose one"
                            .into(),
                    ));
                }
            }
            // A malformed flag value is a usage error (exit 2), as the
            // exit-code table says; it was refused later, with exit 1
            // (helper-60).
            Command::Owner {
                action:
                    Some(
                        OwnerAction::Take {
                            owner_id: Some(id), ..
                        }
                        | OwnerAction::Release {
                            owner_id: Some(id), ..
                        },
                    ),
            } => {
                crate::remote::lease::validate_owner(id)
                    .map_err(|e| Error::InvalidInput(format!("--owner-id: {}", bare_message(e))))?;
            }
            // An inverted range matches nothing: "0 hits" would read as
            // "not there".
            Command::Lookup { from, to, .. } if from > to => {
                return Err(Error::InvalidInput(format!(
                    "--from {from} is after --to {to}: the range is empty (both are \
                     inclusive, in ms since the epoch)"
                )));
            }
            _ => {}
        }
        Ok(())
    }
}

/// Logs go to stderr. The filter comes from `TIERINDEX_LOG`, else
/// `RUST_LOG`, else `warn`; colour only when stderr is a terminal and
/// `NO_COLOR` is unset or empty (no escape codes in a redirected log).
fn init_logging() {
    use std::io::IsTerminal as _;
    let from = ["TIERINDEX_LOG", "RUST_LOG"]
        .into_iter()
        .find_map(|var| match std::env::var(var) {
            Ok(v) if !v.trim().is_empty() => Some((var, v)),
            _ => None,
        });
    let filter = match from {
        Some((var, spec)) => match tracing_subscriber::EnvFilter::try_new(&spec) {
            Ok(f) => f,
            Err(e) => {
                note(&format!(
                    "tierindex: {var} is not a valid log filter ({e}); logging at warn"
                ));
                tracing_subscriber::EnvFilter::new("warn")
            }
        },
        None => tracing_subscriber::EnvFilter::new("warn"),
    };
    let colour = std::io::stderr().is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        // A closed stderr must not turn into a panic inside the logger.
        .log_internal_errors(false)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Entry point of the binary; returns the process exit code. When stdout
/// was closed by its reader, [`stdout_closed`] is true afterwards and the
/// binary ends itself by SIGPIPE, as Unix tools do.
/// The variables the global flags read, with their flags.
const FLAG_VARS: &[(&str, &str)] = &[
    ("TIERINDEX_DATA_DIR", "--data-dir"),
    ("TIERINDEX_STORE", "--store"),
    ("TIERINDEX_ENDPOINT", "--endpoint"),
    ("TIERINDEX_CONFIG", "--config"),
    ("TIERINDEX_STREAM", "--stream"),
    ("TIERINDEX_MANIFEST", "--manifest"),
];

/// A flag's variable that is set but empty while the flag itself is not
/// given (then clap reads the variable): what to say instead of clap's
/// error about the flag.
fn empty_variable() -> Option<String> {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    FLAG_VARS.iter().find_map(|(var, flag)| {
        let empty = std::env::var_os(var).is_some_and(|v| v.is_empty());
        let given = args.iter().any(|a| {
            a.to_str()
                .is_some_and(|a| a == *flag || a.starts_with(&format!("{flag}=")))
        });
        (empty && !given).then(|| {
            format!("{var} is set but empty (it stands for {flag}): unset it or give it a value")
        })
    })
}

pub fn main() -> i32 {
    // Registered before anything can fail: an error about a mistyped URL
    // comes before any store (which registers them too) is built.
    if let Ok(v) = std::env::var("AWS_ACCESS_KEY_ID") {
        crate::error::register_key_id(&v);
    }
    for var in ["AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"] {
        if let Ok(v) = std::env::var(var) {
            crate::error::register_secret(&v);
        }
    }
    let parsed = Cli::command()
        .try_get_matches()
        .and_then(|m| Cli::from_arg_matches(&m).map(|c| (c, m)));
    let (cli, matches) = match parsed {
        Ok(c) => c,
        Err(e) => {
            // clap did not parse the flags: `--json` anywhere among them
            // still asks for a document.
            let json = e.use_stderr() && std::env::args_os().any(|a| a == "--json");
            // clap names the flag an empty variable stands for ("a value is
            // required for '--data-dir'"), not the variable that is empty.
            if e.use_stderr()
                && let Some(why) = empty_variable()
            {
                return fail(json, EXIT_USAGE, &why);
            }
            if json {
                // clap's whole message (what is missing, the accepted
                // values, a similar name), not only its first line.
                let text = e.render().to_string();
                let msg = text.trim().trim_start_matches("error: ");
                return fail(json, EXIT_USAGE, msg);
            }
            let _ = e.print();
            return if e.use_stderr() { EXIT_USAGE } else { 0 };
        }
    };
    if let Err(e) = cli.check_flags(&matches) {
        return fail(cli.json, EXIT_USAGE, &e.to_string());
    }
    if cli.json {
        crate::lifecycle::FORCED_EXIT_JSON.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    init_logging();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            return fail(
                cli.json,
                EXIT_ERROR,
                &format!("cannot start the async runtime: {e}"),
            );
        }
    };
    let res = rt.block_on(run(&cli));
    // Do not wait for stray blocking tasks (a hung disk) at exit.
    rt.shutdown_timeout(std::time::Duration::from_millis(100));
    match res {
        Ok(code) => code,
        // Damage that stopped a check (a journal damaged other than by a
        // torn tail): what `fsck` and `status` exist to find, so 4 as for
        // every other damage they find (helper-74: 1, "a fatal error"). A
        // command that cannot run on it (`drain`, `inspect` of one file)
        // keeps 1; the message says what to run.
        Err(e @ crate::error::Error::Corrupt { .. })
            if matches!(cli.cmd, Command::Fsck { .. } | Command::Status { .. }) =>
        {
            fail(
                cli.json,
                crate::lifecycle::EXIT_NEEDS_OPERATOR,
                &e.to_string(),
            )
        }
        Err(e) => fail(cli.json, EXIT_ERROR, &with_advice(&e)),
    }
}

/// `e`'s message, and for a full file system what to do (helper-74 F4: a
/// `drain` on a full data disk stopped at its first allocation with only
/// "No space left on device"; an operator must not make room by deleting
/// segment or journal files, which hold entries not uploaded yet).
fn with_advice(e: &crate::error::Error) -> String {
    match e {
        crate::error::Error::Io { path, source, .. }
            if source.raw_os_error() == Some(libc::ENOSPC) =>
        {
            format!(
                "{e}\n  the file system holding {} is full. Free space on it and run the \
                 command again; nothing acknowledged was lost. Do not make room by deleting \
                 files under segments/ or journal/: they hold entries not uploaded yet (a \
                 drain with release_after_commit = true in its config file frees them once \
                 they are committed; it creates no new active segment file)",
                path.display()
            )
        }
        // A `file://` store whose directory holds an entry the listing
        // cannot walk (a symbolic link loop, a directory it may not read):
        // every check stops there while uploads, which do not list, go on
        // (helper-78 F5).
        _ if e.to_string().contains("Unable to walk dir") => format!(
            "{e}\n  an entry in the file:// store's directory cannot be listed (a symbolic link \
             loop, a directory this process may not read: the path above names it). tierindex \
             never creates such entries: move it out of the store's directory and run the \
             command again; nothing was changed"
        ),
        _ => e.to_string(),
    }
}

async fn run(cli: &Cli) -> Result<i32> {
    match &cli.cmd {
        Command::Demo(a) => demo::run(cli, a).await,
        Command::Drain(a) => {
            cli.require_data_dir()?;
            drain::run(cli, a).await
        }
        Command::Status { remote } => {
            cli.require_data_dir()?;
            if *remote {
                remote::status_remote(cli).await
            } else {
                local::status(cli)
            }
        }
        Command::Verify => {
            cli.require_data_dir()?;
            remote::verify(cli).await
        }
        Command::Inspect { file } => local::inspect(cli, file),
        Command::Fsck { repair } => {
            cli.require_data_dir()?;
            // fsck checks a data directory; it must not create one for a
            // mistyped --data-dir and then report it clean.
            let dir = cli.config()?.data_dir;
            if !dir.is_dir() {
                return Err(Error::InvalidInput(format!(
                    "no data directory at {}: check --data-dir",
                    dir.display()
                )));
            }
            local::fsck(cli, *repair)
        }
        Command::Lookup {
            key,
            from,
            to,
            remote,
        } => {
            cli.require_data_dir()?;
            local::lookup(cli, key, *from, *to, *remote).await
        }
        Command::Owner { action } => {
            remote::owner(cli, action.clone().unwrap_or(OwnerAction::Show)).await
        }
        Command::Reconcile {
            repair,
            grace_ms,
            deep,
            accept,
        } => {
            cli.require_data_dir()?;
            remote::reconcile(cli, *repair, *grace_ms, *deep, accept).await
        }
        Command::Quarantine { action } => {
            cli.require_data_dir()?;
            quarantine::run(cli, action)
        }
        Command::StoreCheck { url } => remote::store_check(cli, url.as_deref()).await,
    }
}

/// Prints how often each armed failpoint was hit (feature `failpoints`;
/// nothing otherwise), for the binary's exit path.
pub fn report_failpoint_counts() {
    crate::failpoint::report_counts();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_store_directory_that_cannot_be_walked_says_what_to_do() {
        let e = crate::error::Error::RemoteRetryable(
            "Generic LocalFileSystem error: Unable to walk dir: IO error for operation on \
             /s/stream-0/segments/junk: Too many levels of symbolic links (os error 40)"
                .into(),
        );
        let m = with_advice(&e);
        assert!(m.contains("move it out of the store's directory"), "{m}");
        let other = crate::error::Error::RemoteRetryable("timed out".into());
        assert_eq!(with_advice(&other), other.to_string());
    }

    #[test]
    fn a_full_disk_says_what_to_do_and_what_not_to() {
        let full = crate::error::Error::io(
            std::path::Path::new("/d/segments/1.active"),
            "preallocate segment (posix_fallocate)",
            std::io::Error::from_raw_os_error(libc::ENOSPC),
        );
        let m = with_advice(&full);
        assert!(m.contains("No space left on device"), "{m}");
        assert!(m.contains("Free space on it"), "{m}");
        assert!(m.contains("Do not make room by deleting"), "{m}");
        let other = crate::error::Error::io(
            std::path::Path::new("/d"),
            "open",
            std::io::Error::from_raw_os_error(libc::EACCES),
        );
        assert_eq!(with_advice(&other), other.to_string());
    }
}
