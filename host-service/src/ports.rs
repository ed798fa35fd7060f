//! Host ports for mandelboxes' published container ports.
//!
//! The choice is a pure function of what is taken: [`PortAllocator::allocate`] takes the set of
//! ports to publish and a predicate saying whether the host itself uses a port (the effect, kept
//! outside), and either takes one host port per request or takes none. Unlike the original, which
//! probed 100 random ports and ignored the host's own sockets, it scans the whole range from a
//! rotating cursor, so it fails only when the range is really full, and it never hands out a
//! port something else on the host is using.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::ops::Range;

use serde::{Deserialize, Serialize};

/// Transport protocol of a port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        })
    }
}

/// A container port a mandelbox publishes, e.g. `32262/tcp`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ContainerPort {
    pub port: u16,
    pub protocol: Protocol,
}

impl fmt::Display for ContainerPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.port, self.protocol)
    }
}

/// The ports every mandelbox publishes (the protocol's discovery, UDP and TCP ports, and the
/// browser-extension socket of the later original).
pub const MANDELBOX_PORTS: [ContainerPort; 4] = [
    ContainerPort {
        port: 32261,
        protocol: Protocol::Tcp,
    },
    ContainerPort {
        port: 32262,
        protocol: Protocol::Tcp,
    },
    ContainerPort {
        port: 32263,
        protocol: Protocol::Udp,
    },
    ContainerPort {
        port: 32273,
        protocol: Protocol::Tcp,
    },
];

/// The range the original used, "from the Docker daemon source": above the privileged ports and
/// below the IANA dynamic range.
pub const DEFAULT_RANGE: Range<u16> = 1025..49151;

/// Host ports taken by one mandelbox, keyed by the container port they publish.
pub type PortMap = BTreeMap<ContainerPort, u16>;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PortError {
    #[error("no free host port for {0} in {1:?}")]
    Exhausted(ContainerPort, Range<u16>),
    #[error("host port {port}/{protocol} was not allocated")]
    NotAllocated { port: u16, protocol: Protocol },
    #[error("empty host port range")]
    EmptyRange,
}

/// Which host ports are taken by mandelboxes or reserved (e.g. the host service's own 4678).
#[derive(Debug, Clone)]
pub struct PortAllocator {
    range: Range<u16>,
    taken: BTreeSet<(Protocol, u16)>,
    reserved: BTreeSet<(Protocol, u16)>,
    cursor: u16,
}

impl PortAllocator {
    pub fn new(range: Range<u16>) -> Result<Self, PortError> {
        if range.is_empty() {
            return Err(PortError::EmptyRange);
        }
        Ok(Self {
            cursor: range.start,
            range,
            taken: BTreeSet::new(),
            reserved: BTreeSet::new(),
        })
    }

    /// Marks a port as never to be handed out.
    pub fn reserve(&mut self, protocol: Protocol, port: u16) {
        self.reserved.insert((protocol, port));
    }

    /// Marks a port as taken by an existing mandelbox (adopted after a restart).
    pub fn mark_taken(&mut self, protocol: Protocol, port: u16) {
        self.taken.insert((protocol, port));
    }

    pub fn is_taken(&self, protocol: Protocol, port: u16) -> bool {
        self.taken.contains(&(protocol, port)) || self.reserved.contains(&(protocol, port))
    }

    /// Number of ports currently taken by mandelboxes.
    pub fn taken_count(&self) -> usize {
        self.taken.len()
    }

    /// Takes one host port for each of `wanted`, skipping ports taken here or reported in use by
    /// `in_use_on_host`. All or nothing: on failure nothing stays taken.
    pub fn allocate(
        &mut self,
        wanted: &[ContainerPort],
        mut in_use_on_host: impl FnMut(Protocol, u16) -> bool,
    ) -> Result<PortMap, PortError> {
        let mut chosen = PortMap::new();
        for &want in wanted {
            match self.next_free(want.protocol, &mut in_use_on_host) {
                Some(port) => {
                    self.taken.insert((want.protocol, port));
                    chosen.insert(want, port);
                }
                None => {
                    for (c, port) in &chosen {
                        self.taken.remove(&(c.protocol, *port));
                    }
                    return Err(PortError::Exhausted(want, self.range.clone()));
                }
            }
        }
        Ok(chosen)
    }

    /// Releases exactly the ports of `map`. Every port must have been taken.
    pub fn free(&mut self, map: &PortMap) -> Result<(), PortError> {
        for (c, port) in map {
            if !self.taken.contains(&(c.protocol, *port)) {
                return Err(PortError::NotAllocated {
                    port: *port,
                    protocol: c.protocol,
                });
            }
        }
        for (c, port) in map {
            self.taken.remove(&(c.protocol, *port));
        }
        Ok(())
    }

