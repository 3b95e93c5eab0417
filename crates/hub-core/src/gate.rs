//! Admission of connections that have not authenticated yet.
//!
//! Every accepted connection holds a [`Ticket`] from the [`Gate`] until it proves who it is (a worker's
//! credentials at the WebSocket upgrade, the admin token on an admin request) or closes. The gate caps
//! such connections in total and per source address; at a cap, the **oldest** unauthenticated connection
//! (of that source, or overall) is closed to make room. So a client that opens connections and sends
//! nothing, or sends half a request, holds at most the cap of the hub's file descriptors, while a new
//! connection — an admin command, a reconnecting worker, from the same address or another — always
//! gets in and has until the cap's worth of newer connections arrive to authenticate. Authenticated
//! connections never count, so worker sessions and the admin API keep their room.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use cla_common::logging::Throttle;

/// Caps of the gate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GateLimits {
    /// Unauthenticated connections held at once, from all sources.
    pub total: usize,
    /// Unauthenticated connections held at once from one source address.
    pub per_source: usize,
}

impl GateLimits {
    /// The caps for a process allowed `nofile` open files: a quarter of them in total (at least 64, at
    /// most 8,192), and a quarter of that per source (at least 16, at most 1,024). The other three
    /// quarters stay for worker sessions, the store and the logs.
    pub fn for_file_limit(nofile: u64) -> GateLimits {
        let total = (nofile / 4).clamp(64, 8192) as usize;
        GateLimits {
            total,
            per_source: (total / 4).clamp(16, 1024),
        }
    }
}

/// Evictions are logged at most this often (with the count).
static EVICTED_LOG: Throttle = Throttle::new(Duration::from_secs(10));

/// The registry of unauthenticated connections.
pub struct Gate {
    limits: GateLimits,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    next: u64,
    /// Live tickets: source and the token that closes the connection.
    open: HashMap<u64, (IpAddr, CancellationToken)>,
    /// Ids in arrival order, overall and per source. Ids no longer in `open` are skipped (and dropped)
    /// when met; [`Inner::compact`] keeps the queues from outgrowing `open`.
    order: VecDeque<u64>,
    by_source: HashMap<IpAddr, Source>,
}

#[derive(Default)]
struct Source {
    live: usize,
    order: VecDeque<u64>,
}

impl Gate {
    pub fn new(limits: GateLimits) -> Arc<Gate> {
        Arc::new(Gate {
            limits,
            inner: Mutex::new(Inner::default()),
        })
    }

    pub fn limits(&self) -> GateLimits {
        self.limits
    }

    /// Unauthenticated connections held now.
    pub fn held(&self) -> usize {
        self.lock().open.len()
    }

    /// Admits a connection from `source`, closing the oldest unauthenticated one of that source (at the
    /// per-source cap) or overall (at the total cap) to make room.
    pub fn admit(self: &Arc<Gate>, source: IpAddr) -> Ticket {
        let source = canonical(source);
        let mut evicted = 0;
        let ticket = {
            let mut inner = self.lock();
            if inner
                .by_source
                .get(&source)
                .is_some_and(|s| s.live >= self.limits.per_source)
            {
                evicted += usize::from(inner.evict_oldest_of(source));
            }
            while inner.open.len() >= self.limits.total && inner.evict_oldest() {
                evicted += 1;
            }
            let id = inner.next;
            inner.next += 1;
            let close = CancellationToken::new();
            inner.open.insert(id, (source, close.clone()));
            inner.order.push_back(id);
            let s = inner.by_source.entry(source).or_default();
            s.live += 1;
            s.order.push_back(id);
            inner.compact(source);
            Ticket {
                gate: self.clone(),
                id,
                close,
            }
        };
        if evicted > 0
            && let Some(held) = EVICTED_LOG.allow(Instant::now())
        {
            tracing::warn!(
                %source,
                "closed an unauthenticated connection to make room: at most {} per source and {} in all wait \
                 for their first request{}",
                self.limits.per_source,
                self.limits.total,
                EVICTED_LOG.suffix(held)
            );
        }
        ticket
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn release(&self, id: u64) {
        let mut inner = self.lock();
        if let Some((source, _)) = inner.open.remove(&id)
            && let Some(s) = inner.by_source.get_mut(&source)
        {
            s.live -= 1;
            if s.live == 0 {
                inner.by_source.remove(&source);
            }
        }
    }
}

impl Inner {
    /// Closes the oldest live connection overall; false when there is none.
    fn evict_oldest(&mut self) -> bool {
        while let Some(id) = self.order.pop_front() {
            if self.close(id) {
                return true;
            }
        }
        false
    }

    /// Closes the oldest live connection of `source`; false when there is none.
    fn evict_oldest_of(&mut self, source: IpAddr) -> bool {
        loop {
            let Some(id) = self.by_source.get_mut(&source).and_then(|s| s.order.pop_front()) else {
                return false;
            };
            if self.close(id) {
                return true;
            }
        }
    }

