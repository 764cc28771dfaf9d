//! The HTTP client of the S3 store: `object_store`'s own, built from the
//! same options, except that it follows no redirect.
//!
//! reqwest follows up to 10 redirects by default and, on one to another
//! host, drops `Authorization` but keeps `x-amz-security-token`: a 307 from
//! the endpoint sent the session token to whatever host it named, in clear
//! text when that was `http://` (helper-49). A redirect never helps a
//! signed S3 request anyway (the signature names the host): S3's own
//! (a bucket in another region) now fail as the clear error
//! `object_store` makes of a redirect status. The upload lister's client
//! does the same (`s3_uploads`).
//!
//! Every option `object_store`'s reqwest connector reads from
//! [`ClientOptions`] is read here through its config keys, with the same
//! defaults (HTTP/1 only, addresses shuffled); root certificates and
//! default headers, which have no config key, are not set by tierindex.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use object_store::client::{DnsResolver, HttpClient, HttpConnector};
use object_store::{ClientConfigKey, ClientOptions};

/// An [`HttpConnector`] for `object_store`: its reqwest client with
/// redirects off.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct NoRedirects;

fn generic(source: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> object_store::Error {
    object_store::Error::Generic {
        store: "S3",
        source: source.into(),
    }
}

impl HttpConnector for NoRedirects {
    fn connect(&self, options: &ClientOptions) -> object_store::Result<HttpClient> {
        let get = |k: ClientConfigKey| options.get_config_value(&k);
        let flag = |k: ClientConfigKey| get(k).is_some_and(|v| super::build::parse_flag(&v));
        let duration = |k: ClientConfigKey| -> object_store::Result<Option<Duration>> {
            match get(k) {
                None => Ok(None),
                Some(v) => humantime::parse_duration(&v)
                    .map(Some)
                    .map_err(|_| generic(format!("{} is not a duration", k.as_ref()))),
            }
        };
        let mut b = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(
                get(ClientConfigKey::UserAgent)
                    .unwrap_or_else(|| concat!("tierindex/", env!("CARGO_PKG_VERSION")).to_string()),
            )
            // As object_store: no transparent decompression (it would
            // break Content-Length, hence object sizes).
            .no_gzip()
            .no_brotli()
            .no_zstd()
            .no_deflate()
            .https_only(!flag(ClientConfigKey::AllowHttp));
        if let Some(p) = get(ClientConfigKey::ProxyUrl) {
            let mut proxy = reqwest::Proxy::all(p.as_str())
                .map_err(|_| generic("the configured proxy URL does not parse"))?;
            if let Some(pem) = get(ClientConfigKey::ProxyCaCertificate) {
                let cert = reqwest::tls::Certificate::from_pem(pem.as_bytes())
                    .map_err(|_| generic("the proxy CA certificate does not parse"))?;
                b = b.tls_certs_merge(std::iter::once(cert));
            }
            if let Some(ex) = get(ClientConfigKey::ProxyExcludes) {
                proxy = proxy.no_proxy(reqwest::NoProxy::from_string(&ex));
            }
            b = b.proxy(proxy);
        }
        if flag(ClientConfigKey::NoSystemCertificates) {
            b = b.tls_certs_only(std::iter::empty());
        }
        if let Some(d) = duration(ClientConfigKey::Timeout)? {
            b = b.timeout(d);
        }
        if let Some(d) = duration(ClientConfigKey::ConnectTimeout)? {
            b = b.connect_timeout(d);
        }
        if let Some(d) = duration(ClientConfigKey::ReadTimeout)? {
            b = b.read_timeout(d);
        }
        if let Some(d) = duration(ClientConfigKey::PoolIdleTimeout)? {
            b = b.pool_idle_timeout(d);
        }
        if let Some(v) = get(ClientConfigKey::PoolMaxIdlePerHost) {
            let n = v
                .parse::<usize>()
                .map_err(|_| generic("pool_max_idle_per_host is not a number"))?;
            b = b.pool_max_idle_per_host(n);
        }
        if let Some(d) = duration(ClientConfigKey::Http2KeepAliveInterval)? {
            b = b.http2_keep_alive_interval(d);
        }
        if let Some(d) = duration(ClientConfigKey::Http2KeepAliveTimeout)? {
            b = b.http2_keep_alive_timeout(d);
        }
        if flag(ClientConfigKey::Http2KeepAliveWhileIdle) {
            b = b.http2_keep_alive_while_idle(true);
        }
        if let Some(v) = get(ClientConfigKey::Http2MaxFrameSize) {
            let n = v
                .parse::<u32>()
                .map_err(|_| generic("http2_max_frame_size is not a number"))?;
            b = b.http2_max_frame_size(Some(n));
        }
        if flag(ClientConfigKey::Http1Only) {
            b = b.http1_only();
        }
        if flag(ClientConfigKey::Http2Only) {
            b = b.http2_prior_knowledge();
        }
        if flag(ClientConfigKey::AllowInvalidCertificates) {
            b = b.danger_accept_invalid_certs(true);
        }
        let resolver: Option<Arc<dyn DnsResolver>> = match options.dns_resolver() {
            Some(r) => Some(Arc::clone(r)),
            None if flag(ClientConfigKey::RandomizeAddresses) => Some(Arc::new(Shuffle)),
            None => None,
        };
        if let Some(r) = resolver {
            b = b.dns_resolver(Arc::new(Resolver(r)));
        }
        let client = b
            .build()
            .map_err(|e| generic(format!("HTTP client: {}", e.without_url())))?;
        Ok(HttpClient::new(client))
    }
}

/// A [`DnsResolver`] as reqwest takes one.
struct Resolver(Arc<dyn DnsResolver>);

impl reqwest::dns::Resolve for Resolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let r = Arc::clone(&self.0);
        let host = name.as_str().to_string();
        Box::pin(async move {
            let ips = r.resolve(&host).await?;
            // Port 0: reqwest puts the URL's port in its place.
            let addrs: reqwest::dns::Addrs =
                Box::new(ips.into_iter().map(|ip| SocketAddr::new(ip, 0)));
            Ok(addrs)
        })
    }
}

/// The system's addresses of a host in random order (object_store's
/// default: requests spread over a service's addresses).
#[derive(Debug)]
struct Shuffle;

impl DnsResolver for Shuffle {
    fn resolve(&self, host: &str) -> object_store::client::DnsFuture {
        let host = host.to_string();
        Box::pin(async move {
            let mut ips: Vec<IpAddr> = tokio::task::spawn_blocking(move || {
                (host.as_str(), 0)
                    .to_socket_addrs()
                    .map(|it| it.map(|a| a.ip()).collect::<Vec<_>>())
            })
            .await
            .map_err(|e| Box::new(e) as object_store::client::DnsError)??;
            fastrand::shuffle(&mut ips);
            Ok(ips)
        })
    }
}
