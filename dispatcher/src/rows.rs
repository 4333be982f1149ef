//! The one strict parser of dataset rows: JSON Lines, one object per line,
//! keys exactly the schema's column names (a missing nullable column is
//! null). Dataset staging and the buffer sink both use it, so a part that
//! stages is a batch that ingests and the other way round.
//!
//! Strict means: invalid UTF-8, a line that is not one JSON object, a key
//! twice in one object, an unknown or missing column, a value of the wrong
//! type (including `null` in a non-nullable column, an `int64` given as a
//! fraction or past ±2^53, which JSON readers cannot all hold exactly, and
//! a NUL character, which Postgres cannot store), and
//! a line longer than the row limit are all errors, named by the
//! contract's reason codes and the 1-based line. Nothing is coerced.

use std::collections::HashMap;
use std::fmt;

use dispatcher_wire::{Column, ColumnType};
use serde::de::{Deserializer, MapAccess, Visitor};
use serde_json::Value;

/// Largest integer an `int64` column takes from a JSON number: 2^53 − 1,
/// the largest every JSON reader holds exactly.
pub const MAX_SAFE_INTEGER: i64 = (1 << 53) - 1;

/// Why a part or batch was refused (the contract's reason codes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReasonCode {
    ChecksumMismatch,
    RowCountMismatch,
    InvalidJson,
    UnknownColumn,
    MissingColumn,
    WrongType,
    RowTooLarge,
    ObjectMissing,
}

impl ReasonCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ReasonCode::ChecksumMismatch => "checksum_mismatch",
            ReasonCode::RowCountMismatch => "row_count_mismatch",
            ReasonCode::InvalidJson => "invalid_json",
            ReasonCode::UnknownColumn => "unknown_column",
            ReasonCode::MissingColumn => "missing_column",
            ReasonCode::WrongType => "wrong_type",
            ReasonCode::RowTooLarge => "row_too_large",
            ReasonCode::ObjectMissing => "object_missing",
        }
    }
}

/// A refused part or batch: the reason, the first bad line (1-based) when
/// a line is at fault, and a message for people.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{}: {message}", code.as_str(), line.map(|l| format!(" at line {l}")).unwrap_or_default())]
pub struct RowError {
    pub code: ReasonCode,
    pub line: Option<u64>,
    pub message: String,
}

impl RowError {
    fn at(code: ReasonCode, line: u64, message: impl Into<String>) -> Self {
        RowError {
            code,
            line: Some(line),
            message: message.into(),
        }
    }
}

/// One JSON object's members in order, duplicates kept (serde_json's own
/// map would keep the last silently).
struct Members(Vec<(String, Value)>);

impl<'de> serde::Deserialize<'de> for Members {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Members;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Members, A::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, Value>()? {
                    out.push((k, v));
                }
                Ok(Members(out))
            }
        }
        d.deserialize_map(V)
    }
}

fn check_type(c: &Column, v: &Value) -> Result<(), String> {
    if v.is_null() {
        return if c.nullable {
            Ok(())
        } else {
            Err(format!("column {:?} is not nullable but is null", c.name))
        };
    }
    let ok = match c.kind {
        ColumnType::String => v.is_string(),
        ColumnType::Bool => v.is_boolean(),
        ColumnType::Float64 => v.is_number(),
        ColumnType::Json => true,
        ColumnType::Int64 => match v {
            Value::Number(n) => match n.as_i64() {
                Some(i) if (-MAX_SAFE_INTEGER..=MAX_SAFE_INTEGER).contains(&i) => true,
                Some(_) => {
                    return Err(format!(
                        "column {:?} (int64): {n} is past ±2^53, which JSON readers cannot all \
                         hold exactly",
                        c.name
                    ))
                }
                None if n.is_u64() => {
                    return Err(format!("column {:?} (int64): {n} is past ±2^53", c.name))
                }
                None => false,
            },
            _ => false,
        },
        ColumnType::Timestamp => match v {
            Value::String(s) => {
                chrono::DateTime::parse_from_rfc3339(s).map_err(|e| {
                    format!(
                        "column {:?} (timestamp): {s:?} is not RFC 3339: {e}",
                        c.name
                    )
                })?;
                true
            }
            _ => false,
        },
    };
    if ok {
        Ok(())
    } else {
        Err(format!(
            "column {:?} is {} but the value is {}",
            c.name,
            c.kind.as_str(),
            match v {
                Value::Null => "null",
                Value::Bool(_) => "a boolean",
                Value::Number(_) => "a number",
                Value::String(_) => "a string",
                Value::Array(_) => "an array",
                Value::Object(_) => "an object",
            }
        ))
    }
}

