//! Datasets, as an attempt writes them (contract: "Staging and commit"):
//! parts are verified and copied out of the attempt's reach when staged,
//! and a successful completion writes each staged dataset's manifest.

use dispatcher_wire as wire;
use sha2::Digest;

use super::{fence, Ctx};
use crate::domain::{self, Invalid};
use crate::error::StoreError;
use crate::objects::ObjectError;
use crate::rows::{ReasonCode, RowError};
use crate::store::{NewPart, WrittenManifest};
use crate::tokens::TaskClaims;

fn sha256_hex(body: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(body))
}

/// Stages parts of a dataset the task may write: each part must lie under
/// the attempt's prefix, exist with the given size and sha256, and parse
/// line by line against the schema with the given row count (the buffer
/// sink's parser). Any mismatch is `Invalid` naming the part and the first
/// bad line, and nothing is staged. Fenced. Answers how many parts the
/// attempt has staged for the dataset.
pub async fn stage(
    ctx: Ctx<'_>,
    claims: &TaskClaims,
    req: &wire::StageRequest,
) -> Result<(String, u32), StoreError> {
    let settings = ctx.settings;
    let name = domain::dataset_name("dataset", &req.dataset).map_err(StoreError::Invalid)?;
    let invalid = |field: String, why: String| StoreError::Invalid(Invalid::new(field, why));
    let max = settings.max_parts_per_stage;
    if req.parts.is_empty() || req.parts.len() > max {
        return Err(invalid("parts".into(), format!("give 1 to {max} parts")));
    }
    for (i, p) in req.parts.iter().enumerate() {
        domain::object_key_rule(&p.key)
            .map_err(|why| invalid(format!("parts[{i}].key"), why.into()))?;
        if p.sha256.len() != 64 || !p.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(invalid(
                format!("parts[{i}].sha256"),
                "must be 64 hexadecimal characters".into(),
            ));
        }
        if p.bytes > settings.max_part_bytes {
            return Err(invalid(
                format!("parts[{i}].bytes"),
                format!("a part may have at most {} bytes", settings.max_part_bytes),
            ));
        }
    }
    if !claims.datasets.contains(&name) {
        return Err(StoreError::Forbidden(format!(
            "dataset {name:?} is not among the task's outputs"
        )));
    }
    let prefix = claims.prefixes.first().map(String::as_str).unwrap_or("");
    if let Some((i, p)) = req
        .parts
        .iter()
        .enumerate()
        .find(|(_, p)| prefix.is_empty() || !p.key.starts_with(prefix))
    {
        return Err(StoreError::Forbidden(format!(
            "parts[{i}].key {:?} is not under the attempt's prefix {prefix:?}",
            p.key
        )));
    }
    let (dataset_id, mode, columns) = ctx.store.dataset_schema(claims.org, &name).await?;
    if mode == wire::DatasetMode::Stream {
        return Err(invalid(
            "dataset".into(),
            format!("{name:?} is a stream dataset: its rows arrive through buffer-publish"),
        ));
    }
    // A fenced attempt learns it before any part is read.
    ctx.store.check_fence(fence(claims)).await?;
    let mut parts = Vec::with_capacity(req.parts.len());
    for (i, p) in req.parts.iter().enumerate() {
        let field = format!("parts[{i}]");
        let committed = crate::objects::committed_key(claims.org, &p.key);
        verify_part(ctx, &columns, p, &committed)
            .await
            .map_err(|e| match e {
                PartError::Refused(e) => {
                    invalid(field.clone(), format!("{e} (object {:?})", p.key))
                }
                PartError::Rewritten => StoreError::Conflict(format!(
                    "{field}: {:?} was staged before with other bytes; a part is staged once",
                    p.key
                )),
                PartError::Store(e) => {
                    tracing::warn!(error = %e, "reading a staged part failed");
                    StoreError::Retry("the object store is unavailable; nothing was staged".into())
                }
            })?;
        parts.push(NewPart {
            key: committed,
            rows: i64::try_from(p.rows).unwrap_or(i64::MAX),
            bytes: i64::try_from(p.bytes).unwrap_or(i64::MAX),
            sha256: p.sha256.to_ascii_lowercase(),
        });
    }
    let staged = ctx
        .store
        .stage_parts(fence(claims), dataset_id, &parts)
        .await?;
    Ok((name, staged))
}

enum PartError {
    Refused(RowError),
    /// The committed copy exists with other bytes.
    Rewritten,
    Store(ObjectError),
}

fn refused(code: ReasonCode, message: String) -> PartError {
    PartError::Refused(RowError {
        code,
        line: None,
        message,
    })
}

