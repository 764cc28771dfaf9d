//! The metrics endpoint of a live `demo` (issue 13): scraped over HTTP while
//! it uploads, checked by `promtool check metrics` (Debian/Ubuntu package
//! `prometheus`) and by the Prometheus conventions checked here in Rust.
//!
//! Without promtool on PATH the promtool half is skipped with a message,
//! except under `CI=true`, where a missing promtool FAILS the test: CI must
//! install it. The Rust checks always run.

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// One HTTP/1.1 request; returns (status line, body).
fn http(addr: &str, request_line: &str) -> std::io::Result<(String, String)> {
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "{request_line}\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
    let status = head.lines().next().unwrap_or("").to_string();
    Ok((status, body.to_string()))
}

/// Sample values by name (labels included), e.g. `x_bucket{le="+Inf"}`.
fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (name, v) = l.rsplit_once(' ')?;
            Some((name.to_string(), v.parse().ok()?))
        })
        .collect()
}

/// The conventions promtool checks, and the shape of every family.
fn check_conventions(text: &str) {
    let mut families: BTreeMap<&str, &str> = BTreeMap::new();
    for l in text.lines() {
        if let Some(rest) = l.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE line");
            assert!(
                families.insert(name, kind).is_none(),
                "two TYPE lines for {name}"
            );
            assert!(name.starts_with("tierindex_"), "{name}");
            assert!(
                !name.contains("_ms") && !name.contains("millis"),
                "not a base unit: {name}"
            );
            if kind == "counter" {
                assert!(name.ends_with("_total"), "counter without _total: {name}");
            }
            assert!(
                text.contains(&format!("# HELP {name} ")),
                "no HELP for {name}"
            );
        }
    }
    let s = samples(text);
    for (name, kind) in &families {
        match *kind {
            "histogram" => {
                let inf_key = format!("{name}_bucket{{le=\"+Inf\"}}");
                assert!(s.contains_key(&inf_key), "{name}: no +Inf bucket");
                let inf = s[&format!("{name}_bucket{{le=\"+Inf\"}}")];
                assert_eq!(inf, s[&format!("{name}_count")], "{name}: +Inf != _count");
                assert!(s.contains_key(&format!("{name}_sum")), "{name}: no _sum");
                // Only _bucket, _sum and _count in a histogram family.
                for k in s.keys().filter(|k| k.starts_with(*name)) {
                    let rest = &k[name.len()..];
                    assert!(
                        rest.starts_with("_bucket{") || rest == "_sum" || rest == "_count",
                        "{k} inside histogram {name}"
                    );
                }
            }
            "counter" | "gauge" => {
                assert!(s.contains_key(*name), "{name}: no sample");
            }
            other => panic!("{name}: unexpected type {other}"),
        }
    }
    // Cumulative buckets never decrease (checked in le order).
    let h = "tierindex_upload_duration_seconds_bucket";
    let mut b: Vec<(f64, f64)> = s
        .iter()
        .filter_map(|(k, v)| {
            let le = k
                .strip_prefix(h)?
                .strip_prefix("{le=\"")?
                .strip_suffix("\"}")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, *v))
        })
        .collect();
    b.sort_by(|x, y| x.0.total_cmp(&y.0));
    assert!(
        b.windows(2).all(|w| w[0].1 <= w[1].1),
        "buckets not cumulative: {b:?}"
    );
}

/// `promtool check metrics` on `text`: `Ok(output)` or `Err(output)`;
/// `None` when promtool is not installed.
fn promtool(text: &str) -> Option<Result<String, String>> {
    let mut child = match Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => panic!("run promtool: {e}"),
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let o = child.wait_with_output().unwrap();
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    Some(if o.status.success() {
        Ok(out)
    } else {
        Err(out)
    })
}

#[test]
fn live_scrape_passes_promtool() {
    let d = tempfile::tempdir().unwrap();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let addr = format!("127.0.0.1:{port}");
    let child = Command::new(env!("CARGO_BIN_EXE_tierindex"))
        .current_dir(d.path())
        .env_remove("TIERINDEX_CONFIG")
        .env_remove("TIERINDEX_STREAM")
        .args(["--data-dir"])
        .arg(d.path().join("data"))
        .arg("--store")
        .arg(format!("file://{}", d.path().join("store").display()))
        .args([
            "demo",
            "--segment-items",
            "500",
            "--slots",
            "64",
            "--rate",
            "5000",
            "--metrics-addr",
            &addr,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = Kill(child);

    // Scrape until the run has uploaded something.
    let until = Instant::now() + Duration::from_secs(60);
    let text = loop {
        if let Ok((status, body)) = http(&addr, "GET /metrics HTTP/1.1") {
            assert!(status.contains("200"), "{status}");
            let s = samples(&body);
            let committed = s.get("tierindex_segments_committed_total").copied();
            let appended = s.get("tierindex_entries_appended_total").copied();
            if committed.unwrap_or(0.0) >= 2.0 && appended.unwrap_or(0.0) > 0.0 {
                break body;
            }
        }
        assert!(Instant::now() < until, "no uploads scraped within 60 s");
        std::thread::sleep(Duration::from_millis(200));
    };
    let s = samples(&text);
    assert!(s["tierindex_entries_flushed_total"] <= s["tierindex_entries_appended_total"]);
    assert!(s["tierindex_segments_uploaded_total"] >= 2.0, "{text}");
    assert!(s["tierindex_entries_uploaded_total"] >= 1000.0, "{text}");
    assert!(
        s["tierindex_upload_duration_seconds_count"] >= 2.0,
        "{text}"
    );
    check_conventions(&text);

    match promtool(&text) {
        Some(Ok(out)) => assert!(
            out.trim().is_empty(),
            "promtool accepted but complained:\n{out}\n{text}"
        ),
        Some(Err(out)) => panic!("promtool check metrics failed:\n{out}\n--- scrape\n{text}"),
        None if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("CI=true but promtool is not installed (apt-get install prometheus)")
        }
        None => {
            eprintln!("SKIPPED promtool check: promtool not installed (apt-get install prometheus)")
        }
    }

    // Only /metrics (and /) answer; other methods are refused.
    let (status, _) = http(&addr, "GET /nope HTTP/1.1").unwrap();
    assert!(status.contains("404"), "{status}");
    let (status, _) = http(&addr, "POST /metrics HTTP/1.1").unwrap();
    assert!(status.contains("405"), "{status}");
    let (status, body) = http(&addr, "HEAD /metrics HTTP/1.1").unwrap();
    assert!(
        status.contains("200") && body.is_empty(),
        "{status} {body:?}"
    );

    // SIGTERM: the demo drains and reports its run.
    // SAFETY: kill(2) on our child, not yet reaped.
    assert_eq!(unsafe { libc::kill(child.0.id() as i32, libc::SIGTERM) }, 0);
    let until = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(st) = child.0.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < until, "demo did not exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut out = String::new();
    child
        .0
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    assert_eq!(status.code(), Some(0), "{out}");
    assert!(out.contains("run totals"), "{out}");
}
