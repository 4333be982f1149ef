//! `POST /v1/query` (contract: "Query"; ADR 0007): structured filters over
//! a committed version's parts and over a stream's ingested rows give the
//! rows a straightforward evaluator written here gives; bad filters are
//! `400` naming the place; a task reads only its `reads`.

use std::cmp::Ordering;
use std::sync::Arc;

use dispatcher_tests::{unthrottled, TestApp};
use proptest::prelude::*;
use proptest::test_runner::TestRunner;
use reqwest::StatusCode;
use serde_json::{json, Value};
use sha2::Digest;
use uuid::Uuid;

// ------------------------------------------------------------ the model ---

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Str,
    Int,
    Float,
    Bool,
    Ts,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Str => "string",
            Kind::Int => "int64",
            Kind::Float => "float64",
            Kind::Bool => "bool",
            Kind::Ts => "timestamp",
        }
    }

    /// Small domains, so that equality and ties happen often. Strings
    /// order by code point: "B" < "a" < "é".
    fn domain(self) -> Vec<Value> {
        match self {
            Kind::Str => vec![json!(""), json!("B"), json!("a"), json!("ab"), json!("é")],
            Kind::Int => (-2..=2).map(|i| json!(i)).collect(),
            Kind::Float => vec![json!(-1.5), json!(0.0), json!(0.5), json!(2.0)],
            Kind::Bool => vec![json!(false), json!(true)],
            Kind::Ts => vec![
                json!("2026-01-01T00:00:00Z"),
                json!("2026-01-01T00:00:01Z"),
                json!("2026-06-30T12:00:00.500Z"),
            ],
        }
    }
}

#[derive(Debug, Clone)]
struct Col {
    kind: Kind,
    nullable: bool,
}

/// Compares two non-null values of one kind as the contract says.
fn cmp(kind: Kind, a: &Value, b: &Value) -> Ordering {
    match kind {
        Kind::Str | Kind::Ts => a.as_str().unwrap().cmp(b.as_str().unwrap()),
        Kind::Int => a.as_i64().cmp(&b.as_i64()),
        Kind::Float => a.as_f64().unwrap().total_cmp(&b.as_f64().unwrap()),
        Kind::Bool => a.as_bool().cmp(&b.as_bool()),
    }
}

#[derive(Debug, Clone)]
enum W {
    And(Vec<W>),
    Or(Vec<W>),
    Not(Box<W>),
    Leaf(usize, &'static str, Value),
}

impl W {
    fn to_json(&self) -> Value {
        match self {
            W::And(xs) => json!({"and": xs.iter().map(W::to_json).collect::<Vec<_>>()}),
            W::Or(xs) => json!({"or": xs.iter().map(W::to_json).collect::<Vec<_>>()}),
            W::Not(x) => json!({"not": x.to_json()}),
            W::Leaf(c, op, v) => json!({ format!("c{c}"): { *op: v } }),
        }
    }

