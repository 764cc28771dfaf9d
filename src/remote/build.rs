//! Building a [`RemoteStore`] from a URL: the backends, the S3 client
//! and its options from the standard `AWS_*` variables (credentials never
//! echoed), the upload lister, and the unsigned-payload body client where
//! the transport protects bodies.

use super::*;

impl RemoteStore {
    /// Builds a store from a URL:
    /// - `file:///abs/path`: a directory (created if missing), fsync on;
    /// - `s3://bucket/prefix`: S3 or compatible, configured from the standard
    ///   `AWS_*` variables plus `opts`;
    /// - `memory://[prefix]`: a fresh in-memory store (tests, dry runs).
    pub fn from_url(url: &str, opts: &StoreOptions) -> Result<RemoteStore> {
        let env = aws_env(std::env::vars_os())?;
        Self::from_url_with_env(url, opts, &env)
    }

    /// [`RemoteStore::from_url`] with an explicit environment (tests pass a
    /// fake one instead of mutating the process environment).
    #[doc(hidden)]
    pub fn from_url_with_env(
        url: &str,
        opts: &StoreOptions,
        env: &[(String, String)],
    ) -> Result<RemoteStore> {
        let parsed = self::url::parse_store("store URL", url)?;
        let key = probe_key(url, opts, env);
        let mut rs = Self::build_parsed(parsed, opts, env)?;
        if !matches!(rs.kind, StoreKind::Memory) {
            rs.probe_key = Some(key);
        }
        Ok(rs)
    }

    fn build_parsed(
        parsed: StoreUrl,
        opts: &StoreOptions,
        env: &[(String, String)],
    ) -> Result<RemoteStore> {
        match parsed {
            StoreUrl::File { dir } => {
                // An object's path is the directory's and its key (stream,
                // kind, id, checksum: at most a few hundred bytes); past
                // the system's 4,096-byte limit every write fails with
                // ENAMETOOLONG, which no retry or restart cures.
                const KEY_ROOM: usize = 512;
                let n = dir.as_os_str().len();
                if n + KEY_ROOM > libc::PATH_MAX as usize {
                    return Err(Error::InvalidInput(format!(
                        "the file store's directory path is {n} bytes: the objects' paths \
                         under it would pass the system's {} byte limit; use a shorter \
                         path (at most {})",
                        libc::PATH_MAX,
                        libc::PATH_MAX as usize - KEY_ROOM
                    )));
                }
                std::fs::create_dir_all(&dir)
                    .map_err(|e| Error::io(&dir, "create store directory", e))?;
                let fs = LocalFileSystem::new_with_prefix(&dir)
                    .map_err(|e| Error::Remote(format!("open {}: {e}", dir.display())))?
                    // IMPORTANT: without fsync a "created" object may vanish
                    // on power loss while the journal says it was uploaded.
                    .with_fsync(true);
                let display = format!("file://{}", dir.display());
                let mp = Arc::new(local_multipart::LocalMultipart::new(dir));
                let fs = super::local_fs::RegularFiles(fs);
                let mut rs = Self::from_parts(Arc::new(fs), Some(mp.clone()), "", &display);
                rs.uploads = UploadLister::Local(mp);
                Ok(rs)
            }
            StoreUrl::Memory { prefix } => {
                tracing::warn!(
                    "memory:// store: uploads live only in this process and are gone when it \
                     exits; for tests and demos, not for data that must survive"
                );
                let mem = Arc::new(InMemory::new());
                let display = format!("memory://{prefix}");
                Ok(Self::from_parts(
                    mem.clone(),
                    Some(mem as Arc<dyn MultipartStore>),
                    &prefix,
                    &display,
                ))
            }
            StoreUrl::S3 { bucket, prefix } => {
                let prefix = self::url::s3_prefix(&prefix)?;
                let (s3, lister, body) = build_s3(&bucket, opts, env)?;
                let s3 = Arc::new(s3);
                let display = self::url::s3_display(&bucket, &prefix);
                let mut rs = Self::from_parts(
                    s3.clone(),
                    Some(s3 as Arc<dyn MultipartStore>),
                    "",
                    &display,
                );
                rs.prefix = prefix;
                rs.uploads = UploadLister::S3(Arc::new(lister));
                rs.unsigned_body = body;
                rs.credentials = credential_source(env);
                Ok(rs)
            }
        }
    }
}

