//! Outbound calls to addresses an org chooses (alert webhooks) never reach
//! the dispatcher's own network.
//!
//! A destination's host is checked where the connection is made, not
//! before it: the HTTP client resolves names only through [`Guard`], which
//! drops the call when any address of the name is not a public one, so
//! the address checked is the address connected to (no second lookup, no
//! DNS-rebinding window). An IP literal is never resolved; [`Guard::check_url`]
//! vets it (the URL parser has already turned `127.1`, `2130706433` and
//! `0x7f.1` into `127.0.0.1`). The client ignores proxy variables and
//! follows no redirects, so the checked hop is the only hop.
//!
//! "Public" is the IANA special-purpose registries' "globally reachable":
//! [`is_forbidden`] refuses loopback, unspecified, private, shared (CGNAT),
//! link-local (cloud metadata), benchmarking, documentation, multicast and
//! reserved ranges, and looks inside IPv4-mapped, NAT64 and 6to4 IPv6
//! addresses at the IPv4 address they carry. Hosts named in
//! `Settings::alert_allow_hosts` skip the check (local receivers in
//! development and tests).

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, LazyLock};

use ipnet::{Ipv4Net, Ipv6Net};

/// IPv4 ranges that are not globally reachable (IANA IPv4 special-purpose
/// address registry) plus multicast.
static V4_FORBIDDEN: LazyLock<Vec<Ipv4Net>> = LazyLock::new(|| {
    [
        "0.0.0.0/8",       // "this network", incl. 0.0.0.0
        "10.0.0.0/8",      // private
        "100.64.0.0/10",   // shared address space (CGNAT; Alibaba metadata)
        "127.0.0.0/8",     // loopback
        "169.254.0.0/16",  // link-local (AWS/GCP/Azure metadata)
        "172.16.0.0/12",   // private
        "192.0.0.0/24",    // IETF protocol assignments
        "192.0.2.0/24",    // documentation
        "192.88.99.0/24",  // 6to4 relay anycast
        "192.168.0.0/16",  // private
        "198.18.0.0/15",   // benchmarking
        "198.51.100.0/24", // documentation
        "203.0.113.0/24",  // documentation
        "224.0.0.0/4",     // multicast
        "240.0.0.0/4",     // reserved, incl. 255.255.255.255
    ]
    .iter()
    .map(|n| n.parse().expect("a CIDR"))
    .collect()
});

/// IPv6 ranges that are not globally reachable (IANA IPv6 special-purpose
/// registry) plus multicast and the deprecated site-local and
/// IPv4-compatible ranges. The three that embed an IPv4 address are not
/// here: [`is_forbidden`] looks at the address they carry.
static V6_FORBIDDEN: LazyLock<Vec<Ipv6Net>> = LazyLock::new(|| {
    [
        "::/96",          // unspecified, loopback, IPv4-compatible (deprecated)
        "64:ff9b:1::/48", // local-use NAT64
        "100::/64",       // discard-only
        "2001::/23",      // IETF protocol assignments (Teredo, ORCHID, …)
        "2001:db8::/32",  // documentation
        "3fff::/20",      // documentation
        "5f00::/16",      // segment routing SIDs
        "fc00::/7",       // unique local
        "fe80::/10",      // link-local
        "fec0::/10",      // site-local (deprecated)
        "ff00::/8",       // multicast
    ]
    .iter()
    .map(|n| n.parse().expect("a CIDR"))
    .collect()
});

/// Whether a webhook must never connect to `ip`.
pub fn is_forbidden(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => V4_FORBIDDEN.iter().any(|n| n.contains(&v4)),
        IpAddr::V6(v6) => match embedded_v4(v6) {
            Some(v4) => is_forbidden(v4.into()),
            None => V6_FORBIDDEN.iter().any(|n| n.contains(&v6)),
        },
    }
}

/// The IPv4 address an IPv4-mapped (`::ffff:a.b.c.d`), NAT64
/// (`64:ff9b::a.b.c.d`) or 6to4 (`2002:aabb:ccdd::/48`) address stands for.
fn embedded_v4(v6: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = v6.segments();
    let tail = || Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
    if s[..5] == [0, 0, 0, 0, 0] && s[5] == 0xffff {
        return Some(tail());
    }
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return Some(tail());
    }
    if s[0] == 0x2002 {
        return Some(Ipv4Addr::new(
            (s[1] >> 8) as u8,
            s[1] as u8,
            (s[2] >> 8) as u8,
            s[2] as u8,
        ));
    }
    None
}

/// Why a destination is not called; the delivery is dead, not retried.
#[derive(Debug, thiserror::Error)]
#[error("{host} resolves to {addr}, an internal address; not delivered (serve --alerts-allow-hosts allows a chosen host)")]
pub struct Refused {
    pub host: String,
    pub addr: IpAddr,
}

