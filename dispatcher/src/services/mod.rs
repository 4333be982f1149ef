//! Services: the operations of each area that handlers and background
//! roles call, over the store and the adapters. A service never imports
//! the HTTP layer or a role (`scripts/check-layers`).

pub mod alerts;
pub mod dlq;
pub mod query;
pub mod retention;
pub mod sink;
