//! Users act only in orgs they belong to, with the role Postgres holds.

use chrono::Utc;
use dispatcher::domain::Role;
use dispatcher_tests::TestApp;
use reqwest::StatusCode;
use serde_json::json;
use uuid::Uuid;

fn one_task_job() -> serde_json::Value {
    json!({"name": "j", "tasks": [{"key": "a", "runtime": "exec", "bundle": "x"}]})
}

#[tokio::test]
async fn cross_org_access_to_a_job_answers_404() {
    let app = TestApp::spawn().await;
    let job = app.submit(&one_task_job()).await;

    let rival_org = app.store.ensure_org("rival").await.unwrap();
    let rival = app.store.ensure_user("eve@rival.test").await.unwrap();
    app.store
        .set_membership(rival_org, rival, Role::Owner)
        .await
        .unwrap();
    let token = app
        .keys
        .mint_user(rival, rival_org, Utc::now() + chrono::Duration::hours(1));

    let before = app.table_counts().await;
    let get = app.get(&format!("/v1/jobs/{}", job.job_id), &token).await;
    let cancel = app
        .post(
            &format!("/v1/jobs/{}/cancel", job.job_id),
            &token,
            &json!({}),
        )
        .await;
    for r in [get, cancel] {
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.body);
        assert_eq!(r.code(), "not_found");
        assert!(
            !r.body.to_string().contains("\"j\""),
            "no detail of the job leaks"
        );
    }
    assert_eq!(app.table_counts().await, before);
    assert_eq!(
        app.job(job.job_id).await.state,
        dispatcher_wire::JobState::Running
    );
}

#[tokio::test]
async fn a_token_naming_an_org_the_user_is_not_in_is_forbidden() {
    let app = TestApp::spawn().await;
    let other_org = app.store.ensure_org("other").await.unwrap();
    let token = app.keys.mint_user(
        app.user_id,
        other_org,
        Utc::now() + chrono::Duration::hours(1),
    );
    let r = app.post("/v1/jobs", &token, &one_task_job()).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.body);

    // Membership is read on every call: removing it takes effect at once.
    let job = app.submit(&one_task_job()).await;
    app.store
        .remove_membership(app.org_id, app.user_id)
        .await
        .unwrap();
    let r = app
        .get(&format!("/v1/jobs/{}", job.job_id), &app.user_token)
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.body);
}

#[tokio::test]
async fn viewers_read_but_cannot_submit_or_cancel() {
    let app = TestApp::spawn().await;
    let job = app.submit(&one_task_job()).await;
    let viewer = app.store.ensure_user("vic@acme.test").await.unwrap();
    app.store
        .set_membership(app.org_id, viewer, Role::Viewer)
        .await
        .unwrap();
    let token = app
        .keys
        .mint_user(viewer, app.org_id, Utc::now() + chrono::Duration::hours(1));

    assert_eq!(
        app.get(&format!("/v1/jobs/{}", job.job_id), &token)
            .await
            .status,
        StatusCode::OK
    );
    let before = app.table_counts().await;
    let submit = app.post("/v1/jobs", &token, &one_task_job()).await;
    let cancel = app
        .post(
            &format!("/v1/jobs/{}/cancel", job.job_id),
            &token,
            &json!({}),
        )
        .await;
    for r in [submit, cancel] {
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.body);
        assert_eq!(r.code(), "forbidden");
    }
    assert_eq!(app.table_counts().await, before);
}

#[tokio::test]
async fn unknown_job_is_404_and_a_malformed_id_is_400() {
    let app = TestApp::spawn().await;
    let r = app
        .get(&format!("/v1/jobs/{}", Uuid::new_v4()), &app.user_token)
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let r = app.get("/v1/jobs/not-a-uuid", &app.user_token).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.body["error"]["message"]
        .as_str()
        .unwrap()
        .starts_with("job_id:"));
}
