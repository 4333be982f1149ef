//! The query service's core (contract: "Query"; ADR 0007): a `where` map is
//! parsed into a typed expression checked against the dataset's schema,
//! then either evaluated over a committed version's parts (read with the
//! strict row parser) or compiled to parameterised SQL over a stream
//! dataset's table in the data database. Column names reach SQL only as
//! indexes into the schema (quoted identifiers the registry validated);
//! every value is a bind parameter. Both paths follow SQL's semantics:
//! three-valued logic, nulls last ascending and first descending, strings
//! compared by code point.

use std::cmp::Ordering;

use chrono::{DateTime, SecondsFormat, Utc};
use dispatcher_wire::{Column, ColumnType, QueryRequest};
use serde_json::{Map, Value};

use crate::domain::Invalid;
use crate::error::StoreError;
pub use crate::settings::{QueryLimits, ReadLimits};

/// Deepest nesting of `and` / `or` / `not` (a leaf at the top is depth 1).
pub const MAX_DEPTH: usize = 8;

/// A typed value of a column.
#[derive(Debug, Clone, PartialEq)]
pub enum Scalar {
    Str(String),
    Int(i64),
    Float(f64),
    Bool(bool),
    Ts(DateTime<Utc>),
    /// A `json` column's value (only ever tested for null).
    Json(Value),
}

impl Scalar {
    /// Compares two values of one column type.
    pub fn cmp_same(&self, other: &Scalar) -> Ordering {
        match (self, other) {
            (Scalar::Str(a), Scalar::Str(b)) => a.as_bytes().cmp(b.as_bytes()),
            (Scalar::Int(a), Scalar::Int(b)) => a.cmp(b),
            (Scalar::Float(a), Scalar::Float(b)) => a.total_cmp(b),
            (Scalar::Bool(a), Scalar::Bool(b)) => a.cmp(b),
            (Scalar::Ts(a), Scalar::Ts(b)) => a.cmp(b),
            _ => Ordering::Equal,
        }
    }

    /// The value as the answer shows it: timestamps in UTC with `Z`,
    /// `float64` always as a float.
    pub fn to_json(&self) -> Value {
        match self {
            Scalar::Str(s) => Value::String(s.clone()),
            Scalar::Int(i) => Value::from(*i),
            Scalar::Float(f) => serde_json::Number::from_f64(*f)
                .map(Value::Number)
                .unwrap_or(Value::Null),
            Scalar::Bool(b) => Value::Bool(*b),
            Scalar::Ts(t) => Value::String(t.to_rfc3339_opts(SecondsFormat::AutoSi, true)),
            Scalar::Json(v) => v.clone(),
        }
    }

