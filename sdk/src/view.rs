//! Typed views of the contract's flat lists, the packed answers, and the
//! builders the node (and the harness) fill the lists with.

use crate::layout::{self, consistency_request as cr, replica as rp, request as rq, MAX_REPLICAS, NONE};

fn word(words: &[u64], i: usize) -> u64 {
    words.get(i).copied().unwrap_or(0)
}

fn optional(v: u64) -> Option<u64> {
    (v != NONE).then_some(v)
}

/// A read as the load balancer sees it.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a>(pub &'a [u64]);

impl Request<'_> {
    pub fn collection(&self) -> u64 {
        word(self.0, rq::COLLECTION)
    }
    pub fn shard(&self) -> u32 {
        word(self.0, rq::SHARD) as u32
    }
    /// The client's zone id, if it named one the cluster knows.
    pub fn client_zone(&self) -> Option<u32> {
        optional(word(self.0, rq::CLIENT_ZONE)).map(|z| z as u32)
    }
    pub fn level(&self) -> u32 {
        word(self.0, rq::LEVEL) as u32
    }
    /// Milliseconds left before the client's deadline.
    pub fn deadline_ms(&self) -> u64 {
        word(self.0, rq::DEADLINE_MS)
    }
    /// Whether candidate `i` was already tried for this read.
    pub fn tried(&self, i: usize) -> bool {
        i < 64 && word(self.0, rq::TRIED) & (1 << i) != 0
    }
    /// The node's count of reads of this shard: consecutive reads get
    /// consecutive numbers, however many plugin instances serve them.
    pub fn sequence(&self) -> u64 {
        word(self.0, rq::SEQUENCE)
    }

    /// Candidate `i` is worth trying first: not ejected, serviceable and
    /// not tried yet for this read.
    pub fn fresh(&self, i: usize, r: &Replica<'_>) -> bool {
        !r.is_ejected() && r.is_serviceable() && !self.tried(i)
    }
}

/// A read as the consistency policy sees it.
#[derive(Debug, Clone, Copy)]
pub struct ConsistencyRequest<'a>(pub &'a [u64]);

impl ConsistencyRequest<'_> {
    pub fn collection(&self) -> u64 {
        word(self.0, cr::COLLECTION)
    }
    pub fn shard(&self) -> u32 {
        word(self.0, cr::SHARD) as u32
    }
    pub fn client_zone(&self) -> Option<u32> {
        optional(word(self.0, cr::CLIENT_ZONE)).map(|z| z as u32)
    }
    pub fn level(&self) -> u32 {
        word(self.0, cr::LEVEL) as u32
    }
    /// The level's staleness bound in ms (`bounded`).
    pub fn bound_ms(&self) -> u64 {
        word(self.0, cr::BOUND_MS)
    }
    /// The client's session token for this shard, as (term, LSN).
    pub fn session(&self) -> Option<(u64, u64)> {
        let (t, l) = (word(self.0, cr::SESSION_TERM), word(self.0, cr::SESSION_LSN));
        (t != 0 || l != 0).then_some((t, l))
    }
    pub fn deadline_ms(&self) -> u64 {
        word(self.0, cr::DEADLINE_MS)
    }
}

/// Where a replica stands in its shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicaState {
    InSync,
    CatchingUp,
    Offline,
    Damaged,
}

impl ReplicaState {
    fn from_word(w: u64) -> Self {
        match w {
            0 => ReplicaState::InSync,
            1 => ReplicaState::CatchingUp,
            3 => ReplicaState::Damaged,
            _ => ReplicaState::Offline,
        }
    }
    fn word(self) -> u64 {
        match self {
            ReplicaState::InSync => 0,
            ReplicaState::CatchingUp => 1,
            ReplicaState::Offline => 2,
            ReplicaState::Damaged => 3,
        }
    }
}

/// The candidate replicas of one call.
#[derive(Debug, Clone, Copy)]
pub struct Replicas<'a>(pub &'a [u64]);

impl<'a> Replicas<'a> {
    pub fn len(&self) -> usize {
        (self.0.len() / rp::WORDS).min(MAX_REPLICAS)
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Candidate `i` (`None` past the end).
    pub fn get(&self, i: usize) -> Option<Replica<'a>> {
        (i < self.len()).then(|| Replica(&self.0[i * rp::WORDS..(i + 1) * rp::WORDS]))
    }
    /// (index, replica) for every candidate.
    pub fn iter(&self) -> impl Iterator<Item = (usize, Replica<'a>)> + '_ {
        (0..self.len()).map(|i| (i, Replica(&self.0[i * rp::WORDS..(i + 1) * rp::WORDS])))
    }
}

/// One candidate replica.
#[derive(Debug, Clone, Copy)]
pub struct Replica<'a>(&'a [u64]);

