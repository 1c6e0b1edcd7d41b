//! `eventually`: any serviceable replica that is in sync or catching up,
//! with no requirement on how fresh it is.

use edgevec_policy::{
    consistency_policy, Configuration, ConsistencyPolicy, ConsistencyRequest, ReplicaState, Replicas, Requirement,
    Requirements,
};

pub struct Eventually;

impl ConsistencyPolicy for Eventually {
    fn configure(_: &Configuration) -> Result<Self, String> {
        Ok(Eventually)
    }

    fn requirements(&mut self, _: &ConsistencyRequest<'_>, replicas: &Replicas<'_>, out: &mut Requirements) {
        for (i, r) in replicas.iter() {
            if r.is_serviceable() && matches!(r.state(), ReplicaState::InSync | ReplicaState::CatchingUp) {
                out.set(i, Requirement::None);
            }
        }
    }
}

consistency_policy!(Eventually);

#[cfg(test)]
mod tests {
    use super::*;
    use edgevec_policy::harness::Harness;
    use edgevec_policy::{ConsistencyRequestInfo, ReplicaInfo};

    #[test]
    fn any_serviceable_replica() {
        let mut h = Harness::<Eventually>::consistency(&Configuration::default(), 1).unwrap();
        let mut rs: Vec<ReplicaInfo> = (1..=3).map(ReplicaInfo::new).collect();
        rs[0].serviceable = false;
        rs[1].state = ReplicaState::Offline;
        let (reqs, _) = h.requirements(&ConsistencyRequestInfo::default(), &rs).unwrap();
        assert_eq!(reqs, vec![Requirement::Skip, Requirement::Skip, Requirement::None]);
    }
}
