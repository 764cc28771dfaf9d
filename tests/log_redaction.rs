//! Nothing logged carries credentials: everything logged while listing
//! multipart uploads against a server that echoes the key id, secret and
//! session token (retries included, at TRACE), the final error and the
//! store's `Debug` are free of them; a key id that is an ordinary word
//! is blanked where a key id is quoted, not in ordinary text.
//!
//! Its own test binary, with one test and a process-wide subscriber: in the
//! library's unit tests, which run on parallel threads, `tracing`'s callsite
//! interest cache could be filled by another thread (no subscriber there:
//! "never") while this test's scoped subscriber was being installed, and the
//! "retrying" event this test must see went unlogged (CI at d6f5fcc).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use object_store::path::Path;
use tierindex::remote::{RemoteStore, StoreOptions};
use tierindex::testing::canned_http;

const KEY_ID: &str = "AKIDMOCKKEYID0001";
const SECRET: &str = "mock-secret-DO-NOT-PRINT-0123456789";
const TOKEN: &str = "mock-session-token-DO-NOT-PRINT";

#[derive(Clone, Default)]
struct Buf(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Buf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn nothing_logged_carries_credentials() {
    let buf = Buf::default();
    let w = buf.clone();
    let sub = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || w.clone())
        .finish();
    // Process-wide and before any callsite is hit: the only test here.
    tracing::subscriber::set_global_default(sub).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let echo = format!(
            "<Error><Code>SlowDown</Code><Message>{KEY_ID} {SECRET} {TOKEN}</Message></Error>"
        );
        let m = canned_http(vec![(503, "", echo); 4]).await;
        let env = vec![
            ("AWS_ACCESS_KEY_ID".to_string(), KEY_ID.to_string()),
            ("AWS_SECRET_ACCESS_KEY".to_string(), SECRET.to_string()),
            ("AWS_SESSION_TOKEN".to_string(), TOKEN.to_string()),
            ("AWS_ENDPOINT_URL".to_string(), m.endpoint.clone()),
            ("AWS_REGION".to_string(), "eu-mock-1".to_string()),
        ];
        let opts = StoreOptions {
            request_timeout: Duration::from_secs(5),
            ..StoreOptions::default()
        };
        let s = RemoteStore::from_url_with_env("s3://bkt/pre", &opts, &env).unwrap();
        let e = s
            .list_multipart_uploads(&Path::from("pre/s/segments"))
            .await
            .unwrap_err();
        tracing::error!(error = %e, debug = ?e, store = ?s, "final");
        let logged = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        assert!(
            logged.contains("retrying") && logged.contains("final"),
            "{logged}"
        );
        assert_eq!(m.seen.lock().unwrap().len(), 4, "{logged}");
        // The echo did reach the log, blanked.
        assert!(
            logged.contains("<redacted> <redacted> <redacted>"),
            "{logged}"
        );
        for secret in [KEY_ID, SECRET, TOKEN] {
            assert!(!logged.contains(secret), "{secret} leaked: {logged}");
        }

        // helper-81 F7: a key id that is an ordinary word (`tierindex`,
        // the s3s test server's) was blanked wherever the word appeared,
        // the tool's own advice included. Now it goes only where a key id
        // is quoted; the secret and the token still go everywhere.
        buf.0.lock().unwrap().clear();
        let (word_key, secret2, token2) =
            ("tierindex", "word-key-secret-7Qx9", "word-key-token-Zp42");
        let echo = format!(
            "<Error><Code>SlowDown</Code><Message>run tierindex reconcile --repair on \
             tierindex-data; Credential={word_key}/20261204/eu-mock-1/s3/aws4_request; \
             access key id: {word_key}; user {word_key}:{secret2}@host; {secret2} {token2}\
             </Message><AWSAccessKeyId>{word_key}</AWSAccessKeyId></Error>"
        );
        let m = canned_http(vec![(503, "", echo); 4]).await;
        let env = vec![
            ("AWS_ACCESS_KEY_ID".to_string(), word_key.to_string()),
            ("AWS_SECRET_ACCESS_KEY".to_string(), secret2.to_string()),
            ("AWS_SESSION_TOKEN".to_string(), token2.to_string()),
            ("AWS_ENDPOINT_URL".to_string(), m.endpoint.clone()),
            ("AWS_REGION".to_string(), "eu-mock-1".to_string()),
        ];
        let s = RemoteStore::from_url_with_env("s3://bkt/pre", &opts, &env).unwrap();
        let e = s
            .list_multipart_uploads(&Path::from("pre/s/segments"))
            .await
            .unwrap_err();
        tracing::error!(error = %e, debug = ?e, store = ?s, "final");
        let logged = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        assert!(logged.contains("final"), "{logged}");
        // Ordinary text stays whole.
        assert!(
            logged.contains("run tierindex reconcile --repair on tierindex-data"),
            "{logged}"
        );
        // Where a key id is quoted it goes; the secret and token go
        // everywhere.
        for leak in [
            format!("Credential={word_key}"),
            format!("access key id: {word_key}"),
            format!("user {word_key}:"),
            format!("<AWSAccessKeyId>{word_key}"),
            secret2.to_string(),
            token2.to_string(),
        ] {
            assert!(!logged.contains(&leak), "{leak} leaked: {logged}");
        }
    });
}
