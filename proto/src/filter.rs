//! Payload filters: which points a search, a count or a delete considers.
//!
//! Users write them as JSON, Qdrant-style:
//!
//! ```json
//! {"must": [{"key": "lang", "match": "en"},
//!           {"key": "year", "range": {"gte": 2020}}],
//!  "should": [{"key": "tag", "in": ["a", "b"]}],
//!  "must_not": [{"key": "draft", "match": true}]}
//! ```
//!
//! A point passes when every `must` condition holds, at least one `should`
//! condition holds (if there are any), and no `must_not` condition holds.
//! A condition is `match` (equality with a string, an integer or a
//! boolean), `in` (equality with any of a list), `range` (`gt`, `gte`,
//! `lt`, `lte` on a number), each on a top-level payload field named by
//! `key`, or a nested filter. A field that is missing, or holds another
//! type, satisfies no condition (so it passes a `must_not`).
//!
//! [`Filter::parse`] reads the JSON with bounds (depth, conditions, values,
//! key length) and says exactly what is wrong; the parsed [`Filter`] is
//! what travels on the wire (postcard cannot carry free JSON).
//! [`Filter::matches`] evaluates it on any source of field values.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Most levels of filters in one filter (the outermost counts).
pub const MAX_FILTER_DEPTH: usize = 8;
/// Most conditions in one filter, nested ones and `in` values included.
pub const MAX_FILTER_CONDITIONS: usize = 1024;
/// Longest field name.
pub const MAX_FILTER_KEY_BYTES: usize = 256;
/// Longest string compared with.
pub const MAX_FILTER_STRING_BYTES: usize = 4096;

/// A payload filter (see the module doc).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Filter {
    pub must: Vec<Condition>,
    pub should: Vec<Condition>,
    pub must_not: Vec<Condition>,
}

/// One condition of a [`Filter`]. New kinds go at the end (postcard
/// encodes variant indexes).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Condition {
    Match { key: String, value: Scalar },
    In { key: String, values: Vec<Scalar> },
    Range { key: String, range: Range },
    Nested(Box<Filter>),
}

/// A value a field is compared with for equality.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Scalar {
    Str(String),
    Int(i64),
    Bool(bool),
}

/// Bounds on a number; at least one is set.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Range {
    pub gt: Option<f64>,
    pub gte: Option<f64>,
    pub lt: Option<f64>,
    pub lte: Option<f64>,
}

impl Range {
    pub fn contains(&self, x: f64) -> bool {
        self.gt.is_none_or(|b| x > b)
            && self.gte.is_none_or(|b| x >= b)
            && self.lt.is_none_or(|b| x < b)
            && self.lte.is_none_or(|b| x <= b)
    }
}

/// The value of one payload field, as a filter sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum FieldValue<'a> {
    Str(&'a str),
    /// An integer (a JSON number without fraction that fits in i64).
    Int(i64),
    /// Any other number.
    Float(f64),
    Bool(bool),
}

impl FieldValue<'_> {
    /// The value of a JSON field, if a filter can compare it.
    pub fn of_json(v: &Value) -> Option<FieldValue<'_>> {
        match v {
            Value::String(s) => Some(FieldValue::Str(s)),
            Value::Bool(b) => Some(FieldValue::Bool(*b)),
            Value::Number(n) => Some(match n.as_i64() {
                Some(i) => FieldValue::Int(i),
                None => FieldValue::Float(n.as_f64()?),
            }),
            _ => None,
        }
    }

    fn number(&self) -> Option<f64> {
        match *self {
            FieldValue::Int(i) => Some(i as f64),
            FieldValue::Float(f) => Some(f),
            _ => None,
        }
    }

    fn equals(&self, s: &Scalar) -> bool {
        match (self, s) {
            (FieldValue::Str(a), Scalar::Str(b)) => *a == b.as_str(),
            (FieldValue::Int(a), Scalar::Int(b)) => a == b,
            (FieldValue::Float(a), Scalar::Int(b)) => *a == *b as f64,
            (FieldValue::Bool(a), Scalar::Bool(b)) => a == b,
            _ => false,
        }
    }
}

/// The type of a payload index: which values of the field it holds.
/// Values of another type are held as missing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum FieldKind {
    /// Strings, compared for equality (`match`, `in`).
    Keyword,
    /// Integers (`match`, `in`, `range`).
    Int,
    /// Any number (`range`; `match` of an integer).
    Float,
    /// Booleans (`match`).
    Bool,
}

