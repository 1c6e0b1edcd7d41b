//! `random`: the fresh replicas (not ejected, serviceable, not tried yet)
//! in a uniformly random order, then the others in a random order.

use edgevec_policy::host::random_u64;
use edgevec_policy::{load_balancer, Configuration, LoadBalancer, Order, Replicas, Request};

pub struct Random;

impl LoadBalancer for Random {
    fn configure(_: &Configuration) -> Result<Self, String> {
        Ok(Random)
    }

    fn order(&mut self, request: &Request<'_>, replicas: &Replicas<'_>, order: &mut Order) {
        let n = replicas.len();
        let mut idx = [0usize; edgevec_policy::layout::MAX_REPLICAS];
        for (slot, i) in idx.iter_mut().zip(0..n) {
            *slot = i;
        }
        let idx = &mut idx[..n];
        // Fisher-Yates, its draws taken as mixed-radix digits of one
        // 64-bit number (16! < 2^45: the bias is below one in a million).
        let mut pool = random_u64();
        for k in (1..n).rev() {
            let j = (pool % (k as u64 + 1)) as usize;
            pool /= k as u64 + 1;
            idx.swap(k, j);
        }
        for fresh_pass in [true, false] {
            for &i in idx.iter() {
                if let Some(r) = replicas.get(i) {
                    if request.fresh(i, &r) == fresh_pass {
                        order.push(i);
                    }
                }
            }
        }
    }
}

load_balancer!(Random);

#[cfg(test)]
mod tests {
    use super::*;
    use edgevec_policy::harness::Harness;
    use edgevec_policy::{ReplicaInfo, RequestInfo};

    #[test]
    fn every_replica_comes_first_about_as_often_and_ejected_last() {
        let mut h = Harness::<Random>::load_balancer(&Configuration::default(), 42).unwrap();
        let mut rs: Vec<ReplicaInfo> = (1..=3).map(ReplicaInfo::new).collect();
        let mut firsts = [0u32; 3];
        for _ in 0..3000 {
            firsts[h.order(&RequestInfo::default(), &rs).unwrap()[0]] += 1;
        }
        assert!(firsts.iter().all(|c| (800..1200).contains(c)), "{firsts:?}");
        rs[2].ejected = true;
        for _ in 0..50 {
            assert_eq!(h.order(&RequestInfo::default(), &rs).unwrap()[2], 2);
        }
    }
}
