//! Request validation: the one place every entry point checks its input.
//!
//! Pure functions over plain data, no I/O. A batch is validated as a whole
//! before anything is written, so a bad point at index 4 leaves the
//! collection untouched. Errors are [`EngineError::Invalid`] naming the
//! field the way the request spells it (`points[4].vector[17]`) with a
//! message that says what was wrong and what the collection expects.
//!
//! Cosine collections normalise here, once: the op that is logged and
//! replicated already carries unit vectors, so every replica stores the
//! same bytes.

use edgevec_proto::{limits, CollectionSpec, IndexSpec, Metric, Point, SearchParams};

use crate::engine::ReplicaSpec;
use crate::error::EngineError;
use crate::hnsw::SearchOptions;
use crate::metric;

/// Checks a create-collection request.
pub fn collection_spec(spec: &CollectionSpec) -> Result<(), EngineError> {
    collection_name(&spec.name)?;
    dim(spec.dim)?;
    if spec.shards == 0 || spec.shards > limits::MAX_SHARDS {
        return Err(EngineError::invalid(
            "shards",
            format!(
                "shards must be between 1 and {}, got {}",
                limits::MAX_SHARDS,
                spec.shards
            ),
        ));
    }
    seal_rows(spec.seal_rows)
}

/// Checks the spec of a shard replica to create: the same rules as the
/// collection it belongs to, and a shard number the collection can have.
pub fn replica_spec(spec: &ReplicaSpec) -> Result<(), EngineError> {
    collection_name(&spec.name)?;
    dim(spec.dim)?;
    if spec.key.shard >= limits::MAX_SHARDS {
        return Err(EngineError::invalid(
            "shard",
            format!("shard must be below {}, got {}", limits::MAX_SHARDS, spec.key.shard),
        ));
    }
    seal_rows(spec.seal_rows)
}

fn dim(dim: u32) -> Result<(), EngineError> {
    if dim == 0 || dim > limits::MAX_DIM {
        return Err(EngineError::invalid(
            "dim",
            format!("dim must be between 1 and {}, got {dim}", limits::MAX_DIM),
        ));
    }
    Ok(())
}

fn seal_rows(seal_rows: u32) -> Result<(), EngineError> {
    if !(limits::MIN_SEAL_ROWS..=limits::MAX_SEAL_ROWS).contains(&seal_rows) {
        return Err(EngineError::invalid(
            "seal_rows",
            format!(
                "seal_rows must be between {} and {}, got {seal_rows}",
                limits::MIN_SEAL_ROWS,
                limits::MAX_SEAL_ROWS,
            ),
        ));
    }
    Ok(())
}