/// Checks one part against what the task says of it and the schema, and
/// writes the bytes it checked to `committed` (create-only): what a version
/// names is exactly what was verified, whatever the task's URL or
/// credentials write to the staged key afterwards (no check-then-use gap).
async fn verify_part(
    ctx: Ctx<'_>,
    columns: &[wire::Column],
    part: &wire::StagedPart,
    committed: &str,
) -> Result<(), PartError> {
    let missing = |_| {
        refused(
            ReasonCode::ObjectMissing,
            "no object at this key (upload it first through a PUT URL)".into(),
        )
    };
    let meta = match ctx.objects.head(&part.key).await {
        Ok(m) => m,
        Err(ObjectError::NotFound(k)) => return Err(missing(k)),
        Err(e) => return Err(PartError::Store(e)),
    };
    if meta.size != part.bytes {
        return Err(refused(
            ReasonCode::ChecksumMismatch,
            format!("the object has {} bytes, not {}", meta.size, part.bytes),
        ));
    }
    let body = match ctx.objects.get(&part.key).await {
        Ok(b) => b,
        Err(ObjectError::NotFound(k)) => return Err(missing(k)),
        Err(e) => return Err(PartError::Store(e)),
    };
    let sum = sha256_hex(&body);
    if !sum.eq_ignore_ascii_case(&part.sha256) {
        return Err(refused(
            ReasonCode::ChecksumMismatch,
            format!("the object's sha256 is {sum}, not {}", part.sha256),
        ));
    }
    let rows = crate::rows::parse_rows(&body, columns, ctx.settings.max_row_bytes, |_| {})
        .map_err(PartError::Refused)?;
    if rows != part.rows {
        return Err(refused(
            ReasonCode::RowCountMismatch,
            format!("the object has {rows} rows, not {}", part.rows),
        ));
    }
    match ctx.objects.put_if_absent(committed, body).await {
        Ok(()) => {}
        Err(ObjectError::AlreadyExists(_)) => {
            // Staged again (a retried call): the same bytes are the same part.
            let kept = ctx.objects.get(committed).await.map_err(PartError::Store)?;
            if !sha256_hex(&kept).eq_ignore_ascii_case(&part.sha256) {
                return Err(PartError::Rewritten);
            }
        }
        Err(e) => return Err(PartError::Store(e)),
    }
    Ok(())
}

/// Writes, create-only, the manifest of every dataset the attempt staged
/// parts for, at an immutable key named by its content: a retried or
/// replayed completion finds its own manifest there (same content, same
/// key) and goes on; nothing is ever overwritten or deleted here. A manifest
/// whose transaction does not commit is an orphan, never a version
/// (retention removes it).
pub async fn write_manifests(
    ctx: Ctx<'_>,
    claims: &TaskClaims,
) -> Result<Vec<WrittenManifest>, StoreError> {
    let staged = ctx.store.staged_datasets(claims.sub, claims.att).await?;
    let mut written = Vec::with_capacity(staged.len());
    for ds in staged {
        let body = serde_json::to_vec(&ds)
            .map_err(|e| StoreError::Internal(format!("encoding a manifest: {e}")))?;
        let key = manifest_key(claims, &ds.dataset, &body);
        let unavailable = |e: ObjectError| {
            tracing::warn!(error = %e, key, "writing a manifest failed");
            StoreError::Retry("the object store is unavailable; nothing was committed".into())
        };
        match ctx.objects.put_if_absent(&key, body.clone()).await {
            Ok(()) => {}
            // Our own earlier write (a lost answer, a retry): the key names
            // the content, so re-read to be sure, never delete.
            Err(ObjectError::AlreadyExists(_)) => {
                let existing = ctx.objects.get(&key).await.map_err(unavailable)?;
                if existing != body {
                    return Err(StoreError::Internal(format!(
                        "manifest key {key} holds other content"
                    )));
                }
            }
            Err(e) => return Err(unavailable(e)),
        }
        let mut parts: Vec<String> = ds.parts.iter().map(|p| p.key.clone()).collect();
        parts.sort();
        written.push(WrittenManifest {
            dataset_id: ds.dataset_id,
            key,
            parts,
        });
    }
    Ok(written)
}

/// A manifest's key: under its dataset, named by attempt and content.
fn manifest_key(claims: &TaskClaims, dataset: &str, body: &[u8]) -> String {
    format!(
        "orgs/{}/datasets/{dataset}/manifests/{}-{}-{}.json",
        claims.org,
        claims.sub,
        claims.att,
        sha256_hex(body)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::services::testing::{claims, Parts};

    fn part(key: &str, sha256: &str, bytes: u64) -> wire::StagedPart {
        wire::StagedPart {
            key: key.into(),
            rows: 1,
            bytes,
            sha256: sha256.into(),
        }
    }

    #[tokio::test]
    async fn staging_refuses_bad_parts_and_datasets_it_may_not_write_before_the_store_is_asked() {
        let parts = Parts::new();
        let c = claims(600);
        let own = c.prefixes[0].clone();
        let good = "a".repeat(64);
        let ask = |dataset: &str, parts: Vec<wire::StagedPart>| wire::StageRequest {
            dataset: dataset.into(),
            parts,
        };
        let too_big = parts.settings.max_part_bytes + 1;
        for (req, want) in [
            (ask("out", vec![]), "invalid parts"),
            (
                ask("out", vec![part(&format!("{own}x"), "zz", 1)]),
                "invalid parts[0].sha256",
            ),
            (
                ask("out", vec![part(&format!("{own}x"), &good, too_big)]),
                "invalid parts[0].bytes",
            ),
            (
                ask("out", vec![part("a//b", &good, 1)]),
                "invalid parts[0].key",
            ),
            (
                ask("other", vec![part(&format!("{own}x"), &good, 1)]),
                "forbidden",
            ),
            (
                ask("out", vec![part("orgs/elsewhere/x", &good, 1)]),
                "forbidden",
            ),
        ] {
            let got = match stage(parts.ctx(), &c, &req).await {
                Err(StoreError::Invalid(e)) => format!("invalid {}", e.field),
                Err(StoreError::Forbidden(_)) => "forbidden".to_owned(),
                other => format!("{other:?}"),
            };
            assert_eq!(got, want, "{req:?}");
        }
    }

    #[test]
    fn a_manifest_key_names_its_dataset_attempt_and_content() {
        let c = claims(600);
        let key = manifest_key(&c, "out", b"{}");
        assert_eq!(
            key,
            format!(
                "orgs/{}/datasets/out/manifests/{}-1-{}.json",
                c.org,
                c.sub,
                sha256_hex(b"{}")
            )
        );
        assert_ne!(
            key,
            manifest_key(&c, "out", b"{ }"),
            "content names the key"
        );
    }
}
