//! Users from an identity provider (ADR 0012), and org administration: an
//! IdP token names the user, Postgres alone says which orgs and roles it
//! has; tokens of other issuers, audiences, algorithms or kinds are
//! refused; an org always keeps an admin.

use chrono::Utc;
use dispatcher::domain::Role;
use dispatcher::idp::Idp;
use dispatcher_tests::TestApp;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::StatusCode;
use serde_json::{json, Value};
use uuid::Uuid;

pub(crate) const ISS: &str = "https://idp.example.test";
pub(crate) const AUD: &str = "dispatcher-users";

pub(crate) fn fixture(name: &str) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/idp")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

pub(crate) fn sign(alg: Algorithm, kid: Option<&str>, claims: &Value) -> String {
    let key = match alg {
        Algorithm::RS256 => EncodingKey::from_rsa_pem(fixture("rsa.pem").as_bytes()),
        Algorithm::ES256 => EncodingKey::from_ec_pem(fixture("ec.pem").as_bytes()),
        Algorithm::EdDSA => EncodingKey::from_ed_pem(fixture("ed.pem").as_bytes()),
        Algorithm::HS256 => Ok(EncodingKey::from_secret(fixture("rsa.pub.pem").as_bytes())),
        other => panic!("{other:?}"),
    }
    .expect("key");
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&header, claims, &key).expect("sign")
}

pub(crate) fn claims(sub: &str) -> Value {
    json!({"iss": ISS, "aud": AUD, "sub": sub, "iat": Utc::now().timestamp(),
           "exp": Utc::now().timestamp() + 600})
}

pub(crate) async fn app_with_jwks() -> TestApp {
    let idp = Idp::from_jwks(ISS, AUD, "sub", &fixture("jwks.json"), 5).expect("jwks");
    let app = TestApp::spawn_with_idp(idp).await;
    let ada = app.store.ensure_user("ada@idp.test").await.unwrap();
    app.store
        .set_user_subject(ada, ISS, "idp|ada")
        .await
        .unwrap();
    app
}

