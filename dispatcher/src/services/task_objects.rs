//! The objects a task may touch (contract: "Objects a task may touch"):
//! presigned URLs, and on the aws profile STS credentials, each scoped to
//! the attempt's own prefix for writes and to committed parts of the
//! datasets it may read, and living no longer than its token.

use chrono::Utc;
use dispatcher_wire as wire;

use super::{fence, Ctx};
use crate::domain::Invalid;
use crate::error::StoreError;
use crate::objects::sts::{self, StsIssuer};
use crate::tokens::TaskClaims;

/// The attempt's own prefix, which every task token names.
fn own_prefix(claims: &TaskClaims) -> Result<String, StoreError> {
    claims
        .prefixes
        .first()
        .cloned()
        .ok_or_else(|| StoreError::Forbidden("the token names no object prefix".into()))
}

/// How long a URL minted now may live: the configured TTL, cut to what is
/// left of the token.
pub fn url_ttl(
    ctx: Ctx<'_>,
    claims: &TaskClaims,
    now: chrono::DateTime<Utc>,
) -> std::time::Duration {
    let token_left = (crate::tokens::from_timestamp(claims.exp) - now)
        .to_std()
        .unwrap_or_default();
    ctx.settings.object_url_ttl.min(token_left)
}

/// Presigned URLs: `PUT` under the attempt's own prefix only (keys given
/// relative to it); `GET` of parts of committed versions of the datasets
/// the task may read, or under its own prefix. One key out of scope
/// refuses the whole call and mints nothing. Fenced.
pub async fn urls(
    ctx: Ctx<'_>,
    claims: &TaskClaims,
    req: &wire::ObjectsRequest,
) -> Result<Vec<wire::ObjectUrl>, StoreError> {
    let max = ctx.settings.max_object_keys_per_call;
    if req.keys.is_empty() || req.keys.len() > max {
        return Err(StoreError::Invalid(Invalid::new(
            "keys",
            format!("give 1 to {max} keys"),
        )));
    }
    let prefix = own_prefix(claims)?;
    let mut keys = Vec::with_capacity(req.keys.len());
    for (i, key) in req.keys.iter().enumerate() {
        let absolute = match req.method {
            wire::ObjectMethod::Put => {
                key_rule(i, key)?;
                format!("{prefix}{key}")
            }
            wire::ObjectMethod::Get => key.clone(),
        };
        key_rule(i, &absolute)?;
        keys.push(absolute);
    }
    ctx.store.check_fence(fence(claims)).await?;
    if req.method == wire::ObjectMethod::Get {
        let others: Vec<String> = keys
            .iter()
            .filter(|k| !k.starts_with(&prefix))
            .cloned()
            .collect();
        let readable = ctx
            .store
            .readable_parts(claims.org, &claims.reads, &others)
            .await?;
        if let Some(k) = others.iter().find(|k| !readable.contains(*k)) {
            return Err(StoreError::Forbidden(format!(
                "key {k:?} is neither under this attempt's prefix nor a part of a committed \
                 version of a dataset the task may read; no URL was minted"
            )));
        }
    }
    let now = Utc::now();
    let ttl = url_ttl(ctx, claims, now);
    let expires_at = now + chrono::Duration::from_std(ttl).unwrap_or_default();
    let mut urls = Vec::with_capacity(keys.len());
    for key in keys {
        let url = match req.method {
            wire::ObjectMethod::Put => ctx.objects.presign_put(&key, ttl).await,
            wire::ObjectMethod::Get => ctx.objects.presign_get(&key, ttl).await,
        }
        .map_err(|e| {
            tracing::warn!(error = %e, "presigning failed");
            StoreError::Retry("the object store could not presign a URL".into())
        })?;
        urls.push(wire::ObjectUrl {
            key,
            url,
            expires_at,
        });
    }
    Ok(urls)
}

fn key_rule(i: usize, key: &str) -> Result<(), StoreError> {
    crate::domain::object_key_rule(key)
        .map_err(|why| StoreError::Invalid(Invalid::new(format!("keys[{i}]"), why)))
}

/// STS credentials whose session policy allows `PutObject` under the
/// attempt's prefix and `GetObject` there and on the committed parts of
/// the task's `reads`, for runners that write many parts. Fenced; they
/// live as long as the token (at least the 15 minutes STS requires, at
/// most an hour) and are answered as expiring no later than the lease.
pub async fn credentials(
    ctx: Ctx<'_>,
    sts: &StsIssuer,
    claims: &TaskClaims,
) -> Result<wire::TaskCredentialsResponse, StoreError> {
    let lease_end = ctx.store.lease_end(fence(claims)).await?;
    let prefix = own_prefix(claims)?;
    let readable = ctx
        .store
        .committed_part_keys(claims.org, &claims.reads)
        .await?;
    let policy = sts::session_policy(
        &sts.bucket,
        &prefix,
        &readable,
        lease_end,
        sts.kms_key_arn.as_deref(),
    )
    .map_err(|len| {
        StoreError::Limit(format!(
            "a session policy for the {} readable parts would be {len} characters; \
             STS takes {}: read them through POST /v1/task/objects",
            readable.len(),
            sts::MAX_POLICY_CHARS
        ))
    })?;
    let left = (crate::tokens::from_timestamp(claims.exp) - Utc::now())
        .to_std()
        .unwrap_or_default();
    let session = format!("task-{}-{}", claims.sub.simple(), claims.att);
    let creds = sts.issue(&session, &policy, left).await.map_err(|e| {
        tracing::warn!(error = %e, "STS refused");
        StoreError::Retry("STS did not answer".into())
    })?;
    Ok(wire::TaskCredentialsResponse {
        access_key_id: creds.access_key_id,
        secret_access_key: creds.secret_access_key,
        session_token: creds.session_token,
        expires_at: creds.expires_at.min(lease_end),
        region: sts.region.clone(),
        bucket: sts.bucket.clone(),
        prefix,
        policy: serde_json::from_str(&policy).unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::services::testing::{claims, Parts};

    #[tokio::test]
    async fn a_url_lives_no_longer_than_the_token_that_asked_for_it() {
        let parts = Parts::new();
        let now = Utc::now();
        let short = claims(30);
        let ttl = url_ttl(parts.ctx(), &short, now);
        assert!(ttl <= std::time::Duration::from_secs(30), "{ttl:?}");
        assert!(ttl >= std::time::Duration::from_secs(28), "{ttl:?}");
        let long = claims(24 * 3600);
        assert_eq!(
            url_ttl(parts.ctx(), &long, now),
            parts.settings.object_url_ttl
        );
        assert_eq!(
            url_ttl(parts.ctx(), &claims(-5), now),
            std::time::Duration::ZERO
        );
    }

    #[tokio::test]
    async fn urls_refuse_an_empty_call_and_an_escaping_key_before_the_store_is_asked() {
        let parts = Parts::new();
        let c = claims(600);
        let ask = |method, keys: &[&str]| wire::ObjectsRequest {
            method,
            keys: keys.iter().map(|k| k.to_string()).collect(),
        };
        for (req, field) in [
            (ask(wire::ObjectMethod::Put, &[]), "keys"),
            (
                ask(wire::ObjectMethod::Put, &["ok.jsonl", "../x"]),
                "keys[1]",
            ),
            (ask(wire::ObjectMethod::Get, &["/etc/passwd"]), "keys[0]"),
        ] {
            match urls(parts.ctx(), &c, &req).await {
                Err(StoreError::Invalid(e)) => assert_eq!(e.field, field, "{e:?}"),
                other => panic!("{field}: {other:?}"),
            }
        }
    }
}