impl FieldKind {
    pub fn name(self) -> &'static str {
        match self {
            FieldKind::Keyword => "keyword",
            FieldKind::Int => "int",
            FieldKind::Float => "float",
            FieldKind::Bool => "bool",
        }
    }
}

impl std::str::FromStr for FieldKind {
    type Err = String;
    fn from_str(s: &str) -> Result<FieldKind, String> {
        match s {
            "keyword" => Ok(FieldKind::Keyword),
            "int" | "integer" => Ok(FieldKind::Int),
            "float" | "number" => Ok(FieldKind::Float),
            "bool" | "boolean" => Ok(FieldKind::Bool),
            other => Err(format!(
                "unknown field type \"{other}\" (expected keyword, int, float or bool)"
            )),
        }
    }
}

/// A payload index: a top-level payload field and its type.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FieldSpec {
    pub name: String,
    pub kind: FieldKind,
}

/// Most payload indexes of one collection.
pub const MAX_PAYLOAD_INDEXES: usize = 32;

impl FieldSpec {
    /// Parses `name:kind` (`lang:keyword`, `year:int`).
    pub fn parse(s: &str) -> Result<FieldSpec, String> {
        let (name, kind) = s
            .rsplit_once(':')
            .ok_or_else(|| format!("\"{s}\" is not name:type (e.g. lang:keyword, year:int)"))?;
        let spec = FieldSpec {
            name: name.to_owned(),
            kind: kind.parse()?,
        };
        FieldSpec::check(std::slice::from_ref(&spec))?;
        Ok(spec)
    }

    /// Checks a collection's payload indexes: at most
    /// [`MAX_PAYLOAD_INDEXES`], names of 1 to [`MAX_FILTER_KEY_BYTES`]
    /// bytes, each named once.
    pub fn check(fields: &[FieldSpec]) -> Result<(), String> {
        if fields.len() > MAX_PAYLOAD_INDEXES {
            return Err(format!(
                "{} payload indexes asked; at most {MAX_PAYLOAD_INDEXES}",
                fields.len()
            ));
        }
        for (i, f) in fields.iter().enumerate() {
            if f.name.is_empty() || f.name.len() > MAX_FILTER_KEY_BYTES {
                return Err(format!(
                    "payload index names are 1 to {MAX_FILTER_KEY_BYTES} bytes, not {:?}",
                    f.name
                ));
            }
            if fields[..i].iter().any(|g| g.name == f.name) {
                return Err(format!("payload index \"{}\" is declared twice", f.name));
            }
        }
        Ok(())
    }
}

/// Why a filter was refused: where in the JSON, and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("filter {path}: {message}")]
pub struct FilterError {
    /// A JSON path such as `must[1].range.gte`.
    pub path: String,
    pub message: String,
}

fn err<T>(path: &str, message: impl Into<String>) -> Result<T, FilterError> {
    Err(FilterError {
        path: if path.is_empty() { "(top)".into() } else { path.into() },
        message: message.into(),
    })
}

struct Parser {
    conditions: usize,
}

impl Filter {
    /// Parses the JSON syntax of the module doc.
    pub fn parse(json: &str) -> Result<Filter, FilterError> {
        let value: Value = serde_json::from_str(json).or_else(|e| err("", format!("is not JSON: {e}")))?;
        Filter::from_json(&value)
    }

    /// [`Filter::parse`] from JSON already read.
    pub fn from_json(value: &Value) -> Result<Filter, FilterError> {
        Parser { conditions: 0 }.filter(value, "", 0)
    }

    /// Whether a point whose payload fields are given by `field` passes.
    pub fn matches<'a>(&self, field: &impl Fn(&str) -> Option<FieldValue<'a>>) -> bool {
        self.must.iter().all(|c| c.matches(field))
            && (self.should.is_empty() || self.should.iter().any(|c| c.matches(field)))
            && !self.must_not.iter().any(|c| c.matches(field))
    }

    /// Whether a point with this JSON payload (`None`: no payload) passes.
    pub fn matches_json(&self, payload: Option<&serde_json::Map<String, Value>>) -> bool {
        self.matches(&|key: &str| payload.and_then(|p| FieldValue::of_json(p.get(key)?)))
    }

    /// Whether the filter lets every point pass (it has no condition).
    pub fn is_empty(&self) -> bool {
        self.must.is_empty() && self.should.is_empty() && self.must_not.is_empty()
    }

    /// Every field the filter reads.
    pub fn keys(&self) -> Vec<&str> {
        let mut out = Vec::new();
        for c in self.must.iter().chain(&self.should).chain(&self.must_not) {
            match c {
                Condition::Match { key, .. } | Condition::In { key, .. } | Condition::Range { key, .. } => {
                    out.push(key.as_str())
                }
                Condition::Nested(f) => out.extend(f.keys()),
            }
        }
        out.sort_unstable();
        out.dedup();
        out
    }
}

