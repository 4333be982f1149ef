//! One integration-test binary (one link step on a 2-core machine).
//! Each test gets its own Postgres database and its own server.

mod access;
mod alerts;
mod batches;
mod bundles;
mod commit;
mod commit_model;
mod completion;
mod dag;
mod datasets;
mod docs;
mod e2e;
mod e2e_datasets;
mod e2e_sink;
mod fencing;
mod identity;
mod idp;
mod input;
mod inspection;
mod isolation;
mod limits;
mod model;
mod objects;
mod orgs;
mod query;
mod races;
mod retention;
mod runners;
mod secrets;
mod services;
mod sink;
mod staging;
mod task_objects;
mod tokens;
mod transport;
mod wakeups;