    /// A stored row value (already checked by the row parser) as a typed
    /// value; `None` for null.
    pub fn from_row(kind: ColumnType, v: &Value) -> Option<Scalar> {
        match (kind, v) {
            (_, Value::Null) => None,
            (ColumnType::String, Value::String(s)) => Some(Scalar::Str(s.clone())),
            (ColumnType::Int64, Value::Number(n)) => n.as_i64().map(Scalar::Int),
            (ColumnType::Float64, Value::Number(n)) => n.as_f64().map(Scalar::Float),
            (ColumnType::Bool, Value::Bool(b)) => Some(Scalar::Bool(*b)),
            (ColumnType::Timestamp, Value::String(s)) => DateTime::parse_from_rfc3339(s)
                .ok()
                .map(|t| Scalar::Ts(t.with_timezone(&Utc))),
            (ColumnType::Json, v) => Some(Scalar::Json(v.clone())),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cmp {
    Eq,
    Ne,
    Lt,
    Lte,
    Gt,
    Gte,
}

impl Cmp {
    fn parse(op: &str) -> Option<Cmp> {
        Some(match op {
            "eq" => Cmp::Eq,
            "ne" => Cmp::Ne,
            "lt" => Cmp::Lt,
            "lte" => Cmp::Lte,
            "gt" => Cmp::Gt,
            "gte" => Cmp::Gte,
            _ => return None,
        })
    }

    pub fn sql(self) -> &'static str {
        match self {
            Cmp::Eq => "=",
            Cmp::Ne => "<>",
            Cmp::Lt => "<",
            Cmp::Lte => "<=",
            Cmp::Gt => ">",
            Cmp::Gte => ">=",
        }
    }

    fn holds(self, o: Ordering) -> bool {
        match self {
            Cmp::Eq => o == Ordering::Equal,
            Cmp::Ne => o != Ordering::Equal,
            Cmp::Lt => o == Ordering::Less,
            Cmp::Lte => o != Ordering::Greater,
            Cmp::Gt => o == Ordering::Greater,
            Cmp::Gte => o != Ordering::Less,
        }
    }
}

/// A checked filter; columns are indexes into the schema.
#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    And(Vec<Expr>),
    Or(Vec<Expr>),
    Not(Box<Expr>),
    Cmp {
        column: usize,
        op: Cmp,
        value: Scalar,
    },
    In {
        column: usize,
        values: Vec<Scalar>,
    },
    IsNull {
        column: usize,
        is_null: bool,
    },
}

impl Expr {
    /// SQL's three-valued logic over a row of typed values (`None` is
    /// null): `Some(true)`, `Some(false)` or unknown (`None`).
    pub fn eval(&self, row: &[Option<Scalar>]) -> Option<bool> {
        match self {
            Expr::And(xs) => {
                let mut unknown = false;
                for x in xs {
                    match x.eval(row) {
                        Some(false) => return Some(false),
                        None => unknown = true,
                        Some(true) => {}
                    }
                }
                if unknown {
                    None
                } else {
                    Some(true)
                }
            }
            Expr::Or(xs) => {
                let mut unknown = false;
                for x in xs {
                    match x.eval(row) {
                        Some(true) => return Some(true),
                        None => unknown = true,
                        Some(false) => {}
                    }
                }
                if unknown {
                    None
                } else {
                    Some(false)
                }
            }
            Expr::Not(x) => x.eval(row).map(|b| !b),
            Expr::Cmp { column, op, value } => {
                row[*column].as_ref().map(|v| op.holds(v.cmp_same(value)))
            }
            Expr::In { column, values } => row[*column]
                .as_ref()
                .map(|v| values.iter().any(|x| v.cmp_same(x) == Ordering::Equal)),
            Expr::IsNull { column, is_null } => Some(row[*column].is_none() == *is_null),
        }
    }
}

/// A query checked against its dataset's schema.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub columns: Vec<Column>,
    /// Indexes of the selected columns, in answer order.
    pub select: Vec<usize>,
    pub filter: Option<Expr>,
    /// (column, descending)
    pub order_by: Vec<(usize, bool)>,
    pub limit: usize,
}

impl Plan {
    /// Whether a row (typed values, schema order) passes the filter.
    pub fn keeps(&self, row: &[Option<Scalar>]) -> bool {
        self.filter
            .as_ref()
            .is_none_or(|f| f.eval(row) == Some(true))
    }

    /// The answer's order: each key ascending with nulls last, or
    /// descending with nulls first.
    pub fn compare(&self, a: &[Option<Scalar>], b: &[Option<Scalar>]) -> Ordering {
        for &(c, desc) in &self.order_by {
            let o = match (&a[c], &b[c]) {
                (None, None) => Ordering::Equal,
                (None, Some(_)) => Ordering::Greater,
                (Some(_), None) => Ordering::Less,
                (Some(x), Some(y)) => x.cmp_same(y),
            };
            let o = if desc { o.reverse() } else { o };
            if o != Ordering::Equal {
                return o;
            }
        }
        Ordering::Equal
    }

    pub fn column_names(&self) -> Vec<String> {
        self.select
            .iter()
            .map(|&i| self.columns[i].name.clone())
            .collect()
    }
}