async fn status(app: &TestApp, token: &str, org: Option<Uuid>) -> (StatusCode, Value) {
    let mut req = app.client.get(app.url("/v1/datasets")).bearer_auth(token);
    if let Some(org) = org {
        req = req.header("dispatcher-org", org.to_string());
    }
    let resp = req.send().await.unwrap();
    let status = resp.status();
    (status, resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn idp_tokens_signed_by_a_configured_key_name_a_user_whose_orgs_come_from_postgres() {
    let app = app_with_jwks().await;
    // Each key of the JWKS, each with its pinned algorithm.
    for (alg, kid) in [
        (Algorithm::RS256, "rsa-1"),
        (Algorithm::ES256, "ec-1"),
        (Algorithm::EdDSA, "ed-1"),
    ] {
        let token = sign(alg, Some(kid), &claims("idp|ada"));
        // Known, but a member of no org yet: nothing.
        if alg == Algorithm::RS256 {
            let (s, body) = status(&app, &token, Some(app.org_id)).await;
            assert_eq!(s, StatusCode::FORBIDDEN, "{body}");
            let ada = app.store.ensure_user("ada@idp.test").await.unwrap();
            app.store
                .set_membership(app.org_id, ada, Role::Viewer)
                .await
                .unwrap();
        }
        let (s, body) = status(&app, &token, None).await;
        assert_eq!(s, StatusCode::OK, "{kid}: {body}");
        // A viewer may read but not write: the role is Postgres'.
        let r = app
            .post(
                "/v1/datasets",
                &token,
                &json!({"name": "x", "mode": "append", "columns": [{"name": "a", "type": "string"}]}),
            )
            .await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.body);
    }
    // The dispatcher's own user token still works beside them.
    assert_eq!(status(&app, &app.user_token, None).await.0, StatusCode::OK);

    // In two orgs the token must say which, and only a member's org works.
    let other = app.store.ensure_org("globex").await.unwrap();
    let token = sign(Algorithm::EdDSA, Some("ed-1"), &claims("idp|ada"));
    let ada = app.store.ensure_user("ada@idp.test").await.unwrap();
    app.store
        .set_membership(other, ada, Role::Member)
        .await
        .unwrap();
    let (s, body) = status(&app, &token, None).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{body}");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .starts_with("dispatcher-org"));
    assert_eq!(status(&app, &token, Some(other)).await.0, StatusCode::OK);
    let stranger = app.store.ensure_org("initech").await.unwrap();
    assert_eq!(
        status(&app, &token, Some(stranger)).await.0,
        StatusCode::FORBIDDEN
    );
}

#[tokio::test]
async fn idp_refuses_other_issuers_audiences_algorithms_and_the_dispatchers_own_task_and_worker_tokens(
) {
    let app = app_with_jwks().await;
    let ada = app.store.ensure_user("ada@idp.test").await.unwrap();
    app.store
        .set_membership(app.org_id, ada, Role::Member)
        .await
        .unwrap();
    let good = claims("idp|ada");
    let mut other_iss = good.clone();
    other_iss["iss"] = json!("https://evil.example.test");
    let mut other_aud = good.clone();
    other_aud["aud"] = json!("someone-else");
    let mut expired = good.clone();
    expired["exp"] = json!(Utc::now().timestamp() - 3600);
    let mut no_sub = good.clone();
    no_sub.as_object_mut().unwrap().remove("sub");
    let job = app.single_task(1).await;
    let claim = app.claim(job).await;
    let cases: Vec<(&str, String, StatusCode)> = vec![
        (
            "another issuer",
            sign(Algorithm::RS256, Some("rsa-1"), &other_iss),
            StatusCode::UNAUTHORIZED,
        ),
        (
            "another audience",
            sign(Algorithm::RS256, Some("rsa-1"), &other_aud),
            StatusCode::UNAUTHORIZED,
        ),
        (
            "expired",
            sign(Algorithm::ES256, Some("ec-1"), &expired),
            StatusCode::UNAUTHORIZED,
        ),
        (
            "no subject",
            sign(Algorithm::ES256, Some("ec-1"), &no_sub),
            StatusCode::UNAUTHORIZED,
        ),
        // HMAC, keyed with the RSA public key (algorithm confusion).
        (
            "HS256",
            sign(Algorithm::HS256, Some("rsa-1"), &good),
            StatusCode::UNAUTHORIZED,
        ),
        (
            "HS256 without kid",
            sign(Algorithm::HS256, None, &good),
            StatusCode::UNAUTHORIZED,
        ),
        // A real key, under another key's kid and algorithm.
        (
            "algorithm of another key",
            sign(Algorithm::EdDSA, Some("rsa-1"), &good),
            StatusCode::UNAUTHORIZED,
        ),
        (
            "unknown kid",
            sign(Algorithm::RS256, Some("rsa-9"), &good),
            StatusCode::UNAUTHORIZED,
        ),
        (
            "the dispatcher's task token",
            claim.capability_token.clone(),
            StatusCode::UNAUTHORIZED,
        ),
        (
            "the dispatcher's worker token",
            app.worker_token.clone(),
            StatusCode::UNAUTHORIZED,
        ),
        (
            "an unknown subject",
            sign(Algorithm::RS256, Some("rsa-1"), &claims("idp|mallory")),
            StatusCode::FORBIDDEN,
        ),
    ];
    for (what, token, want) in cases {
        let (s, body) = status(&app, &token, Some(app.org_id)).await;
        assert_eq!(s, want, "{what}: {body}");
    }
    // One PEM key pinned to ES256: its tokens work, RS256 ones do not.
    let idp = Idp::from_pem(
        ISS,
        AUD,
        "email",
        &fixture("ec.pub.pem"),
        Algorithm::ES256,
        None,
        5,
    )
    .unwrap();
    let pem_app = TestApp::spawn_with_idp(idp).await;
    let bob = pem_app.store.ensure_user("bob@acme.test").await.unwrap();
    pem_app
        .store
        .set_user_subject(bob, ISS, "bob@acme.test")
        .await
        .unwrap();
    pem_app
        .store
        .set_membership(pem_app.org_id, bob, Role::Member)
        .await
        .unwrap();
    let mut by_email = claims("ignored");
    by_email["email"] = json!("bob@acme.test");
    let ok = sign(Algorithm::ES256, None, &by_email);
    assert_eq!(status(&pem_app, &ok, None).await.0, StatusCode::OK);
    let rsa = sign(Algorithm::RS256, None, &by_email);
    assert_eq!(
        status(&pem_app, &rsa, None).await.0,
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn idp_configuration_refuses_symmetric_keys_and_other_algorithms() {
    let oct = r#"{"keys": [{"kty": "oct", "kid": "k", "k": "c2VjcmV0"}]}"#;
    assert!(Idp::from_jwks(ISS, AUD, "sub", oct, 5).is_err());
    let hs = r#"{"keys": [{"kty": "RSA", "kid": "k", "alg": "HS256", "n": "AQAB", "e": "AQAB"}]}"#;
    assert!(Idp::from_jwks(ISS, AUD, "sub", hs, 5).is_err());
    assert!(dispatcher::idp::parse_alg("HS256").is_err());
    assert!(dispatcher::idp::parse_alg("none").is_err());
    assert!(Idp::from_jwks(ISS, AUD, "sub", r#"{"keys": []}"#, 5).is_err());
}

#[tokio::test]
async fn org_admins_add_change_and_remove_members_and_the_last_admin_stays() {
    let app = TestApp::spawn().await;
    let exp = Utc::now() + chrono::Duration::hours(1);
    // Ada creates an org and is its admin.
    let r = app
        .post("/v1/orgs", &app.user_token, &json!({"name": "newco"}))
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let org: Uuid = serde_json::from_value(r.body["org_id"].clone()).unwrap();
    let r = app
        .post("/v1/orgs", &app.user_token, &json!({"name": "newco"}))
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT, "a taken name");
    let ada = app.keys.mint_user(app.user_id, org, exp);
    let put = |token: String, body: Value| {
        let app = &app;
        async move {
            let resp = app
                .client
                .put(app.url("/v1/org/members"))
                .bearer_auth(token)
                .json(&body)
                .send()
                .await
                .unwrap();
            (
                resp.status(),
                resp.json::<Value>().await.unwrap_or(Value::Null),
            )
        }
    };
    let delete = |token: String, user: Uuid| {
        let app = &app;
        async move {
            app.client
                .delete(app.url(&format!("/v1/org/members/{user}")))
                .bearer_auth(token)
                .send()
                .await
                .unwrap()
                .status()
        }
    };
    let (s, bob) = put(
        ada.clone(),
        json!({"email": "bob@newco.test", "role": "member"}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{bob}");
    let bob_id: Uuid = serde_json::from_value(bob["user_id"].clone()).unwrap();
    let bob_token = app.keys.mint_user(bob_id, org, exp);
    let r = app.get("/v1/org/members", &bob_token).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body["members"].as_array().unwrap().len(), 2);
    // A member may not administer.
    let (s, _) = put(
        bob_token.clone(),
        json!({"email": "eve@newco.test", "role": "admin"}),
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert_eq!(
        delete(bob_token.clone(), app.user_id).await,
        StatusCode::FORBIDDEN
    );
    // The last admin can be neither removed nor demoted.
    assert_eq!(delete(ada.clone(), app.user_id).await, StatusCode::CONFLICT);
    let (s, _) = put(
        ada.clone(),
        json!({"email": "ada@acme.test", "role": "member"}),
    )
    .await;
    assert_eq!(s, StatusCode::CONFLICT);
    // With a second admin, the first may go.
    let (s, _) = put(
        ada.clone(),
        json!({"email": "bob@newco.test", "role": "admin"}),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        delete(ada.clone(), app.user_id).await,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        app.get("/v1/org/members", &ada).await.status,
        StatusCode::FORBIDDEN,
        "ada is no member any more"
    );
    assert_eq!(
        delete(bob_token.clone(), Uuid::new_v4()).await,
        StatusCode::NOT_FOUND
    );
    let (s, body) = put(bob_token.clone(), json!({"email": "x@y.z", "role": "root"})).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{body}");
    // Another org's admin sees none of this org's members.
    let r = app.get("/v1/org/members", &app.user_token).await;
    let emails: Vec<&str> = r.body["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["email"].as_str().unwrap())
        .collect();
    assert_eq!(emails, vec!["ada@acme.test"]);
}

#[tokio::test]
async fn two_admins_removing_each_other_at_once_leave_one() {
    let app = TestApp::spawn().await;
    let a = app.store.ensure_user("a@x.test").await.unwrap();
    let b = app.store.ensure_user("b@x.test").await.unwrap();
    let org = app.store.ensure_org("pair").await.unwrap();
    for u in [a, b] {
        app.store.set_membership(org, u, Role::Admin).await.unwrap();
    }
    let (ra, rb) = tokio::join!(
        app.store.remove_membership(org, a),
        app.store.remove_membership(org, b)
    );
    assert!(
        ra.is_ok() != rb.is_ok(),
        "exactly one removal wins: {ra:?} {rb:?}"
    );
    let members = app.store.list_members(org).await.unwrap();
    assert_eq!(members.len(), 1);
    assert_eq!(members[0].role, "admin");
}

/// A JWKS served over HTTP, whose document the test can change.
async fn jwks_server(doc: std::sync::Arc<std::sync::Mutex<String>>) -> String {
    let app = axum::Router::new().route(
        "/jwks.json",
        axum::routing::get(move || {
            let doc = doc.clone();
            async move { doc.lock().unwrap().clone() }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}/jwks.json")
}

#[tokio::test]
async fn idp_keys_from_a_jwks_url_rotate_when_a_token_names_a_new_kid() {
    let full: Value = serde_json::from_str(&fixture("jwks.json")).unwrap();
    let only_rsa = json!({"keys": [full["keys"][0].clone()]});
    let doc = std::sync::Arc::new(std::sync::Mutex::new(only_rsa.to_string()));
    let url = jwks_server(doc.clone()).await;
    let idp = Idp::from_jwks_url(ISS, AUD, "sub", &url, 5)
        .await
        .unwrap()
        .with_min_refetch(std::time::Duration::ZERO);
    let app = TestApp::spawn_with_idp(idp).await;
    let ada = app.store.ensure_user("ada@idp.test").await.unwrap();
    app.store
        .set_user_subject(ada, ISS, "idp|ada")
        .await
        .unwrap();
    app.store
        .set_membership(app.org_id, ada, Role::Member)
        .await
        .unwrap();
    let rsa = sign(Algorithm::RS256, Some("rsa-1"), &claims("idp|ada"));
    let ec = sign(Algorithm::ES256, Some("ec-1"), &claims("idp|ada"));
    assert_eq!(status(&app, &rsa, None).await.0, StatusCode::OK);
    assert_eq!(
        status(&app, &ec, None).await.0,
        StatusCode::UNAUTHORIZED,
        "ec-1 is not published yet"
    );
    // The IdP rotates: it publishes ec-1 and drops rsa-1.
    *doc.lock().unwrap() = json!({"keys": [full["keys"][1].clone()]}).to_string();
    assert_eq!(
        status(&app, &ec, None).await.0,
        StatusCode::OK,
        "fetched on the unknown kid"
    );
    // rsa-1 is unknown now; the refetch finds it gone: refused.
    assert_eq!(status(&app, &rsa, None).await.0, StatusCode::UNAUTHORIZED);
    // A URL that does not answer a JWKS stops the start.
    *doc.lock().unwrap() = "not json".into();
    assert!(Idp::from_jwks_url(ISS, AUD, "sub", &url, 5).await.is_err());
}
