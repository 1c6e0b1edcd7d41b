//! Runs a policy natively, without a node: the test harness.
//!
//! A [`Harness`] configures the policy the way the node does and calls it
//! with typed inputs; `random-u64` draws from [`crate::SplitMix64`] seeded
//! with the harness's seed (the node seeds each instance the same way when
//! told to), and `now-ns` returns the time the test sets. Answers come back
//! decoded exactly as the node decodes them.

use crate::host::{LogLevel, NATIVE};
use crate::{
    decode_order, decode_requirements, replica_words, BadAnswer, Configuration, ConsistencyPolicy, ConsistencyRequest,
    ConsistencyRequestInfo, LoadBalancer, Order, ReplicaInfo, Replicas, Request, RequestInfo, Requirement,
    Requirements, SplitMix64,
};

/// A configured policy and its seeded host.
pub struct Harness<P> {
    policy: P,
}

fn reset(seed: u64) {
    NATIVE.with(|n| {
        let mut n = n.borrow_mut();
        n.rng = SplitMix64::new(seed);
        n.log.clear();
    });
}

/// Sets what `now-ns` returns.
pub fn set_time_ns(ns: u64) {
    NATIVE.with(|n| n.borrow_mut().now_ns = ns);
}

/// The lines the policy logged so far on this thread.
pub fn logged() -> Vec<(LogLevel, String)> {
    NATIVE.with(|n| n.borrow().log.clone())
}

impl<P: LoadBalancer> Harness<P> {
    /// Configures a load balancer; `random-u64` starts from `seed`.
    pub fn load_balancer(config: &Configuration, seed: u64) -> Result<Self, String> {
        reset(seed);
        P::configure(config).map(|policy| Harness { policy })
    }

    /// The packed answer for this read, as the policy returns it.
    pub fn order_packed(&mut self, request: &RequestInfo, replicas: &[ReplicaInfo]) -> u64 {
        let words = replica_words(replicas);
        let rs = Replicas(&words);
        let mut order = Order::new(rs.len());
        self.policy.order(&Request(&request.words()), &rs, &mut order);
        order.packed()
    }

    /// The order the node would try the candidates in.
    pub fn order(&mut self, request: &RequestInfo, replicas: &[ReplicaInfo]) -> Result<Vec<usize>, BadAnswer> {
        let packed = self.order_packed(request, replicas);
        decode_order(packed, replicas.len())
    }
}

impl<P: ConsistencyPolicy> Harness<P> {
    /// Configures a consistency policy; `random-u64` starts from `seed`.
    pub fn consistency(config: &Configuration, seed: u64) -> Result<Self, String> {
        reset(seed);
        P::configure(config).map(|policy| Harness { policy })
    }

    /// The packed answer for this read.
    pub fn requirements_packed(&mut self, request: &ConsistencyRequestInfo, replicas: &[ReplicaInfo]) -> (u64, u64) {
        let words = replica_words(replicas);
        let rs = Replicas(&words);
        let mut out = Requirements::new(rs.len());
        self.policy
            .requirements(&ConsistencyRequest(&request.words()), &rs, &mut out);
        out.packed()
    }

    /// Each candidate's requirement and the staleness bound in ms.
    pub fn requirements(
        &mut self,
        request: &ConsistencyRequestInfo,
        replicas: &[ReplicaInfo],
    ) -> Result<(Vec<Requirement>, u64), BadAnswer> {
        let packed = self.requirements_packed(request, replicas);
        decode_requirements(packed, replicas.len())
    }
}