/// Names are also directory-safe, but the engine never uses them as paths
/// (replicas live under numeric collection ids); the rule is for humans and
/// URLs.
pub fn collection_name(name: &str) -> Result<(), EngineError> {
    let bad = |why: String| Err(EngineError::invalid("name", why));
    if name.is_empty() || name.len() > limits::MAX_NAME_LEN {
        return bad(format!(
            "collection name must be 1 to {} characters, got {}",
            limits::MAX_NAME_LEN,
            name.len()
        ));
    }
    if !name.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return bad(format!(
            "collection name {name:?} must start with an ASCII letter or digit"
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-'))
    {
        return bad(format!(
            "collection name {name:?} contains {c:?}; use only ASCII letters, digits, '_' and '-'"
        ));
    }
    Ok(())
}

/// Checks an upsert batch against `spec` and normalises cosine vectors in
/// place.
pub fn points(spec: &CollectionSpec, points: &mut [Point]) -> Result<(), EngineError> {
    if points.is_empty() {
        return Err(EngineError::invalid("points", "an upsert needs at least one point"));
    }
    if points.len() > limits::MAX_BATCH_POINTS {
        return Err(EngineError::invalid(
            "points",
            format!(
                "an upsert carries at most {} points, got {}; split the batch",
                limits::MAX_BATCH_POINTS,
                points.len()
            ),
        ));
    }
    for (i, p) in points.iter_mut().enumerate() {
        vector(spec, &format!("points[{i}].vector"), &mut p.vector)?;
        if let Some(payload) = &p.payload {
            payload_json(&format!("points[{i}].payload"), payload)?;
        }
    }
    Ok(())
}

fn payload_json(field: &str, payload: &str) -> Result<(), EngineError> {
    if payload.len() > limits::MAX_PAYLOAD_BYTES {
        return Err(EngineError::invalid(
            field,
            format!(
                "payload is {} bytes, the limit is {}",
                payload.len(),
                limits::MAX_PAYLOAD_BYTES
            ),
        ));
    }
    serde_json::from_str::<serde::de::IgnoredAny>(payload)
        .map_err(|e| EngineError::invalid(field, format!("payload is not valid JSON: {e}")))?;
    // Valid JSON that starts with `{` is an object.
    match payload.trim_start().chars().next() {
        Some('{') => Ok(()),
        _ => Err(EngineError::invalid(
            field,
            format!(
                "payload must be a JSON object (like {{\"tag\": \"a\"}}), got {}",
                payload.chars().take(40).collect::<String>()
            ),
        )),
    }
}

/// Checks one vector (dimension, finiteness, direction for cosine) and
/// normalises it for cosine collections.
pub fn vector(spec: &CollectionSpec, field: &str, v: &mut [f32]) -> Result<(), EngineError> {
    if v.len() != spec.dim as usize {
        return Err(EngineError::invalid(
            field,
            format!(
                "vector has {} components but collection {:?} has dim {}",
                v.len(),
                spec.name,
                spec.dim
            ),
        ));
    }
    if let Some((j, x)) = v.iter().enumerate().find(|(_, x)| !x.is_finite()) {
        let what = if x.is_nan() { "NaN" } else { "infinite" };
        return Err(EngineError::invalid(
            format!("{field}[{j}]"),
            format!("{field}[{j}] is {what}; every component must be a finite number"),
        ));
    }
    if spec.metric == Metric::Cosine && !metric::normalize(v) {
        return Err(EngineError::invalid(
            field,
            format!(
                "vector is all zeros; collection {:?} uses cosine, which needs a vector with a direction",
                spec.name
            ),
        ));
    }
    Ok(())
}

/// Checks the ids of a get or delete.
pub fn ids(ids: &[u64]) -> Result<(), EngineError> {
    if ids.is_empty() {
        return Err(EngineError::invalid("ids", "at least one id is needed"));
    }
    if ids.len() > limits::MAX_BATCH_IDS {
        return Err(EngineError::invalid(
            "ids",
            format!(
                "at most {} ids per request, got {}; split the batch",
                limits::MAX_BATCH_IDS,
                ids.len()
            ),
        ));
    }
    Ok(())
}

/// Checks a collection's index parameters against [`limits`].
pub fn index_spec(index: &IndexSpec) -> Result<(), EngineError> {
    index
        .check()
        .map_err(|(field, message)| EngineError::invalid(field, message))
}

/// Checks a search's parameters and turns them into the engine's options.
pub fn search_params(params: &SearchParams) -> Result<SearchOptions, EngineError> {
    if params.ef > limits::MAX_SEARCH_EF {
        return Err(EngineError::invalid(
            "ef",
            format!(
                "ef must be at most {} (0: the default, {}), got {}",
                limits::MAX_SEARCH_EF,
                crate::hnsw::DEFAULT_EF,
                params.ef
            ),
        ));
    }
    Ok(SearchOptions {
        ef: if params.ef == 0 {
            crate::hnsw::DEFAULT_EF
        } else {
            params.ef as usize
        },
        exact: params.exact,
    })
}

/// Checks a search and returns its queries ready to score (normalised for
/// cosine).
pub fn search(spec: &CollectionSpec, queries: &[Vec<f32>], k: u32) -> Result<Vec<Vec<f32>>, EngineError> {
    if k == 0 || k > limits::MAX_K {
        return Err(EngineError::invalid(
            "k",
            format!("k must be between 1 and {}, got {k}", limits::MAX_K),
        ));
    }
    if queries.is_empty() {
        return Err(EngineError::invalid(
            "queries",
            "a search needs at least one query vector",
        ));
    }
    if queries.len() > limits::MAX_QUERIES {
        return Err(EngineError::invalid(
            "queries",
            format!(
                "a search carries at most {} queries, got {}; split the batch",
                limits::MAX_QUERIES,
                queries.len()
            ),
        ));
    }
    queries
        .iter()
        .enumerate()
        .map(|(i, q)| {
            let mut q = q.clone();
            vector(spec, &format!("queries[{i}]"), &mut q)?;
            Ok(q)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(metric: Metric) -> CollectionSpec {
        CollectionSpec {
            name: "docs".into(),
            dim: 3,
            metric,
            shards: 2,
            seal_rows: 64,
        }
    }

    fn field_of(r: Result<impl Sized, EngineError>) -> (String, String) {
        match r {
            Err(EngineError::Invalid { field, message }) => (field, message),
            Err(e) => panic!("expected Invalid, got {e:?}"),
            Ok(_) => panic!("expected Invalid, got Ok"),
        }
    }

    fn point(id: u64, vector: Vec<f32>) -> Point {
        Point {
            id,
            vector,
            payload: None,
        }
    }

    #[test]
    fn spec_limits() {
        assert!(collection_spec(&spec(Metric::L2)).is_ok());
        for (name, ok) in [
            ("a", true),
            ("9lives_a-b", true),
            ("", false),
            ("-x", false),
            ("_x", false),
            ("has space", false),
            ("dots.no", false),
            ("é", false),
        ] {
            let mut s = spec(Metric::L2);
            s.name = name.into();
            assert_eq!(collection_spec(&s).is_ok(), ok, "{name:?}");
        }
        let mut s = spec(Metric::L2);
        s.name = "a".repeat(129);
        assert_eq!(field_of(collection_spec(&s)).0, "name");
        s.name = "a".repeat(128);
        assert!(collection_spec(&s).is_ok());

        let mut s = spec(Metric::L2);
        s.dim = 0;
        assert_eq!(field_of(collection_spec(&s)).0, "dim");
        s.dim = limits::MAX_DIM + 1;
        assert_eq!(field_of(collection_spec(&s)).0, "dim");
        let mut s = spec(Metric::L2);
        s.shards = 0;
        assert_eq!(field_of(collection_spec(&s)).0, "shards");
        s.shards = limits::MAX_SHARDS + 1;
        assert_eq!(field_of(collection_spec(&s)).0, "shards");
        let mut s = spec(Metric::L2);
        s.seal_rows = limits::MIN_SEAL_ROWS - 1;
        assert_eq!(field_of(collection_spec(&s)).0, "seal_rows");
        s.seal_rows = limits::MAX_SEAL_ROWS + 1;
        assert_eq!(field_of(collection_spec(&s)).0, "seal_rows");
    }

    #[test]
    fn replica_spec_limits() {
        let ok = ReplicaSpec {
            key: crate::ReplicaKey {
                collection: 1,
                shard: limits::MAX_SHARDS - 1,
            },
            name: "docs".into(),
            dim: 3,
            metric: Metric::L2,
            seal_rows: 64,
            index: Default::default(),
            fields: Vec::new(),
        };
        assert!(replica_spec(&ok).is_ok());
        let mut s = ok.clone();
        s.key.shard = limits::MAX_SHARDS;
        assert_eq!(field_of(replica_spec(&s)).0, "shard");
        let mut s = ok.clone();
        s.dim = 0;
        assert_eq!(field_of(replica_spec(&s)).0, "dim");
        let mut s = ok.clone();
        s.seal_rows = 1;
        assert_eq!(field_of(replica_spec(&s)).0, "seal_rows");
        let mut s = ok;
        s.name = "no spaces".into();
        assert_eq!(field_of(replica_spec(&s)).0, "name");
    }

    #[test]
    fn bad_points() {
        let s = spec(Metric::L2);
        assert_eq!(field_of(points(&s, &mut [])).0, "points");
        let mut many = vec![point(1, vec![0.0; 3]); limits::MAX_BATCH_POINTS + 1];
        assert_eq!(field_of(points(&s, &mut many)).0, "points");

        let mut batch = vec![point(1, vec![0.0; 3]); 5];
        batch[4].vector = vec![1.0; 2];
        let (f, m) = field_of(points(&s, &mut batch));
        assert_eq!(f, "points[4].vector");
        assert_eq!(m, "vector has 2 components but collection \"docs\" has dim 3");

        let mut batch = vec![point(1, vec![0.0, f32::NAN, 0.0])];
        let (f, m) = field_of(points(&s, &mut batch));
        assert_eq!(f, "points[0].vector[1]");
        assert!(m.contains("is NaN"), "{m}");
        let mut batch = vec![point(1, vec![0.0, 0.0, f32::NEG_INFINITY])];
        assert_eq!(field_of(points(&s, &mut batch)).0, "points[0].vector[2]");

        let mut batch = vec![point(1, vec![0.0; 3])];
        batch[0].payload = Some("{not json".into());
        assert_eq!(field_of(points(&s, &mut batch)).0, "points[0].payload");
        for not_an_object in ["\"just a string\"", "42", " [1, 2]", "null"] {
            batch[0].payload = Some(not_an_object.into());
            let (f, m) = field_of(points(&s, &mut batch));
            assert_eq!(f, "points[0].payload");
            assert!(m.contains("must be a JSON object"), "{m}");
        }
        batch[0].payload = Some(format!("\"{}\"", "x".repeat(limits::MAX_PAYLOAD_BYTES)));
        let (f, m) = field_of(points(&s, &mut batch));
        assert_eq!(f, "points[0].payload");
        assert!(m.contains("limit"), "{m}");
        batch[0].payload = Some(r#"{"tag": [1, 2]}"#.into());
        assert!(points(&s, &mut batch).is_ok());
    }

    #[test]
    fn cosine_rejects_zero_and_normalises() {
        let s = spec(Metric::Cosine);
        let mut batch = vec![point(1, vec![0.0; 3])];
        let (f, m) = field_of(points(&s, &mut batch));
        assert_eq!(f, "points[0].vector");
        assert!(m.contains("zeros"), "{m}");
        let mut batch = vec![point(1, vec![0.0, 3.0, 4.0])];
        points(&s, &mut batch).unwrap();
        assert_eq!(batch[0].vector, vec![0.0, 0.6, 0.8]);
        // Zero vectors are fine for L2 and inner product.
        assert!(points(&spec(Metric::L2), &mut [point(1, vec![0.0; 3])]).is_ok());
        assert!(points(&spec(Metric::InnerProduct), &mut [point(1, vec![0.0; 3])]).is_ok());
    }

    #[test]
    fn bad_ids() {
        assert_eq!(field_of(ids(&[])).0, "ids");
        assert_eq!(field_of(ids(&vec![1; limits::MAX_BATCH_IDS + 1])).0, "ids");
        assert!(ids(&[1, 1, 2]).is_ok());
    }

    #[test]
    fn bad_searches() {
        let s = spec(Metric::Cosine);
        let q = vec![vec![1.0, 0.0, 0.0]];
        let (f, m) = field_of(search(&s, &q, 0));
        assert_eq!(f, "k");
        assert_eq!(m, "k must be between 1 and 1024, got 0");
        assert_eq!(field_of(search(&s, &q, limits::MAX_K + 1)).0, "k");
        assert_eq!(field_of(search(&s, &[], 10)).0, "queries");
        let many = vec![vec![1.0, 0.0, 0.0]; limits::MAX_QUERIES + 1];
        assert_eq!(field_of(search(&s, &many, 10)).0, "queries");
        let bad = vec![vec![1.0, 0.0, 0.0], vec![1.0, 0.0]];
        assert_eq!(field_of(search(&s, &bad, 10)).0, "queries[1]");
        let nan = vec![vec![1.0, f32::NAN, 0.0]];
        assert_eq!(field_of(search(&s, &nan, 10)).0, "queries[0][1]");
        let zero = vec![vec![0.0; 3]];
        assert_eq!(field_of(search(&s, &zero, 10)).0, "queries[0]");
        let ok = search(&s, &[vec![0.0, 0.0, 2.0]], 10).unwrap();
        assert_eq!(ok, vec![vec![0.0, 0.0, 1.0]]);
    }
}
