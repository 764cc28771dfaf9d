//! The `tierindex` command line: the recovery tool and the demo broker.
//!
//! Every command that touches a data directory or a store takes
//! `--data-dir` / `--store` (or `TIERINDEX_DATA_DIR` / `TIERINDEX_STORE`, or
//! a `--config` TOML file). Exit codes are in [`crate::lifecycle`].

mod demo;
mod drain;
mod local;
mod remote;

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use serde::Serialize;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::lifecycle::{EXIT_ERROR, EXIT_USAGE};

#[derive(Parser, Debug)]
#[command(
    name = "tierindex",
    version,
    about = "Tiered-storage index uploader and recovery tool"
)]
pub struct Cli {
    /// Data directory (segments, journal, quarantine).
    #[arg(long, global = true, env = "TIERINDEX_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Store URL: file:///abs/path, s3://bucket/prefix, memory://.
    #[arg(long, global = true, env = "TIERINDEX_STORE")]
    pub store: Option<String>,
    /// S3 endpoint (MinIO, Garage, ...); else AWS_ENDPOINT_URL.
    #[arg(long, global = true, env = "TIERINDEX_ENDPOINT")]
    pub endpoint: Option<String>,
    /// TOML configuration file (flags and variables override it).
    #[arg(long, global = true, env = "TIERINDEX_CONFIG")]
    pub config: Option<PathBuf>,
    /// Stream name (part of every remote key).
    #[arg(long, global = true, env = "TIERINDEX_STREAM")]
    pub stream: Option<String>,
    /// Machine-readable output.
    #[arg(long, global = true)]
    pub json: bool,
    /// Use --store (or --stream) although the data directory's IDENTITY
    /// records another one.
    #[arg(long, global = true)]
    pub store_override: bool,
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
        /// Orphans younger than this many ms are kept (default 1 h).
        #[arg(long, default_value_t = 3_600_000)]
        grace_ms: u64,
        /// Also read every journaled object back in full (CRC check).
        #[arg(long)]
        deep: bool,
    },
    /// Probe a store: conditional writes, multipart, range GET, metadata.
    StoreCheck {
        /// Store URL (default: --store / the config's store).
        url: Option<String>,
    },
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
        /// Lease length in ms (default: the config's `lease_ttl_ms`).
        #[arg(long)]
        ttl_ms: Option<u64>,
    },
    /// Release ownership held by --owner-id (refused if someone else holds
    /// a live lease).
    Release {
        #[arg(long)]
        owner_id: Option<String>,
    },
}

impl Cli {
    /// Build the effective config: file, then flags/variables.
    pub fn config(&self) -> Result<Config> {
        let mut c = match &self.config {
            Some(p) => Config::from_file(p)?,
            None => Config::default(),
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
        let stream_given = self.stream.is_some() || c.stream != Config::default().stream;
        if let Some(s) = &self.stream {
            c.stream = s.clone();
        }
        crate::identity::resolve_cli(&mut c, self.identity_intent(stream_given))?;
        c.validate()?;
        Ok(c)
    }

    /// What the command does with the data directory and the store, for
    /// the identity check (`crate::identity::resolve_cli`).
    fn identity_intent(&self, stream_given: bool) -> crate::identity::CliIntent {
        let (inspects, needs_store) = match &self.cmd {
            Command::Drain(_) | Command::Verify | Command::Reconcile { .. } => (true, true),
            Command::Status { remote } | Command::Lookup { remote, .. } => (true, *remote),
            Command::Fsck { .. } => (true, false),
            _ => (false, false),
        };
        crate::identity::CliIntent {
            inspects,
            needs_store,
            stream_given,
            store_override: self.store_override,
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

/// Print `v` as JSON or with `human`.
pub(crate) fn emit<T: Serialize>(json: bool, v: &T, human: impl FnOnce(&T) -> String) {
    if json {
        match serde_json::to_string_pretty(v) {
            Ok(s) => println!("{s}"),
            Err(e) => eprintln!("tierindex: cannot encode output: {e}"),
        }
    } else {
        println!("{}", human(v));
    }
}

/// Entry point of the binary; returns the process exit code.
pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { EXIT_USAGE } else { 0 };
        }
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TIERINDEX_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .try_init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tierindex: cannot start the async runtime: {e}");
            return EXIT_ERROR;
        }
    };
    let res = rt.block_on(run(&cli));
    // Do not wait for stray blocking tasks (a hung disk) at exit.
    rt.shutdown_timeout(std::time::Duration::from_millis(100));
    match res {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tierindex: {e}");
            EXIT_ERROR
        }
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
        } => {
            cli.require_data_dir()?;
            remote::reconcile(cli, *repair, *grace_ms, *deep).await
        }
        Command::StoreCheck { url } => remote::store_check(cli, url.as_deref()).await,
    }
}
