//! Identity is never changed by an org-scoped call (ADR 0012): an org admin
//! invites by e-mail and sets roles in their own org; an IdP identity is
//! bound to a user only at its first sign-in, from the token's verified
//! e-mail, and only to a user that has none; an invitation never changes
//! which org the invited user's calls land in.

use chrono::Utc;
use dispatcher::domain::Role;
use dispatcher::http::ROUTES;
use dispatcher_tests::{unthrottled, TestApp};
use jsonwebtoken::Algorithm;
use reqwest::StatusCode;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::idp::{claims, fixture, sign, AUD, ISS};

async fn app_with_idp() -> TestApp {
    let idp =
        dispatcher::idp::Idp::from_jwks(ISS, AUD, "sub", &fixture("jwks.json"), 5).expect("jwks");
    TestApp::spawn_with_idp(idp).await
}

fn idp_token(sub: &str) -> String {
    sign(Algorithm::EdDSA, Some("ed-1"), &claims(sub))
}

fn idp_token_with_email(sub: &str, email: &str, verified: Value) -> String {
    let mut c = claims(sub);
    c["email"] = json!(email);
    c["email_verified"] = verified;
    sign(Algorithm::EdDSA, Some("ed-1"), &c)
}

/// One call: method, path, token, the `Dispatcher-Org` header, a body.
async fn call(
    app: &TestApp,
    method: &str,
    path: &str,
    token: &str,
    org: Option<Uuid>,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut req = app
        .client
        .request(method.parse().unwrap(), app.url(path))
        .bearer_auth(token);
    if let Some(org) = org {
        req = req.header("dispatcher-org", org.to_string());
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// A user with an identity, accepted in `org` with `role`.
async fn bound_member(app: &TestApp, email: &str, subject: &str, org: Uuid, role: Role) -> Uuid {
    let user = app.store.ensure_user(email).await.unwrap();
    app.store
        .set_user_subject(user, ISS, subject)
        .await
        .unwrap();
    app.store.set_membership(org, user, role).await.unwrap();
    user
}

/// Every user row, and the memberships of the orgs `keep` selects.
async fn identities(app: &TestApp, keep: Orgs) -> Value {
    let users: Value = sqlx::query_scalar(
        "SELECT coalesce(jsonb_agg(to_jsonb(u) ORDER BY u.email), '[]') FROM users u",
    )
    .fetch_one(&app.db.pool)
    .await
    .unwrap();
    let (org, only) = match keep {
        Orgs::AllBut(o) => (o, false),
        Orgs::Only(o) => (o, true),
    };
    let memberships: Value = sqlx::query_scalar(
        "SELECT coalesce(jsonb_agg(to_jsonb(m) ORDER BY m.org_id, m.user_id), '[]')
           FROM memberships m WHERE (m.org_id = $1) = $2",
    )
    .bind(org)
    .bind(only)
    .fetch_one(&app.db.pool)
    .await
    .unwrap();
    json!({"users": users, "memberships": memberships})
}

#[derive(Clone, Copy)]
enum Orgs {
    AllBut(Uuid),
    Only(Uuid),
}

fn emails(members: &Value) -> Vec<String> {
    members["members"]
        .as_array()
        .unwrap_or_else(|| panic!("a member list: {members}"))
        .iter()
        .map(|m| m["email"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn the_takeover_sequence_changes_no_identity_and_reaches_no_other_org() {
    let app = app_with_idp().await;
    let victim_org = app.org_id;
    let victim = bound_member(&app, "cfo@victim.test", "idp|cfo", victim_org, Role::Admin).await;
    let home = app.store.ensure_org("mallory-home").await.unwrap();
    let mallory = bound_member(&app, "mallory@evil.test", "idp|mallory", home, Role::Member).await;
    let mallory_token = idp_token("idp|mallory");

    // Mallory makes an org of her own, and is its admin.
    let (s, body) = call(
        &app,
        "POST",
        "/v1/orgs",
        &mallory_token,
        None,
        Some(json!({"name": "mallory-co"})),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{body}");
    let m_org: Uuid = serde_json::from_value(body["org_id"].clone()).unwrap();
    let before = identities(&app, Orgs::AllBut(m_org)).await;

    // 1. Moving her own subject off her row, and 2. writing it onto the
    // victim's: both refused, nothing written.
    for body in [
        json!({"email": "mallory@evil.test", "role": "admin", "idp_subject": "junk"}),
        json!({"email": "cfo@victim.test", "role": "viewer", "idp_subject": "idp|mallory"}),
    ] {
        let (s, answer) = call(
            &app,
            "PUT",
            "/v1/org/members",
            &mallory_token,
            Some(m_org),
            Some(body),
        )
        .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{answer}");
        assert_eq!(answer["error"]["code"], "invalid_request");
        assert!(
            answer["error"]["message"]
                .as_str()
                .unwrap()
                .contains("idp_subject"),
            "the message names the field: {answer}"
        );
    }
    // Inviting the victim's e-mail is allowed in her own org, and removing
    // the invitation again: it touches her org's membership only.
    let (s, answer) = call(
        &app,
        "PUT",
        "/v1/org/members",
        &mallory_token,
        Some(m_org),
        Some(json!({"email": "cfo@victim.test", "role": "admin"})),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{answer}");
    assert_eq!(answer["accepted"], false, "an invitation: {answer}");
    assert_eq!(answer["user_id"], json!(victim));
    assert_eq!(
        identities(&app, Orgs::AllBut(m_org)).await,
        before,
        "no user row and no membership of another org changed"
    );

    // 3. Her own sign-in names her own user, never the victim's: the
    // victim's org refuses her.
    for path in ["/v1/org/members", "/v1/datasets"] {
        let (s, answer) = call(&app, "GET", path, &mallory_token, Some(victim_org), None).await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{path}: {answer}");
    }
    let (s, answer) = call(
        &app,
        "PUT",
        "/v1/org/members",
        &mallory_token,
        Some(victim_org),
        Some(json!({"email": "mallory@evil.test", "role": "admin"})),
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{answer}");
    assert_eq!(
        app.store.member_role(victim_org, mallory).await.unwrap(),
        None
    );

    // The victim still signs in, and without naming an org lands in their
    // own, with their own role.
    let victim_token = idp_token("idp|cfo");
    let (s, answer) = call(&app, "GET", "/v1/org/members", &victim_token, None, None).await;
    assert_eq!(s, StatusCode::OK, "{answer}");
    let list = emails(&answer);
    assert!(list.contains(&"cfo@victim.test".to_owned()), "{list:?}");
    assert!(!list.contains(&"mallory@evil.test".to_owned()), "{list:?}");
    let (s, answer) = call(
        &app,
        "PUT",
        "/v1/org/members",
        &victim_token,
        None,
        Some(json!({"email": "deputy@victim.test", "role": "viewer"})),
    )
    .await;
    assert_eq!(
        s,
        StatusCode::OK,
        "the victim is still its org's admin: {answer}"
    );
    let victim_row = app.store.member(victim_org, victim).await.unwrap().unwrap();
    assert_eq!(victim_row.idp_subject.as_deref(), Some("idp|cfo"));
    assert_eq!(victim_row.role, "admin");
}

#[tokio::test]
async fn an_identity_is_bound_only_at_first_sign_in_from_a_verified_email() {
    let app = app_with_idp().await;
    let admin = bound_member(&app, "boss@acme.test", "idp|boss", app.org_id, Role::Admin).await;
    let admin_token =
        app.keys
            .mint_user(admin, app.org_id, Utc::now() + chrono::Duration::hours(1));
    let (s, answer) = call(
        &app,
        "PUT",
        "/v1/org/members",
        &admin_token,
        None,
        Some(json!({"email": "New.Hire@acme.test", "role": "member"})),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{answer}");
    assert_eq!(answer["idp_subject"], Value::Null);
    let hire: Uuid = serde_json::from_value(answer["user_id"].clone()).unwrap();

    // No e-mail, an unverified one, a verified flag that is not `true`:
    // nothing to claim the invitation with.
    for token in [
        idp_token("idp|hire"),
        idp_token_with_email("idp|hire", "new.hire@acme.test", json!(false)),
        idp_token_with_email("idp|hire", "new.hire@acme.test", json!("true")),
        idp_token_with_email("idp|hire", "someone.else@acme.test", json!(true)),
    ] {
        let (s, answer) = call(&app, "GET", "/v1/datasets", &token, Some(app.org_id), None).await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{answer}");
        let row = app.store.member(app.org_id, hire).await.unwrap().unwrap();
        assert_eq!(row.idp_subject, None, "nothing bound");
    }

    // The verified e-mail (case aside) claims it, once.
    let token = idp_token_with_email("idp|hire", "new.hire@ACME.test", json!(true));
    let (s, answer) = call(&app, "GET", "/v1/datasets", &token, Some(app.org_id), None).await;
    assert_eq!(s, StatusCode::OK, "{answer}");
    let row = app.store.member(app.org_id, hire).await.unwrap().unwrap();
    assert_eq!(row.idp_subject.as_deref(), Some("idp|hire"));
    assert!(row.accepted, "naming the org accepted the invitation");

    // Another identity with the same verified e-mail cannot take the user.
    let impostor = idp_token_with_email("idp|impostor", "new.hire@acme.test", json!(true));
    let (s, answer) = call(
        &app,
        "GET",
        "/v1/datasets",
        &impostor,
        Some(app.org_id),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{answer}");
    let row = app.store.member(app.org_id, hire).await.unwrap().unwrap();
    assert_eq!(row.idp_subject.as_deref(), Some("idp|hire"));
    assert_eq!(
        app.store
            .user_by_subject(ISS, "idp|impostor")
            .await
            .unwrap(),
        None
    );

    // The operator's binding, too, never moves a bound user.
    assert!(app
        .store
        .set_user_subject(hire, ISS, "idp|other")
        .await
        .is_err());
    // And the first identity, now without the header, lands in its org.
    let (s, answer) = call(
        &app,
        "GET",
        "/v1/org/members",
        &idp_token("idp|hire"),
        None,
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{answer}");
    assert!(emails(&answer).contains(&"boss@acme.test".to_owned()));

    // The operator unbinds (the IdP account was replaced): the next
    // verified sign-in binds again, and the old identity names nobody.
    assert_eq!(
        app.store
            .unbind_identity("New.Hire@acme.test")
            .await
            .unwrap(),
        Some(hire)
    );
    let (s, answer) = call(
        &app,
        "GET",
        "/v1/datasets",
        &impostor,
        Some(app.org_id),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{answer}");
    let (s, _) = call(
        &app,
        "GET",
        "/v1/datasets",
        &idp_token("idp|hire"),
        None,
        None,
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn an_invitation_does_not_change_where_the_invited_users_calls_land() {
    let app = app_with_idp().await;
    let own = app.org_id;
    bound_member(&app, "sam@acme.test", "idp|sam", own, Role::Member).await;
    let stranger_org = app.store.ensure_org("stranger-co").await.unwrap();
    let stranger_admin = app.store.ensure_user("admin@stranger.test").await.unwrap();
    app.store
        .set_membership(stranger_org, stranger_admin, Role::Admin)
        .await
        .unwrap();
    let stranger_token = app.keys.mint_user(
        stranger_admin,
        stranger_org,
        Utc::now() + chrono::Duration::hours(1),
    );
    let sam = idp_token("idp|sam");
    let lands_in = |members: &Value| emails(members).contains(&"ada@acme.test".to_owned());

    let (s, answer) = call(&app, "GET", "/v1/org/members", &sam, None, None).await;
    assert_eq!(s, StatusCode::OK, "{answer}");
    assert!(lands_in(&answer));
    // Another org adds Sam's e-mail, as an admin even.
    let (s, answer) = call(
        &app,
        "PUT",
        "/v1/org/members",
        &stranger_token,
        None,
        Some(json!({"email": "sam@acme.test", "role": "admin"})),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{answer}");
    // Sam's calls without the header still land in Sam's own org.
    let (s, answer) = call(&app, "GET", "/v1/org/members", &sam, None, None).await;
    assert_eq!(s, StatusCode::OK, "{answer}");
    assert!(lands_in(&answer), "still the own org: {answer}");
    // Naming the other org accepts the invitation; from then on Sam is in
    // two orgs and names one on every call.
    let (s, answer) = call(
        &app,
        "GET",
        "/v1/org/members",
        &sam,
        Some(stranger_org),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{answer}");
    assert!(!lands_in(&answer));
    let (s, answer) = call(&app, "GET", "/v1/org/members", &sam, None, None).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{answer}");
    assert_eq!(answer["error"]["code"], "invalid_request");
}

/// Every `/v1/org*` route, called by the admin of each of two orgs with
/// the other org's users as its targets: each answers as documented, no
/// user row and no membership of the other org changes, and each user's
/// default org stays. A new `/v1/org*` route without a case here fails.
#[tokio::test]
async fn every_org_route_run_by_each_orgs_admin_against_the_other_changes_nothing_of_the_other() {
    let app = TestApp::spawn_with(unthrottled()).await;
    let exp = Utc::now() + chrono::Duration::hours(1);
    let a = app.org_id;
    let b = app.store.ensure_org("globex").await.unwrap();
    let mut admins = Vec::new();
    for (org, email) in [(a, "root@acme.test"), (b, "root@globex.test")] {
        let user = app.store.ensure_user(email).await.unwrap();
        app.store.set_user_subject(user, ISS, email).await.unwrap();
        app.store
            .set_membership(org, user, Role::Admin)
            .await
            .unwrap();
        let member = app
            .store
            .ensure_user(&format!("staff@{}", email.split('@').nth(1).unwrap()))
            .await
            .unwrap();
        app.store
            .set_membership(org, member, Role::Member)
            .await
            .unwrap();
        admins.push((org, user, member, app.keys.mint_user(user, org, exp)));
    }
    let org_routes: Vec<_> = ROUTES
        .iter()
        .filter(|r| r.path.starts_with("/v1/org"))
        .collect();
    assert!(org_routes.len() >= 4, "{org_routes:?}");
    for (i, &(own, _, _, ref token)) in admins.iter().enumerate() {
        let &(other, other_admin, other_member, _) = &admins[1 - i];
        let other_before = identities(&app, Orgs::Only(other)).await;
        let defaults_before = (
            app.store.sole_org(other_admin).await.unwrap(),
            app.store.sole_org(other_member).await.unwrap(),
        );
        for (n, route) in org_routes.iter().enumerate() {
            let cases: Vec<(String, Option<Value>, StatusCode)> = match (route.method, route.path) {
                ("POST", "/v1/orgs") => vec![(
                    route.path.into(),
                    Some(json!({"name": format!("spare-{i}-{n}")})),
                    StatusCode::CREATED,
                )],
                ("GET", "/v1/org/members") => vec![(route.path.into(), None, StatusCode::OK)],
                ("PUT", "/v1/org/members") => vec![
                    (
                        route.path.into(),
                        Some(
                            json!({"email": format!("root@{}", if i == 0 { "globex.test" } else { "acme.test" }),
                                    "role": "admin", "idp_subject": "stolen"}),
                        ),
                        StatusCode::BAD_REQUEST,
                    ),
                    (
                        route.path.into(),
                        Some(
                            json!({"email": format!("staff@{}", if i == 0 { "globex.test" } else { "acme.test" }),
                                    "role": "viewer"}),
                        ),
                        StatusCode::OK,
                    ),
                ],
                ("DELETE", "/v1/org/members/{user_id}") => {
                    // The other org's member, invited into the own org.
                    app.store
                        .invite_member(own, other_member, Role::Viewer, admins[i].1)
                        .await
                        .unwrap();
                    vec![
                        (
                            format!("/v1/org/members/{other_admin}"),
                            None,
                            StatusCode::NOT_FOUND,
                        ),
                        (
                            format!("/v1/org/members/{other_member}"),
                            None,
                            StatusCode::NO_CONTENT,
                        ),
                    ]
                }
                (m, p) => panic!("no case for {m} {p}: add one to tests/tests/it/identity.rs"),
            };
            for (path, body, expected) in cases {
                let (s, answer) = call(&app, route.method, &path, token, None, body).await;
                assert_eq!(
                    s, expected,
                    "{} {path} by org {own}: {answer}",
                    route.method
                );
                if route.method == "GET" {
                    let list = emails(&answer);
                    assert!(
                        list.iter().all(|e| !e.starts_with("root@")
                            || e.ends_with(if i == 0 { "acme.test" } else { "globex.test" })),
                        "only the own org's admin is listed: {list:?}"
                    );
                }
            }
        }
        assert_eq!(
            identities(&app, Orgs::Only(other)).await,
            other_before,
            "org {own}'s admin changed nothing of org {other} nor any user row"
        );
        assert_eq!(
            (
                app.store.sole_org(other_admin).await.unwrap(),
                app.store.sole_org(other_member).await.unwrap(),
            ),
            defaults_before,
            "the other org's users still land where they did"
        );
        assert_eq!(defaults_before, (Some(other), Some(other)));
    }
}