/// Checks a request against the dataset's schema.
pub fn plan(req: &QueryRequest, columns: &[Column], limits: &QueryLimits) -> Result<Plan, Invalid> {
    let index = |field: &str, name: &str| -> Result<usize, Invalid> {
        columns
            .iter()
            .position(|c| c.name == name)
            .ok_or_else(|| Invalid::new(field, format!("no column {name:?} in the dataset")))
    };
    let select = match &req.select {
        None => (0..columns.len()).collect(),
        Some(names) if names.is_empty() => {
            return Err(Invalid::new("select", "must name at least one column"))
        }
        Some(names) => names
            .iter()
            .enumerate()
            .map(|(i, n)| index(&format!("select[{i}]"), n))
            .collect::<Result<Vec<_>, _>>()?,
    };
    let mut order_by = Vec::with_capacity(req.order_by.len());
    for (i, o) in req.order_by.iter().enumerate() {
        let field = format!("order_by[{i}].column");
        let c = index(&field, &o.column)?;
        if columns[c].kind == ColumnType::Json {
            return Err(Invalid::new(field, "json columns cannot be ordered by"));
        }
        order_by.push((c, o.desc));
    }
    let limit = req.limit.unwrap_or(limits.default_rows);
    if limit == 0 || limit > limits.max_rows {
        return Err(Invalid::new(
            "limit",
            format!("must be 1 to {}", limits.max_rows),
        ));
    }
    let filter = match &req.filter {
        None => None,
        Some(w) => Some(parse_expr(w, "where", 1, columns, limits)?),
    };
    Ok(Plan {
        columns: columns.to_vec(),
        select,
        filter,
        order_by,
        limit: limit as usize,
    })
}

fn single<'a>(v: &'a Value, at: &str, what: &str) -> Result<(&'a String, &'a Value), Invalid> {
    let obj: &Map<String, Value> = v
        .as_object()
        .ok_or_else(|| Invalid::new(at, format!("must be an object with exactly one {what}")))?;
    let mut it = obj.iter();
    match (it.next(), it.next()) {
        (Some(kv), None) => Ok(kv),
        _ => Err(Invalid::new(
            at,
            format!("must be an object with exactly one {what}"),
        )),
    }
}

fn parse_expr(
    v: &Value,
    at: &str,
    depth: usize,
    columns: &[Column],
    limits: &QueryLimits,
) -> Result<Expr, Invalid> {
    if depth > MAX_DEPTH {
        return Err(Invalid::new(
            at,
            format!("nesting is deeper than {MAX_DEPTH} levels"),
        ));
    }
    let (key, inner) = single(v, at, "key (`and`, `or`, `not` or a column)")?;
    // A column may be named `and`, `or` or `not`: the key is that column
    // when its value has a leaf's shape (an operator object) rather than a
    // combinator's (a list, or an expression).
    let is_column = |name: &str| columns.iter().any(|c| c.name == name);
    let operator_object = inner.as_object().is_some_and(|o| {
        o.len() == 1
            && o.keys().all(|k| {
                matches!(
                    k.as_str(),
                    "eq" | "ne" | "lt" | "lte" | "gt" | "gte" | "in" | "is_null"
                ) && !is_column(k)
            })
    });
    let combinator = match key.as_str() {
        "and" | "or" | "not" if is_column(key) && operator_object => None,
        k @ ("and" | "or" | "not") => Some(k),
        _ => None,
    };
    match combinator.unwrap_or("") {
        "and" | "or" => {
            let list = inner
                .as_array()
                .filter(|l| !l.is_empty())
                .ok_or_else(|| Invalid::new(format!("{at}.{key}"), "must be a non-empty list"))?;
            let xs = list
                .iter()
                .enumerate()
                .map(|(i, x)| {
                    parse_expr(x, &format!("{at}.{key}[{i}]"), depth + 1, columns, limits)
                })
                .collect::<Result<Vec<_>, _>>()?;
            Ok(if key == "and" {
                Expr::And(xs)
            } else {
                Expr::Or(xs)
            })
        }
        "not" => Ok(Expr::Not(Box::new(parse_expr(
            inner,
            &format!("{at}.not"),
            depth + 1,
            columns,
            limits,
        )?))),
        _ => {
            let name = key.as_str();
            let here = format!("{at}.{name}");
            let column = columns
                .iter()
                .position(|c| c.name == name)
                .ok_or_else(|| Invalid::new(&here, format!("no column {name:?} in the dataset")))?;
            let kind = columns[column].kind;
            let (op, arg) = single(
                inner,
                &here,
                "operator (eq, ne, lt, lte, gt, gte, in, is_null)",
            )?;
            let here = format!("{here}.{op}");
            if op == "is_null" {
                let is_null = arg
                    .as_bool()
                    .ok_or_else(|| Invalid::new(&here, "must be true or false"))?;
                return Ok(Expr::IsNull { column, is_null });
            }
            if kind == ColumnType::Json {
                return Err(Invalid::new(&here, "json columns support is_null only"));
            }
            if op == "in" {
                let list = arg
                    .as_array()
                    .filter(|l| !l.is_empty())
                    .ok_or_else(|| Invalid::new(&here, "must be a non-empty list"))?;
                if list.len() > limits.max_in {
                    return Err(Invalid::new(
                        &here,
                        format!("holds at most {} values", limits.max_in),
                    ));
                }
                let values = list
                    .iter()
                    .enumerate()
                    .map(|(i, x)| value_of(kind, x, &format!("{here}[{i}]")))
                    .collect::<Result<Vec<_>, _>>()?;
                return Ok(Expr::In { column, values });
            }
            let op = Cmp::parse(op).ok_or_else(|| {
                Invalid::new(
                    &here,
                    "unknown operator (eq, ne, lt, lte, gt, gte, in, is_null)",
                )
            })?;
            Ok(Expr::Cmp {
                column,
                op,
                value: value_of(kind, arg, &here)?,
            })
        }
    }
}