    /// SQL's three-valued logic, written out.
    fn eval(&self, cols: &[Col], row: &[Value]) -> Option<bool> {
        match self {
            W::And(xs) => {
                let vs: Vec<Option<bool>> = xs.iter().map(|x| x.eval(cols, row)).collect();
                if vs.contains(&Some(false)) {
                    Some(false)
                } else if vs.contains(&None) {
                    None
                } else {
                    Some(true)
                }
            }
            W::Or(xs) => {
                let vs: Vec<Option<bool>> = xs.iter().map(|x| x.eval(cols, row)).collect();
                if vs.contains(&Some(true)) {
                    Some(true)
                } else if vs.contains(&None) {
                    None
                } else {
                    Some(false)
                }
            }
            W::Not(x) => x.eval(cols, row).map(|b| !b),
            W::Leaf(c, "is_null", v) => Some(row[*c].is_null() == v.as_bool().unwrap()),
            W::Leaf(c, op, v) => {
                if row[*c].is_null() {
                    return None;
                }
                let k = cols[*c].kind;
                if *op == "in" {
                    return Some(
                        v.as_array()
                            .unwrap()
                            .iter()
                            .any(|x| cmp(k, &row[*c], x).is_eq()),
                    );
                }
                let o = cmp(k, &row[*c], v);
                Some(match *op {
                    "eq" => o.is_eq(),
                    "ne" => o.is_ne(),
                    "lt" => o.is_lt(),
                    "lte" => o.is_le(),
                    "gt" => o.is_gt(),
                    "gte" => o.is_ge(),
                    _ => unreachable!(),
                })
            }
        }
    }
}

fn schema() -> impl Strategy<Value = Vec<Col>> {
    let kind = prop_oneof![
        Just(Kind::Str),
        Just(Kind::Int),
        Just(Kind::Float),
        Just(Kind::Bool),
        Just(Kind::Ts)
    ];
    proptest::collection::vec(
        (kind, any::<bool>()).prop_map(|(kind, nullable)| Col { kind, nullable }),
        1..4,
    )
}

fn value(col: &Col) -> BoxedStrategy<Value> {
    let d = col.kind.domain();
    let pick = proptest::sample::select(d);
    if col.nullable {
        prop_oneof![1 => Just(Value::Null), 3 => pick].boxed()
    } else {
        pick.boxed()
    }
}

fn leaf(cols: Vec<Col>) -> BoxedStrategy<W> {
    (0..cols.len())
        .prop_flat_map(move |c| {
            let d = cols[c].kind.domain();
            let one = proptest::sample::select(d.clone());
            prop_oneof![
                (
                    proptest::sample::select(vec!["eq", "ne", "lt", "lte", "gt", "gte"]),
                    one
                )
                    .prop_map(move |(op, v)| W::Leaf(c, op, v)),
                proptest::sample::subsequence(d.clone(), 1..=d.len()).prop_map(move |vs| W::Leaf(
                    c,
                    "in",
                    Value::Array(vs)
                )),
                any::<bool>().prop_map(move |b| W::Leaf(c, "is_null", json!(b))),
            ]
        })
        .boxed()
}

fn filter(cols: Vec<Col>) -> BoxedStrategy<W> {
    leaf(cols)
        .prop_recursive(3, 12, 3, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 1..3).prop_map(W::And),
                proptest::collection::vec(inner.clone(), 1..3).prop_map(W::Or),
                inner.prop_map(|x| W::Not(Box::new(x))),
            ]
        })
        .boxed()
}

#[derive(Debug, Clone)]
struct Case {
    cols: Vec<Col>,
    rows: Vec<Vec<Value>>,
    filter: Option<W>,
    order: Option<(usize, bool)>,
    limit: usize,
}

fn case() -> impl Strategy<Value = Case> {
    schema().prop_flat_map(|cols| {
        let row: Vec<BoxedStrategy<Value>> = cols.iter().map(value).collect();
        let n = cols.len();
        (
            Just(cols.clone()),
            proptest::collection::vec(row, 0..25),
            proptest::option::of(filter(cols)),
            proptest::option::of((0..n, any::<bool>())),
            prop_oneof![Just(1000usize), 1..6usize],
        )
            .prop_map(|(cols, rows, filter, order, limit)| Case {
                cols,
                rows,
                filter,
                order,
                limit,
            })
    })
}

// ------------------------------------------------------------ plumbing ---

fn jsonl(case: &Case) -> String {
    case.rows
        .iter()
        .map(|r| {
            let obj: serde_json::Map<String, Value> = r
                .iter()
                .enumerate()
                .filter(|(_, v)| !v.is_null() || rand::random::<bool>())
                .map(|(i, v)| (format!("c{i}"), v.clone()))
                .collect();
            Value::Object(obj).to_string() + "\n"
        })
        .collect()
}

fn sha(body: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(body))
}