    fn next_free(
        &mut self,
        protocol: Protocol,
        in_use_on_host: &mut impl FnMut(Protocol, u16) -> bool,
    ) -> Option<u16> {
        let len = usize::from(self.range.end - self.range.start);
        for step in 0..len {
            let offset = (usize::from(self.cursor - self.range.start) + step) % len;
            let port = self.range.start + offset as u16;
            if !self.is_taken(protocol, port) && !in_use_on_host(protocol, port) {
                // The next search starts after this port, so a port freed a moment ago is not
                // handed to the next mandelbox while a client may still be talking to it.
                self.cursor = self.range.start + ((offset + 1) % len) as u16;
                return Some(port);
            }
        }
        None
    }
}

/// Whether something on this host already listens on (or has bound) `port`: tries to bind it on
/// all interfaces. The effect behind [`PortAllocator::allocate`]'s predicate.
pub fn in_use_on_host(protocol: Protocol, port: u16) -> bool {
    let addr = std::net::SocketAddr::from(([0, 0, 0, 0], port));
    match protocol {
        Protocol::Tcp => std::net::TcpListener::bind(addr).is_err(),
        Protocol::Udp => std::net::UdpSocket::bind(addr).is_err(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn never(_: Protocol, _: u16) -> bool {
        false
    }

    #[test]
    fn allocates_one_distinct_port_per_request() {
        let mut a = PortAllocator::new(40000..40010).unwrap();
        let m = a.allocate(&MANDELBOX_PORTS, never).unwrap();
        assert_eq!(m.len(), 4);
        let tcp: BTreeSet<u16> = m
            .iter()
            .filter(|(c, _)| c.protocol == Protocol::Tcp)
            .map(|(_, p)| *p)
            .collect();
        assert_eq!(tcp.len(), 3);
    }

    #[test]
    fn skips_ports_in_use_on_the_host_and_reserved_ones() {
        let mut a = PortAllocator::new(40000..40004).unwrap();
        a.reserve(Protocol::Tcp, 40000);
        let want = [ContainerPort {
            port: 1,
            protocol: Protocol::Tcp,
        }];
        let m = a.allocate(&want, |_, p| p == 40001).unwrap();
        assert_eq!(m[&want[0]], 40002);
    }

    #[test]
    fn exhaustion_takes_nothing() {
        let mut a = PortAllocator::new(40000..40002).unwrap();
        let err = a.allocate(&MANDELBOX_PORTS, never).unwrap_err();
        assert!(matches!(err, PortError::Exhausted(..)));
        assert_eq!(a.taken_count(), 0);
    }

    #[test]
    fn free_of_unknown_port_changes_nothing() {
        let mut a = PortAllocator::new(40000..40100).unwrap();
        let m = a.allocate(&MANDELBOX_PORTS, never).unwrap();
        let mut bogus = m.clone();
        bogus.insert(
            ContainerPort {
                port: 9,
                protocol: Protocol::Udp,
            },
            40099,
        );
        assert!(a.free(&bogus).is_err());
        assert_eq!(a.taken_count(), 4);
        a.free(&m).unwrap();
        assert_eq!(a.taken_count(), 0);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Allocate(Vec<u16>),
        Free(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            proptest::collection::vec(0u16..40, 0..4).prop_map(Op::Allocate),
            (0usize..16).prop_map(Op::Free),
        ]
    }

    proptest! {
        /// No host port is ever held by two mandelboxes, or by a mandelbox and the host, and a
        /// free returns exactly what was taken.
        #[test]
        fn no_double_assignment_and_frees_are_exact(
            ops in proptest::collection::vec(op(), 1..60),
            busy in proptest::collection::btree_set(30000u16..30030, 0..10),
        ) {
            let mut a = PortAllocator::new(30000..30030).unwrap();
            let mut live: Vec<PortMap> = Vec::new();
            for op in ops {
                match op {
                    Op::Allocate(protos) => {
                        let wanted: Vec<ContainerPort> = protos.iter().enumerate().map(|(i, p)| {
                            ContainerPort {
                                port: 1000 + i as u16,
                                protocol: if p % 2 == 0 { Protocol::Tcp } else { Protocol::Udp },
                            }
                        }).collect();
                        let before = a.taken_count();
                        match a.allocate(&wanted, |_, p| busy.contains(&p)) {
                            Ok(m) => {
                                prop_assert_eq!(m.len(), wanted.len());
                                for p in m.values() {
                                    prop_assert!(!busy.contains(p));
                                }
                                live.push(m);
                            }
                            Err(_) => prop_assert_eq!(a.taken_count(), before),
                        }
                    }
                    Op::Free(i) if !live.is_empty() => {
                        let m = live.remove(i % live.len());
                        a.free(&m).unwrap();
                        if !m.is_empty() {
                            prop_assert!(a.free(&m).is_err(), "double free must be refused");
                        }
                    }
                    Op::Free(_) => {}
                }
                let mut seen = BTreeSet::new();
                for m in &live {
                    for (c, p) in m {
                        prop_assert!(seen.insert((c.protocol, *p)), "port {} handed out twice", p);
                    }
                }
                prop_assert_eq!(seen.len(), a.taken_count());
            }
        }
    }
}