/// A filter value, which must fit its column's type.
fn value_of(kind: ColumnType, v: &Value, at: &str) -> Result<Scalar, Invalid> {
    let bad = || Invalid::new(at, format!("must be a {} value", kind.as_str()));
    Ok(match kind {
        ColumnType::String => Scalar::Str(v.as_str().ok_or_else(bad)?.to_owned()),
        ColumnType::Int64 => Scalar::Int(v.as_i64().ok_or_else(bad)?),
        ColumnType::Float64 => Scalar::Float(v.as_f64().ok_or_else(bad)?),
        ColumnType::Bool => Scalar::Bool(v.as_bool().ok_or_else(bad)?),
        ColumnType::Timestamp => {
            let s = v.as_str().ok_or_else(bad)?;
            Scalar::Ts(
                DateTime::parse_from_rfc3339(s)
                    .map_err(|_| Invalid::new(at, "must be an RFC 3339 timestamp"))?
                    .with_timezone(&Utc),
            )
        }
        ColumnType::Json => return Err(bad()),
    })
}

/// Why [`answer`] did not answer: the store refused (no such dataset or
/// version, a bad plan), or reading failed.
#[derive(Debug)]
pub enum Failed {
    Refused(StoreError),
    Read(QueryError),
}

impl From<StoreError> for Failed {
    fn from(e: StoreError) -> Self {
        Failed::Refused(e)
    }
}

