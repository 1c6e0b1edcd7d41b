//! Payload indexes: typed in-memory columns of the declared payload fields
//! of a replica, one per segment, and filters compiled against them.
//!
//! A replica's [`Schema`] lists its declared fields ([`FieldSpec`]) and
//! holds one dictionary per keyword field (each distinct string gets a
//! number once; strings are never removed). Every segment keeps one
//! [`Column`] per field, a cell per row, filled from the row's payload
//! when the row is appended (or read back at open). A value of another
//! type than the field's is held as missing.
//!
//! [`Schema::compile`] turns a [`Filter`] into a [`Compiled`] filter over
//! columns: field names become column numbers, keyword strings become
//! dictionary numbers (a string never seen matches nothing). Filters on
//! fields without an index, and conditions that cannot hold for the
//! field's type, are refused with an error that says what to change: a
//! filter is always answered from memory, in time linear in the rows.
//!
//! Invariants: every segment has exactly `schema.fields().len()` columns,
//! each with a cell per row; evaluation of a compiled filter on a row
//! equals [`Filter::matches_json`] on its payload, for values of the
//! declared types.

use std::collections::HashMap;

use edgevec_proto::filter::{Condition, FieldKind, FieldSpec, FieldValue, Filter, Range, Scalar};
use serde_json::Value;

use crate::error::EngineError;

const NO_KEYWORD: u32 = u32::MAX;
const NO_BOOL: u8 = 2;

/// The cells of one field for the rows of one segment.
#[derive(Debug, Clone, PartialEq)]
pub enum Column {
    /// Dictionary numbers; `u32::MAX`: missing.
    Keyword(Vec<u32>),
    /// `None`: missing.
    Int(Vec<Option<i64>>),
    /// NaN: missing.
    Float(Vec<f64>),
    /// 0 or 1; 2: missing.
    Bool(Vec<u8>),
}

/// One cell, before it is pushed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Cell {
    Keyword(u32),
    Int(Option<i64>),
    Float(f64),
    Bool(u8),
}

impl Column {
    fn new(kind: FieldKind) -> Column {
        match kind {
            FieldKind::Keyword => Column::Keyword(Vec::new()),
            FieldKind::Int => Column::Int(Vec::new()),
            FieldKind::Float => Column::Float(Vec::new()),
            FieldKind::Bool => Column::Bool(Vec::new()),
        }
    }

    fn push(&mut self, cell: Cell) {
        match (self, cell) {
            (Column::Keyword(v), Cell::Keyword(c)) => v.push(c),
            (Column::Int(v), Cell::Int(c)) => v.push(c),
            (Column::Float(v), Cell::Float(c)) => v.push(c),
            (Column::Bool(v), Cell::Bool(c)) => v.push(c),
            (col, cell) => panic!("cell {cell:?} pushed onto {col:?}: the schema decides both"),
        }
    }

    fn cell(&self, row: usize) -> Cell {
        match self {
            Column::Keyword(v) => Cell::Keyword(v[row]),
            Column::Int(v) => Cell::Int(v[row]),
            Column::Float(v) => Cell::Float(v[row]),
            Column::Bool(v) => Cell::Bool(v[row]),
        }
    }

    fn shrink(&mut self) {
        match self {
            Column::Keyword(v) => v.shrink_to_fit(),
            Column::Int(v) => v.shrink_to_fit(),
            Column::Float(v) => v.shrink_to_fit(),
            Column::Bool(v) => v.shrink_to_fit(),
        }
    }
}

/// The columns of one segment.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Columns(Vec<Column>);

impl Columns {
    pub fn new(schema: &Schema) -> Columns {
        Columns(schema.fields.iter().map(|f| Column::new(f.kind)).collect())
    }

    /// Appends one row's cells (as [`Schema::cells`] made them).
    pub fn push(&mut self, cells: &[Cell]) {
        for (col, cell) in self.0.iter_mut().zip(cells) {
            col.push(*cell);
        }
    }

