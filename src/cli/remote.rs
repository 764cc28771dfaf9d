//! Commands that talk to the store: `verify`, `store-check`.

use serde::Serialize;

use crate::cli::{Cli, emit};
use crate::error::{Error, Result};
use crate::journal::{Journal, SegmentState};
use crate::lifecycle::{EXIT_DRAINED, EXIT_NEEDS_OPERATOR};
use crate::remote::{RemoteStore, probe};
use crate::tier::open_store;
use crate::upload::{VerifyLevel, verify_segment};

#[derive(Serialize)]
struct VerifyOut {
    store: String,
    checked: u64,
    ok: u64,
    bad: Vec<(u64, String)>,
}

/// Re-check every segment the journal says is verified or later: the
/// object exists, has the size, and the CRC of its bytes matches.
pub async fn verify(cli: &Cli) -> Result<i32> {
    let cfg = cli.config()?;
    let store = open_store(&cfg)?;
    let (view, _) = Journal::open_read_only(&cfg.data_dir)?;
    let mut out = VerifyOut {
        store: store.display_url().to_string(),
        checked: 0,
        ok: 0,
        bad: Vec::new(),
    };
    for (id, r) in view.segments() {
        if !matches!(
            r.state,
            SegmentState::Verified | SegmentState::Committed | SegmentState::Released
        ) {
            continue;
        }
        out.checked += 1;
        let key = match &r.key {
            Some(k) => object_store::path::Path::from(k.as_str()),
            None => store.try_segment_key(&cfg.stream, &r.meta)?,
        };
        match verify_segment(&store, &key, &r.meta, VerifyLevel::Full).await {
            Ok(()) => out.ok += 1,
            Err(e) => out.bad.push((id.0, e.to_string())),
        }
    }
    emit(cli.json, &out, |o| {
        let mut s = format!(
            "{}: {} checked, {} ok, {} bad",
            o.store,
            o.checked,
            o.ok,
            o.bad.len()
        );
        for (id, why) in &o.bad {
            s.push_str(&format!("\n  segment {id:020}: {why}"));
        }
        s
    });
    Ok(if out.bad.is_empty() {
        EXIT_DRAINED
    } else {
        EXIT_NEEDS_OPERATOR
    })
}

/// Probe a store's behaviour (conditional writes, multipart, ranges,
/// metadata) and report it.
pub async fn store_check(cli: &Cli, url: Option<&str>) -> Result<i32> {
    let cfg = cli.config()?;
    let url = match url {
        Some(u) => u.to_string(),
        None => cfg.store_url()?,
    };
    let store = RemoteStore::from_url(&url, &cfg.store_options())?;
    let caps = probe::probe(&store).await?;
    #[derive(Serialize)]
    struct Out {
        store: String,
        capabilities: probe::Capabilities,
        fenced_multi_writer_safe: bool,
    }
    let out = Out {
        store: store.display_url().to_string(),
        fenced_multi_writer_safe: caps.conditional_create && caps.conditional_update,
        capabilities: caps,
    };
    emit(cli.json, &out, |o| {
        let c = &o.capabilities;
        let mut s = format!(
            "{}\n  conditional create (If-None-Match): {}\n  conditional update (If-Match): {}\n  multipart: {}\n  range GET: {}\n  object metadata: {}",
            o.store,
            c.conditional_create,
            c.conditional_update,
            c.multipart,
            c.range_get,
            c.metadata
        );
        if !o.fenced_multi_writer_safe {
            s.push_str("\n  WARNING: this store does not honour conditional writes: uploads read every object back to prove it is ours; it cannot fence a second writer (multi-writer fencing, when it lands, will refuse this store)");
        }
        for n in &c.notes {
            s.push_str(&format!("\n  note: {n}"));
        }
        s
    });
    if !out.capabilities.range_get {
        return Err(Error::Remote(
            "store does not serve range GETs correctly".into(),
        ));
    }
    Ok(EXIT_DRAINED)
}
