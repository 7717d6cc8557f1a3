//! The base of the absolute URLs the gateway hands out (FHIR `fullUrl`s and paging links).
//!
//! A caller's `Host` header is never used: `Host: attacker.example` would otherwise turn our links into theirs.
//! The base is `server.public_base_url` when configured; else, for a request that came through a trusted proxy
//! (`server.trusted_proxies`), that proxy's `X-Forwarded-Proto` and `X-Forwarded-Host` (checked: a scheme of
//! `http` or `https`, a host of sane characters); else `http://<the address the listener is bound to>`.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::HeaderMap;
use axum::http::request::Parts;
use ipnet::IpNet;

use super::AppState;

/// Where links point, as configured.
#[derive(Debug, Clone)]
pub struct PublicUrl {
    /// `server.public_base_url` without its trailing `/`.
    configured: Option<String>,
    /// `http://<bound address>` (`https://` when the listener speaks TLS), without a trailing `/`.
    bound: String,
    /// Peers whose forwarded headers are believed.
    trusted: Vec<IpNet>,
}

impl PublicUrl {
    /// The configured base (already checked at load), the address actually bound, and the trusted proxies.
    #[must_use]
    pub fn new(configured: Option<&str>, bound: SocketAddr, tls: bool, trusted: Vec<IpNet>) -> Self {
        PublicUrl {
            configured: configured.map(|u| u.trim_end_matches('/').to_owned()),
            bound: format!("{}://{bound}", if tls { "https" } else { "http" }),
            trusted,
        }
    }

    /// The base for a request from `peer` with `headers`, without a trailing `/` (`https://gw.example`).
    #[must_use]
    pub fn resolve(&self, peer: Option<IpAddr>, headers: &HeaderMap) -> String {
        if let Some(configured) = &self.configured {
            return configured.clone();
        }
        let trusted = peer.is_some_and(|ip| {
            let ip = ip.to_canonical();
            self.trusted.iter().any(|net| net.contains(&ip))
        });
        if !trusted {
            return self.bound.clone();
        }
        let proto = last_value(headers, "x-forwarded-proto").and_then(|p| match p.to_ascii_lowercase().as_str() {
            "http" => Some("http"),
            "https" => Some("https"),
            _ => None,
        });
        match last_value(headers, "x-forwarded-host").filter(|h| is_host_and_port(h)) {
            Some(host) => format!("{}://{host}", proto.unwrap_or("http")),
            None => match proto {
                Some(proto) => format!("{proto}{}", self.bound.trim_start_matches("http")),
                None => self.bound.clone(),
            },
        }
    }
}

/// The last of a header's comma-separated values: the one our trusted proxy, the nearest hop, added.
fn last_value<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    let value = headers.get_all(name).iter().next_back()?.to_str().ok()?;
    Some(value.rsplit(',').next().unwrap_or(value).trim()).filter(|v| !v.is_empty())
}

/// `host[:port]`: a DNS name or IPv4 address of letters, digits, `.` and `-`, or a bracketed IPv6 address.
fn is_host_and_port(value: &str) -> bool {
    let port_ok = |p: &str| !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit());
    if value.len() > 255 {
        return false;
    }
    if let Some(rest) = value.strip_prefix('[') {
        return rest.split_once(']').is_some_and(|(v6, after)| {
            v6.parse::<std::net::Ipv6Addr>().is_ok()
                && (after.is_empty() || after.strip_prefix(':').is_some_and(port_ok))
        });
    }
    let (host, port) = match value.split_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (value, None),
    };
    !host.is_empty()
        && !host.starts_with(['.', '-'])
        && host.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
        && port.is_none_or(port_ok)
}

/// The base URL of this request's links (see the module doc), for handlers that build absolute URLs.
#[derive(Debug, Clone)]
pub struct RequestBase(pub String);

impl FromRequestParts<AppState> for RequestBase {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let peer = parts.extensions.get::<ConnectInfo<SocketAddr>>().map(|ConnectInfo(addr)| addr.ip());
        Ok(RequestBase(state.public_url.resolve(peer, &parts.headers)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    fn proxy_at(net: &str) -> PublicUrl {
        PublicUrl::new(None, "127.0.0.1:8080".parse().expect("addr"), false, vec![net.parse().expect("net")])
    }

    const FORWARDED: &[(&str, &str)] =
        &[("host", "attacker.example"), ("x-forwarded-proto", "https"), ("x-forwarded-host", "gw.example:8443")];

    #[test]
    fn the_host_header_is_never_the_base() {
        let url = PublicUrl::new(None, "127.0.0.1:8080".parse().expect("addr"), false, Vec::new());
        assert_eq!(url.resolve(Some([127, 0, 0, 1].into()), &headers(FORWARDED)), "http://127.0.0.1:8080");
        assert_eq!(url.resolve(None, &headers(FORWARDED)), "http://127.0.0.1:8080");
    }

    #[test]
    fn a_configured_base_wins_over_a_trusted_proxy() {
        let url = PublicUrl::new(
            Some("https://gw.example/carebridge/"),
            "127.0.0.1:8080".parse().expect("addr"),
            false,
            vec!["127.0.0.0/8".parse().expect("net")],
        );
        assert_eq!(url.resolve(Some([127, 0, 0, 1].into()), &headers(FORWARDED)), "https://gw.example/carebridge");
    }

    #[test]
    fn only_a_trusted_peer_forwards_and_an_ipv4_mapped_address_counts_as_ipv4() {
        let url = proxy_at("10.0.0.0/8");
        assert_eq!(url.resolve(Some([10, 1, 2, 3].into()), &headers(FORWARDED)), "https://gw.example:8443");
        let mapped: IpAddr = "::ffff:10.1.2.3".parse().expect("ip");
        assert_eq!(url.resolve(Some(mapped), &headers(FORWARDED)), "https://gw.example:8443");
        assert_eq!(url.resolve(Some([192, 168, 0, 1].into()), &headers(FORWARDED)), "http://127.0.0.1:8080");
    }

    #[test]
    fn forwarded_values_are_checked_and_the_nearest_hop_counts() {
        let url = proxy_at("127.0.0.1/32");
        let peer = Some([127, 0, 0, 1].into());
        let chained =
            headers(&[("x-forwarded-host", "evil.example, gw.example"), ("x-forwarded-proto", "http, https")]);
        assert_eq!(url.resolve(peer, &chained), "https://gw.example");
        for bad in ["gw.example/evil", "gw.example:80x", "user@gw.example", "gw example", "-gw.example", "[::1"] {
            let mut h = HeaderMap::new();
            h.insert("x-forwarded-host", HeaderValue::from_str(bad).expect("header"));
            assert_eq!(url.resolve(peer, &h), "http://127.0.0.1:8080", "{bad}");
        }
        assert_eq!(url.resolve(peer, &headers(&[("x-forwarded-host", "[::1]:8443")])), "http://[::1]:8443");
        assert_eq!(url.resolve(peer, &headers(&[("x-forwarded-proto", "javascript")])), "http://127.0.0.1:8080");
        assert_eq!(url.resolve(peer, &headers(&[("x-forwarded-proto", "HTTPS")])), "https://127.0.0.1:8080");
    }
}