    fn close(&mut self, id: u64) -> bool {
        let Some((source, token)) = self.open.remove(&id) else {
            return false;
        };
        token.cancel();
        if let Some(s) = self.by_source.get_mut(&source) {
            s.live -= 1;
            if s.live == 0 {
                self.by_source.remove(&source);
            }
        }
        true
    }

    /// Drops ids of released tickets from the queues once they make up most of them.
    fn compact(&mut self, source: IpAddr) {
        if self.order.len() > 2 * self.open.len() + 64 {
            let open = &self.open;
            self.order.retain(|id| open.contains_key(id));
        }
        if let Some(s) = self.by_source.get_mut(&source)
            && s.order.len() > 2 * s.live + 64
        {
            let open = &self.open;
            s.order.retain(|id| open.contains_key(id));
        }
    }
}

/// IPv4-mapped IPv6 addresses count as the IPv4 address they map.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// One connection's place in the [`Gate`]; released when dropped or when the connection authenticates.
pub struct Ticket {
    gate: Arc<Gate>,
    id: u64,
    close: CancellationToken,
}

impl Ticket {
    /// The connection proved who it is: it no longer counts and is never closed to make room.
    pub fn authenticated(&self) {
        self.gate.release(self.id);
    }

    /// Resolves when the gate closes this connection to make room.
    pub async fn evicted(&self) {
        self.close.cancelled().await
    }

    /// Whether the gate has closed this connection.
    pub fn is_evicted(&self) -> bool {
        self.close.is_cancelled()
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.gate.release(self.id);
    }
}

/// The ticket of the connection a request came on, as a request extension.
#[derive(Clone)]
pub struct ConnTicket(pub Arc<Ticket>);

impl ConnTicket {
    /// Marks the connection of `parts` authenticated (no-op for requests not from the listener, as in
    /// tests that call the router directly).
    pub fn authenticate(extensions: &axum::http::Extensions) {
        if let Some(t) = extensions.get::<ConnTicket>() {
            t.0.authenticated();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn caps_follow_the_file_limit() {
        assert_eq!(
            GateLimits::for_file_limit(1024),
            GateLimits {
                total: 256,
                per_source: 64
            }
        );
        assert_eq!(
            GateLimits::for_file_limit(20_000),
            GateLimits {
                total: 5000,
                per_source: 1024
            }
        );
        assert_eq!(
            GateLimits::for_file_limit(1 << 20),
            GateLimits {
                total: 8192,
                per_source: 1024
            }
        );
        assert_eq!(
            GateLimits::for_file_limit(0),
            GateLimits {
                total: 64,
                per_source: 16
            }
        );
    }

    #[test]
    fn a_flooding_source_loses_its_oldest_connections_and_others_keep_theirs() {
        let gate = Gate::new(GateLimits {
            total: 10,
            per_source: 3,
        });
        let other = gate.admit(ip("10.0.0.2"));
        let flood: Vec<Ticket> = (0..100).map(|_| gate.admit(ip("10.0.0.1"))).collect();
        assert_eq!(gate.held(), 4, "3 from the flooding source, 1 from the other");
        assert!(flood[..97].iter().all(Ticket::is_evicted));
        assert!(flood[97..].iter().all(|t| !t.is_evicted()));
        assert!(!other.is_evicted());
    }

    #[test]
    fn at_the_total_cap_the_oldest_overall_goes_and_authenticated_ones_never_count() {
        let gate = Gate::new(GateLimits {
            total: 4,
            per_source: 4,
        });
        let worker = gate.admit(ip("10.0.0.9"));
        worker.authenticated();
        let many: Vec<Ticket> = (0..4).map(|i| gate.admit(ip(&format!("10.0.1.{i}")))).collect();
        assert_eq!(gate.held(), 4);
        let newest = gate.admit(ip("10.0.2.1"));
        assert!(many[0].is_evicted(), "the oldest unauthenticated one made room");
        assert!(!many[1].is_evicted() && !newest.is_evicted() && !worker.is_evicted());
        assert_eq!(gate.held(), 4);
    }

    #[test]
    fn released_tickets_free_their_place_and_the_queues_stay_small() {
        let gate = Gate::new(GateLimits {
            total: 8,
            per_source: 8,
        });
        for _ in 0..10_000 {
            let t = gate.admit(ip("::ffff:10.0.0.1"));
            drop(t);
        }
        let inner = gate.lock();
        assert!(inner.open.is_empty() && inner.by_source.is_empty());
        assert!(inner.order.len() <= 64 + 1, "queue grew to {}", inner.order.len());
    }

    #[test]
    fn mapped_ipv6_counts_as_its_ipv4_source() {
        let gate = Gate::new(GateLimits {
            total: 10,
            per_source: 1,
        });
        let a = gate.admit(ip("10.0.0.1"));
        let _b = gate.admit(ip("::ffff:10.0.0.1"));
        assert!(a.is_evicted());
    }
}
