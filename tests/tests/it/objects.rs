//! One conformance suite for the `ObjectStore` trait, run against every
//! implementation: a directory on disk (its presigned URLs served by
//! `http::objects::router` on a loopback port) and S3, against two
//! S3-compatible servers: moto's, and s3s-fs, which also enforces
//! signatures, presigned URL expiry and conditional writes.

use std::sync::Arc;
use std::time::Duration;

use dispatcher::objects::{LocalDirStore, ObjectError, ObjectStore, S3Config, S3Store};
use dispatcher_tests::moto::Moto;
use dispatcher_tests::s3s::{self, S3sFs};
use reqwest::StatusCode;

async fn conformance_put_get_head_list_delete(s: &dyn ObjectStore) {
    s.put("a/1.txt", b"one".to_vec()).await.unwrap();
    s.put("a/2.txt", b"two!".to_vec()).await.unwrap();
    s.put("b/3.txt", b"three".to_vec()).await.unwrap();
    assert_eq!(s.get("a/1.txt").await.unwrap(), b"one");
    assert_eq!(s.head("a/2.txt").await.unwrap().size, 4);
    let keys: Vec<String> = s
        .list("a/")
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.key)
        .collect();
    assert_eq!(keys, vec!["a/1.txt", "a/2.txt"]);
    s.put("a/1.txt", b"uno".to_vec()).await.unwrap();
    assert_eq!(s.get("a/1.txt").await.unwrap(), b"uno", "put replaces");
    s.delete("a/1.txt").await.unwrap();
    assert!(matches!(
        s.get("a/1.txt").await,
        Err(ObjectError::NotFound(_))
    ));
    assert!(matches!(
        s.head("a/1.txt").await,
        Err(ObjectError::NotFound(_))
    ));
    s.delete("a/1.txt")
        .await
        .expect("deleting a missing key is not an error");
    assert!(matches!(
        s.put("../escape", vec![]).await,
        Err(ObjectError::InvalidKey(..))
    ));
    assert!(matches!(
        s.get("/abs").await,
        Err(ObjectError::InvalidKey(..))
    ));
}

async fn conformance_create_only_put_fails_on_an_existing_key_and_keeps_the_first(
    s: &dyn ObjectStore,
) {
    s.put_if_absent("once/x", b"first".to_vec()).await.unwrap();
    let second = s.put_if_absent("once/x", b"second".to_vec()).await;
    assert!(
        matches!(second, Err(ObjectError::AlreadyExists(_))),
        "{second:?}"
    );
    assert_eq!(
        s.get("once/x").await.unwrap(),
        b"first",
        "the first object is intact"
    );
}

/// What an implementation's environment enforces beyond the common core.
#[derive(Clone, Copy)]
struct Caps {
    /// The server checks presigned URL signatures and expiry. The local
    /// store's router does, and so do S3 and s3s-fs; moto's server accepts
    /// any signature, so against moto only the URL's form can be checked.
    verifies_presigned_urls: bool,
}

async fn conformance_presigned_urls_work_for_exactly_one_key_and_expire(
    s: &dyn ObjectStore,
    caps: Caps,
) {
    let http = reqwest::Client::new();
    s.put("signed/mine", b"secret".to_vec()).await.unwrap();
    s.put("signed/other", b"not yours".to_vec()).await.unwrap();

    let url = s
        .presign_get("signed/mine", Duration::from_secs(60))
        .await
        .unwrap();
    let r = http.get(&url).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.bytes().await.unwrap().as_ref(), b"secret");
    let put = s
        .presign_put("signed/upload", Duration::from_secs(60))
        .await
        .unwrap();
    let r = http.put(&put).body("uploaded").send().await.unwrap();
    assert!(r.status().is_success(), "presigned PUT: {}", r.status());
    assert_eq!(s.get("signed/upload").await.unwrap(), b"uploaded");
    if !caps.verifies_presigned_urls {
        // The server will not refuse a wrong signature, so check the form:
        // signed (SigV4), bound to this key's path, with its expiry.
        let short = s
            .presign_get("signed/mine", Duration::from_secs(1))
            .await
            .unwrap();
        let parsed = reqwest::Url::parse(&short).unwrap();
        assert!(parsed.path().ends_with("/signed/mine"), "{short}");
        let q: std::collections::HashMap<_, _> = parsed.query_pairs().into_owned().collect();
        assert_eq!(
            q.get("X-Amz-Expires").map(String::as_str),
            Some("1"),
            "{short}"
        );
        assert!(
            q.contains_key("X-Amz-Signature") && q.contains_key("X-Amz-Credential"),
            "{short}"
        );
        return;
    }
    let other = url.replace("signed/mine", "signed/other");
    let r = http.get(&other).send().await.unwrap();
    assert!(
        r.status().is_client_error(),
        "another key with the same signature: {}",
        r.status()
    );

    let r = http
        .put(put.replace("signed/upload", "signed/mine"))
        .body("overwrite")
        .send()
        .await
        .unwrap();
    assert!(
        r.status().is_client_error(),
        "a PUT URL for another key: {}",
        r.status()
    );
    assert_eq!(s.get("signed/mine").await.unwrap(), b"secret");

    let short = s
        .presign_get("signed/mine", Duration::from_secs(1))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let r = http.get(&short).send().await.unwrap();
    assert!(
        r.status().is_client_error(),
        "an expired URL: {}",
        r.status()
    );
}