impl Replica<'_> {
    pub fn node(&self) -> u64 {
        self.0[rp::NODE]
    }
    pub fn zone(&self) -> Option<u32> {
        optional(self.0[rp::ZONE]).map(|z| z as u32)
    }
    pub fn is_primary(&self) -> bool {
        self.0[rp::FLAGS] & rp::PRIMARY != 0
    }
    /// The failure detector has taken the node out of rotation.
    pub fn is_ejected(&self) -> bool {
        self.0[rp::FLAGS] & rp::EJECTED != 0
    }
    /// Not loading segments nor installing an export: it can answer now.
    pub fn is_serviceable(&self) -> bool {
        self.0[rp::FLAGS] & rp::SERVICEABLE != 0
    }
    pub fn state(&self) -> ReplicaState {
        ReplicaState::from_word(self.0[rp::STATE])
    }
    pub fn term(&self) -> u64 {
        self.0[rp::TERM]
    }
    /// (term, LSN) of the last op it applied.
    pub fn applied(&self) -> (u64, u64) {
        (self.0[rp::APPLIED_TERM], self.0[rp::APPLIED_LSN])
    }
    /// How old the report behind `applied` is, in ms.
    pub fn report_age_ms(&self) -> u64 {
        self.0[rp::REPORT_AGE_MS]
    }
    /// Requests this node has in flight to the replica's node.
    pub fn in_flight(&self) -> u64 {
        self.0[rp::IN_FLIGHT]
    }
    /// Decayed average latency in µs; `None` before the first sample.
    pub fn latency_us(&self) -> Option<u64> {
        Some(self.0[rp::LATENCY_US]).filter(|l| *l != 0)
    }
    /// Ms since the last latency sample; `None`: never sampled.
    pub fn since_sample_ms(&self) -> Option<u64> {
        optional(self.0[rp::SINCE_SAMPLE_MS])
    }
    /// Errors from this replica in the last 10 s.
    pub fn errors(&self) -> u64 {
        self.0[rp::ERRORS]
    }
}

/// A load balancer's answer: candidate indices, best first.
#[derive(Debug, Clone, Default)]
pub struct Order {
    packed: u64,
    count: u32,
    seen: u32,
    len: usize,
}

impl Order {
    /// An empty order over `len` candidates.
    pub fn new(len: usize) -> Self {
        Order {
            len: len.min(MAX_REPLICAS),
            ..Order::default()
        }
    }

    /// Appends candidate `i`; ignored when out of range, already listed,
    /// or when 15 are listed (the 16th is then implied). Returns whether
    /// it was listed.
    pub fn push(&mut self, i: usize) -> bool {
        if i >= self.len || self.seen & (1 << i) != 0 || self.count >= 15 {
            return false;
        }
        self.count += 1;
        self.packed = (self.packed & !0xF) | u64::from(self.count);
        self.packed |= (i as u64) << (4 * self.count);
        self.seen |= 1 << i;
        true
    }

    /// Whether candidate `i` is listed.
    pub fn contains(&self, i: usize) -> bool {
        i < 32 && self.seen & (1 << i) != 0
    }

    /// How many candidates are listed.
    pub fn len(&self) -> usize {
        self.count as usize
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The packed form `order` returns.
    pub fn packed(&self) -> u64 {
        self.packed
    }
}

/// Why a packed answer was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BadAnswer {
    OutOfRange { index: usize, candidates: usize },
    Repeated { index: usize },
    UnknownRequirement { index: usize, code: u8 },
}

impl std::fmt::Display for BadAnswer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BadAnswer::OutOfRange { index, candidates } => {
                write!(f, "candidate {index} named, but there are {candidates}")
            }
            BadAnswer::Repeated { index } => write!(f, "candidate {index} named twice"),
            BadAnswer::UnknownRequirement { index, code } => {
                write!(f, "requirement {code} for candidate {index} is not one of 0..=4")
            }
        }
    }
}

