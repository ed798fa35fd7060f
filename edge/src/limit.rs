//! Limits per client at the public edges, in bounded memory whatever the number of clients:
//!
//! - [`KeyedRateLimiter`]: a token bucket per key (a client's address, a user), at most
//!   [`RateSettings::capacity`] keys remembered;
//! - [`ConnectionGate`]: open connections, in total and per client address;
//! - [`client_key`] and [`client_address`]: the address a client is known by (an IPv6 client by
//!   its /64, which is what one subscriber gets; behind trusted proxies, the right-most
//!   `X-Forwarded-For` hop a trusted proxy appended).

use std::collections::HashMap;
use std::hash::Hash;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use http::HeaderMap;
use tokio::time::Instant;

/// A bucket's refill, burst and how many keys are remembered.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateSettings {
    /// Tokens added per second.
    pub per_second: f64,
    /// Tokens a bucket holds when full: requests accepted at once.
    pub burst: u32,
    /// Keys remembered at most. Past it, the keys not seen for longest are forgotten (they
    /// start again with a full bucket), so memory stays bounded under address churn.
    pub capacity: usize,
}

/// A refused request: when the client may try again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limited {
    pub retry_after: Duration,
}

impl Limited {
    /// Whole seconds, at least 1, for a `Retry-After` header.
    pub fn retry_after_secs(&self) -> u64 {
        self.retry_after.as_secs_f64().ceil().max(1.0) as u64
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Two generations of buckets, each at most half the capacity: a key is looked up in both and
/// kept in the current one; when the current one is full, the previous one (keys not seen
/// since the last swap) is dropped whole. O(1) per request, memory bounded by `capacity`.
#[derive(Debug)]
struct Generations<K> {
    current: HashMap<K, Bucket>,
    previous: HashMap<K, Bucket>,
}

/// A token bucket per key, in bounded memory.
#[derive(Debug)]
pub struct KeyedRateLimiter<K> {
    settings: RateSettings,
    half: usize,
    state: Mutex<Generations<K>>,
}

/// When a key is refused and its bucket never refills (`per_second` 0).
const NEVER_REFILLS: Duration = Duration::from_secs(3600);

impl<K: Hash + Eq + Clone> KeyedRateLimiter<K> {
    pub fn new(settings: RateSettings) -> Self {
        let half = (settings.capacity / 2).max(1);
        Self {
            settings: RateSettings {
                per_second: settings.per_second.max(0.0),
                burst: settings.burst.max(1),
                capacity: half * 2,
            },
            half,
            state: Mutex::new(Generations {
                current: HashMap::new(),
                previous: HashMap::new(),
            }),
        }
    }

    pub fn settings(&self) -> RateSettings {
        self.settings
    }

    fn lock(&self) -> MutexGuard<'_, Generations<K>> {
        match self.state.lock() {
            Ok(state) => state,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Takes a token from `key`'s bucket, or says when one will be there.
    pub fn check(&self, key: &K) -> Result<(), Limited> {
        let now = Instant::now();
        let burst = f64::from(self.settings.burst);
        let mut state = self.lock();
        let bucket = match state.current.get(key) {
            Some(bucket) => *bucket,
            None => {
                let bucket = state.previous.remove(key).unwrap_or(Bucket {
                    tokens: burst,
                    at: now,
                });
                if state.current.len() >= self.half {
                    state.previous = std::mem::take(&mut state.current);
                }
                bucket
            }
        };
        let refilled = now.duration_since(bucket.at).as_secs_f64() * self.settings.per_second;
        let mut bucket = Bucket {
            tokens: (bucket.tokens + refilled).min(burst),
            at: now,
        };
        let answer = if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else if self.settings.per_second > 0.0 {
            Err(Limited {
                retry_after: Duration::from_secs_f64(
                    (1.0 - bucket.tokens) / self.settings.per_second,
                ),
            })
        } else {
            Err(Limited {
                retry_after: NEVER_REFILLS,
            })
        };
        state.current.insert(key.clone(), bucket);
        answer
    }

    /// Keys remembered now (at most [`RateSettings::capacity`]).
    pub fn len(&self) -> usize {
        let state = self.lock();
        state.current.len() + state.previous.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The address a client is limited by: an IPv4 address as it is (an IPv4-mapped IPv6 one as
/// IPv4), an IPv6 address by its /64 (one subscriber's share; counting single addresses would
/// let one host take 2^64 buckets).
pub fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// The client's address: the peer's, or behind `trusted_proxies` proxies (Heroku's router is
/// one, and appends the address it saw to `X-Forwarded-For`) the hop the outermost trusted
/// proxy appended, the right-most one no client can forge. A request with fewer hops than
/// trusted proxies did not come through them all: its left-most hop (or the peer) is used.
/// A hop that is not an address falls back to the peer.
pub fn client_address(peer: IpAddr, headers: &HeaderMap, trusted_proxies: usize) -> IpAddr {
    if trusted_proxies == 0 {
        return peer;
    }
    let hops: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(str::trim)
        .filter(|hop| !hop.is_empty())
        .collect();
    let Some(hop) = hops
        .len()
        .checked_sub(trusted_proxies)
        .map_or(hops.first(), |at| hops.get(at))
    else {
        return peer;
    };
    parse_hop(hop).unwrap_or(peer)
}

/// `1.2.3.4`, `1.2.3.4:567`, `::1` or `[::1]:567`.
fn parse_hop(hop: &str) -> Option<IpAddr> {
    if let Ok(ip) = hop.parse::<IpAddr>() {
        return Some(ip);
    }
    hop.parse::<std::net::SocketAddr>().ok().map(|a| a.ip())
}

/// Open connections on one listener: at most `total`, at most `per_address` from one
/// [`client_key`]. Memory is bounded by `total` (one count per address with a connection).
#[derive(Debug)]
pub struct ConnectionGate {
    total: usize,
    per_address: usize,
    open: Mutex<OpenConnections>,
}

#[derive(Debug, Default)]
struct OpenConnections {
    total: usize,
    by_address: HashMap<IpAddr, usize>,
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum GateRefusal {
    #[error("{0} connections open: the listener's limit")]
    Total(usize),
    #[error("{0} connections open from this address: its limit")]
    PerAddress(usize),
}

/// One admitted connection; dropping it frees its place.
#[derive(Debug)]
pub struct ConnectionPermit {
    gate: Arc<ConnectionGate>,
    key: IpAddr,
}

impl ConnectionGate {
    /// `per_address` 0: no per-address limit (behind a proxy every peer is the proxy).
    pub fn new(total: usize, per_address: usize) -> Arc<Self> {
        Arc::new(Self {
            total: total.max(1),
            per_address: if per_address == 0 {
                usize::MAX
            } else {
                per_address
            },
            open: Mutex::new(OpenConnections::default()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, OpenConnections> {
        match self.open.lock() {
            Ok(open) => open,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// A place for a connection from `peer`, if there is one.
    pub fn admit(self: &Arc<Self>, peer: IpAddr) -> Result<ConnectionPermit, GateRefusal> {
        let key = client_key(peer);
        let mut open = self.lock();
        if open.total >= self.total {
            return Err(GateRefusal::Total(self.total));
        }
        let from_peer = open.by_address.entry(key).or_insert(0);
        if *from_peer >= self.per_address {
            return Err(GateRefusal::PerAddress(self.per_address));
        }
        *from_peer += 1;
        open.total += 1;
        Ok(ConnectionPermit {
            gate: self.clone(),
            key,
        })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.lock().total
    }
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        let mut open = self.gate.lock();
        open.total = open.total.saturating_sub(1);
        if let Some(from_peer) = open.by_address.get_mut(&self.key) {
            *from_peer = from_peer.saturating_sub(1);
            if *from_peer == 0 {
                open.by_address.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn v4(n: u32) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(n))
    }

    #[tokio::test(start_paused = true)]
    async fn a_bucket_refuses_past_its_burst_and_refills_at_its_rate() {
        let limiter = KeyedRateLimiter::new(RateSettings {
            per_second: 2.0,
            burst: 3,
            capacity: 16,
        });
        for _ in 0..3 {
            assert_eq!(limiter.check(&v4(1)), Ok(()));
        }
        let refused = limiter.check(&v4(1)).unwrap_err();
        assert_eq!(refused.retry_after, Duration::from_millis(500));
        assert_eq!(refused.retry_after_secs(), 1);
        // Another key has its own bucket.
        assert_eq!(limiter.check(&v4(2)), Ok(()));
        tokio::time::advance(Duration::from_millis(500)).await;
        assert_eq!(limiter.check(&v4(1)), Ok(()));
        assert!(limiter.check(&v4(1)).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn memory_stays_bounded_under_address_churn_and_recent_keys_are_kept() {
        let limiter = KeyedRateLimiter::new(RateSettings {
            per_second: 0.0,
            burst: 1,
            capacity: 64,
        });
        assert_eq!(limiter.check(&v4(0)), Ok(()));
        for n in 1..100_000 {
            let _ = limiter.check(&v4(n));
            // The spent key stays spent while it keeps being seen.
            if n % 16 == 0 {
                assert!(limiter.check(&v4(0)).is_err(), "at {n}");
            }
            assert!(limiter.len() <= 64, "{} keys at {n}", limiter.len());
        }
    }

    #[test]
    fn ipv6_clients_are_counted_by_their_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::2".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(client_key(a), client_key(b));
        assert_ne!(client_key(a), client_key(c));
        let mapped: IpAddr = "::ffff:10.1.2.3".parse().unwrap();
        assert_eq!(client_key(mapped), "10.1.2.3".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn the_client_is_the_right_most_hop_no_client_can_forge() {
        let peer: IpAddr = "10.0.0.1".parse().unwrap();
        let mut headers = HeaderMap::new();
        assert_eq!(client_address(peer, &headers, 0), peer);
        assert_eq!(client_address(peer, &headers, 1), peer);
        headers.insert("x-forwarded-for", "6.6.6.6, 1.2.3.4".parse().unwrap());
        // No trusted proxy: the header is the client's to write, so it is ignored.
        assert_eq!(client_address(peer, &headers, 0), peer);
        assert_eq!(
            client_address(peer, &headers, 1),
            "1.2.3.4".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            client_address(peer, &headers, 2),
            "6.6.6.6".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            client_address(peer, &headers, 3),
            "6.6.6.6".parse::<IpAddr>().unwrap()
        );
        headers.append("x-forwarded-for", "[2001:db8::1]:443".parse().unwrap());
        assert_eq!(
            client_address(peer, &headers, 1),
            "2001:db8::1".parse::<IpAddr>().unwrap()
        );
        headers.insert("x-forwarded-for", "garbage".parse().unwrap());
        assert_eq!(client_address(peer, &headers, 1), peer);
    }

    #[test]
    fn connections_are_capped_per_address_and_in_total() {
        let gate = ConnectionGate::new(3, 2);
        let a1 = gate.admit(v4(1)).unwrap();
        let _a2 = gate.admit(v4(1)).unwrap();
        assert_eq!(gate.admit(v4(1)).unwrap_err(), GateRefusal::PerAddress(2));
        let _b1 = gate.admit(v4(2)).unwrap();
        assert_eq!(gate.admit(v4(3)).unwrap_err(), GateRefusal::Total(3));
        drop(a1);
        assert_eq!(gate.open(), 2);
        let _a3 = gate.admit(v4(1)).unwrap();
        assert_eq!(gate.open(), 3);
    }
}
