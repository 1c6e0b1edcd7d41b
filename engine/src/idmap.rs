//! Where each live point of a shard replica is stored: point id →
//! [`Location`], in 16 bytes an entry.
//!
//! A replica keeps one entry per live point, so an entry's size is paid
//! per row, and a hash table's capacity doubles as it grows (at 500,000
//! points, 1,048,576 slots). [`Location`] is 16 bytes with its padding (a
//! `u64` segment and a `u32` row), which made a `HashMap<u64, Location>`
//! slot 24 bytes; here a location is packed into one `u64` (segment in the
//! high 32 bits, row in the low 32): 25 MiB of table at 500,000 points
//! becomes 17.
//!
//! Segment ids are a counter that grows by one per seal or merge, so they
//! stay below 2^32 in any real shard; an entry whose segment does not is
//! kept unpacked in a second map, so every location is kept whatever its
//! segment. Invariant: an id is in at most one of the two maps. The
//! second map is empty in practice, and is not hashed into while it is.

use std::collections::HashMap;

use crate::plan::Location;

/// Point id → where its live row is stored.
#[derive(Debug, Default)]
pub struct IdMap {
    packed: HashMap<u64, u64>,
    wide: HashMap<u64, Location>,
}

fn pack(at: Location) -> Option<u64> {
    let segment = u32::try_from(at.segment).ok()?;
    Some((u64::from(segment) << 32) | u64::from(at.row))
}

fn unpack(v: u64) -> Location {
    Location {
        segment: v >> 32,
        row: v as u32,
    }
}

impl IdMap {
    /// The location of point `id`, if it is live.
    pub fn get(&self, id: u64) -> Option<Location> {
        match self.packed.get(&id) {
            Some(&v) => Some(unpack(v)),
            None if self.wide.is_empty() => None,
            None => self.wide.get(&id).copied(),
        }
    }

    /// Records that point `id` is stored at `at`.
    pub fn insert(&mut self, id: u64, at: Location) {
        match pack(at) {
            Some(v) => {
                self.packed.insert(id, v);
                if !self.wide.is_empty() {
                    self.wide.remove(&id);
                }
            }
            None => {
                self.wide.insert(id, at);
                self.packed.remove(&id);
            }
        }
    }

    /// Forgets point `id` (deleted).
    pub fn remove(&mut self, id: u64) {
        if self.packed.remove(&id).is_none() && !self.wide.is_empty() {
            self.wide.remove(&id);
        }
    }

    /// Live points.
    pub fn len(&self) -> usize {
        self.packed.len() + self.wide.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(segment: u64, row: u32) -> Location {
        Location { segment, row }
    }

    #[test]
    fn keeps_every_location_including_segments_past_32_bits() {
        let mut m = IdMap::default();
        let wide = u64::from(u32::MAX) + 1;
        m.insert(1, at(0, 0));
        m.insert(2, at(u64::from(u32::MAX), u32::MAX));
        m.insert(3, at(wide, 7));
        m.insert(4, at(u64::MAX, u32::MAX));
        assert_eq!(m.len(), 4);
        assert_eq!(m.get(1), Some(at(0, 0)));
        assert_eq!(m.get(2), Some(at(u64::from(u32::MAX), u32::MAX)));
        assert_eq!(m.get(3), Some(at(wide, 7)));
        assert_eq!(m.get(4), Some(at(u64::MAX, u32::MAX)));
        assert_eq!(m.get(5), None);

        // Moving between the two maps leaves one entry.
        m.insert(3, at(9, 1));
        m.insert(1, at(wide + 1, 2));
        assert_eq!(
            (m.len(), m.get(3), m.get(1)),
            (4, Some(at(9, 1)), Some(at(wide + 1, 2)))
        );
        assert_eq!((m.packed.len(), m.wide.len()), (2, 2));

        m.remove(1);
        m.remove(3);
        m.remove(5);
        assert_eq!((m.len(), m.get(1), m.get(3)), (2, None, None));
        m.remove(2);
        m.remove(4);
        assert_eq!(m.len(), 0);
    }
}