async fn conformance(s: &dyn ObjectStore, caps: Caps) {
    conformance_put_get_head_list_delete(s).await;
    conformance_create_only_put_fails_on_an_existing_key_and_keeps_the_first(s).await;
    conformance_presigned_urls_work_for_exactly_one_key_and_expire(s, caps).await;
}

#[tokio::test]
async fn object_store_conformance_local_dir() {
    let root = std::env::temp_dir().join(format!("objects-{}", uuid::Uuid::new_v4().simple()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let secret = b"a test secret of at least 32 bytes".to_vec();
    let store = Arc::new(LocalDirStore::new(&root, &base, secret.clone()).unwrap());
    let server = tokio::spawn(async move {
        axum::serve(listener, dispatcher::http::objects::router(store)).await
    });
    let client_side = LocalDirStore::new(&root, &base, secret).unwrap();
    conformance(
        &client_side,
        Caps {
            verifies_presigned_urls: true,
        },
    )
    .await;
    server.abort();
    let _ = std::fs::remove_dir_all(&root);
}

/// The local store refuses a presigned-URL secret under 32 bytes, and
/// percent-encodes keys in its URLs: a key with `?`, `#`, `%`, `&`, `+` and
/// spaces round-trips through a presigned PUT and GET.
#[tokio::test]
async fn rule_local_presigned_urls_need_a_strong_secret_and_encode_keys() {
    let err = LocalDirStore::new("/nowhere", "http://x", b"short".to_vec()).unwrap_err();
    assert!(err.to_string().contains("at least 32 bytes"), "{err}");
    let root = std::env::temp_dir().join(format!("objects-{}", uuid::Uuid::new_v4().simple()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let secret = vec![7u8; 32];
    let store = Arc::new(LocalDirStore::new(&root, &base, secret).unwrap());
    let server = tokio::spawn({
        let store = store.clone();
        async move { axum::serve(listener, dispatcher::http::objects::router(store)).await }
    });
    assert!(
        !format!("{store:?}").contains("7, 7"),
        "Debug shows the secret"
    );
    let key = "odd keys/a?b#c%d&e+f=g h.jsonl";
    let put = store
        .presign_put(key, Duration::from_secs(60))
        .await
        .unwrap();
    assert!(!put.contains('#') && !put.contains(' '), "{put}");
    let http = reqwest::Client::new();
    let r = http.put(&put).body("row\n").send().await.unwrap();
    assert_eq!(r.status(), 200, "{put}");
    assert_eq!(store.get(key).await.unwrap(), b"row\n");
    let get = store
        .presign_get(key, Duration::from_secs(60))
        .await
        .unwrap();
    let r = http.get(&get).send().await.unwrap();
    assert_eq!(r.bytes().await.unwrap().as_ref(), b"row\n");
    server.abort();
    let _ = std::fs::remove_dir_all(&root);
}

/// A fresh bucket on an S3-compatible server: `connect` first names it as
/// missing, then succeeds once it is created.
async fn fresh_bucket(cfg: &S3Config) -> S3Store {
    let err = S3Store::connect(cfg)
        .await
        .err()
        .expect("connect names a missing bucket");
    assert!(err.to_string().contains(&cfg.bucket), "{err}");
    S3Store::create_bucket(cfg).await.unwrap();
    S3Store::connect(cfg).await.unwrap()
}

#[tokio::test]
async fn object_store_conformance_s3_on_moto() {
    let moto = Moto::start().await;
    let cfg = S3Config {
        region: "us-east-1".into(),
        endpoint_url: Some(moto.url()),
        bucket: format!("t{}", uuid::Uuid::new_v4().simple()),
        static_credentials: Some(("test".into(), "test".into())),
    };
    conformance(
        &fresh_bucket(&cfg).await,
        Caps {
            verifies_presigned_urls: false,
        },
    )
    .await;
}

/// The same suite against s3s-fs, which checks signatures: here the S3
/// adapter's presigned URLs are shown to work for exactly one key and to
/// expire, not only to look right.
#[tokio::test]
async fn object_store_conformance_s3_on_s3s_fs() {
    let server = S3sFs::start().await;
    let cfg = server.s3();
    conformance(
        &fresh_bucket(&cfg).await,
        Caps {
            verifies_presigned_urls: true,
        },
    )
    .await;
    // The server does check credentials: a wrong secret is refused.
    let wrong = S3Config {
        static_credentials: Some((s3s::ACCESS_KEY.into(), "not-the-secret".into())),
        ..cfg
    };
    assert!(S3Store::connect(&wrong).await.is_err());
}
