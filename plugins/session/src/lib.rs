//! `session`: read your writes. With a session token, any serviceable
//! replica that has applied the token's op may serve (it waits briefly
//! for it, else the next replica is tried); without one, any serviceable
//! replica.

use edgevec_policy::{
    consistency_policy, Configuration, ConsistencyPolicy, ConsistencyRequest, ReplicaState, Replicas, Requirement,
    Requirements,
};

pub struct Session;

impl ConsistencyPolicy for Session {
    fn configure(_: &Configuration) -> Result<Self, String> {
        Ok(Session)
    }

    fn requirements(&mut self, request: &ConsistencyRequest<'_>, replicas: &Replicas<'_>, out: &mut Requirements) {
        let need = if request.session().is_some() {
            Requirement::SessionOp
        } else {
            Requirement::None
        };
        for (i, r) in replicas.iter() {
            if r.is_serviceable() && matches!(r.state(), ReplicaState::InSync | ReplicaState::CatchingUp) {
                out.set(i, need);
            }
        }
    }
}

consistency_policy!(Session);

#[cfg(test)]
mod tests {
    use super::*;
    use edgevec_policy::harness::Harness;
    use edgevec_policy::{ConsistencyRequestInfo, ReplicaInfo};

    #[test]
    fn the_token_is_required_when_given() {
        let mut h = Harness::<Session>::consistency(&Configuration::default(), 1).unwrap();
        let rs: Vec<ReplicaInfo> = (1..=2).map(ReplicaInfo::new).collect();
        let with = ConsistencyRequestInfo {
            session: Some((2, 40)),
            ..ConsistencyRequestInfo::default()
        };
        assert_eq!(h.requirements(&with, &rs).unwrap().0, vec![Requirement::SessionOp; 2]);
        let without = ConsistencyRequestInfo::default();
        assert_eq!(h.requirements(&without, &rs).unwrap().0, vec![Requirement::None; 2]);
    }
}
