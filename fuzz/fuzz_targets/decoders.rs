//! Every request decoder and validator the API runs on untrusted bytes,
//! and the query `where` parser with its SQL compilation. The first byte
//! picks the decoder; the rest is the body. Nothing may panic; a `where`
//! that parses compiles to SQL holding none of the input's text.
#![no_main]

use dispatcher::settings::Settings;
use dispatcher_wire as wire;
use libfuzzer_sys::fuzz_target;

fn schema() -> Vec<wire::Column> {
    serde_json::from_str(
        r#"[{"name": "s", "type": "string"}, {"name": "i", "type": "int64", "nullable": false},
            {"name": "f", "type": "float64"}, {"name": "b", "type": "bool"},
            {"name": "t", "type": "timestamp"}, {"name": "j", "type": "json"}]"#,
    )
    .expect("schema")
}

fn query(body: &[u8]) {
    let Ok(req) = serde_json::from_slice::<wire::QueryRequest>(body) else {
        return;
    };
    let settings = Settings::default();
    let Ok(plan) = dispatcher::services::query::plan(&req, &schema(), &settings.query_limits()) else {
        return;
    };
    let (sql, _binds) = dispatcher::services::query::stream_sql(&plan, "stream_x");
    assert!(
        !sql.contains(';') && !sql.contains('\'') && !sql.contains("--"),
        "input text reached the SQL: {sql}"
    );
    // Evaluating over a row of nulls and one of values must not panic.
    let nulls = vec![None; 6];
    let _ = plan.keeps(&nulls);
    let row: Vec<Option<dispatcher::services::query::Scalar>> = vec![
        Some(dispatcher::services::query::Scalar::Str("a".into())),
        Some(dispatcher::services::query::Scalar::Int(1)),
        Some(dispatcher::services::query::Scalar::Float(0.5)),
        Some(dispatcher::services::query::Scalar::Bool(true)),
        None,
        Some(dispatcher::services::query::Scalar::Json(serde_json::json!({"k": 1}))),
    ];
    let _ = plan.keeps(&row);
    let _ = plan.compare(&row, &nulls);
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    let settings = Settings::default();
    match which % 8 {
        0 => query(body),
        1 => {
            if let Ok(req) = serde_json::from_slice::<wire::SubmitJobRequest>(body) {
                let _ = dispatcher::domain::new_job(req, &settings);
            }
        }
        2 => {
            if let Ok(req) = serde_json::from_slice::<wire::CompleteRequest>(body) {
                let _ = dispatcher::domain::completion(req);
            }
        }
        3 => {
            if let Ok(req) = serde_json::from_slice::<wire::EventsRequest>(body) {
                let _ = dispatcher::domain::events(req, &settings);
            }
        }
        4 => {
            if let Ok(req) = serde_json::from_slice::<wire::BufferPublishRequest>(body) {
                let _ = dispatcher::domain::buffer_batch(req);
            }
        }
        5 => {
            if let Ok(req) = serde_json::from_slice::<wire::CreateDatasetRequest>(body) {
                let _ = dispatcher::domain::new_dataset(req);
            }
        }
        6 => {
            let _ = serde_json::from_slice::<wire::StageRequest>(body);
            let _ = serde_json::from_slice::<wire::ClaimRequest>(body);
            let _ = serde_json::from_slice::<wire::ObjectsRequest>(body);
        }
        _ => {
            // The strict row parser, as staging and the sink run it.
            let _ = dispatcher::rows::parse_rows(body, &schema(), 1024, |_| {});
        }
    }
});