    /// Columns whose row `i` is row `rows[i]` of `from(i)`'s columns: for a
    /// merged segment, gathered from the segments serving its rows.
    pub fn gather<'a>(schema: &Schema, rows: impl Iterator<Item = (&'a Columns, u32)>) -> Columns {
        let mut out = Columns::new(schema);
        let mut cells = Vec::with_capacity(schema.fields.len());
        for (cols, row) in rows {
            cells.clear();
            cells.extend(cols.0.iter().map(|c| c.cell(row as usize)));
            out.push(&cells);
        }
        out.shrink();
        out
    }

    pub fn shrink(&mut self) {
        self.0.iter_mut().for_each(Column::shrink);
    }
}

/// The declared fields of a replica and its keyword dictionaries.
#[derive(Debug, Default)]
pub struct Schema {
    fields: Vec<FieldSpec>,
    dicts: HashMap<usize, HashMap<String, u32>>,
}

impl Schema {
    pub fn new(fields: &[FieldSpec]) -> Schema {
        Schema {
            fields: fields.to_vec(),
            dicts: HashMap::new(),
        }
    }

    pub fn fields(&self) -> &[FieldSpec] {
        &self.fields
    }

    /// The cells of one row from its payload (JSON text of an object, as
    /// stored; `None`: no payload). Interns new keyword strings.
    pub fn cells(&mut self, payload: Option<&str>) -> Vec<Cell> {
        if self.fields.is_empty() {
            return Vec::new();
        }
        let map: Option<serde_json::Map<String, Value>> = payload.and_then(|p| serde_json::from_str(p).ok());
        let mut out = Vec::with_capacity(self.fields.len());
        for (i, f) in self.fields.iter().enumerate() {
            let v = map.as_ref().and_then(|m| FieldValue::of_json(m.get(&f.name)?));
            out.push(match f.kind {
                FieldKind::Keyword => match v {
                    Some(FieldValue::Str(s)) => {
                        let dict = self.dicts.entry(i).or_default();
                        let next = dict.len() as u32;
                        Cell::Keyword(*dict.entry(s.to_owned()).or_insert(next))
                    }
                    _ => Cell::Keyword(NO_KEYWORD),
                },
                FieldKind::Int => Cell::Int(match v {
                    Some(FieldValue::Int(x)) => Some(x),
                    Some(FieldValue::Float(x)) if x.fract() == 0.0 && x.abs() < 9.0e18 => Some(x as i64),
                    _ => None,
                }),
                FieldKind::Float => Cell::Float(match v {
                    Some(FieldValue::Int(x)) => x as f64,
                    Some(FieldValue::Float(x)) => x,
                    _ => f64::NAN,
                }),
                FieldKind::Bool => Cell::Bool(match v {
                    Some(FieldValue::Bool(b)) => u8::from(b),
                    _ => NO_BOOL,
                }),
            });
        }
        out
    }

    /// Compiles `filter` against these fields (see the module doc).
    pub fn compile(&self, filter: &Filter) -> Result<Compiled, EngineError> {
        let list = |conds: &[Condition]| conds.iter().map(|c| self.condition(c)).collect::<Result<Vec<_>, _>>();
        let (must, should, must_not) = (list(&filter.must)?, list(&filter.should)?, list(&filter.must_not)?);
        let key = format!("{:?}", (&must, &should, &must_not));
        Ok(Compiled {
            must,
            should,
            must_not,
            key,
        })
    }

    fn column_of(&self, key: &str) -> Result<(usize, FieldKind), EngineError> {
        self.fields
            .iter()
            .position(|f| f.name == key)
            .map(|i| (i, self.fields[i].kind))
            .ok_or_else(|| {
                let declared: Vec<String> = self
                    .fields
                    .iter()
                    .map(|f| format!("{}:{}", f.name, f.kind.name()))
                    .collect();
                EngineError::invalid(
                    "filter",
                    format!(
                        "field \"{key}\" has no payload index; filters use indexed fields only (declared: {}). \
                         Declare it when creating the collection, e.g. --index-field {key}:keyword",
                        if declared.is_empty() {
                            "none".to_owned()
                        } else {
                            declared.join(", ")
                        }
                    ),
                )
            })
    }