impl Condition {
    pub fn matches<'a>(&self, field: &impl Fn(&str) -> Option<FieldValue<'a>>) -> bool {
        match self {
            Condition::Match { key, value } => field(key).is_some_and(|v| v.equals(value)),
            Condition::In { key, values } => field(key).is_some_and(|v| values.iter().any(|s| v.equals(s))),
            Condition::Range { key, range } => field(key).and_then(|v| v.number()).is_some_and(|x| range.contains(x)),
            Condition::Nested(f) => f.matches(field),
        }
    }
}

impl Parser {
    fn count(&mut self, path: &str, n: usize) -> Result<(), FilterError> {
        self.conditions += n;
        if self.conditions > MAX_FILTER_CONDITIONS {
            return err(
                path,
                format!("the filter has more than {MAX_FILTER_CONDITIONS} conditions"),
            );
        }
        Ok(())
    }

    fn filter(&mut self, value: &Value, path: &str, depth: usize) -> Result<Filter, FilterError> {
        if depth >= MAX_FILTER_DEPTH {
            return err(path, format!("filters nest more than {MAX_FILTER_DEPTH} deep"));
        }
        let Value::Object(map) = value else {
            return err(path, "must be an object with \"must\", \"should\" or \"must_not\"");
        };
        let mut out = Filter::default();
        for (k, v) in map {
            let list = match k.as_str() {
                "must" => &mut out.must,
                "should" => &mut out.should,
                "must_not" => &mut out.must_not,
                other => {
                    return err(
                        path,
                        format!("unknown clause \"{other}\" (expected \"must\", \"should\" or \"must_not\")"),
                    )
                }
            };
            let at = join(path, k);
            let Value::Array(items) = v else {
                return err(&at, "must be a list of conditions");
            };
            for (i, item) in items.iter().enumerate() {
                let at = format!("{at}[{i}]");
                self.count(&at, 1)?;
                list.push(self.condition(item, &at, depth)?);
            }
        }
        Ok(out)
    }