/// The address policy of outbound webhook calls, and the HTTP client's
/// only resolver.
#[derive(Clone, Debug, Default)]
pub struct Guard {
    allowed: Arc<HashSet<String>>,
}

impl Guard {
    /// `allowed`: host names or IP literals (as written in URLs, brackets
    /// optional for IPv6) that may be internal.
    pub fn new<S: AsRef<str>>(allowed: &[S]) -> Guard {
        let allowed = allowed
            .iter()
            .map(|h| {
                h.as_ref()
                    .trim()
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .to_ascii_lowercase()
            })
            .filter(|h| !h.is_empty())
            .collect();
        Guard {
            allowed: Arc::new(allowed),
        }
    }

    fn allows(&self, host: &str) -> bool {
        self.allowed.contains(&host.to_ascii_lowercase())
    }

    /// Vets a URL's IP-literal host (names are vetted when resolved).
    pub fn check_url(&self, url: &reqwest::Url) -> Result<(), Refused> {
        let host = url.host_str().unwrap_or_default();
        let Ok(ip) = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
        else {
            return Ok(());
        };
        if !self.allows(&ip.to_string()) && is_forbidden(ip) {
            return Err(Refused {
                host: ip.to_string(),
                addr: ip,
            });
        }
        Ok(())
    }

    /// An HTTP client that resolves only through this guard, uses no proxy
    /// and follows no redirect.
    pub fn client(&self, timeout: std::time::Duration) -> reqwest::Client {
        reqwest::Client::builder()
            .timeout(timeout)
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .dns_resolver(Arc::new(self.clone()))
            .build()
            .expect("an HTTP client")
    }

    /// The `Refused` somewhere in a failed call's error chain.
    pub fn refusal<'a>(mut e: &'a (dyn std::error::Error + 'static)) -> Option<&'a Refused> {
        loop {
            if let Some(r) = e.downcast_ref::<Refused>() {
                return Some(r);
            }
            e = e.source()?;
        }
    }
}

impl reqwest::dns::Resolve for Guard {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_owned();
        let allowed = self.allows(&host);
        Box::pin(async move {
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            if !allowed {
                if let Some(bad) = addrs.iter().find(|a| is_forbidden(a.ip())) {
                    return Err(Box::new(Refused {
                        host,
                        addr: bad.ip(),
                    })
                        as Box<dyn std::error::Error + Send + Sync>);
                }
            }
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn forbidden(s: &str) -> bool {
        is_forbidden(s.parse().unwrap())
    }

    #[test]
    fn every_special_purpose_range_is_refused_and_public_addresses_are_not() {
        for ip in [
            "0.0.0.0",
            "0.1.2.3",
            "10.1.2.3",
            "100.64.0.1",
            "100.100.100.200",
            "127.0.0.1",
            "127.255.255.254",
            "169.254.169.254",
            "172.31.255.255",
            "192.0.0.8",
            "192.168.1.1",
            "198.18.0.1",
            "198.19.255.255",
            "224.0.0.1",
            "239.255.255.250",
            "240.0.0.1",
            "255.255.255.255",
            "::",
            "::1",
            "::127.0.0.1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::7f00:1",
            "64:ff9b::a9fe:a9fe",
            "64:ff9b:1::1",
            "2002:7f00:1::1",
            "2002:a9fe:a9fe::",
            "2001::1",
            "2001:db8::1",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "fec0::1",
            "ff02::1",
        ] {
            assert!(forbidden(ip), "{ip} must be refused");
        }
        for ip in [
            "1.1.1.1",
            "8.8.8.8",
            "100.63.255.255",
            "100.128.0.0",
            "172.32.0.1",
            "198.20.0.1",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
            "2002:808:808::1",
        ] {
            assert!(!forbidden(ip), "{ip} is public");
        }
    }

    #[test]
    fn every_spelling_of_loopback_in_a_url_is_refused() {
        let guard = Guard::default();
        for url in [
            "http://127.0.0.1/",
            "http://127.1/",
            "http://2130706433/",
            "http://0x7f000001/",
            "http://0177.0.0.1/",
            "http://[::ffff:127.0.0.1]/",
            "http://[::ffff:7f00:1]/",
            "http://[::1]/",
            "http://0.0.0.0/",
            "http://0/",
            "http://169.254.169.254/latest/meta-data/",
        ] {
            let u = reqwest::Url::parse(url).unwrap();
            assert!(guard.check_url(&u).is_err(), "{url} must be refused");
        }
        assert!(Guard::new(&["127.0.0.1"])
            .check_url(&reqwest::Url::parse("http://127.1:9/").unwrap())
            .is_ok());
        assert!(Guard::new(&["[::1]"])
            .check_url(&reqwest::Url::parse("http://[::1]:9/").unwrap())
            .is_ok());
    }
}