/// Answers a query of the dataset `name` of `org`: a stream dataset is read
/// from its table in the data database, any other from the parts of the
/// version asked for (by default the current one).
pub async fn answer(
    ctx: crate::services::Ctx<'_>,
    data: Option<&sqlx::PgPool>,
    org: uuid::Uuid,
    name: String,
    req: &QueryRequest,
) -> Result<dispatcher_wire::QueryResponse, Failed> {
    let (id, mode, columns, current) = ctx.store.dataset_for_query(org, &name).await?;
    let plan = plan(req, &columns, &ctx.settings.query_limits()).map_err(StoreError::Invalid)?;
    let limits = ctx.settings.read_limits();
    let (version, answer) = if mode == dispatcher_wire::DatasetMode::Stream {
        let data =
            data.ok_or_else(|| StoreError::Retry("this dispatcher has no data database".into()))?;
        let table = crate::services::sink::Sink::table_name(id);
        (None, read_stream(data, &table, &plan, &limits).await)
    } else {
        let version = req.version.or(current).ok_or_else(|| {
            StoreError::NotFound(format!("dataset {name:?} has no committed version yet"))
        })?;
        let manifest = ctx.store.manifest(org, &name, version).await?;
        (
            Some(version),
            read_version(ctx.objects, &manifest.parts, &plan, &limits).await,
        )
    };
    let answer = answer.map_err(Failed::Read)?;
    Ok(dispatcher_wire::QueryResponse {
        dataset: name,
        version,
        columns: plan.column_names(),
        rows: answer.rows,
        truncated: answer.truncated,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema() -> Vec<Column> {
        serde_json::from_value(json!([
            {"name": "s", "type": "string"}, {"name": "i", "type": "int64"},
            {"name": "f", "type": "float64"}, {"name": "j", "type": "json"}]))
        .unwrap()
    }

    const LIMITS: QueryLimits = QueryLimits {
        default_rows: 100,
        max_rows: 1000,
        max_in: 3,
    };

    fn req(w: Value) -> QueryRequest {
        serde_json::from_value(json!({"dataset": "d", "where": w})).unwrap()
    }

    #[test]
    fn bad_filters_name_the_place() {
        let cases = [
            (
                json!({"s\"; DROP TABLE x; --": {"eq": "a"}}),
                "where.s\"; DROP TABLE x; --",
            ),
            (json!({"s": {"like": "a"}}), "where.s.like"),
            (json!({"i": {"eq": "1"}}), "where.i.eq"),
            (json!({"i": {"in": [1, 2, 3, 4]}}), "where.i.in"),
            (json!({"j": {"eq": 1}}), "where.j.eq"),
            (
                json!({"and": [{"s": {"eq": "a"}}, {"x": {"eq": 1}}]}),
                "where.and[1].x",
            ),
            (json!({"s": {"eq": "a", "ne": "b"}}), "where.s"),
            (json!({"or": []}), "where.or"),
        ];
        for (w, field) in cases {
            let e = plan(&req(w.clone()), &schema(), &LIMITS).unwrap_err();
            assert_eq!(e.field, field, "{w}: {}", e.message);
        }
        let mut deep = json!({"s": {"eq": "a"}});
        for _ in 0..MAX_DEPTH - 1 {
            deep = json!({"not": deep});
        }
        assert!(plan(&req(deep.clone()), &schema(), &LIMITS).is_ok());
        let e = plan(&req(json!({"not": deep})), &schema(), &LIMITS).unwrap_err();
        assert!(e.message.contains("deeper"), "{}", e.message);
    }

    #[test]
    fn columns_named_like_combinators_are_columns_when_the_value_is_a_leaf() {
        let cols: Vec<Column> = serde_json::from_value(json!([
            {"name": "and", "type": "int64"}, {"name": "not", "type": "bool"}]))
        .unwrap();
        let p = plan(&req(json!({"and": {"eq": 1}})), &cols, &LIMITS).unwrap();
        assert!(matches!(p.filter, Some(Expr::Cmp { column: 0, .. })));
        let p = plan(&req(json!({"not": {"eq": true}})), &cols, &LIMITS).unwrap();
        assert!(matches!(p.filter, Some(Expr::Cmp { column: 1, .. })));
        let p = plan(&req(json!({"not": {"and": {"gt": 0}}})), &cols, &LIMITS).unwrap();
        assert!(matches!(p.filter, Some(Expr::Not(_))));
        let p = plan(&req(json!({"and": [{"and": {"gt": 0}}]})), &cols, &LIMITS).unwrap();
        assert!(matches!(p.filter, Some(Expr::And(_))));
    }

    #[test]
    fn three_valued_logic_matches_sql() {
        let p = plan(
            &req(json!({"not": {"or": [{"i": {"gt": 1}}, {"s": {"eq": "a"}}]}})),
            &schema(),
            &LIMITS,
        )
        .unwrap();
        let row = |s: Option<&str>, i: Option<i64>| {
            vec![
                s.map(|s| Scalar::Str(s.into())),
                i.map(Scalar::Int),
                None,
                None,
            ]
        };
        assert!(!p.keeps(&row(None, None)), "not(unknown) is unknown");
        assert!(p.keeps(&row(Some("b"), Some(0))));
        assert!(
            !p.keeps(&row(None, Some(0))),
            "not(false or unknown) is unknown"
        );
        assert!(
            !p.keeps(&row(None, Some(5))),
            "not(true or unknown) is false"
        );
    }
}

/// Why a query could not be answered (besides a bad request).
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// The version's parts together are larger than one query may read.
    #[error("{0}")]
    TooLarge(String),
    #[error("the query ran longer than {0:?}")]
    Timeout(std::time::Duration),
    #[error("object store: {0}")]
    Objects(crate::objects::ObjectError),
    #[error("data database: {0}")]
    Data(sqlx::Error),
    /// A committed part's bytes are not the ones its version recorded
    /// (size or sha256): the store was changed behind the dispatcher.
    #[error("part {key}: {why}")]
    Integrity { key: String, why: String },
    /// A committed part no longer parses: the store was tampered with.
    #[error("part {key}: {error}")]
    Corrupt {
        key: String,
        error: crate::rows::RowError,
    },
}

/// The rows of an answer (selected columns, in order) and whether more
/// matched than were returned.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub rows: Vec<Vec<Value>>,
    pub truncated: bool,
}