/// The full order a packed answer means for `len` candidates: the listed
/// ones, then the others in their given order.
pub fn decode_order(packed: u64, len: usize) -> Result<Vec<usize>, BadAnswer> {
    let len = len.min(MAX_REPLICAS);
    let mut out = Vec::with_capacity(len);
    let mut seen = 0u32;
    let count = (packed & 0xF) as usize;
    for k in 1..=count {
        let i = ((packed >> (4 * k)) & 0xF) as usize;
        if i >= len {
            return Err(BadAnswer::OutOfRange {
                index: i,
                candidates: len,
            });
        }
        if seen & (1 << i) != 0 {
            return Err(BadAnswer::Repeated { index: i });
        }
        seen |= 1 << i;
        out.push(i);
    }
    out.extend((0..len).filter(|i| seen & (1 << i) == 0));
    Ok(out)
}

/// What a replica must satisfy to serve a read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Requirement {
    /// It does not serve this read.
    Skip,
    /// Whatever it has applied.
    None,
    /// It must have applied the request's session op.
    SessionOp,
    /// Its data must be at most the answer's bound (ms) stale.
    MaxStaleness,
    /// Linearizable: a read-index round at the primary.
    ReadIndex,
}

impl Requirement {
    fn code(self) -> u64 {
        match self {
            Requirement::Skip => 0,
            Requirement::None => 1,
            Requirement::SessionOp => 2,
            Requirement::MaxStaleness => 3,
            Requirement::ReadIndex => 4,
        }
    }
    fn from_code(c: u8) -> Option<Self> {
        Some(match c {
            0 => Requirement::Skip,
            1 => Requirement::None,
            2 => Requirement::SessionOp,
            3 => Requirement::MaxStaleness,
            4 => Requirement::ReadIndex,
            _ => return None,
        })
    }
}

/// A consistency policy's answer.
#[derive(Debug, Clone, Default)]
pub struct Requirements {
    packed: u64,
    bound_ms: u64,
    len: usize,
}

impl Requirements {
    /// Every one of `len` candidates skipped.
    pub fn new(len: usize) -> Self {
        Requirements {
            len: len.min(MAX_REPLICAS),
            ..Requirements::default()
        }
    }

    /// Sets candidate `i`'s requirement (out of range: ignored).
    pub fn set(&mut self, i: usize, r: Requirement) {
        if i < self.len {
            self.packed = (self.packed & !(0xF << (4 * i))) | (r.code() << (4 * i));
        }
    }

    /// The staleness bound of [`Requirement::MaxStaleness`], in ms.
    pub fn set_bound_ms(&mut self, ms: u64) {
        self.bound_ms = ms;
    }

    /// The pair `requirements` returns.
    pub fn packed(&self) -> (u64, u64) {
        (self.packed, self.bound_ms)
    }
}

/// What a packed consistency answer means for `len` candidates, and the
/// bound in ms.
pub fn decode_requirements(packed: (u64, u64), len: usize) -> Result<(Vec<Requirement>, u64), BadAnswer> {
    let len = len.min(MAX_REPLICAS);
    let mut out = Vec::with_capacity(len);
    for i in 0..len {
        let code = ((packed.0 >> (4 * i)) & 0xF) as u8;
        out.push(Requirement::from_code(code).ok_or(BadAnswer::UnknownRequirement { index: i, code })?);
    }
    Ok((out, packed.1))
}

/// One candidate replica, as the node describes it (encoded with
/// [`ReplicaInfo::write_to`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaInfo {
    pub node: u64,
    pub zone: Option<u32>,
    pub primary: bool,
    pub ejected: bool,
    pub serviceable: bool,
    pub state: ReplicaState,
    pub term: u64,
    pub applied: (u64, u64),
    pub report_age_ms: u64,
    pub in_flight: u64,
    pub latency_us: Option<u64>,
    pub since_sample_ms: Option<u64>,
    pub errors: u64,
}

impl ReplicaInfo {
    /// An in-sync, serviceable replica on `node` with no history.
    pub fn new(node: u64) -> Self {
        ReplicaInfo {
            node,
            zone: None,
            primary: false,
            ejected: false,
            serviceable: true,
            state: ReplicaState::InSync,
            term: 1,
            applied: (1, 0),
            report_age_ms: 0,
            in_flight: 0,
            latency_us: None,
            since_sample_ms: None,
            errors: 0,
        }
    }