/// Parses `bytes` as rows of `columns`, calling `on_row` with each row's
/// values in column order (`null` where absent). Returns the row count, or
/// the first error. `max_row_bytes` bounds one line.
pub fn parse_rows(
    bytes: &[u8],
    columns: &[Column],
    max_row_bytes: usize,
    mut on_row: impl FnMut(Vec<Value>),
) -> Result<u64, RowError> {
    let index: HashMap<&str, usize> = columns
        .iter()
        .enumerate()
        .map(|(i, c)| (c.name.as_str(), i))
        .collect();
    // A final newline ends the last line; it does not start an empty one.
    let body = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    if body.is_empty() {
        return Ok(0);
    }
    let mut rows = 0u64;
    for (i, raw) in body.split(|b| *b == b'\n').enumerate() {
        let line = i as u64 + 1;
        if raw.len() > max_row_bytes {
            return Err(RowError::at(
                ReasonCode::RowTooLarge,
                line,
                format!(
                    "{} bytes; a row may have at most {max_row_bytes}",
                    raw.len()
                ),
            ));
        }
        let text = std::str::from_utf8(raw)
            .map_err(|e| RowError::at(ReasonCode::InvalidJson, line, format!("not UTF-8: {e}")))?;
        let text = text.strip_suffix('\r').unwrap_or(text);
        if text.trim().is_empty() {
            return Err(RowError::at(ReasonCode::InvalidJson, line, "an empty line"));
        }
        let Members(members) = serde_json::from_str(text)
            .map_err(|e| RowError::at(ReasonCode::InvalidJson, line, e.to_string()))?;
        let mut values = vec![Value::Null; columns.len()];
        let mut seen = vec![false; columns.len()];
        for (key, value) in members {
            let Some(&at) = index.get(key.as_str()) else {
                return Err(RowError::at(
                    ReasonCode::UnknownColumn,
                    line,
                    format!("no column {key:?}"),
                ));
            };
            if seen[at] {
                return Err(RowError::at(
                    ReasonCode::InvalidJson,
                    line,
                    format!("key {key:?} appears twice"),
                ));
            }
            seen[at] = true;
            check_type(&columns[at], &value)
                .map_err(|m| RowError::at(ReasonCode::WrongType, line, m))?;
            // Postgres stores no NUL character, in text or jsonb.
            crate::domain::storable_json(&key, &value)
                .map_err(|e| RowError::at(ReasonCode::WrongType, line, e.to_string()))?;
            values[at] = value;
        }
        if let Some(c) = columns
            .iter()
            .zip(&seen)
            .find(|(c, seen)| !**seen && !c.nullable)
            .map(|(c, _)| c)
        {
            return Err(RowError::at(
                ReasonCode::MissingColumn,
                line,
                format!("column {:?} is required", c.name),
            ));
        }
        on_row(values);
        rows += 1;
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use dispatcher_wire::{Column, ColumnType};
    use proptest::prelude::*;

    fn col(name: &str, kind: ColumnType, nullable: bool) -> Column {
        Column {
            name: name.into(),
            kind,
            nullable,
        }
    }

    fn schema() -> Vec<Column> {
        vec![
            col("ts", ColumnType::Timestamp, false),
            col("user_id", ColumnType::String, false),
            col("n", ColumnType::Int64, true),
            col("value", ColumnType::Float64, true),
            col("ok", ColumnType::Bool, true),
            col("extra", ColumnType::Json, true),
        ]
    }

    fn parse(text: &[u8]) -> Result<Vec<Vec<Value>>, RowError> {
        let mut rows = vec![];
        parse_rows(text, &schema(), 200, |r| rows.push(r))?;
        Ok(rows)
    }

    #[test]
    fn good_rows_parse_in_column_order_with_missing_nullables_null() {
        let rows = parse(
            b"{\"user_id\": \"a\", \"ts\": \"2026-01-01T00:00:00Z\", \"n\": 3}\n\
              {\"ts\": \"2026-01-01T00:00:00+02:00\", \"user_id\": \"b\", \"value\": 1.5, \"ok\": true, \"extra\": [1]}\n",
        )
        .unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0][1], "a");
        assert_eq!(rows[0][2], 3);
        assert_eq!(rows[0][3], Value::Null);
        assert_eq!(rows[1][5], serde_json::json!([1]));
        assert_eq!(parse(b"").unwrap().len(), 0);
        // No final newline, and CRLF line ends, are fine.
        assert_eq!(
            parse(b"{\"ts\":\"2026-01-01T00:00:00Z\",\"user_id\":\"a\"}\r\n{\"ts\":\"2026-01-01T00:00:00Z\",\"user_id\":\"b\"}")
                .unwrap()
                .len(),
            2
        );
    }

    #[test]
    fn every_malformed_kind_is_refused_with_its_code_and_line() {
        let good = "{\"ts\": \"2026-01-01T00:00:00Z\", \"user_id\": \"a\"}";
        let cases: Vec<(Vec<u8>, ReasonCode)> = vec![
            (b"{\"ts\": ".to_vec(), ReasonCode::InvalidJson),
            (b"[1, 2]".to_vec(), ReasonCode::InvalidJson),
            (b"{} {}".to_vec(), ReasonCode::InvalidJson),
            (b"".to_vec(), ReasonCode::InvalidJson), // an empty line between rows
            (b"{\"ts\": \"2026-01-01T00:00:00Z\", \"user_id\": \"\xff\"}".to_vec(), ReasonCode::InvalidJson),
            (b"{\"ts\": \"2026-01-01T00:00:00Z\", \"user_id\": \"a\", \"user_id\": \"b\"}".to_vec(), ReasonCode::InvalidJson),
            (b"{\"ts\": \"2026-01-01T00:00:00Z\", \"user_id\": \"a\", \"who\": 1}".to_vec(), ReasonCode::UnknownColumn),
            (b"{\"ts\": \"2026-01-01T00:00:00Z\"}".to_vec(), ReasonCode::MissingColumn),
            (b"{\"ts\": \"2026-01-01T00:00:00Z\", \"user_id\": 7}".to_vec(), ReasonCode::WrongType),
            (b"{\"ts\": \"yesterday\", \"user_id\": \"a\"}".to_vec(), ReasonCode::WrongType),
            (b"{\"ts\": \"2026-01-01T00:00:00Z\", \"user_id\": null}".to_vec(), ReasonCode::WrongType),
            (b"{\"ts\": \"2026-01-01T00:00:00Z\", \"user_id\": \"a\", \"n\": 1.5}".to_vec(), ReasonCode::WrongType),
            (b"{\"ts\": \"2026-01-01T00:00:00Z\", \"user_id\": \"a\", \"n\": 9007199254740993}".to_vec(), ReasonCode::WrongType),
            (b"{\"ts\": \"2026-01-01T00:00:00Z\", \"user_id\": \"a\", \"n\": 18446744073709551615}".to_vec(), ReasonCode::WrongType),
            (b"{\"ts\": \"2026-01-01T00:00:00Z\", \"user_id\": \"a\", \"ok\": \"yes\"}".to_vec(), ReasonCode::WrongType),
            (b"{\"ts\": \"2026-01-01T00:00:00Z\", \"user_id\": \"a\\u0000b\"}".to_vec(), ReasonCode::WrongType),
            (format!("{{\"ts\": \"2026-01-01T00:00:00Z\", \"user_id\": \"{}\"}}", "x".repeat(300)).into_bytes(), ReasonCode::RowTooLarge),
        ];
        for (bad, code) in cases {
            // The bad line is the second: the first is good.
            let mut text = good.as_bytes().to_vec();
            text.push(b'\n');
            text.extend_from_slice(&bad);
            text.extend_from_slice(b"\n");
            text.extend_from_slice(good.as_bytes());
            let err = parse(&text).unwrap_err();
            assert_eq!(
                (err.code, err.line),
                (code, Some(2)),
                "{:?}: {err}",
                String::from_utf8_lossy(&bad)
            );
        }
        // The largest safe integers are taken.
        let edge = format!(
            "{{\"ts\": \"2026-01-01T00:00:00Z\", \"user_id\": \"a\", \"n\": {MAX_SAFE_INTEGER}}}"
        );
        assert!(parse(edge.as_bytes()).is_ok());
        let edge = format!(
            "{{\"ts\": \"2026-01-01T00:00:00Z\", \"user_id\": \"a\", \"n\": -{MAX_SAFE_INTEGER}}}"
        );
        assert!(parse(edge.as_bytes()).is_ok());
    }

    fn value_for(kind: ColumnType) -> BoxedStrategy<Value> {
        match kind {
            // Any text but NUL, which Postgres cannot store (refused above).
            ColumnType::String => "[^\\x00]{0,24}".prop_map(Value::from).boxed(),
            ColumnType::Int64 => (-MAX_SAFE_INTEGER..=MAX_SAFE_INTEGER)
                .prop_map(Value::from)
                .boxed(),
            ColumnType::Float64 => (-1e12f64..1e12).prop_map(Value::from).boxed(),
            ColumnType::Bool => any::<bool>().prop_map(Value::from).boxed(),
            ColumnType::Timestamp => (0i64..4_000_000_000)
                .prop_map(|s| {
                    Value::from(chrono::DateTime::from_timestamp(s, 0).unwrap().to_rfc3339())
                })
                .boxed(),
            ColumnType::Json => prop_oneof![
                Just(serde_json::json!({"a": [1, "b"]})),
                any::<i32>().prop_map(Value::from)
            ]
            .boxed(),
        }
    }

    proptest! {
        /// Any row of the schema's types, written as JSON Lines, parses back
        /// to the same values (absent nullables as null).
        #[test]
        fn written_rows_parse_back_to_the_same_values(
            rows in proptest::collection::vec(
                (value_for(ColumnType::Timestamp), value_for(ColumnType::String),
                 proptest::option::of(value_for(ColumnType::Int64)),
                 proptest::option::of(value_for(ColumnType::Float64)),
                 proptest::option::of(value_for(ColumnType::Bool)),
                 proptest::option::of(value_for(ColumnType::Json))),
                0..20)
        ) {
            let names = ["ts", "user_id", "n", "value", "ok", "extra"];
            let mut text = String::new();
            let mut expected = vec![];
            for (ts, user, n, value, ok, extra) in rows {
                let vals = [Some(ts), Some(user), n, value, ok, extra];
                let mut obj = serde_json::Map::new();
                for (name, v) in names.iter().zip(&vals) {
                    if let Some(v) = v {
                        obj.insert((*name).to_owned(), v.clone());
                    }
                }
                text.push_str(&Value::Object(obj).to_string());
                text.push('\n');
                expected.push(vals.into_iter().map(|v| v.unwrap_or(Value::Null)).collect::<Vec<_>>());
            }
            let mut got = vec![];
            let n = parse_rows(text.as_bytes(), &schema(), usize::MAX, |r| got.push(r)).unwrap();
            prop_assert_eq!(n as usize, expected.len());
            prop_assert_eq!(got, expected);
        }
    }
}
