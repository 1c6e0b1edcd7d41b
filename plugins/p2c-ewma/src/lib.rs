//! `p2c-ewma`: power of two choices. Two fresh replicas are drawn at
//! random and the one with the lower cost goes first; the rest follow by
//! cost. Cost = latency EWMA × (requests in flight + 1) × (errors + 1).
//! A replica with no latency sample, or whose last sample is older than
//! `decay_ms`, is costed at `default_latency_us`, so a replica that was
//! slow once is tried again.
//!
//! Parameters: `default_latency_us` (default 1000), `decay_ms` (default
//! 10000).

use edgevec_policy::host::random_u64;
use edgevec_policy::{load_balancer, Configuration, LoadBalancer, Order, Replica, Replicas, Request};

pub struct P2cEwma {
    default_latency_us: u64,
    decay_ms: u64,
}

impl P2cEwma {
    fn cost(&self, r: &Replica<'_>) -> u64 {
        let latency = match (r.latency_us(), r.since_sample_ms()) {
            (Some(l), Some(age)) if age <= self.decay_ms => l,
            _ => self.default_latency_us,
        };
        latency
            .saturating_mul(r.in_flight().saturating_add(1))
            .saturating_mul(r.errors().saturating_add(1))
    }
}

impl LoadBalancer for P2cEwma {
    fn configure(config: &Configuration) -> Result<Self, String> {
        let default_latency_us = config.param_u64("default_latency_us", 1000)?;
        if default_latency_us == 0 {
            return Err("default_latency_us must be above 0".into());
        }
        Ok(P2cEwma {
            default_latency_us,
            decay_ms: config.param_u64("decay_ms", 10_000)?,
        })
    }

    fn order(&mut self, request: &Request<'_>, replicas: &Replicas<'_>, order: &mut Order) {
        // (cost, index) of the fresh candidates.
        let mut fresh = [(0u64, 0usize); edgevec_policy::layout::MAX_REPLICAS];
        let mut m = 0;
        for (i, r) in replicas.iter() {
            if request.fresh(i, &r) {
                fresh[m] = (self.cost(&r), i);
                m += 1;
            }
        }
        let fresh = &mut fresh[..m];
        if m >= 2 {
            // Two distinct candidates from one draw.
            let draw = random_u64();
            let a = (draw % m as u64) as usize;
            let mut b = ((draw / m as u64) % (m as u64 - 1)) as usize;
            if b >= a {
                b += 1;
            }
            let (first, second) = if fresh[b].0 < fresh[a].0 { (b, a) } else { (a, b) };
            order.push(fresh[first].1);
            order.push(fresh[second].1);
        }
        // The rest of the fresh ones by cost (ties: given order).
        fresh.sort_unstable();
        for &(_, i) in fresh.iter() {
            order.push(i);
        }
    }
}

load_balancer!(P2cEwma);

#[cfg(test)]
mod tests {
    use super::*;
    use edgevec_policy::harness::Harness;
    use edgevec_policy::{ReplicaInfo, RequestInfo};

    #[test]
    fn the_fast_idle_replica_wins_most_draws_and_a_stale_sample_is_forgiven() {
        let mut h = Harness::<P2cEwma>::load_balancer(&Configuration::default(), 9).unwrap();
        let mut rs: Vec<ReplicaInfo> = (1..=3).map(ReplicaInfo::new).collect();
        for (r, l) in rs.iter_mut().zip([200, 5000, 5000]) {
            r.latency_us = Some(l);
            r.since_sample_ms = Some(10);
        }
        let mut firsts = [0u32; 3];
        for _ in 0..3000 {
            firsts[h.order(&RequestInfo::default(), &rs).unwrap()[0]] += 1;
        }
        // Replica 0 wins every draw it is in: two draws in three.
        assert!((1800..2200).contains(&firsts[0]), "{firsts:?}");
        // An old sample counts as the default latency.
        rs[1].since_sample_ms = Some(60_000);
        rs[2].latency_us = None;
        let order = h.order(&RequestInfo::default(), &rs).unwrap();
        assert_eq!(order.len(), 3);
    }

    #[test]
    fn a_bad_parameter_refuses_the_configuration() {
        let mut c = Configuration::default();
        c.params.push(("default_latency_us".into(), "fast".into()));
        assert!(Harness::<P2cEwma>::load_balancer(&c, 1).is_err());
    }
}
