//! `strong`: linearizable reads. Only the primary serves, after a
//! read-index round over its ack set (REPLICATION.md, "Reads that need
//! the primary").

use edgevec_policy::{
    consistency_policy, Configuration, ConsistencyPolicy, ConsistencyRequest, Replicas, Requirement, Requirements,
};

pub struct Strong;

impl ConsistencyPolicy for Strong {
    fn configure(_: &Configuration) -> Result<Self, String> {
        Ok(Strong)
    }

    fn requirements(&mut self, _: &ConsistencyRequest<'_>, replicas: &Replicas<'_>, out: &mut Requirements) {
        for (i, r) in replicas.iter() {
            if r.is_primary() && r.is_serviceable() {
                out.set(i, Requirement::ReadIndex);
            }
        }
    }
}

consistency_policy!(Strong);

#[cfg(test)]
mod tests {
    use super::*;
    use edgevec_policy::harness::Harness;
    use edgevec_policy::{ConsistencyRequestInfo, ReplicaInfo};

    #[test]
    fn only_the_primary_with_a_read_index() {
        let mut h = Harness::<Strong>::consistency(&Configuration::default(), 1).unwrap();
        let mut rs: Vec<ReplicaInfo> = (1..=3).map(ReplicaInfo::new).collect();
        rs[1].primary = true;
        let (reqs, _) = h.requirements(&ConsistencyRequestInfo::default(), &rs).unwrap();
        assert_eq!(reqs, vec![Requirement::Skip, Requirement::ReadIndex, Requirement::Skip]);
    }
}