fn finish(plan: &Plan, rows: Vec<Vec<Option<Scalar>>>, more: bool, max_bytes: usize) -> Answer {
    let mut out = Vec::with_capacity(rows.len());
    let mut bytes = 0usize;
    let mut truncated = more;
    for row in rows {
        let projected: Vec<Value> = plan
            .select
            .iter()
            .map(|&c| row[c].as_ref().map(Scalar::to_json).unwrap_or(Value::Null))
            .collect();
        bytes += serde_json::to_vec(&projected).map(|v| v.len()).unwrap_or(0);
        if bytes > max_bytes {
            truncated = true;
            break;
        }
        out.push(projected);
    }
    Answer {
        rows: out,
        truncated,
    }
}

/// Evaluates `plan` over a committed version's parts.
pub async fn read_version(
    objects: &dyn crate::objects::ObjectStore,
    parts: &[dispatcher_wire::PartView],
    plan: &Plan,
    limits: &ReadLimits,
) -> Result<Answer, QueryError> {
    let total: u64 = parts.iter().map(|p| p.bytes).sum();
    if total > limits.max_scan_bytes {
        return Err(QueryError::TooLarge(format!(
            "the version's parts hold {total} bytes; a query reads at most {} (select a smaller version or split the dataset)",
            limits.max_scan_bytes
        )));
    }
    let work = async {
        let kinds: Vec<ColumnType> = plan.columns.iter().map(|c| c.kind).collect();
        let mut kept: Vec<Vec<Option<Scalar>>> = Vec::new();
        // Without an order, the first `limit + 1` matches decide.
        let enough = plan.limit + 1;
        let started = std::time::Instant::now();
        for part in parts {
            if plan.order_by.is_empty() && kept.len() >= enough {
                break;
            }
            // Between parts too: a store that answers at once never lets
            // the timer below fire.
            if started.elapsed() >= limits.timeout {
                return Err(QueryError::Timeout(limits.timeout));
            }
            let body = objects.get(&part.key).await.map_err(QueryError::Objects)?;
            // Never rows of other bytes than the version recorded.
            if body.len() as u64 != part.bytes {
                return Err(QueryError::Integrity {
                    key: part.key.clone(),
                    why: format!("{} bytes, not the {} committed", body.len(), part.bytes),
                });
            }
            let sum = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&body));
            if !sum.eq_ignore_ascii_case(&part.sha256) {
                return Err(QueryError::Integrity {
                    key: part.key.clone(),
                    why: format!("sha256 {sum}, not the {} committed", part.sha256),
                });
            }
            crate::rows::parse_rows(&body, &plan.columns, limits.max_row_bytes, |values| {
                if plan.order_by.is_empty() && kept.len() >= enough {
                    return;
                }
                let row: Vec<Option<Scalar>> = kinds
                    .iter()
                    .zip(&values)
                    .map(|(k, v)| Scalar::from_row(*k, v))
                    .collect();
                if plan.keeps(&row) {
                    kept.push(row);
                    // With an order, only the best `limit + 1` can be
                    // answered: memory stays at twice that (review M4).
                    if kept.len() >= 2 * enough {
                        kept.sort_by(|a, b| plan.compare(a, b));
                        kept.truncate(enough);
                    }
                }
            })
            .map_err(|error| QueryError::Corrupt {
                key: part.key.clone(),
                error,
            })?;
        }
        kept.sort_by(|a, b| plan.compare(a, b));
        let more = kept.len() > plan.limit;
        kept.truncate(plan.limit);
        Ok(finish(plan, kept, more, limits.max_answer_bytes))
    };
    tokio::time::timeout(limits.timeout, work)
        .await
        .map_err(|_| QueryError::Timeout(limits.timeout))?
}

