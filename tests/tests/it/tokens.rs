//! Invariant 9: a token authorizes one scope, and a valid signature is never
//! enough. Every forged or misused token is refused and changes nothing.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use chrono::Utc;
use dispatcher_tests::{decode_claims, TestApp};
use reqwest::StatusCode;
use serde_json::{json, Value};
use uuid::Uuid;

fn b64(v: &Value) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap())
}

/// Replaces the payload of a signed token, keeping header and signature.
fn tamper(token: &str, claims: &Value) -> String {
    let parts: Vec<&str> = token.split('.').collect();
    format!("{}.{}.{}", parts[0], b64(claims), parts[2])
}

struct Case {
    name: &'static str,
    path: &'static str,
    token: String,
    body: Value,
    /// Acceptable refusals.
    statuses: &'static [StatusCode],
}

const UNAUTH: &[StatusCode] = &[StatusCode::UNAUTHORIZED];
const UNAUTH_OR_FORBIDDEN: &[StatusCode] = &[StatusCode::UNAUTHORIZED, StatusCode::FORBIDDEN];

#[tokio::test]
async fn invariant_9_forged_and_misused_tokens_are_refused_and_change_nothing() {
    let app = TestApp::spawn().await;
    let task = app.single_task(3).await;
    let other_task = app.single_task(3).await;
    let claim = app.claim(task).await;
    let genuine = decode_claims(&claim.capability_token);
    let kid = app.keys.signing_kid().to_owned();
    let heartbeat = json!({});
    let claim_body = json!({"task_id": task, "worker_id": "w"});

    let with = |patch: Value| {
        let mut c = genuine.clone();
        for (k, v) in patch.as_object().unwrap() {
            c[k] = v.clone();
        }
        c
    };

    // alg: none, unsigned.
    let alg_none = format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "typ": "task+jwt", "kid": kid})),
        b64(&genuine)
    );
    // Algorithm confusion: HS256 keyed with the public key (raw and JWK form).
    let public = app.keys.signing_public_key();
    let hs256 = |secret: &[u8]| {
        let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
        h.typ = Some("task+jwt".into());
        h.kid = Some(kid.clone());
        jsonwebtoken::encode(
            &h,
            &genuine,
            &jsonwebtoken::EncodingKey::from_secret(secret),
        )
        .unwrap()
    };
    let x = URL_SAFE_NO_PAD.encode(public);
    // A key the dispatcher has never seen, using our kid.
    let (foreign_pem, _) = dispatcher::tokens::generate_key_pem();
    let foreign = {
        let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA);
        h.typ = Some("task+jwt".into());
        h.kid = Some(kid.clone());
        jsonwebtoken::encode(
            &h,
            &genuine,
            &jsonwebtoken::EncodingKey::from_ed_pem(foreign_pem.as_bytes()).unwrap(),
        )
        .unwrap()
    };
    let exp = Utc::now() + chrono::Duration::hours(1);
    let user_token = app.keys.mint_user(app.user_id, app.org_id, exp);

    let cases = vec![
        Case {
            name: "alg none",
            path: "/v1/task/heartbeat",
            token: alg_none,
            body: heartbeat.clone(),
            statuses: UNAUTH,
        },
        Case {
            name: "HS256 keyed with the raw public key",
            path: "/v1/task/heartbeat",
            token: hs256(&public),
            body: heartbeat.clone(),
            statuses: UNAUTH,
        },
        Case {
            name: "HS256 keyed with the JWK x",
            path: "/v1/task/heartbeat",
            token: hs256(x.as_bytes()),
            body: heartbeat.clone(),
            statuses: UNAUTH,
        },
        Case {
            name: "signed by an unknown key",
            path: "/v1/task/heartbeat",
            token: foreign,
            body: heartbeat.clone(),
            statuses: UNAUTH,
        },
        Case {
            name: "wrong aud",
            path: "/v1/task/heartbeat",
            token: app.sign_raw("task+jwt", &with(json!({"aud": "dispatcher:user"}))),
            body: heartbeat.clone(),
            statuses: UNAUTH,
        },
        Case {
            name: "wrong iss",
            path: "/v1/task/heartbeat",
            token: app.sign_raw("task+jwt", &with(json!({"iss": "someone-else"}))),
            body: heartbeat.clone(),
            statuses: UNAUTH,
        },
        Case {
            name: "wrong typ",
            path: "/v1/task/heartbeat",
            token: app.sign_raw("JWT", &genuine),
            body: heartbeat.clone(),
            statuses: UNAUTH,
        },
        Case {
            name: "worker typ on task claims",
            path: "/v1/task/heartbeat",
            token: app.sign_raw("worker+jwt", &genuine),
            body: heartbeat.clone(),
            statuses: UNAUTH,
        },
        Case {
            name: "expired",
            path: "/v1/task/heartbeat",
            token: app.sign_raw(
                "task+jwt",
                &with(json!({"exp": Utc::now().timestamp() - 3600})),
            ),
            body: heartbeat.clone(),
            statuses: UNAUTH,
        },
        Case {
            name: "tampered: another task's id",
            path: "/v1/task/heartbeat",
            token: tamper(&claim.capability_token, &with(json!({"sub": other_task}))),
            body: heartbeat.clone(),
            statuses: UNAUTH,
        },
        Case {
            name: "tampered: another attempt",
            path: "/v1/task/heartbeat",
            token: tamper(&claim.capability_token, &with(json!({"att": 2}))),
            body: heartbeat.clone(),
            statuses: UNAUTH,
        },
        Case {
            name: "genuinely signed for another task (DB check)",
            path: "/v1/task/heartbeat",
            token: app.sign_raw("task+jwt", &with(json!({"sub": other_task}))),
            body: heartbeat.clone(),
            statuses: &[StatusCode::FORBIDDEN],
        },
        Case {
            name: "genuinely signed for a future attempt (DB check)",
            path: "/v1/task/heartbeat",
            token: app.sign_raw("task+jwt", &with(json!({"att": 9}))),
            body: heartbeat.clone(),
            statuses: &[StatusCode::FORBIDDEN],
        },
        Case {
            name: "genuinely signed for another job (DB check)",
            path: "/v1/task/complete",
            token: app.sign_raw("task+jwt", &with(json!({"job": Uuid::new_v4()}))),
            body: json!({"outcome": "succeeded"}),
            statuses: &[StatusCode::FORBIDDEN],
        },
        Case {
            name: "worker credential on /v1/task/*",
            path: "/v1/task/complete",
            token: app.worker_token.clone(),
            body: json!({"outcome": "succeeded"}),
            statuses: UNAUTH_OR_FORBIDDEN,
        },
        Case {
            name: "user token on /v1/task/*",
            path: "/v1/task/events",
            token: user_token.clone(),
            body: json!({"events": [{"seq": 0, "kind": "log"}]}),
            statuses: UNAUTH_OR_FORBIDDEN,
        },
        Case {
            name: "task token on /internal/task-claim",
            path: "/internal/task-claim",
            token: claim.capability_token.clone(),
            body: claim_body.clone(),
            statuses: UNAUTH_OR_FORBIDDEN,
        },
        Case {
            name: "user token on /internal/task-claim",
            path: "/internal/task-claim",
            token: user_token.clone(),
            body: claim_body.clone(),
            statuses: UNAUTH_OR_FORBIDDEN,
        },
        Case {
            name: "task token on /v1/jobs",
            path: "/v1/jobs",
            token: claim.capability_token.clone(),
            body: json!({"name": "x", "tasks": [{"key": "a", "runtime": "exec", "bundle": "b"}]}),
            statuses: UNAUTH_OR_FORBIDDEN,
        },
        Case {
            name: "garbage",
            path: "/v1/task/heartbeat",
            token: "not.a.jwt".into(),
            body: heartbeat.clone(),
            statuses: UNAUTH,
        },
    ];

    for case in cases {
        let before = (app.snapshot(task).await, app.table_counts().await);
        let r = app.post(case.path, &case.token, &case.body).await;
        assert!(
            case.statuses.contains(&r.status),
            "{}: expected one of {:?}, got {} {}",
            case.name,
            case.statuses,
            r.status,
            r.body
        );
        let expected_code = if r.status == StatusCode::UNAUTHORIZED {
            "unauthenticated"
        } else {
            "forbidden"
        };
        assert_eq!(r.code(), expected_code, "{}: {}", case.name, r.body);
        assert_eq!(
            (app.snapshot(task).await, app.table_counts().await),
            before,
            "{} changed the database",
            case.name
        );
    }

    // The genuine token still works after all that.
    let r = app
        .post("/v1/task/heartbeat", &claim.capability_token, &json!({}))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
}