/// The store's identity for sharing probe answers: everything it was built
/// from, hashed with a key drawn once per process (the credentials among it
/// never leave this process's memory, and the hash is never printed).
fn probe_key(url: &str, opts: &StoreOptions, env: &[(String, String)]) -> u64 {
    use std::hash::{BuildHasher as _, Hash as _, Hasher as _};
    static KEY: std::sync::OnceLock<std::hash::RandomState> = std::sync::OnceLock::new();
    let mut h = KEY.get_or_init(std::hash::RandomState::new).build_hasher();
    url.hash(&mut h);
    format!("{opts:?}").hash(&mut h);
    let mut env: Vec<&(String, String)> = env.iter().collect();
    env.sort();
    env.hash(&mut h);
    h.finish()
}

/// A second client of the same bucket for segment bodies.
#[derive(Clone)]
pub(super) struct BodyClient {
    pub(super) store: Arc<dyn ObjectStore>,
    pub(super) multipart: Arc<dyn MultipartStore>,
}

/// The S3 store, the upload lister configured from the same builder, and
/// the unsigned-payload body client where the transport protects bodies.
fn build_s3(
    bucket: &str,
    opts: &StoreOptions,
    env: &[(String, String)],
) -> Result<(
    object_store::aws::AmazonS3,
    s3_uploads::S3Uploads,
    Option<BodyClient>,
)> {
    // Same as AmazonS3Builder::from_env(), over the given variables.
    // Its client follows no redirect: one kept the session token on its
    // way to another host (`http.rs`).
    let mut b = AmazonS3Builder::new().with_http_connector(super::http::NoRedirects);
    for (k, v) in env {
        if let Ok(key) = k.to_ascii_lowercase().parse::<AmazonS3ConfigKey>() {
            // Values go into HTTP headers (credentials, token, region): a
            // control character (a token file edited on Windows leaves a
            // trailing CR) made object_store panic building the request.
            // The value is never shown: it may be a credential.
            match key {
                AmazonS3ConfigKey::AccessKeyId => crate::error::register_key_id(v),
                AmazonS3ConfigKey::SecretAccessKey | AmazonS3ConfigKey::Token => {
                    crate::error::register_secret(v)
                }
                _ => {}
            }
            // object_store's own error for a bad boolean does not name
            // the variable.
            if BOOL_VARS.contains(&k.as_str()) && !is_flag_spelling(v) {
                return Err(Error::InvalidInput(format!(
                    "{k} is not a boolean: set it to true or false (or 1/0, yes/no, on/off)"
                )));
            }
            if v.chars().any(char::is_control) {
                return Err(Error::InvalidInput(format!(
                    "{k} holds a control character (a line break or CR, perhaps from a file \
                     edited elsewhere): set it without one; its value is not shown"
                )));
            }
            // URLs of credential services: one with user info was logged by
            // the HTTP client (hyper's pool, at DEBUG), and one without a
            // scheme made object_store panic (helper-49).
            if matches!(
                key,
                AmazonS3ConfigKey::MetadataEndpoint
                    | AmazonS3ConfigKey::StsEndpoint
                    | AmazonS3ConfigKey::ContainerCredentialsFullUri
                    | AmazonS3ConfigKey::ContainerCredentialsRelativeUri
            ) {
                if self::url::holds_user_info(v) {
                    return Err(Error::InvalidInput(format!(
                        "{k} must not carry credentials (user:password@); its value is not shown"
                    )));
                }
                let relative = key == AmazonS3ConfigKey::ContainerCredentialsRelativeUri;
                let lower = v.to_ascii_lowercase();
                if !(relative || lower.starts_with("http://") || lower.starts_with("https://")) {
                    return Err(Error::InvalidInput(format!(
                        "{k} must be an http:// or https:// URL; its value is not shown"
                    )));
                }
            }
            // Payload signing is tierindex's decision (`sign_payload` and
            // the probe), never a variable's: AWS_UNSIGNED_PAYLOAD would
            // unsign every body on any transport, unproven.
            if key == AmazonS3ConfigKey::UnsignedPayload {
                tracing::warn!(
                    "AWS_UNSIGNED_PAYLOAD is ignored: tierindex signs payloads unless the transport and the server's checksum check make it unnecessary (see sign_payload)"
                );
                continue;
            }
            b = b.with_config(key, v.clone());
        }
    }
    key_pair_complete(env)?;
    b = b.with_bucket_name(bucket);
    // Every endpoint is validated before the HTTP stack sees it: a bad one
    // panics inside object_store, and one with user info would be logged
    // by the HTTP client at TRACE.
    // object_store uses AWS_ENDPOINT_URL_S3 over the generic one, and of
    // AWS_ENDPOINT_URL and AWS_ENDPOINT whichever it saw last: two that
    // disagree are refused rather than guessed between.
    let mut endpoint: Option<self::url::Endpoint> = None;
    let mut generic: Option<(&str, self::url::Endpoint)> = None;
    for name in ["AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ENDPOINT"] {
        if let Some((_, v)) = env.iter().find(|(k, _)| k == name) {
            let ep = self::url::parse_endpoint(name, v)?;
            // An endpoint given here (--endpoint, the config file) wins over
            // both, so their disagreement does not matter then.
            if name != "AWS_ENDPOINT_URL_S3" {
                if let Some((first, other)) = &generic
                    && other.url != ep.url
                    && opts.endpoint.is_none()
                {
                    return Err(Error::InvalidInput(format!(
                        "{first} ({}) and {name} ({}) name different endpoints: set one of them (or --endpoint)",
                        other.url, ep.url
                    )));
                }
                generic.get_or_insert((name, ep.clone()));
            }
            endpoint.get_or_insert(ep);
        }
    }
    if let Some(ep) = &opts.endpoint {
        let ep = self::url::parse_endpoint("endpoint", ep)?;
        // Both keys: an AWS_ENDPOINT_URL_S3 in the environment must not
        // win over the endpoint given here.
        b = b
            .with_endpoint(ep.url.clone())
            .with_config(AmazonS3ConfigKey::S3Endpoint, ep.url.clone());
        endpoint = Some(ep);
    }
    match opts.allow_http {
        Some(allow) => b = b.with_allow_http(allow),
        None if endpoint.as_ref().is_some_and(|e| e.loopback_http) => b = b.with_allow_http(true),
        None => {}
    }
    if let Some(ep) = &endpoint {
        no_metadata_credentials(env, ep)?;
    }
    if let Some(r) = &opts.region {
        b = b.with_region(r.clone());
    }
    let dur = |d: Duration| humantime::format_duration(d).to_string();
    b = b
        .with_config(
            AmazonS3ConfigKey::Client(ClientConfigKey::Timeout),
            dur(opts.request_timeout),
        )
        .with_config(
            AmazonS3ConfigKey::Client(ClientConfigKey::ConnectTimeout),
            dur(opts.connect_timeout),
        );
    // Modest inner retries: our own loop (retry) retries on top with
    // its own deadline, so the two must not multiply into minutes.
    let retry = RetryConfig {
        max_retries: 3,
        retry_timeout: opts.request_timeout.saturating_mul(2),
        backoff: BackoffConfig {
            init_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(2),
            base: 2.0,
        },
    };
    b = b.with_retry(retry);
    // Every PutObject and UploadPart carries x-amz-checksum-crc64nvme (and
    // Complete lists the parts' values): a server that validates rejects a
    // body changed on the way. Whether it does is the probe's question
    // (s3_checksum); the value equals the sealed file's CRC64, since the
    // bytes sent are checked against it first.
    if opts.s3_checksums {
        b = b.with_checksum_algorithm(Checksum::CRC64NVME);
    }
    // What the lister needs, read back from the builder so it addresses
    // the bucket exactly as object_store will.
    let get = |k: AmazonS3ConfigKey| b.get_config_value(&k);
    let flag = |k: AmazonS3ConfigKey| get(k).is_some_and(|v| parse_flag(&v));
    let lister = |credentials| s3_uploads::S3UploadsConfig {
        bucket: bucket.to_string(),
        endpoint: get(AmazonS3ConfigKey::S3Endpoint).or_else(|| get(AmazonS3ConfigKey::Endpoint)),
        region: get(AmazonS3ConfigKey::Region).unwrap_or_else(|| "us-east-1".into()),
        virtual_hosted: flag(AmazonS3ConfigKey::VirtualHostedStyleRequest),
        s3_express: flag(AmazonS3ConfigKey::S3Express),
        skip_signature: flag(AmazonS3ConfigKey::SkipSignature),
        request_payer: get(AmazonS3ConfigKey::RequestPayer)
            .is_some_and(|v| v.eq_ignore_ascii_case("requester") || parse_flag(&v)),
        allow_http: flag(AmazonS3ConfigKey::Client(ClientConfigKey::AllowHttp)),
        allow_invalid_certificates: flag(AmazonS3ConfigKey::Client(
            ClientConfigKey::AllowInvalidCertificates,
        )),
        proxy_url: get(AmazonS3ConfigKey::Client(ClientConfigKey::ProxyUrl)),
        proxy_excludes: get(AmazonS3ConfigKey::Client(ClientConfigKey::ProxyExcludes)),
        request_timeout: opts.request_timeout,
        connect_timeout: opts.connect_timeout,
        credentials,
    };
    // The builder's error text names keys and the bucket, never values of
    // secret keys.
    let s3 = b
        .clone()
        .build()
        .map_err(|e| Error::Remote(format!("configure s3://{bucket}: {e}")))?;
    // The same credential provider: both sign with the same keys.
    let cfg = lister(s3.credentials().clone());
    // Bodies may go unsigned only where nobody on the way can rewrite the
    // request (TLS, or a loopback endpoint) and the signed checksum header
    // goes with them; the uploads use this client only once the probe
    // proved the server checks that header in such a request.
    let protected = transport_protects_bodies(
        get(AmazonS3ConfigKey::S3Endpoint).or_else(|| get(AmazonS3ConfigKey::Endpoint)),
        flag(AmazonS3ConfigKey::Client(
            ClientConfigKey::AllowInvalidCertificates,
        )),
        get(AmazonS3ConfigKey::Client(ClientConfigKey::ProxyUrl)).is_some() || env_proxy(env),
    );
    let body = if opts.s3_checksums && !opts.sign_payload && protected {
        let u = b
            .clone()
            .with_unsigned_payload(true)
            .build()
            .map_err(|e| Error::Remote(format!("configure s3://{bucket}: {e}")))?;
        let u = Arc::new(u);
        Some(BodyClient {
            store: u.clone(),
            multipart: u,
        })
    } else {
        None
    };
    Ok((s3, s3_uploads::S3Uploads::new(cfg), body))
}