/// A bind parameter of the compiled SQL.
enum Bind {
    One(Scalar),
    Many(ColumnType, Vec<Scalar>),
}

/// The column as SQL: its quoted name, with the byte-order collation for
/// strings (code point order, as the contract says).
fn col_sql(c: &Column) -> String {
    let name = crate::datadb::quote_ident(&c.name);
    if c.kind == ColumnType::String {
        format!("{name} COLLATE \"C\"")
    } else {
        name
    }
}

fn expr_sql(e: &Expr, columns: &[Column], binds: &mut Vec<Bind>) -> String {
    match e {
        Expr::And(xs) | Expr::Or(xs) => {
            let op = if matches!(e, Expr::And(_)) {
                " AND "
            } else {
                " OR "
            };
            let parts: Vec<String> = xs.iter().map(|x| expr_sql(x, columns, binds)).collect();
            format!("({})", parts.join(op))
        }
        Expr::Not(x) => format!("(NOT {})", expr_sql(x, columns, binds)),
        Expr::Cmp { column, op, value } => {
            binds.push(Bind::One(value.clone()));
            format!(
                "({} {} ${})",
                col_sql(&columns[*column]),
                op.sql(),
                binds.len()
            )
        }
        Expr::In { column, values } => {
            binds.push(Bind::Many(columns[*column].kind, values.clone()));
            format!("({} = ANY(${}))", col_sql(&columns[*column]), binds.len())
        }
        Expr::IsNull { column, is_null } => format!(
            "({} IS {}NULL)",
            crate::datadb::quote_ident(&columns[*column].name),
            if *is_null { "" } else { "NOT " }
        ),
    }
}

fn add_bind(args: &mut sqlx::postgres::PgArguments, b: Bind) -> Result<(), sqlx::Error> {
    use sqlx::Arguments;
    let r = match b {
        Bind::One(Scalar::Str(s)) => args.add(s),
        Bind::One(Scalar::Int(i)) => args.add(i),
        Bind::One(Scalar::Float(f)) => args.add(f),
        Bind::One(Scalar::Bool(b)) => args.add(b),
        Bind::One(Scalar::Ts(t)) => args.add(t),
        Bind::One(Scalar::Json(v)) => args.add(v),
        Bind::Many(kind, xs) => {
            macro_rules! many {
                ($variant:ident) => {
                    args.add(
                        xs.into_iter()
                            .filter_map(|x| match x {
                                Scalar::$variant(v) => Some(v),
                                _ => None,
                            })
                            .collect::<Vec<_>>(),
                    )
                };
            }
            match kind {
                ColumnType::String => many!(Str),
                ColumnType::Int64 => many!(Int),
                ColumnType::Float64 => many!(Float),
                ColumnType::Bool => many!(Bool),
                ColumnType::Timestamp => many!(Ts),
                ColumnType::Json => Ok(()),
            }
        }
    };
    r.map_err(sqlx::Error::Encode)
}

/// The statement a stream query runs and its number of bind parameters
/// (for tests and the fuzz target: user input reaches the text only as
/// `$n` placeholders and schema identifiers).
pub fn stream_sql(plan: &Plan, table: &str) -> (String, usize) {
    let (sql, binds) = build_sql(plan, table);
    (sql, binds.len())
}

