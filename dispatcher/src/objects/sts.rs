//! Scoped object credentials for the aws profile (`POST
//! /v1/task/credentials`): short-lived STS credentials from `AssumeRole`
//! with an inline **session policy** that narrows the role to one attempt:
//! `PutObject` under the attempt's own prefix, `GetObject` there and on the
//! committed parts of the datasets in the task's `reads`. The role's own
//! policy must allow at least that on the bucket; the session policy can
//! only narrow it (AWS evaluates the intersection).

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::json;

use super::{ObjectError, S3Config};

/// AWS's bound on an inline session policy (characters of its JSON).
pub const MAX_POLICY_CHARS: usize = 2048;
/// AWS's shortest `AssumeRole` duration.
pub const MIN_DURATION: Duration = Duration::from_secs(900);
/// The longest we ask for (a role's default maximum).
pub const MAX_DURATION: Duration = Duration::from_secs(3600);

/// The session policy of one attempt, as compact JSON; `Err` (with its
/// size) when the readable parts make it larger than AWS accepts. Every
/// statement holds only while `aws:CurrentTime` is before `until` (the
/// attempt's lease end): STS cannot end a session sooner than 15 minutes,
/// so the policy ends its power with the lease instead.
pub fn session_policy(
    bucket: &str,
    prefix: &str,
    readable: &[String],
    until: DateTime<Utc>,
    kms_key: Option<&str>,
) -> Result<String, usize> {
    let own = format!("arn:aws:s3:::{bucket}/{prefix}*");
    let mut gets = vec![own.clone()];
    gets.extend(
        readable
            .iter()
            .map(|k| format!("arn:aws:s3:::{bucket}/{k}")),
    );
    let within = json!({"DateLessThan": {
        "aws:CurrentTime": until.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    }});
    let mut statements = vec![
        json!({"Sid": "WriteOwnPrefix", "Effect": "Allow",
               "Action": ["s3:PutObject", "s3:AbortMultipartUpload"], "Resource": [own],
               "Condition": within}),
        json!({"Sid": "ReadOwnAndReadable", "Effect": "Allow",
               "Action": ["s3:GetObject"], "Resource": gets, "Condition": within}),
    ];
    // SSE-KMS objects: S3 uses the key as the requester, and a session's
    // rights are its role's and its policy's intersection, so the policy
    // names the key, and only through S3 (review of terraform/, ADR 0010).
    if let Some(key) = kms_key {
        statements.push(json!({"Sid": "ObjectKeyThroughS3", "Effect": "Allow",
            "Action": ["kms:GenerateDataKey", "kms:Decrypt"], "Resource": [key],
            "Condition": {"StringLike": {"kms:ViaService": "s3.*.amazonaws.com"}}}));
    }
    let policy = json!({"Version": "2012-10-17", "Statement": statements}).to_string();
    if policy.len() > MAX_POLICY_CHARS {
        Err(policy.len())
    } else {
        Ok(policy)
    }
}

/// Credentials of one session.
#[derive(Clone)]
pub struct SessionCredentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: String,
    pub expires_at: DateTime<Utc>,
}

/// Never prints the secret or the token.
impl std::fmt::Debug for SessionCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionCredentials")
            .field("access_key_id", &self.access_key_id)
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

/// Mints session credentials for one role.
pub struct StsIssuer {
    client: aws_sdk_sts::Client,
    role_arn: String,
    pub bucket: String,
    pub region: String,
    /// The bucket's SSE-KMS key, which each session policy then names.
    pub kms_key_arn: Option<String>,
}

impl std::fmt::Debug for StsIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StsIssuer")
            .field("role_arn", &self.role_arn)
            .field("bucket", &self.bucket)
            .finish_non_exhaustive()
    }
}

impl StsIssuer {
    /// STS in the S3 profile's region and endpoint (an S3/STS-compatible
    /// test server speaks both), assuming `role_arn`.
    pub async fn new(cfg: &S3Config, role_arn: &str) -> Self {
        let shared = crate::aws::sdk_config(
            &cfg.region,
            cfg.endpoint_url.as_deref(),
            cfg.static_credentials.as_ref(),
        )
        .await;
        StsIssuer {
            client: aws_sdk_sts::Client::new(&shared),
            role_arn: role_arn.to_owned(),
            bucket: cfg.bucket.clone(),
            region: cfg.region.clone(),
            kms_key_arn: None,
        }
    }

