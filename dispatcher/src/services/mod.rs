//! Services: the operations of each area that handlers and background
//! roles call, over the store and the adapters. A service never imports
//! the HTTP layer or a role (`scripts/check-layers`); it answers
//! [`StoreError`](crate::error::StoreError), which the HTTP layer maps to
//! the contract's errors.

use crate::objects::ObjectStore;
use crate::settings::Settings;
use crate::store::Store;
use crate::tokens::Keyring;

pub mod alerts;
pub mod dlq;
pub mod leases;
pub mod logs;
pub mod query;
pub mod retention;
pub mod sink;
pub mod staging;
pub mod task_objects;

/// What the worker-contract services need: the store, the signing keys,
/// the object store and the settings (borrowed from the API's state).
#[derive(Clone, Copy)]
pub struct Ctx<'a> {
    pub store: &'a Store,
    pub keys: &'a Keyring,
    pub objects: &'a dyn ObjectStore,
    pub settings: &'a Settings,
}

/// The fence of a task token's attempt.
pub fn fence(claims: &crate::tokens::TaskClaims) -> crate::store::Fence {
    crate::store::Fence {
        task_id: claims.sub,
        job_id: claims.job,
        attempt: claims.att,
    }
}

/// What the services' unit tests run on: a store whose pool never connects
/// (a test that reaches it fails), real keys, a local object store in a
/// temporary directory, default settings.
#[cfg(test)]
pub(crate) mod testing {
    use std::sync::Arc;

    use super::Ctx;
    use crate::objects::LocalDirStore;
    use crate::settings::Settings;
    use crate::store::Store;
    use crate::tokens::{Keyring, TaskClaims};

    pub struct Parts {
        pub store: Store,
        pub keys: Keyring,
        pub objects: LocalDirStore,
        pub settings: Arc<Settings>,
        _dir: std::path::PathBuf,
    }

    impl Parts {
        pub fn new() -> Parts {
            let settings = Arc::new(Settings::default());
            // Port 9 (discard): nothing answers; the pool is lazy.
            let pool = sqlx::postgres::PgPoolOptions::new()
                .acquire_timeout(std::time::Duration::from_millis(200))
                .connect_lazy("postgres://nobody@127.0.0.1:9/none")
                .expect("a lazy pool");
            let dir = std::env::temp_dir().join(format!("services-test-{}", uuid::Uuid::new_v4()));
            Parts {
                store: Store::new(pool, settings.clone()),
                keys: Keyring::generate("test", 0),
                objects: LocalDirStore::new(&dir, "http://127.0.0.1:1", vec![7; 32]).unwrap(),
                settings,
                _dir: dir,
            }
        }

        pub fn ctx(&self) -> Ctx<'_> {
            Ctx {
                store: &self.store,
                keys: &self.keys,
                objects: &self.objects,
                settings: &self.settings,
            }
        }
    }

    impl Drop for Parts {
        fn drop(&mut self) {
            std::fs::remove_dir_all(&self._dir).ok();
        }
    }

    /// A task token's claims for attempt 1 of a task writing `out` and
    /// reading `input`, expiring in `secs` seconds.
    pub fn claims(secs: i64) -> TaskClaims {
        let (task, job, org) = (
            uuid::Uuid::new_v4(),
            uuid::Uuid::new_v4(),
            uuid::Uuid::new_v4(),
        );
        let now = chrono::Utc::now().timestamp();
        TaskClaims {
            iss: "test".into(),
            aud: "task".into(),
            sub: task,
            job,
            org,
            att: 1,
            datasets: vec!["out".into()],
            reads: vec!["input".into()],
            prefixes: vec![format!("orgs/{org}/jobs/{job}/tasks/{task}/attempts/1/")],
            iat: now,
            exp: now + secs,
            jti: uuid::Uuid::new_v4(),
        }
    }
}