/// Loads the case's rows as version 1 of `v<n>` and as the stream `s<n>`.
async fn load(app: &TestApp, sink: &Arc<dispatcher::services::sink::Sink>, n: usize, case: &Case) {
    let columns: Vec<Value> = case
        .cols
        .iter()
        .enumerate()
        .map(|(i, c)| json!({"name": format!("c{i}"), "type": c.kind.name(), "nullable": c.nullable}))
        .collect();
    for (name, mode) in [(format!("v{n}"), "replace"), (format!("s{n}"), "stream")] {
        app.create_dataset(&name, mode, json!(columns)).await;
    }
    let job = app
        .submit(&json!({"name": "load", "tasks": [{"key": "w", "runtime": "exec", "bundle": "x",
                                                    "outputs": [format!("v{n}"), format!("s{n}")]}]}))
        .await;
    let claim = app.claim(job.tasks[0].task_id).await;
    let token = &claim.capability_token;
    let body = jsonl(case);
    let key = format!("{}part.jsonl", claim.object_prefix);
    app.objects
        .put(&key, body.clone().into_bytes())
        .await
        .unwrap();
    let part = json!({"key": key, "rows": case.rows.len(), "bytes": body.len(), "sha256": sha(body.as_bytes())});
    let r = app
        .post(
            "/v1/task/dataset-stage",
            token,
            &json!({"dataset": format!("v{n}"), "parts": [part]}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let r = app
        .post(
            "/v1/task/buffer-publish",
            token,
            &json!({"batch_id": Uuid::new_v4(), "dataset": format!("s{n}"), "object_key": key,
                    "rows": case.rows.len(), "sha256": sha(body.as_bytes())}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let r = app.complete_ok(token, json!({})).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let (queue, _) = dispatcher::profile::local_queue(&app.store, &app.settings);
    dispatcher::roles::relay::Relay::new(app.store.clone(), queue, app.settings.clone())
        .relay_once()
        .await
        .unwrap();
    while sink.poll(std::time::Duration::ZERO).await.unwrap() > 0 {}
}

fn check(case: &Case, answer: &Value, what: &str) -> Result<(), TestCaseError> {
    let mut expected: Vec<Vec<Value>> = case
        .rows
        .iter()
        .filter(|r| {
            case.filter
                .as_ref()
                .is_none_or(|f| f.eval(&case.cols, r) == Some(true))
        })
        .cloned()
        .collect();
    let got: Vec<Vec<Value>> = serde_json::from_value(answer["rows"].clone()).unwrap();
    let order = |a: &Vec<Value>, b: &Vec<Value>| -> Ordering {
        let Some((c, desc)) = case.order else {
            return Ordering::Equal;
        };
        let o = match (a[c].is_null(), b[c].is_null()) {
            (true, true) => Ordering::Equal,
            (true, false) => Ordering::Greater,
            (false, true) => Ordering::Less,
            _ => cmp(case.cols[c].kind, &a[c], &b[c]),
        };
        if desc {
            o.reverse()
        } else {
            o
        }
    };
    prop_assert_eq!(
        answer["truncated"].as_bool().unwrap(),
        expected.len() > case.limit,
        "{}: truncated",
        what
    );
    prop_assert_eq!(
        got.len(),
        expected.len().min(case.limit),
        "{}: {}",
        what,
        answer
    );
    // The answer is in order, and its rows are rows the filter keeps: when
    // truncated, exactly a prefix of the ordered matches (up to ties).
    for w in got.windows(2) {
        prop_assert!(
            order(&w[0], &w[1]) != Ordering::Greater,
            "{}: out of order",
            what
        );
    }
    let key = |r: &Vec<Value>| r.iter().map(Value::to_string).collect::<Vec<_>>().join("|");
    if case.order.is_some() || got.len() == expected.len() {
        expected.sort_by(order);
        let boundary = got.last().cloned();
        let mut want: Vec<String> = expected.iter().take(got.len()).map(key).collect();
        let mut have: Vec<String> = got.iter().map(key).collect();
        if got.len() < expected.len() {
            // Ties at the cut may be any of the tied rows.
            let b = boundary.unwrap();
            want.retain(|k| {
                let r = expected.iter().find(|r| key(r) == *k).unwrap();
                order(r, &b) != Ordering::Equal
            });
            have.retain(|k| {
                let r = got.iter().find(|r| key(r) == *k).unwrap();
                order(r, &b) != Ordering::Equal
            });
        }
        want.sort();
        have.sort();
        prop_assert_eq!(have, want, "{}: rows", what);
    } else {
        let all: Vec<String> = expected.iter().map(key).collect();
        for r in &got {
            prop_assert!(all.contains(&key(r)), "{}: a row the filter drops", what);
        }
    }
    Ok(())
}

#[test]
fn query_random_filters_over_versions_and_streams_match_an_in_memory_evaluator() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let app = rt.block_on(TestApp::spawn_with(unthrottled()));
    let sink = rt.block_on(app.sink());
    let mut runner = TestRunner::new(dispatcher_tests::proptest_config());
    let counter = std::sync::atomic::AtomicUsize::new(0);
    let result = runner.run(&case(), |case| {
        let n = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        rt.block_on(async {
            load(&app, &sink, n, &case).await;
            for name in [format!("v{n}"), format!("s{n}")] {
                let mut q = json!({"dataset": name, "limit": case.limit});
                if let Some(f) = &case.filter {
                    q["where"] = f.to_json();
                }
                if let Some((c, desc)) = case.order {
                    q["order_by"] = json!([{"column": format!("c{c}"), "desc": desc}]);
                }
                let r = app.post("/v1/query", &app.user_token, &q).await;
                prop_assert_eq!(r.status, StatusCode::OK, "{}: {}", name, r.body);
                let cols: Vec<String> = (0..case.cols.len()).map(|i| format!("c{i}")).collect();
                prop_assert_eq!(&r.body["columns"], &json!(cols));
                check(&case, &r.body, &name)?;
            }
            Ok(())
        })
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

// ------------------------------------------------- abuse and scope tests ---

async fn small_version(app: &TestApp) {
    app.create_dataset(
        "clicks",
        "append",
        json!([{"name": "user_id", "type": "string", "nullable": false},
               {"name": "value", "type": "float64"},
               {"name": "meta", "type": "json"}]),
    )
    .await;
    let job = app
        .submit(&json!({"name": "w", "tasks": [{"key": "w", "runtime": "exec", "bundle": "x", "outputs": ["clicks"]}]}))
        .await;
    let claim = app.claim(job.tasks[0].task_id).await;
    let body = "{\"user_id\": \"a\", \"value\": 2.0}\n{\"user_id\": \"b\", \"value\": 1.0, \"meta\": {\"k\": 1}}\n";
    let key = format!("{}p.jsonl", claim.object_prefix);
    app.objects
        .put(&key, body.as_bytes().to_vec())
        .await
        .unwrap();
    let r = app
        .post(
            "/v1/task/dataset-stage",
            &claim.capability_token,
            &json!({"dataset": "clicks", "parts": [{"key": key, "rows": 2, "bytes": body.len(), "sha256": sha(body.as_bytes())}]}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    app.complete_ok(&claim.capability_token, json!({})).await;
}

#[tokio::test]
async fn injection_and_abuse_are_400_naming_the_place_and_execute_nothing() {
    let app = TestApp::spawn_with(unthrottled()).await;
    small_version(&app).await;
    let mut deep = json!({"user_id": {"eq": "a"}});
    for _ in 0..8 {
        deep = json!({"not": deep});
    }
    let too_many: Vec<String> = (0..1001).map(|i| format!("u{i}")).collect();
    let cases = [
        (
            json!({"where": {"user_id\" OR 1=1 --": {"eq": "a"}}}),
            "where.user_id\" OR 1=1 --",
        ),
        (
            json!({"where": {"user_id; DROP TABLE datasets": {"eq": "a"}}}),
            "where.user_id; DROP TABLE datasets",
        ),
        (json!({"where": {"SELECT": {"eq": "a"}}}), "where.SELECT"),
        (json!({"where": {"user_id": {"eq": "a' OR '1'='1"}}}), ""),
        (
            json!({"where": {"user_id": {"like": "%"}}}),
            "where.user_id.like",
        ),
        (
            json!({"where": {"value": {"gte": "1.5"}}}),
            "where.value.gte",
        ),
        (
            json!({"where": {"meta": {"eq": {"k": 1}}}}),
            "where.meta.eq",
        ),
        (
            json!({"where": {"user_id": {"in": too_many}}}),
            "where.user_id.in",
        ),
        (
            json!({"where": {"user_id": {"in": []}}}),
            "where.user_id.in",
        ),
        (
            json!({"where": deep}),
            "where.not.not.not.not.not.not.not.not",
        ),
        (json!({"where": "user_id = 'a'"}), "where"),
        (json!({"select": ["user_id", "password"]}), "select[1]"),
        (
            json!({"order_by": [{"column": "value; --"}]}),
            "order_by[0].column",
        ),
        (json!({"limit": 0}), "limit"),
        (json!({"limit": 10_001}), "limit"),
        (json!({"sql": "SELECT 1"}), "sql"),
    ];
    for (extra, field) in cases {
        let mut q = json!({"dataset": "clicks"});
        for (k, v) in extra.as_object().unwrap() {
            q[k] = v.clone();
        }
        let r = app.post("/v1/query", &app.user_token, &q).await;
        if field.is_empty() {
            // A quote inside a value is only a value: no row matches.
            assert_eq!(r.status, StatusCode::OK, "{q}: {}", r.body);
            assert_eq!(r.body["rows"], json!([]));
            continue;
        }
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{q}: {}", r.body);
        assert_eq!(r.code(), "invalid_request");
        assert!(
            r.body["error"]["message"]
                .as_str()
                .unwrap()
                .starts_with(field),
            "{q}: {} should name {field}",
            r.body
        );
    }
    // Still there, unharmed.
    let r = app
        .post(
            "/v1/query",
            &app.user_token,
            &json!({"dataset": "clicks", "order_by": [{"column": "value"}], "select": ["user_id", "meta"]}),
        )
        .await;
    assert_eq!(
        r.body,
        json!({"dataset": "clicks", "version": 1, "columns": ["user_id", "meta"],
               "rows": [["b", {"k": 1}], ["a", null]], "truncated": false})
    );
    // A version this dataset does not have (another dataset's or org's
    // number means nothing here) is 404, as is another org's dataset.
    let r = app
        .post(
            "/v1/query",
            &app.user_token,
            &json!({"dataset": "clicks", "version": 2}),
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.body);
    let other = app.store.ensure_org("globex").await.unwrap();
    let user = app.store.ensure_user("eve@globex.test").await.unwrap();
    app.store
        .set_membership(other, user, dispatcher::domain::Role::Admin)
        .await
        .unwrap();
    let eve = app
        .keys
        .mint_user(user, other, chrono::Utc::now() + chrono::Duration::hours(1));
    let r = app
        .post(
            "/v1/query",
            &eve,
            &json!({"dataset": "clicks", "version": 1}),
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.body);
}

#[tokio::test]
async fn invariant_9_a_task_queries_only_its_reads_and_only_while_its_attempt_is_live() {
    let app = TestApp::spawn_with(unthrottled()).await;
    small_version(&app).await;
    app.create_dataset(
        "secret",
        "replace",
        json!([{"name": "x", "type": "string"}]),
    )
    .await;
    let (task, claim) = app.claimed_reader(&["clicks"]).await;
    let token = &claim.capability_token;
    let r = app
        .post(
            "/v1/query",
            token,
            &json!({"dataset": "clicks", "where": {"user_id": {"eq": "a"}}}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["rows"], json!([["a", 2.0, null]]));
    let r = app
        .post("/v1/query", token, &json!({"dataset": "secret"}))
        .await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::FORBIDDEN, "forbidden"),
        "{}",
        r.body
    );
    // The attempt is superseded: its token reads nothing.
    app.supersede(task).await;
    let r = app
        .post("/v1/query", token, &json!({"dataset": "clicks"}))
        .await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::CONFLICT, "stale_attempt"),
        "{}",
        r.body
    );
    // A worker credential is no reader.
    let r = app
        .post(
            "/v1/query",
            &app.worker_token,
            &json!({"dataset": "clicks"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.body);
}

#[tokio::test]
async fn invariant_12_query_limits_answer_truncated_413_or_503() {
    use dispatcher::settings::Settings;
    let cases = [
        // Answer bytes: past the bound the answer is cut and says so.
        (
            Settings {
                query_max_answer_bytes: 20,
                ..unthrottled()
            },
            StatusCode::OK,
            "",
        ),
        // Parts past the scan bound: 413, nothing read.
        (
            Settings {
                query_max_scan_bytes: 10,
                ..unthrottled()
            },
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
        ),
        // No time at all: 503.
        (
            Settings {
                query_timeout: std::time::Duration::ZERO,
                ..unthrottled()
            },
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
        ),
    ];
    for (settings, status, code) in cases {
        let app = TestApp::spawn_with(settings).await;
        small_version(&app).await;
        let r = app
            .post("/v1/query", &app.user_token, &json!({"dataset": "clicks"}))
            .await;
        assert_eq!((r.status, r.code()), (status, code), "{}", r.body);
        if status == StatusCode::OK {
            assert_eq!(r.body["truncated"], true);
            assert!(r.body["rows"].as_array().unwrap().len() < 2, "{}", r.body);
        }
    }
}
