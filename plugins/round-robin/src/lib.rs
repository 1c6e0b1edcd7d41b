//! `round-robin`: reads of a shard take its replicas in turn.
//!
//! The rotation follows the node's per-shard read count, so it is exact
//! however many instances of the plugin serve. Candidates that are
//! ejected, not serviceable or already tried for this read go last, in
//! the same rotation.

use edgevec_policy::{load_balancer, Configuration, LoadBalancer, Order, Replicas, Request};

pub struct RoundRobin;

impl LoadBalancer for RoundRobin {
    fn configure(_: &Configuration) -> Result<Self, String> {
        Ok(RoundRobin)
    }

    fn order(&mut self, request: &Request<'_>, replicas: &Replicas<'_>, order: &mut Order) {
        let n = replicas.len();
        if n == 0 {
            return;
        }
        let start = (request.sequence() % n as u64) as usize;
        for healthy_pass in [true, false] {
            for k in 0..n {
                let i = (start + k) % n;
                let Some(r) = replicas.get(i) else { continue };
                if request.fresh(i, &r) == healthy_pass {
                    order.push(i);
                }
            }
        }
    }
}

load_balancer!(RoundRobin);

#[cfg(test)]
mod tests {
    use super::*;
    use edgevec_policy::harness::Harness;
    use edgevec_policy::{ReplicaInfo, RequestInfo};

    #[test]
    fn rotates_and_puts_ejected_last() {
        let mut h = Harness::<RoundRobin>::load_balancer(&Configuration::with_zones(&[]), 1).unwrap();
        let rs: Vec<ReplicaInfo> = (1..=3).map(ReplicaInfo::new).collect();
        let firsts: Vec<usize> = (0..6)
            .map(|s| {
                let req = RequestInfo {
                    sequence: s,
                    ..RequestInfo::default()
                };
                h.order(&req, &rs).unwrap()[0]
            })
            .collect();
        assert_eq!(firsts, vec![0, 1, 2, 0, 1, 2]);
        let mut rs = rs;
        rs[1].ejected = true;
        let req = RequestInfo {
            sequence: 1,
            ..RequestInfo::default()
        };
        assert_eq!(h.order(&req, &rs).unwrap(), vec![2, 0, 1]);
    }
}