fn build_sql(plan: &Plan, table: &str) -> (String, Vec<Bind>) {
    let columns = &plan.columns;
    let mut binds = Vec::new();
    let select: Vec<String> = plan
        .select
        .iter()
        .map(|&c| crate::datadb::quote_ident(&columns[c].name))
        .collect();
    let mut sql = format!(
        "SELECT {} FROM {}",
        select.join(", "),
        crate::datadb::quote_ident(table)
    );
    if let Some(f) = &plan.filter {
        sql.push_str(" WHERE ");
        sql.push_str(&expr_sql(f, columns, &mut binds));
    }
    if !plan.order_by.is_empty() {
        let keys: Vec<String> = plan
            .order_by
            .iter()
            .map(|&(c, desc)| {
                format!(
                    "{} {}",
                    col_sql(&columns[c]),
                    if desc {
                        "DESC NULLS FIRST"
                    } else {
                        "ASC NULLS LAST"
                    }
                )
            })
            .collect();
        sql.push_str(" ORDER BY ");
        sql.push_str(&keys.join(", "));
    }
    sql.push_str(&format!(" LIMIT {}", plan.limit + 1));
    (sql, binds)
}

/// Runs `plan` as one parameterised, read-only statement over a stream
/// dataset's table in the data database, under a statement timeout.
pub async fn read_stream(
    data: &sqlx::PgPool,
    table: &str,
    plan: &Plan,
    limits: &ReadLimits,
) -> Result<Answer, QueryError> {
    use sqlx::Row;
    let columns = &plan.columns;
    let (sql, binds) = build_sql(plan, table);
    let mut args = sqlx::postgres::PgArguments::default();
    for b in binds {
        add_bind(&mut args, b).map_err(QueryError::Data)?;
    }
    let mut tx = data.begin().await.map_err(QueryError::Data)?;
    sqlx::query("SET TRANSACTION READ ONLY")
        .execute(&mut *tx)
        .await
        .map_err(QueryError::Data)?;
    // An integer of ours, not a bind (SET takes none).
    sqlx::query(&format!(
        "SET LOCAL statement_timeout = {}",
        limits.timeout.as_millis().max(1)
    ))
    .execute(&mut *tx)
    .await
    .map_err(QueryError::Data)?;
    let exists: bool = sqlx::query_scalar!(
        r#"SELECT to_regclass($1) IS NOT NULL AS "exists!""#,
        crate::datadb::quote_ident(table),
    )
    .fetch_one(&mut *tx)
    .await
    .map_err(QueryError::Data)?;
    if !exists {
        // Nothing ingested yet.
        return Ok(Answer {
            rows: Vec::new(),
            truncated: false,
        });
    }
    let fetched = sqlx::query_with(&sql, args)
        .fetch_all(&mut *tx)
        .await
        .map_err(|e| match &e {
            sqlx::Error::Database(d) if d.code().as_deref() == Some("57014") => {
                QueryError::Timeout(limits.timeout)
            }
            _ => QueryError::Data(e),
        })?;
    tx.rollback().await.map_err(QueryError::Data)?;
    let mut rows = Vec::with_capacity(fetched.len());
    for r in &fetched {
        let mut row: Vec<Option<Scalar>> = vec![None; columns.len()];
        for (i, &c) in plan.select.iter().enumerate() {
            let get = |e: sqlx::Error| QueryError::Data(e);
            row[c] = match columns[c].kind {
                ColumnType::String => r
                    .try_get::<Option<String>, _>(i)
                    .map_err(get)?
                    .map(Scalar::Str),
                ColumnType::Int64 => r
                    .try_get::<Option<i64>, _>(i)
                    .map_err(get)?
                    .map(Scalar::Int),
                ColumnType::Float64 => r
                    .try_get::<Option<f64>, _>(i)
                    .map_err(get)?
                    .map(Scalar::Float),
                ColumnType::Bool => r
                    .try_get::<Option<bool>, _>(i)
                    .map_err(get)?
                    .map(Scalar::Bool),
                ColumnType::Timestamp => r
                    .try_get::<Option<DateTime<Utc>>, _>(i)
                    .map_err(get)?
                    .map(Scalar::Ts),
                ColumnType::Json => r
                    .try_get::<Option<Value>, _>(i)
                    .map_err(get)?
                    .map(Scalar::Json),
            };
        }
        rows.push(row);
    }
    let more = rows.len() > plan.limit;
    rows.truncate(plan.limit);
    Ok(finish(plan, rows, more, limits.max_answer_bytes))
}