    fn condition(&self, c: &Condition) -> Result<Cond, EngineError> {
        let mismatch = |key: &str, kind: FieldKind, what: &str| {
            EngineError::invalid(
                "filter",
                format!("field \"{key}\" is indexed as {}, which {what}", kind.name()),
            )
        };
        Ok(match c {
            Condition::Nested(f) => Cond::Nested(Box::new(self.compile(f)?)),
            Condition::Match { key, value } => self.equality(key, std::slice::from_ref(value))?,
            Condition::In { key, values } => self.equality(key, values)?,
            Condition::Range { key, range } => {
                let (col, kind) = self.column_of(key)?;
                match kind {
                    FieldKind::Int | FieldKind::Float => Cond::Range { col, range: *range },
                    _ => return Err(mismatch(key, kind, "has no range; index it as int or float")),
                }
            }
        })
    }

    fn equality(&self, key: &str, values: &[Scalar]) -> Result<Cond, EngineError> {
        let (col, kind) = self.column_of(key)?;
        let wrong = |what: &str| {
            EngineError::invalid(
                "filter",
                format!("field \"{key}\" is indexed as {}; it cannot equal {what}", kind.name()),
            )
        };
        let mut out = Vec::with_capacity(values.len());
        for v in values {
            match (kind, v) {
                (FieldKind::Keyword, Scalar::Str(s)) => {
                    if let Some(id) = self.dicts.get(&col).and_then(|d| d.get(s)) {
                        out.push(Cell::Keyword(*id));
                    }
                }
                (FieldKind::Int, Scalar::Int(i)) => out.push(Cell::Int(Some(*i))),
                (FieldKind::Float, Scalar::Int(i)) => out.push(Cell::Float(*i as f64)),
                (FieldKind::Bool, Scalar::Bool(b)) => out.push(Cell::Bool(u8::from(*b))),
                (_, Scalar::Str(s)) => return Err(wrong(&format!("the string \"{s}\""))),
                (_, Scalar::Int(i)) => return Err(wrong(&format!("the integer {i}"))),
                (_, Scalar::Bool(b)) => return Err(wrong(&format!("the boolean {b}"))),
            }
        }
        Ok(Cond::Equals { col, any: out })
    }
}

/// A filter compiled against a [`Schema`].
#[derive(Debug, Clone)]
pub struct Compiled {
    must: Vec<Cond>,
    should: Vec<Cond>,
    must_not: Vec<Cond>,
    /// The conditions as text: equal for filters that pass the same rows
    /// of a segment, so a segment can keep its passing rows under it.
    key: String,
}

#[derive(Debug, Clone)]
enum Cond {
    /// The cell equals one of these (none: never).
    Equals {
        col: usize,
        any: Vec<Cell>,
    },
    Range {
        col: usize,
        range: Range,
    },
    Nested(Box<Compiled>),
}

impl Compiled {
    /// Text that names what the filter passes (see the field).
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Whether row `row` of a segment with these columns passes.
    pub fn passes(&self, cols: &Columns, row: u32) -> bool {
        let row = row as usize;
        self.must.iter().all(|c| c.holds(cols, row))
            && (self.should.is_empty() || self.should.iter().any(|c| c.holds(cols, row)))
            && !self.must_not.iter().any(|c| c.holds(cols, row))
    }
}

