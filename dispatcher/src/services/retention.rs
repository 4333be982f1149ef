//! Retention of dataset objects (`dispatcher admin retention run`): deletes
//! what no version can ever reference, and nothing else.
//!
//! Candidates are the objects under an attempt's prefix
//! (`orgs/{org}/jobs/{job}/tasks/{task}/attempts/{n}/…`: uploads), the
//! verified copies staging made of them (`orgs/{org}/committed/jobs/…`,
//! which versions reference) and manifests (`orgs/{org}/datasets/{name}/manifests/{task}-{n}-{sha}.json`).
//! One is deleted only when
//! * its attempt **ended** (Postgres says when: `attempts.finished_at`)
//!   longer ago than the cutoff, which may not be below the floor
//!   ([`floor`]: the longest lease + token grace + a margin, because a
//!   presigned URL minted just before the attempt ended may still write
//!   for that long), and
//! * no committed version references it (a part in `dataset_parts`, a
//!   manifest in `dataset_versions`), nor any buffer publish.
//!
//! An attempt that is still running, or unknown to Postgres, keeps all its
//! objects. A manifest whose transaction committed is referenced; one whose
//! transaction did not is an orphan and goes.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use uuid::Uuid;

use crate::objects::ObjectStore;
use crate::settings::Settings;
use crate::store::Store;

/// Added to the longest lease and token grace to make the floor.
pub const MARGIN: Duration = Duration::from_secs(3600);

/// The smallest cutoff retention accepts.
pub fn floor(settings: &Settings) -> Duration {
    settings.lease_max + settings.token_grace + MARGIN
}

/// What a run found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    pub scanned: u64,
    /// Objects retention may judge (under an attempt prefix, or manifests).
    pub candidates: u64,
    /// Deleted (or, in a dry run, that would be).
    pub deleted: Vec<String>,
    pub deleted_bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum RetentionError {
    #[error("the cutoff {cutoff:?} is below the floor {floor:?} (longest lease + token grace + {MARGIN:?}): objects it would delete may still be written or committed")]
    BelowFloor { cutoff: Duration, floor: Duration },
    #[error(transparent)]
    Store(#[from] crate::error::StoreError),
    #[error(transparent)]
    Objects(#[from] crate::objects::ObjectError),
}

/// The attempt that owns `key`, if retention may judge it.
pub fn owner(key: &str) -> Option<(Uuid, u32)> {
    let parts: Vec<&str> = key.split('/').collect();
    match parts.as_slice() {
        ["orgs", _, "jobs", _, "tasks", task, "attempts", n, _, ..]
        | ["orgs", _, "committed", "jobs", _, "tasks", task, "attempts", n, _, ..] => {
            Some((task.parse().ok()?, n.parse().ok()?))
        }
        ["orgs", _, "datasets", _, "manifests", file] => {
            let stem = file.strip_suffix(".json")?;
            // {task uuid (36 chars)}-{attempt}-{sha}
            let (task, rest) = (stem.get(..36)?, stem.get(37..)?);
            let (n, _) = rest.split_once('-')?;
            Some((task.parse().ok()?, n.parse().ok()?))
        }
        _ => None,
    }
}

/// Runs retention over every object under `orgs/`, calling `progress` with
/// a line now and then. Refuses a cutoff below [`floor`].
pub async fn run(
    store: &Store,
    objects: &dyn ObjectStore,
    cutoff: Duration,
    dry_run: bool,
    mut progress: impl FnMut(&str),
) -> Result<Report, RetentionError> {
    let floor = floor(store.settings());
    if cutoff < floor {
        return Err(RetentionError::BelowFloor { cutoff, floor });
    }
    let mut report = Report::default();
    let listed = objects.list("orgs/").await?;
    report.scanned = listed.len() as u64;
    let candidates: Vec<_> = listed
        .into_iter()
        .filter_map(|m| owner(&m.key).map(|o| (m, o)))
        .collect();
    report.candidates = candidates.len() as u64;
    progress(&format!(
        "scanned {} objects; {} belong to attempts",
        report.scanned, report.candidates
    ));
    const CHUNK: usize = 1_000;
    for chunk in candidates.chunks(CHUNK) {
        let keys: Vec<String> = chunk.iter().map(|(m, _)| m.key.clone()).collect();
        let owners: Vec<(Uuid, u32)> = chunk.iter().map(|(_, o)| *o).collect();
        let referenced: HashSet<String> = store.referenced_objects(&keys).await?;
        let ended: HashMap<(Uuid, u32), bool> =
            store.attempts_ended_before(&owners, cutoff).await?;
        for (meta, owner) in chunk {
            if referenced.contains(&meta.key) || !ended.get(owner).copied().unwrap_or(false) {
                continue;
            }
            if !dry_run {
                objects.delete(&meta.key).await?;
            }
            report.deleted_bytes += meta.size;
            report.deleted.push(meta.key.clone());
        }
        progress(&format!(
            "{} {} objects ({} bytes) so far",
            if dry_run { "would delete" } else { "deleted" },
            report.deleted.len(),
            report.deleted_bytes
        ));
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owners_are_read_from_attempt_prefixes_and_manifest_names() {
        let t = Uuid::now_v7();
        assert_eq!(
            owner(&format!("orgs/o/jobs/j/tasks/{t}/attempts/3/part-0.jsonl")),
            Some((t, 3))
        );
        assert_eq!(
            owner(&format!(
                "orgs/o/committed/jobs/j/tasks/{t}/attempts/3/part-0.jsonl"
            )),
            Some((t, 3))
        );
        assert_eq!(
            owner(&format!(
                "orgs/o/datasets/clicks/manifests/{t}-2-{}.json",
                "a".repeat(64)
            )),
            Some((t, 2))
        );
        for other in [
            "orgs/o/datasets/clicks/part.jsonl",
            "elsewhere/x",
            &format!("orgs/o/jobs/j/tasks/{t}/attempts/x/p"),
            &format!("orgs/o/jobs/j/tasks/{t}/attempts/1"),
        ] {
            assert_eq!(owner(other), None, "{other}");
        }
    }
}