/// Can nobody on the way rewrite a request to `endpoint` (the one
/// object_store will really use: the S3-specific endpoint first)? True for
/// AWS's own endpoints and any `https://` one with certificates checked
/// (a proxy tunnels TLS), and for an `http://` loopback endpoint reached
/// without a proxy. Anything else, including an endpoint that does not
/// parse, is false: segment bodies then stay signed.
fn transport_protects_bodies(endpoint: Option<String>, invalid_certs: bool, proxied: bool) -> bool {
    if invalid_certs {
        return false;
    }
    match endpoint {
        None => true, // AWS's own endpoints: HTTPS
        Some(u) => match self::url::parse_endpoint("endpoint", &u) {
            Ok(ep) if ep.url.starts_with("https://") => true,
            Ok(ep) => ep.loopback_http && !proxied,
            Err(_) => false,
        },
    }
}

/// A proxy the HTTP client may send plain-HTTP requests through: the
/// standard variables, in the given environment or the process's (reqwest
/// reads the process's). `NO_PROXY` is not consulted: a proxy variable
/// alone keeps bodies signed on plain HTTP.
fn env_proxy(env: &[(String, String)]) -> bool {
    const NAMES: [&str; 3] = ["http_proxy", "all_proxy", "https_proxy"];
    let set = |name: &str| {
        env.iter()
            .any(|(k, v)| k.eq_ignore_ascii_case(name) && !v.is_empty())
            || std::env::var_os(name).is_some_and(|v| !v.is_empty())
            || std::env::var_os(name.to_ascii_uppercase()).is_some_and(|v| !v.is_empty())
    };
    NAMES.iter().any(|n| set(n))
}