#[tokio::test]
async fn missing_or_malformed_authorization_is_401() {
    let app = TestApp::spawn().await;
    let url = app.url("/v1/task/heartbeat");
    let no_header = app.client.post(&url).json(&json!({})).send().await.unwrap();
    let basic = app
        .client
        .post(&url)
        .header("authorization", "Basic dXNlcjpwYXNz")
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    for resp in [no_header, basic] {
        let r = TestApp::read(resp).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);
        assert_eq!(r.code(), "unauthenticated");
    }
}

#[tokio::test]
async fn jwks_lets_another_service_verify_capability_tokens_without_a_secret() {
    let app = TestApp::spawn().await;
    let task = app.single_task(1).await;
    let claim = app.claim(task).await;
    let jwks = app.get("/.well-known/jwks.json", "").await;
    assert_eq!(jwks.status, StatusCode::OK);
    let set: jsonwebtoken::jwk::JwkSet = serde_json::from_value(jwks.body).unwrap();
    let header = jsonwebtoken::decode_header(&claim.capability_token).unwrap();
    let jwk = set
        .find(header.kid.as_deref().unwrap())
        .expect("kid published");
    let key = jsonwebtoken::DecodingKey::from_jwk(jwk).unwrap();
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::EdDSA);
    validation.set_audience(&["dispatcher:task"]);
    let data = jsonwebtoken::decode::<Value>(&claim.capability_token, &key, &validation).unwrap();
    assert_eq!(data.claims["sub"], json!(task));
    assert_eq!(data.claims["att"], 1);
    for claim_name in [
        "iss", "aud", "sub", "job", "org", "att", "datasets", "prefixes", "iat", "exp", "jti",
    ] {
        assert!(
            data.claims.get(claim_name).is_some(),
            "claim {claim_name} missing"
        );
    }
    assert_eq!(header.typ.as_deref(), Some("task+jwt"));
}
