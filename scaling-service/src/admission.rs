//! Who may make an assign request, and how often: a token bucket per client address checked
//! before authentication (a stranger spends only their own address's budget, never another
//! user's), then a token bucket per user after it (one account cannot flood from many
//! addresses). Both keep at most [`AdmissionSettings::keys`] keys each, so memory stays bounded
//! whatever the address churn (see [`edge::limit::KeyedRateLimiter`]).
//!
//! The client's address is the peer's, or behind [`AdmissionSettings::trusted_proxies`] proxies
//! the right-most `X-Forwarded-For` hop they appended ([`edge::limit::client_address`]); IPv6
//! clients are counted by their /64.

use std::net::{IpAddr, Ipv4Addr};

use axum::http::HeaderMap;
use dbclient::types::UserId;
use edge::limit::{KeyedRateLimiter, Limited, RateSettings, client_address, client_key};

/// Assign requests per second per client address (`WHIST_ASSIGN_RATE_PER_ADDRESS`). An office
/// behind one NAT shares it; a user assigns once per session, a retrying client every few
/// seconds.
pub const DEFAULT_RATE_PER_ADDRESS: f64 = 5.0;
/// Burst per client address (`WHIST_ASSIGN_BURST_PER_ADDRESS`).
pub const DEFAULT_BURST_PER_ADDRESS: u32 = 30;
/// Assign requests per second per user (`WHIST_ASSIGN_RATE_PER_USER`).
pub const DEFAULT_RATE_PER_USER: f64 = 1.0;
/// Burst per user (`WHIST_ASSIGN_BURST_PER_USER`).
pub const DEFAULT_BURST_PER_USER: u32 = 10;
/// Keys each limiter remembers (`WHIST_RATE_LIMIT_KEYS`): 65,536 addresses take about 4 MiB,
/// 65,536 users (ids up to 256 bytes) at most about 20 MiB.
pub const DEFAULT_KEYS: usize = 65_536;

/// How assign requests are admitted.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdmissionSettings {
    pub per_address: RateSettings,
    pub per_user: RateSettings,
    /// Proxies in front of the service that append to `X-Forwarded-For` (Heroku's router: 1).
    /// 0: the peer is the client and the header is ignored.
    pub trusted_proxies: usize,
}

impl AdmissionSettings {
    /// The defaults above, with `keys` per limiter.
    pub fn new(keys: usize) -> Self {
        Self {
            per_address: RateSettings {
                per_second: DEFAULT_RATE_PER_ADDRESS,
                burst: DEFAULT_BURST_PER_ADDRESS,
                capacity: keys,
            },
            per_user: RateSettings {
                per_second: DEFAULT_RATE_PER_USER,
                burst: DEFAULT_BURST_PER_USER,
                capacity: keys,
            },
            trusted_proxies: 0,
        }
    }

    /// Limits no test reaches (for tests and benches that measure something else).
    pub fn unlimited() -> Self {
        let open = RateSettings {
            per_second: 1e9,
            burst: u32::MAX,
            capacity: 1024,
        };
        Self {
            per_address: open,
            per_user: open,
            trusted_proxies: 0,
        }
    }
}

impl Default for AdmissionSettings {
    fn default() -> Self {
        Self::new(DEFAULT_KEYS)
    }
}

/// Which limit refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    Address(Limited),
    User(Limited),
}

impl Refused {
    pub fn limited(&self) -> Limited {
        match self {
            Self::Address(limited) | Self::User(limited) => *limited,
        }
    }
}

/// The two limiters.
#[derive(Debug)]
pub struct Admission {
    per_address: KeyedRateLimiter<IpAddr>,
    per_user: KeyedRateLimiter<UserId>,
    trusted_proxies: usize,
}

impl Admission {
    pub fn new(settings: AdmissionSettings) -> Self {
        Self {
            per_address: KeyedRateLimiter::new(settings.per_address),
            per_user: KeyedRateLimiter::new(settings.per_user),
            trusted_proxies: settings.trusted_proxies,
        }
    }

    /// The address a request is counted against (`peer` `None`: served without a socket, as
    /// in tests that drive the router directly; all such requests share one bucket).
    pub fn client(&self, peer: Option<IpAddr>, headers: &HeaderMap) -> IpAddr {
        let peer = peer.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        client_key(client_address(peer, headers, self.trusted_proxies))
    }

    /// Before authentication.
    pub fn check_address(&self, client: IpAddr) -> Result<(), Refused> {
        self.per_address.check(&client).map_err(Refused::Address)
    }

    /// After authentication.
    pub fn check_user(&self, user: &UserId) -> Result<(), Refused> {
        self.per_user.check(user).map_err(Refused::User)
    }

    /// Addresses and users remembered now.
    pub fn keys(&self) -> (usize, usize) {
        (self.per_address.len(), self.per_user.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn one_address_spends_its_own_budget_only() {
        let admission = Admission::new(AdmissionSettings {
            per_address: RateSettings {
                per_second: 0.0,
                burst: 2,
                capacity: 16,
            },
            ..AdmissionSettings::unlimited()
        });
        let stranger = admission.client(Some("6.6.6.6".parse().unwrap()), &HeaderMap::new());
        let user = admission.client(Some("1.2.3.4".parse().unwrap()), &HeaderMap::new());
        assert!(admission.check_address(stranger).is_ok());
        assert!(admission.check_address(stranger).is_ok());
        assert!(matches!(
            admission.check_address(stranger),
            Err(Refused::Address(_))
        ));
        assert!(admission.check_address(user).is_ok());
    }

    #[test]
    fn behind_one_proxy_the_forwarded_address_is_the_client() {
        let admission = Admission::new(AdmissionSettings {
            trusted_proxies: 1,
            ..AdmissionSettings::unlimited()
        });
        let mut headers = HeaderMap::new();
        headers.insert("x-forwarded-for", "9.9.9.9, 1.2.3.4".parse().unwrap());
        let router: IpAddr = "10.1.0.1".parse().unwrap();
        assert_eq!(
            admission.client(Some(router), &headers),
            "1.2.3.4".parse::<IpAddr>().unwrap()
        );
    }
}