/// Which credential provider object_store's S3 builder picks from `env`,
/// in its order: keys, web identity, container, instance metadata.
fn credential_source(env: &[(String, String)]) -> CredentialSource {
    let set = |name: &str| env.iter().any(|(k, v)| k == name && !v.is_empty());
    let skip = env
        .iter()
        .any(|(k, v)| k == "AWS_SKIP_SIGNATURE" && parse_flag(v));
    if skip || set("AWS_ACCESS_KEY_ID") || set("AWS_SECRET_ACCESS_KEY") {
        CredentialSource::Direct
    } else if set("AWS_WEB_IDENTITY_TOKEN_FILE") && set("AWS_ROLE_ARN") {
        CredentialSource::WebIdentity
    } else if set("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI")
        || (set("AWS_CONTAINER_CREDENTIALS_FULL_URI")
            && set("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE"))
    {
        CredentialSource::Container
    } else {
        CredentialSource::Instance
    }
}

/// Variables through which object_store finds credentials other than the
/// instance metadata service (IMDS).
const CREDENTIAL_VARS: &[&str] = &[
    "AWS_ACCESS_KEY_ID",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
];

/// With a custom endpoint (MinIO, Garage, Ceph, ...) and no credentials in
/// the environment, object_store would fall back to the EC2 instance
/// metadata service and fail with an IMDS error that says nothing useful.
/// Refuse up front instead, saying which variables to set.
fn no_metadata_credentials(env: &[(String, String)], ep: &self::url::Endpoint) -> Result<()> {
    let set = |name: &str| env.iter().any(|(k, v)| k == name && !v.is_empty());
    let anonymous = env
        .iter()
        .any(|(k, v)| k == "AWS_SKIP_SIGNATURE" && parse_flag(v));
    if anonymous || CREDENTIAL_VARS.iter().any(|n| set(n)) {
        return Ok(());
    }
    Err(Error::InvalidInput(format!(
        "no credentials for the S3 endpoint {}: set AWS_ACCESS_KEY_ID and \
         AWS_SECRET_ACCESS_KEY in the environment (or AWS_SKIP_SIGNATURE=true for \
         a store that takes anonymous requests)",
        self::url::redact(&ep.url)
    )))
}

