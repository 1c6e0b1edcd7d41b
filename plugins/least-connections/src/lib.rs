//! `least-connections`: the replica with the fewest requests in flight
//! from this node goes first. Equal loads are broken by the shard's read
//! count, so idle replicas still take turns. Ejected, unserviceable or
//! already tried replicas go last.

use edgevec_policy::{load_balancer, Configuration, LoadBalancer, Order, Replicas, Request};

pub struct LeastConnections;

impl LoadBalancer for LeastConnections {
    fn configure(_: &Configuration) -> Result<Self, String> {
        Ok(LeastConnections)
    }

    fn order(&mut self, request: &Request<'_>, replicas: &Replicas<'_>, order: &mut Order) {
        let n = replicas.len();
        if n == 0 {
            return;
        }
        let start = (request.sequence() % n as u64) as usize;
        // (not fresh, in flight, turn, index): at most 16 of them.
        let mut keys = [(false, 0u64, 0usize, 0usize); edgevec_policy::layout::MAX_REPLICAS];
        for (i, r) in replicas.iter() {
            keys[i] = (!request.fresh(i, &r), r.in_flight(), (i + n - start) % n, i);
        }
        let keys = &mut keys[..n];
        keys.sort_unstable();
        for k in keys.iter() {
            order.push(k.3);
        }
    }
}

load_balancer!(LeastConnections);

#[cfg(test)]
mod tests {
    use super::*;
    use edgevec_policy::harness::Harness;
    use edgevec_policy::{ReplicaInfo, RequestInfo};

    #[test]
    fn fewest_in_flight_first_and_ties_take_turns() {
        let mut h = Harness::<LeastConnections>::load_balancer(&Configuration::default(), 1).unwrap();
        let mut rs: Vec<ReplicaInfo> = (1..=3).map(ReplicaInfo::new).collect();
        rs[0].in_flight = 5;
        rs[1].in_flight = 1;
        rs[2].in_flight = 3;
        assert_eq!(h.order(&RequestInfo::default(), &rs).unwrap(), vec![1, 2, 0]);
        for r in rs.iter_mut() {
            r.in_flight = 0;
        }
        let firsts: Vec<usize> = (0..3)
            .map(|s| {
                let req = RequestInfo {
                    sequence: s,
                    ..RequestInfo::default()
                };
                h.order(&req, &rs).unwrap()[0]
            })
            .collect();
        assert_eq!(firsts, vec![0, 1, 2]);
        rs[0].ejected = true;
        assert_eq!(h.order(&RequestInfo::default(), &rs).unwrap(), vec![1, 2, 0]);
    }
}
