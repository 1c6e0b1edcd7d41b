//! `zone-aware`: replicas in the client's zone first (taking turns by the
//! shard's read count), then the other zones' (taking turns too). The
//! client's zone is skipped over — spilled — when none of its replicas is
//! fresh, or when every fresh one has at least `spill_in_flight` requests
//! in flight. A client with no known zone gets plain rotation.
//!
//! Parameter: `spill_in_flight` (default 32).

use edgevec_policy::{load_balancer, Configuration, LoadBalancer, Order, Replicas, Request};

pub struct ZoneAware {
    spill_in_flight: u64,
}

impl LoadBalancer for ZoneAware {
    fn configure(config: &Configuration) -> Result<Self, String> {
        let spill_in_flight = config.param_u64("spill_in_flight", 32)?;
        if spill_in_flight == 0 {
            return Err("spill_in_flight must be above 0".into());
        }
        Ok(ZoneAware { spill_in_flight })
    }

    fn order(&mut self, request: &Request<'_>, replicas: &Replicas<'_>, order: &mut Order) {
        let n = replicas.len();
        if n == 0 {
            return;
        }
        let start = (request.sequence() % n as u64) as usize;
        let zone = request.client_zone();
        // (local, fresh) per candidate, read once.
        let mut seen = [(false, false); edgevec_policy::layout::MAX_REPLICAS];
        let mut local_fresh = 0;
        let mut local_busy = 0;
        for (i, r) in replicas.iter() {
            let local = zone.is_some() && r.zone() == zone;
            let fresh = request.fresh(i, &r);
            seen[i] = (local, fresh);
            if local && fresh {
                local_fresh += 1;
                if r.in_flight() >= self.spill_in_flight {
                    local_busy += 1;
                }
            }
        }
        let spill = local_fresh == 0 || local_busy == local_fresh;
        // Passes: (local?, fresh?) in order of preference.
        let passes = if spill {
            [(false, true), (true, true), (true, false), (false, false)]
        } else {
            [(true, true), (false, true), (true, false), (false, false)]
        };
        for want in passes {
            for k in 0..n {
                let i = (start + k) % n;
                if seen[i] == want {
                    order.push(i);
                }
            }
        }
    }
}

load_balancer!(ZoneAware);

#[cfg(test)]
mod tests {
    use super::*;
    use edgevec_policy::harness::Harness;
    use edgevec_policy::{ReplicaInfo, RequestInfo};

    fn zones(z: &[u32]) -> Vec<ReplicaInfo> {
        z.iter()
            .enumerate()
            .map(|(i, z)| {
                let mut r = ReplicaInfo::new(i as u64 + 1);
                r.zone = Some(*z);
                r
            })
            .collect()
    }

    #[test]
    fn local_zone_first_then_spill() {
        let c = Configuration::with_zones(&["a", "b"]);
        let mut h = Harness::<ZoneAware>::load_balancer(&c, 1).unwrap();
        let mut rs = zones(&[0, 1, 1]);
        let req = RequestInfo {
            client_zone: Some(1),
            ..RequestInfo::default()
        };
        assert_eq!(h.order(&req, &rs).unwrap(), vec![1, 2, 0]);
        let next = RequestInfo {
            sequence: 2,
            ..req.clone()
        };
        assert_eq!(h.order(&next, &rs).unwrap(), vec![2, 1, 0]);
        rs[1].ejected = true;
        rs[2].ejected = true;
        assert_eq!(
            h.order(&req, &rs).unwrap(),
            vec![0, 1, 2],
            "spill when the zone has no fresh replica"
        );
        rs[1].ejected = false;
        rs[1].in_flight = 32;
        assert_eq!(
            h.order(&req, &rs).unwrap(),
            vec![0, 1, 2],
            "spill when the zone is overloaded"
        );
        let nowhere = RequestInfo::default();
        assert_eq!(h.order(&nowhere, &zones(&[0, 1, 1])).unwrap(), vec![0, 1, 2]);
    }
}