    /// Names the bucket's SSE-KMS key in every session policy.
    pub fn with_kms_key(mut self, arn: Option<String>) -> Self {
        self.kms_key_arn = arn;
        self
    }

    /// `AssumeRole` with the session policy, for `duration` (clamped to
    /// what AWS accepts).
    pub async fn issue(
        &self,
        session_name: &str,
        policy: &str,
        duration: Duration,
    ) -> Result<SessionCredentials, ObjectError> {
        let secs = duration.clamp(MIN_DURATION, MAX_DURATION).as_secs();
        let out = self
            .client
            .assume_role()
            .role_arn(&self.role_arn)
            .role_session_name(session_name)
            .policy(policy)
            .duration_seconds(i32::try_from(secs).unwrap_or(3600))
            .send()
            .await
            .map_err(|e| ObjectError::Unavailable(crate::aws::sdk_error_line("STS", &e)))?;
        let c = out
            .credentials()
            .ok_or_else(|| ObjectError::Unavailable("STS answered no credentials".into()))?;
        let expires_at =
            DateTime::<Utc>::from_timestamp(c.expiration().secs(), 0).unwrap_or_else(Utc::now);
        Ok(SessionCredentials {
            access_key_id: c.access_key_id().to_owned(),
            secret_access_key: c.secret_access_key().to_owned(),
            session_token: c.session_token().to_owned(),
            expires_at,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_session_policy_names_exactly_the_prefix_and_the_readable_parts_until_the_lease_ends() {
        let until = DateTime::<Utc>::from_timestamp(1_800_000_000, 0).unwrap();
        let p = session_policy(
            "b",
            "orgs/o/jobs/j/tasks/t/attempts/2/",
            &["orgs/o/jobs/x/tasks/y/attempts/1/part.jsonl".into()],
            until,
            None,
        )
        .unwrap();
        let v: serde_json::Value = serde_json::from_str(&p).unwrap();
        assert_eq!(
            v["Statement"][0]["Resource"],
            json!(["arn:aws:s3:::b/orgs/o/jobs/j/tasks/t/attempts/2/*"])
        );
        assert_eq!(
            v["Statement"][0]["Action"],
            json!(["s3:PutObject", "s3:AbortMultipartUpload"])
        );
        assert_eq!(
            v["Statement"][1]["Resource"],
            json!([
                "arn:aws:s3:::b/orgs/o/jobs/j/tasks/t/attempts/2/*",
                "arn:aws:s3:::b/orgs/o/jobs/x/tasks/y/attempts/1/part.jsonl"
            ])
        );
        assert_eq!(v["Statement"][1]["Action"], json!(["s3:GetObject"]));
        assert_eq!(v["Statement"].as_array().unwrap().len(), 2);
        for st in v["Statement"].as_array().unwrap() {
            assert_eq!(
                st["Condition"],
                json!({"DateLessThan": {"aws:CurrentTime": "2027-01-15T08:00:00Z"}})
            );
        }
        let many: Vec<String> = (0..100)
            .map(|i| format!("orgs/o/k/{i}/part.jsonl"))
            .collect();
        assert!(session_policy("b", "p/", &many, until, None).is_err());
        // With the bucket's key: the key alone, through S3 alone.
        let key = "arn:aws:kms:eu-west-1:123456789012:key/k";
        let p = session_policy("b", "p/", &[], until, Some(key)).unwrap();
        let v: serde_json::Value = serde_json::from_str(&p).unwrap();
        assert_eq!(v["Statement"][2]["Resource"], json!([key]));
        assert_eq!(
            v["Statement"][2]["Action"],
            json!(["kms:GenerateDataKey", "kms:Decrypt"])
        );
        assert_eq!(
            v["Statement"][2]["Condition"]["StringLike"]["kms:ViaService"],
            "s3.*.amazonaws.com"
        );
    }
}