impl Cond {
    fn holds(&self, cols: &Columns, row: usize) -> bool {
        match self {
            Cond::Equals { col, any } => {
                let cell = cols.0[*col].cell(row);
                let missing = matches!(cell, Cell::Keyword(NO_KEYWORD) | Cell::Int(None) | Cell::Bool(NO_BOOL))
                    || matches!(cell, Cell::Float(x) if x.is_nan());
                !missing && any.contains(&cell)
            }
            Cond::Range { col, range } => match cols.0[*col].cell(row) {
                Cell::Int(Some(x)) => range.contains(x as f64),
                Cell::Float(x) if !x.is_nan() => range.contains(x),
                _ => false,
            },
            Cond::Nested(f) => f.passes(cols, row as u32),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema() -> Schema {
        let f = |name: &str, kind| FieldSpec {
            name: name.into(),
            kind,
        };
        Schema::new(&[
            f("lang", FieldKind::Keyword),
            f("year", FieldKind::Int),
            f("score", FieldKind::Float),
            f("draft", FieldKind::Bool),
        ])
    }

    const PAYLOADS: [Option<&str>; 8] = [
        Some(r#"{"lang":"en","year":2021,"score":0.5,"draft":false}"#),
        Some(r#"{"lang":"de","year":2019,"score":1}"#),
        Some(r#"{"lang":"en","year":"2022","draft":true}"#),
        Some(r#"{"lang":7,"year":2020.0,"score":-3.25}"#),
        None,
        Some(r#"{"other":1}"#),
        Some(r#"{"lang":"fr","year":2023,"score":2.5,"draft":true}"#),
        Some(r#"{"year":2020.5,"score":"x"}"#),
    ];

    #[test]
    fn compiled_filters_agree_with_the_json_semantics() {
        let mut s = schema();
        let mut cols = Columns::new(&s);
        for p in PAYLOADS {
            let cells = s.cells(p);
            cols.push(&cells);
        }
        let filters = [
            r#"{"must":[{"key":"lang","match":"en"}]}"#,
            r#"{"must":[{"key":"lang","in":["de","fr","zz"]}]}"#,
            r#"{"must":[{"key":"year","range":{"gte":2020}}]}"#,
            r#"{"must":[{"key":"year","match":2020}]}"#,
            r#"{"must":[{"key":"score","range":{"gt":0,"lte":2.5}}]}"#,
            r#"{"must":[{"key":"score","match":1}]}"#,
            r#"{"must_not":[{"key":"draft","match":true}]}"#,
            r#"{"should":[{"key":"lang","match":"de"},{"key":"draft","match":true}]}"#,
            r#"{"must":[{"should":[{"key":"year","range":{"lt":2020}},{"key":"lang","match":"fr"}]}],"must_not":[{"key":"score","range":{"lt":0}}]}"#,
            r#"{"must":[{"key":"lang","match":"never seen"}]}"#,
            "{}",
        ];
        for json in filters {
            let f = Filter::parse(json).unwrap();
            let c = s.compile(&f).unwrap();
            for (row, p) in PAYLOADS.iter().enumerate() {
                let map: Option<serde_json::Map<String, Value>> = p.map(|p| serde_json::from_str(p).unwrap());
                // 2020.5 is no int: the int column holds it as missing.
                let want = f.matches_json(map.as_ref()) && !(row == 7 && json.contains("\"year\""));
                assert_eq!(c.passes(&cols, row as u32), want, "{json} on row {row}: {p:?}");
            }
        }
        // Gathered columns answer the same for the rows they take.
        let gathered = Columns::gather(&s, [(&cols, 6u32), (&cols, 0)].into_iter());
        let en = s
            .compile(&Filter::parse(r#"{"must":[{"key":"lang","match":"en"}]}"#).unwrap())
            .unwrap();
        assert_eq!((en.passes(&gathered, 0), en.passes(&gathered, 1)), (false, true));
    }

    #[test]
    fn filters_the_index_cannot_answer_are_refused_with_the_fix() {
        let s = schema();
        let refused = |json: &str| s.compile(&Filter::parse(json).unwrap()).unwrap_err().to_string();
        let e = refused(r#"{"must":[{"key":"color","match":"red"}]}"#);
        assert!(
            e.contains("\"color\" has no payload index") && e.contains("--index-field color:keyword"),
            "{e}"
        );
        assert!(e.contains("lang:keyword, year:int"), "{e}");
        let e = refused(r#"{"must":[{"key":"lang","range":{"gt":1}}]}"#);
        assert!(e.contains("indexed as keyword, which has no range"), "{e}");
        let e = refused(r#"{"must":[{"key":"year","match":"2020"}]}"#);
        assert!(e.contains("indexed as int; it cannot equal the string \"2020\""), "{e}");
        let e = refused(r#"{"must":[{"should":[{"key":"draft","in":[1]}]}]}"#);
        assert!(e.contains("indexed as bool; it cannot equal the integer 1"), "{e}");
    }
}
