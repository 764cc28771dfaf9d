//! The CLI's resolution of `--data-dir`, `--store`, `--stream` and
//! `--manifest` against the data directory's identity (`IDENTITY`): the
//! inspecting and draining commands use what the directory records and
//! refuse what they would have to guess.

use crate::config::Config;
use crate::datadir::is_data_dir;
use crate::error::{Error, Result};
use crate::identity::{IDENTITY_FILE, Identity};

/// What the CLI was told, for [`resolve_cli`].
#[derive(Clone, Copy, Debug, Default)]
pub struct CliIntent {
    /// The command inspects or drains an existing data directory (it must
    /// not create one).
    pub inspects: bool,
    /// The command talks to the store.
    pub needs_store: bool,
    /// The command runs a broker (`demo`): it opens the data directory as
    /// the library does.
    pub broker_run: bool,
    /// `--stream` (or the config file) named the stream.
    pub stream_given: bool,
    /// `--store-override` (or the config file's `store_override`): use the
    /// given store and stream although the data directory records others.
    pub store_override: bool,
    /// `--manifest` (or the config file) chose the mode.
    pub mode_given: bool,
}

/// The CLI's resolution of `--data-dir`, `--store` and `--stream` against
/// the data directory's identity, for the commands that inspect or drain:
/// - a path that is not a data directory is refused (nothing is created);
/// - no `--store`: the recorded store (and endpoint) is used; a data
///   directory without an identity (older than this file) is refused with
///   what to pass;
/// - a `--store` other than the recorded one is refused unless
///   `store_override`; the same for `--stream`, and no `--stream` means the
///   recorded stream.
/// - no `--manifest` (nor a `manifest` key in the config file): the
///   recorded mode, for every command on an existing data directory.
pub fn resolve_cli(cfg: &mut Config, intent: CliIntent) -> Result<()> {
    if !intent.inspects {
        // A broker run (`demo`) on an existing data directory: its recorded
        // mode. A damaged identity is left to the open, which says what to
        // do.
        if let Ok(Some(id)) = Identity::load(&cfg.data_dir) {
            if !intent.mode_given
                && let Some(m) = id.mode
            {
                cfg.manifest = m.is_manifest();
            }
            // Without --store the store is the default one beside the data
            // directory (so a copied data directory is refused: its default
            // store moved with it). `--stream X --store-override` (one
            // switch for the stream and the store) would then silently
            // move to the default store when only the stream was meant:
            // say so. Without --stream (a data directory moved together
            // with its default store) it goes through.
            if intent.broker_run
                && intent.store_override
                && intent.stream_given
                && cfg.store.is_none()
            {
                let default = crate::remote::url::display_form("store", &cfg.store_url()?)?;
                if default != id.store {
                    return Err(Error::InvalidInput(format!(
                        "--store-override without --store on {}: it was created for store \
                         {:?}, and without --store this run would use the default store \
                         {default:?}; pass --store with the store to use (the recorded one to \
                         keep it)",
                        cfg.data_dir.display(),
                        id.store
                    )));
                }
            }
        }
        return Ok(());
    }
    let dir = &cfg.data_dir;
    if !is_data_dir(dir) {
        return Err(Error::InvalidInput(format!(
            "{} is not a tierindex data directory (no {IDENTITY_FILE}, journal/ or segments/); \
             this command does not create one: check --data-dir",
            dir.display()
        )));
    }
    let id = Identity::load(dir)?;
    let Some(id) = id else {
        if intent.needs_store && cfg.store.is_none() {
            // Nothing in it: a first open that was refused (another owner's
            // lease, a wrong store) removes its identity again and leaves
            // the empty tree (helper-81 F2: this said "created before
            // identity files", false for a directory made seconds ago).
            let journal_empty = match crate::journal::Journal::max_segment_id_on_disk(dir) {
                Ok(max) => max.is_none(),
                // No journal, and none ever (a lost one: `journal_lost`).
                Err(_) => {
                    !crate::journal::log_path(dir).exists()
                        && !crate::datadir::journal_lost(dir, crate::tier::CLEAN_SHUTDOWN_MARKER)
                }
            };
            let empty = journal_empty
                && !std::fs::read_dir(dir.join("segments")).is_ok_and(|rd| {
                    rd.filter_map(|e| e.ok())
                        .any(|e| e.file_name() != "LINKED_BY")
                });
            if empty {
                return Err(Error::InvalidInput(format!(
                    "{} does not record its store and holds no segment: its first open was \
                     refused or stopped before the store was recorded, and nothing of it was \
                     written anywhere. Start the broker again once the cause is fixed, or pass \
                     --store with the store its broker uses (and --endpoint for S3 servers \
                     other than AWS); tierindex does not guess",
                    dir.display()
                )));
            }
            return Err(Error::InvalidInput(format!(
                "{} does not record its store (it was created before identity files, or its \
                 {IDENTITY_FILE} was removed; the broker writes one at its next start): pass \
                 --store with the store its broker uses (and --endpoint for S3 servers other \
                 than AWS); tierindex does not guess",
                dir.display()
            )));
        }
        return Ok(());
    };
    let mismatch = |what: &str, recorded: &str, given: &str| {
        Error::InvalidInput(format!(
            "{} was created for {what} {recorded:?} ({IDENTITY_FILE}, incarnation {}), but \
             {given:?} was given: omit it to use the recorded one, or pass --store-override \
             to use the given one anyway",
            dir.display(),
            id.incarnation
        ))
    };
    if !intent.stream_given {
        cfg.stream = id.stream.clone();
    } else if cfg.stream != id.stream && !intent.store_override {
        return Err(mismatch("stream", &id.stream, &cfg.stream));
    }
    // The mode: the recorded one unless one was chosen; a chosen one that
    // differs is refused by the open itself (`settle_mode`) unless
    // --switch-mode.
    if let Some(m) = id.mode
        && !intent.mode_given
    {
        cfg.manifest = m.is_manifest();
    }
    if !intent.needs_store {
        return Ok(());
    }
    match cfg.store.clone() {
        None => {
            // The recorded display form holds a file store's raw path:
            // as a URL it is encoded again (a space or `%` in the path).
            cfg.store = Some(crate::remote::url::url_from_display(&id.store));
            if cfg.endpoint.is_none() {
                cfg.endpoint = id.endpoint.clone();
            }
        }
        Some(given) => {
            // Compared without building a store (that would create a
            // file:// directory as a side effect).
            // Compared in display form, without building a store (that
            // would create a file:// directory as a side effect); the
            // form carries no credentials, so the message may show it.
            let shown = crate::remote::url::display_form("--store", &given)?;
            if shown != id.store {
                if !intent.store_override {
                    return Err(mismatch("store", &id.store, &shown));
                }
                crate::identity::override_target_exists(dir, &id.store, &shown)?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::ensure;
    use std::fs;

    #[test]
    fn the_cli_refuses_what_it_would_have_to_guess() {
        let tmp = tempfile::tempdir().unwrap();
        let intent = CliIntent {
            inspects: true,
            needs_store: true,
            ..Default::default()
        };
        // Not a data directory: refused, nothing created.
        let missing = tmp.path().join("nope");
        let mut cfg = Config {
            data_dir: missing.clone(),
            ..Config::default()
        };
        let e = resolve_cli(&mut cfg, intent).unwrap_err();
        assert!(
            e.to_string().contains("not a tierindex data directory"),
            "{e}"
        );
        assert!(!missing.exists());

        // A data directory from before identity files, no --store: refused.
        let dd = tmp.path().join("old");
        fs::create_dir_all(dd.join("journal")).unwrap();
        let mut cfg = Config {
            data_dir: dd.clone(),
            ..Config::default()
        };
        let e = resolve_cli(&mut cfg, intent).unwrap_err();
        assert!(e.to_string().contains("pass --store"), "{e}");
        assert_eq!(cfg.store, None);

        // With an identity: the recorded store and stream are used ...
        let store = format!("file://{}", tmp.path().join("store").display());
        ensure(&dd, "orders", &store, None, None, Default::default()).unwrap();
        let mut cfg = Config {
            data_dir: dd.clone(),
            ..Config::default()
        };
        resolve_cli(&mut cfg, intent).unwrap();
        assert_eq!(cfg.store.as_deref(), Some(store.as_str()));
        assert_eq!(cfg.stream, "orders");
        // ... another one is refused without --store-override.
        let other = format!("file://{}", tmp.path().join("elsewhere").display());
        let mut cfg = Config {
            data_dir: dd.clone(),
            store: Some(other.clone()),
            ..Config::default()
        };
        let e = resolve_cli(&mut cfg, intent).unwrap_err();
        assert!(e.to_string().contains("--store-override"), "{e}");
        let with_override = CliIntent {
            store_override: true,
            ..intent
        };
        // With it, a file:// store that does not exist is refused (a
        // mistyped path), and nothing is created ...
        let mut cfg = Config {
            data_dir: dd.clone(),
            store: Some(other.clone()),
            ..Config::default()
        };
        let e = resolve_cli(&mut cfg, with_override).unwrap_err();
        assert!(e.to_string().contains("does not exist"), "{e}");
        assert!(!tmp.path().join("elsewhere").exists());
        // ... and one that does is used.
        fs::create_dir(tmp.path().join("elsewhere")).unwrap();
        let mut cfg = Config {
            data_dir: dd,
            store: Some(other.clone()),
            ..Config::default()
        };
        resolve_cli(&mut cfg, with_override).unwrap();
        assert_eq!(cfg.store, Some(other));
    }
}