    /// Appends this replica's words to `out`.
    pub fn write_to(&self, out: &mut Vec<u64>) {
        let mut flags = 0;
        for (set, bit) in [
            (self.primary, rp::PRIMARY),
            (self.ejected, rp::EJECTED),
            (self.serviceable, rp::SERVICEABLE),
        ] {
            if set {
                flags |= bit;
            }
        }
        out.extend_from_slice(&[
            self.node,
            self.zone.map_or(NONE, u64::from),
            flags,
            self.state.word(),
            self.term,
            self.applied.0,
            self.applied.1,
            self.report_age_ms,
            self.in_flight,
            self.latency_us.unwrap_or(0),
            self.since_sample_ms.unwrap_or(NONE),
            self.errors,
        ]);
    }
}

/// A read, as the node describes it to a load balancer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestInfo {
    pub collection: u64,
    pub shard: u32,
    pub client_zone: Option<u32>,
    pub level: u32,
    pub deadline_ms: u64,
    /// Bit i: candidate i was tried already.
    pub tried: u64,
    pub sequence: u64,
}

impl RequestInfo {
    pub fn words(&self) -> [u64; rq::WORDS] {
        [
            self.collection,
            u64::from(self.shard),
            self.client_zone.map_or(NONE, u64::from),
            u64::from(self.level),
            self.deadline_ms,
            self.tried,
            self.sequence,
        ]
    }
}

/// A read, as the node describes it to a consistency policy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConsistencyRequestInfo {
    pub collection: u64,
    pub shard: u32,
    pub client_zone: Option<u32>,
    pub level: u32,
    pub bound_ms: u64,
    pub session: Option<(u64, u64)>,
    pub deadline_ms: u64,
}

impl ConsistencyRequestInfo {
    pub fn words(&self) -> [u64; cr::WORDS] {
        let (t, l) = self.session.unwrap_or((0, 0));
        [
            self.collection,
            u64::from(self.shard),
            self.client_zone.map_or(NONE, u64::from),
            u64::from(self.level),
            self.bound_ms,
            t,
            l,
            self.deadline_ms,
        ]
    }
}

/// The words of `replicas`, in order.
pub fn replica_words(replicas: &[ReplicaInfo]) -> Vec<u64> {
    let mut out = Vec::with_capacity(replicas.len() * rp::WORDS);
    for r in replicas.iter().take(layout::MAX_REPLICAS) {
        r.write_to(&mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orders_round_trip_and_fill_in_the_rest() {
        let mut o = Order::new(5);
        assert!(o.push(3));
        assert!(!o.push(3), "a repeat is ignored");
        assert!(!o.push(9), "out of range is ignored");
        assert!(o.push(0));
        assert_eq!(decode_order(o.packed(), 5).unwrap(), vec![3, 0, 1, 2, 4]);
        assert_eq!(decode_order(0, 3).unwrap(), vec![0, 1, 2]);
        assert_eq!(decode_order(0x002, 3), Err(BadAnswer::Repeated { index: 0 }));
        assert_eq!(
            decode_order(0x91, 3),
            Err(BadAnswer::OutOfRange {
                index: 9,
                candidates: 3
            })
        );
        // 16 candidates: 15 listed, the last implied.
        let mut o = Order::new(16);
        for i in (0..16).rev() {
            o.push(i);
        }
        let full: Vec<usize> = (0..16).rev().collect();
        assert_eq!(decode_order(o.packed(), 16).unwrap(), full);
    }

    #[test]
    fn requirements_round_trip() {
        let mut r = Requirements::new(3);
        r.set(0, Requirement::ReadIndex);
        r.set(2, Requirement::MaxStaleness);
        r.set_bound_ms(250);
        let (reqs, bound) = decode_requirements(r.packed(), 3).unwrap();
        assert_eq!(
            reqs,
            vec![Requirement::ReadIndex, Requirement::Skip, Requirement::MaxStaleness]
        );
        assert_eq!(bound, 250);
        assert!(decode_requirements((0x7, 0), 1).is_err());
    }

    #[test]
    fn replica_words_read_back() {
        let mut info = ReplicaInfo::new(7);
        info.zone = Some(2);
        info.primary = true;
        info.latency_us = Some(900);
        info.applied = (3, 41);
        let words = replica_words(&[ReplicaInfo::new(1), info]);
        let rs = Replicas(&words);
        assert_eq!(rs.len(), 2);
        let r = rs.get(1).unwrap();
        assert_eq!(
            (r.node(), r.zone(), r.is_primary(), r.latency_us()),
            (7, Some(2), true, Some(900))
        );
        assert_eq!(r.applied(), (3, 41));
        assert_eq!(rs.get(0).unwrap().zone(), None);
        assert_eq!(rs.get(0).unwrap().since_sample_ms(), None);
        assert!(rs.get(2).is_none());
    }
}