    fn condition(&mut self, value: &Value, path: &str, depth: usize) -> Result<Condition, FilterError> {
        let Value::Object(map) = value else {
            return err(path, "a condition must be an object");
        };
        let is_filter = ["must", "should", "must_not"].iter().any(|k| map.contains_key(*k));
        if is_filter && !map.contains_key("key") {
            return Ok(Condition::Nested(Box::new(self.filter(value, path, depth + 1)?)));
        }
        let key = match map.get("key") {
            Some(Value::String(k)) if !k.is_empty() && k.len() <= MAX_FILTER_KEY_BYTES => k.clone(),
            Some(Value::String(_)) => {
                return err(
                    &join(path, "key"),
                    format!("must be a field name of 1 to {MAX_FILTER_KEY_BYTES} bytes"),
                )
            }
            Some(_) => return err(&join(path, "key"), "must be a string"),
            None => return err(path, "a condition needs a \"key\" (or is a nested filter)"),
        };
        let kinds: Vec<&String> = map.keys().filter(|k| *k != "key").collect();
        let [kind] = kinds.as_slice() else {
            return err(
                path,
                format!("a condition has \"key\" and exactly one of \"match\", \"in\", \"range\"; found {kinds:?}"),
            );
        };
        let at = join(path, kind);
        let v = &map[kind.as_str()];
        Ok(match kind.as_str() {
            "match" => Condition::Match {
                key,
                value: scalar(v, &at)?,
            },
            "in" => {
                let Value::Array(items) = v else {
                    return err(&at, "must be a list of values");
                };
                if items.is_empty() {
                    return err(&at, "must name at least one value");
                }
                self.count(&at, items.len())?;
                let values = items
                    .iter()
                    .enumerate()
                    .map(|(i, x)| scalar(x, &format!("{at}[{i}]")))
                    .collect::<Result<_, _>>()?;
                Condition::In { key, values }
            }
            "range" => Condition::Range {
                key,
                range: range(v, &at)?,
            },
            other => {
                return err(
                    path,
                    format!("unknown condition \"{other}\" (expected \"match\", \"in\" or \"range\")"),
                )
            }
        })
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

fn scalar(v: &Value, path: &str) -> Result<Scalar, FilterError> {
    match v {
        Value::String(s) if s.len() <= MAX_FILTER_STRING_BYTES => Ok(Scalar::Str(s.clone())),
        Value::String(_) => err(
            path,
            format!("strings compared with are at most {MAX_FILTER_STRING_BYTES} bytes"),
        ),
        Value::Bool(b) => Ok(Scalar::Bool(*b)),
        Value::Number(n) => match n.as_i64() {
            Some(i) => Ok(Scalar::Int(i)),
            None => err(path, "matches only integers; compare other numbers with \"range\""),
        },
        _ => err(path, "must be a string, an integer or a boolean"),
    }
}

fn range(v: &Value, path: &str) -> Result<Range, FilterError> {
    let Value::Object(map) = v else {
        return err(path, "must be an object with \"gt\", \"gte\", \"lt\" or \"lte\"");
    };
    if map.is_empty() {
        return err(path, "needs at least one of \"gt\", \"gte\", \"lt\", \"lte\"");
    }
    let mut out = Range::default();
    for (k, x) in map {
        let at = join(path, k);
        let bound = match k.as_str() {
            "gt" => &mut out.gt,
            "gte" => &mut out.gte,
            "lt" => &mut out.lt,
            "lte" => &mut out.lte,
            other => return err(path, format!("unknown bound \"{other}\" (expected gt, gte, lt, lte)")),
        };
        match x.as_f64() {
            Some(f) if f.is_finite() => *bound = Some(f),
            _ => return err(&at, "must be a finite number"),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(json: &str) -> serde_json::Map<String, Value> {
        serde_json::from_str(json).unwrap()
    }

    fn passes(filter: &str, p: &str) -> bool {
        Filter::parse(filter).unwrap().matches_json(Some(&payload(p)))
    }

    #[test]
    fn must_should_must_not() {
        let f = r#"{"must":[{"key":"lang","match":"en"},{"key":"year","range":{"gte":2020}}]}"#;
        assert!(passes(f, r#"{"lang":"en","year":2021}"#));
        assert!(passes(f, r#"{"lang":"en","year":2020.0}"#));
        assert!(!passes(f, r#"{"lang":"en","year":2019}"#));
        assert!(!passes(f, r#"{"lang":"de","year":2021}"#));
        assert!(!passes(f, r#"{"lang":"en"}"#), "missing field");
        assert!(!passes(f, r#"{"lang":"en","year":"2021"}"#), "wrong type");
        assert!(!Filter::parse(f).unwrap().matches_json(None), "no payload");

        let f = r#"{"should":[{"key":"tag","in":["a","b"]},{"key":"n","match":3}],"must_not":[{"key":"draft","match":true}]}"#;
        assert!(passes(f, r#"{"tag":"b"}"#));
        assert!(passes(f, r#"{"n":3,"draft":false}"#));
        assert!(passes(f, r#"{"n":3.0}"#), "an integer value equals its float");
        assert!(!passes(f, r#"{"tag":"c","n":4}"#));
        assert!(!passes(f, r#"{"tag":"a","draft":true}"#));
        assert!(
            passes(r#"{"must_not":[{"key":"x","match":1}]}"#, "{}"),
            "missing passes must_not"
        );
        assert!(passes("{}", "{}"), "no condition: everything passes");

        let nested = r#"{"must":[{"should":[{"key":"a","match":1},{"key":"b","match":1}]},{"key":"c","range":{"gt":0,"lt":1}}]}"#;
        assert!(passes(nested, r#"{"b":1,"c":0.5}"#));
        assert!(!passes(nested, r#"{"b":1,"c":1}"#));
        assert!(!passes(nested, r#"{"c":0.5}"#));
        assert_eq!(Filter::parse(nested).unwrap().keys(), vec!["a", "b", "c"]);
    }

    #[test]
    fn bad_filters_say_where_and_what() {
        let cases = [
            ("[1]", "(top)", "must be an object"),
            ("{\"must\":", "(top)", "not JSON"),
            (r#"{"mustt":[]}"#, "(top)", "unknown clause \"mustt\""),
            (r#"{"must":{}}"#, "must", "list of conditions"),
            (r#"{"must":[{"match":1}]}"#, "must[0]", "needs a \"key\""),
            (r#"{"must":[{"key":"","match":1}]}"#, "must[0].key", "1 to 256 bytes"),
            (
                r#"{"must":[{"key":"a","match":1.5}]}"#,
                "must[0].match",
                "only integers",
            ),
            (
                r#"{"must":[{"key":"a","match":null}]}"#,
                "must[0].match",
                "string, an integer or a boolean",
            ),
            (
                r#"{"must":[{"key":"a","match":1,"in":[1]}]}"#,
                "must[0]",
                "exactly one of",
            ),
            (
                r#"{"must":[{"key":"a","near":1}]}"#,
                "must[0]",
                "unknown condition \"near\"",
            ),
            (r#"{"must":[{"key":"a","in":[]}]}"#, "must[0].in", "at least one value"),
            (
                r#"{"must":[{"key":"a","in":[1,[2]]}]}"#,
                "must[0].in[1]",
                "string, an integer",
            ),
            (
                r#"{"must":[{"key":"a","range":{}}]}"#,
                "must[0].range",
                "at least one of",
            ),
            (
                r#"{"must":[{"key":"a","range":{"gte":"x"}}]}"#,
                "must[0].range.gte",
                "finite number",
            ),
            (
                r#"{"must":[{"key":"a","range":{"from":1}}]}"#,
                "must[0].range",
                "unknown bound",
            ),
        ];
        for (json, path, message) in cases {
            let e = Filter::parse(json).unwrap_err();
            assert_eq!(e.path, path, "{json}: {e}");
            assert!(e.message.contains(message), "{json}: {e}");
        }
    }

    #[test]
    fn hostile_filters_are_bounded() {
        let mut deep = String::from(r#"{"key":"a","match":1}"#);
        for _ in 0..MAX_FILTER_DEPTH {
            deep = format!(r#"{{"must":[{deep}]}}"#);
        }
        assert!(Filter::parse(&deep).is_ok(), "{MAX_FILTER_DEPTH} levels are allowed");
        let deep = format!(r#"{{"must":[{deep}]}}"#);
        let e = Filter::parse(&deep).unwrap_err();
        assert!(e.message.contains("nest more than"), "{e}");
        let many: Vec<String> = (0..=MAX_FILTER_CONDITIONS).map(|i| i.to_string()).collect();
        let wide = format!(r#"{{"must":[{{"key":"a","in":[{}]}}]}}"#, many.join(","));
        assert!(Filter::parse(&wide).unwrap_err().message.contains("more than"));
        let long = format!(r#"{{"must":[{{"key":"a","match":"{}"}}]}}"#, "x".repeat(5000));
        assert!(Filter::parse(&long).unwrap_err().message.contains("at most"));
    }

    #[test]
    fn field_specs_parse_and_check() {
        let f = FieldSpec::parse("lang:keyword").unwrap();
        assert_eq!((f.name.as_str(), f.kind), ("lang", FieldKind::Keyword));
        assert_eq!(
            FieldSpec::parse("a:b:int").unwrap().name,
            "a:b",
            "the last colon splits"
        );
        assert!(FieldSpec::parse("year").unwrap_err().contains("name:type"));
        assert!(FieldSpec::parse("year:date")
            .unwrap_err()
            .contains("keyword, int, float or bool"));
        assert!(FieldSpec::parse(":int").unwrap_err().contains("1 to 256 bytes"));
        let twice = [
            FieldSpec::parse("a:int").unwrap(),
            FieldSpec::parse("a:keyword").unwrap(),
        ];
        assert!(FieldSpec::check(&twice).unwrap_err().contains("declared twice"));
    }

    #[test]
    fn travels_through_postcard() {
        let f =
            Filter::parse(r#"{"must":[{"should":[{"key":"a","in":["x",2,true]}]},{"key":"y","range":{"lt":3.5}}]}"#)
                .unwrap();
        let bytes = postcard::to_stdvec(&f).unwrap();
        assert_eq!(postcard::from_bytes::<Filter>(&bytes).unwrap(), f);
    }
}
