//! `bounded`: any serviceable replica that is in sync or catching up, as
//! long as its data is at most the bound stale (the request's bound, else
//! `bound_ms`, default 5000). The replica checks its own staleness
//! against its current-term primary on its own clock.
//!
//! Parameter: `bound_ms` (default 5000).

use edgevec_policy::{
    consistency_policy, Configuration, ConsistencyPolicy, ConsistencyRequest, ReplicaState, Replicas, Requirement,
    Requirements,
};

pub struct Bounded {
    bound_ms: u64,
}

impl ConsistencyPolicy for Bounded {
    fn configure(config: &Configuration) -> Result<Self, String> {
        Ok(Bounded {
            bound_ms: config.param_u64("bound_ms", 5000)?,
        })
    }

    fn requirements(&mut self, request: &ConsistencyRequest<'_>, replicas: &Replicas<'_>, out: &mut Requirements) {
        let bound = match request.bound_ms() {
            0 => self.bound_ms,
            b => b,
        };
        out.set_bound_ms(bound);
        for (i, r) in replicas.iter() {
            let state_ok = matches!(r.state(), ReplicaState::InSync | ReplicaState::CatchingUp);
            if r.is_serviceable() && state_ok {
                out.set(i, Requirement::MaxStaleness);
            }
        }
    }
}

consistency_policy!(Bounded);

#[cfg(test)]
mod tests {
    use super::*;
    use edgevec_policy::harness::Harness;
    use edgevec_policy::{ConsistencyRequestInfo, ReplicaInfo};

    #[test]
    fn every_live_replica_within_the_bound() {
        let mut h = Harness::<Bounded>::consistency(&Configuration::default(), 1).unwrap();
        let mut rs: Vec<ReplicaInfo> = (1..=3).map(ReplicaInfo::new).collect();
        rs[2].state = ReplicaState::Damaged;
        let (reqs, bound) = h.requirements(&ConsistencyRequestInfo::default(), &rs).unwrap();
        assert_eq!(
            reqs,
            vec![Requirement::MaxStaleness, Requirement::MaxStaleness, Requirement::Skip]
        );
        assert_eq!(bound, 5000);
        let req = ConsistencyRequestInfo {
            bound_ms: 250,
            ..ConsistencyRequestInfo::default()
        };
        assert_eq!(h.requirements(&req, &rs).unwrap().1, 250);
    }
}