/// Boolean `AWS_*` variables object_store reads for the S3 builder.
const BOOL_VARS: &[&str] = &[
    "AWS_ALLOW_HTTP",
    "AWS_SKIP_SIGNATURE",
    "AWS_VIRTUAL_HOSTED_STYLE_REQUEST",
    "AWS_ALLOW_INVALID_CERTIFICATES",
    "AWS_IMDSV1_FALLBACK",
    "AWS_S3_EXPRESS",
    "AWS_DISABLE_TAGGING",
];

/// The `AWS_*` variables of `vars`. One whose value is not UTF-8 is
/// refused by name (its value never shown): dropped, a secret key would
/// read as "not set", and a store would be built without it.
fn aws_env(
    vars: impl Iterator<Item = (std::ffi::OsString, std::ffi::OsString)>,
) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for (k, v) in vars {
        let Ok(k) = k.into_string() else { continue };
        if !k.starts_with("AWS_") {
            continue;
        }
        match v.into_string() {
            Ok(v) => out.push((k, v)),
            Err(_) => {
                return Err(Error::InvalidInput(format!(
                    "{k} is set but its value is not valid UTF-8 (a stray byte from a copy or \
                     a file?): set it again, or unset it"
                )));
            }
        }
    }
    Ok(out)
}

/// Every spelling object_store parses as a boolean, either way (it does
/// not trim).
fn is_flag_spelling(v: &str) -> bool {
    matches!(
        v.to_ascii_lowercase().as_str(),
        "1" | "true" | "on" | "yes" | "y" | "0" | "false" | "off" | "no" | "n"
    )
}

/// An access key id without its secret (or the reverse) is refused by
/// name; object_store's answer ("Missing SecretAccessKey") names neither
/// variable. Values are never shown.
fn key_pair_complete(env: &[(String, String)]) -> Result<()> {
    let set = |name: &str| env.iter().any(|(k, v)| k == name && !v.is_empty());
    let (id, secret) = (set("AWS_ACCESS_KEY_ID"), set("AWS_SECRET_ACCESS_KEY"));
    if id == secret {
        return Ok(());
    }
    let (has, lacks) = if id {
        ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
    } else {
        ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID")
    };
    Err(Error::InvalidInput(format!(
        "{has} is set but {lacks} is not (or is empty): set both for a static key, or \
         neither to use other credentials"
    )))
}

/// object_store's boolean spelling (`true`, `1`, `yes`, `on`, `y`).
pub(super) fn parse_flag(v: &str) -> bool {
    matches!(
        v.trim().to_ascii_lowercase().as_str(),
        "1" | "true" | "on" | "yes" | "y"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsString;
    use std::os::unix::ffi::OsStringExt as _;

    #[test]
    fn a_non_utf8_aws_variable_is_refused_by_name_not_dropped() {
        let vars = |secret: OsString| {
            vec![
                (OsString::from("HOME"), OsString::from_vec(vec![0xff])),
                (OsString::from("AWS_ACCESS_KEY_ID"), OsString::from("id")),
                (OsString::from("AWS_SECRET_ACCESS_KEY"), secret),
            ]
            .into_iter()
        };
        let env = aws_env(vars(OsString::from("s3cr3t"))).unwrap();
        assert_eq!(env.len(), 2, "{env:?}");
        let bad = OsString::from_vec(b"s3cr\xfft".to_vec());
        let e = aws_env(vars(bad)).unwrap_err().to_string();
        assert!(e.contains("AWS_SECRET_ACCESS_KEY") && e.contains("not valid UTF-8"), "{e}");
        assert!(!e.contains("s3cr"), "{e}");
    }
}
