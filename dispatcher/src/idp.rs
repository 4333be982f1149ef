//! Users from an identity provider (ADR 0012). User JWTs signed by the
//! IdP are verified against configured keys (a JWKS file or URL, or one
//! PEM key),
//! each key pinned to one algorithm (RS256, ES256 or EdDSA; never HMAC);
//! `iss` and `aud` must be the configured ones. The token says who the
//! user is (its `sub`, or another configured claim) and nothing else: the
//! user row, org membership and role come only from Postgres.

use std::collections::HashMap;
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, JwkSet, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::Value;

use crate::tokens::TokenError;

struct IdpKey {
    kid: Option<String>,
    alg: Algorithm,
    key: DecodingKey,
}

/// Where the keys come from: fixed, or a JWKS URL fetched again on a
/// period and when a token names a `kid` we do not know (key rotation).
struct JwksUrl {
    url: String,
    http: reqwest::Client,
    /// When the keys were last fetched (or tried), to fetch at most once
    /// per `min_refetch` on unknown kids.
    last: Mutex<Instant>,
    min_refetch: Duration,
}

/// Fewest seconds between two fetches of the JWKS URL caused by unknown
/// kids (a flood of forged kids must not become a flood of fetches).
pub const MIN_REFETCH: Duration = Duration::from_secs(30);

/// The identity provider's verification settings and keys.
pub struct Idp {
    issuer: String,
    audience: String,
    subject_claim: String,
    keys: RwLock<Vec<IdpKey>>,
    source: Option<JwksUrl>,
    leeway_secs: u64,
}

impl std::fmt::Debug for Idp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Idp")
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("subject_claim", &self.subject_claim)
            .field("keys", &self.keys.read().map(|k| k.len()).unwrap_or(0))
            .field("jwks_url", &self.source.as_ref().map(|s| &s.url))
            .finish()
    }
}

/// The algorithms an IdP key may be pinned to.
pub fn parse_alg(s: &str) -> Result<Algorithm, String> {
    match s {
        "RS256" => Ok(Algorithm::RS256),
        "ES256" => Ok(Algorithm::ES256),
        "EdDSA" => Ok(Algorithm::EdDSA),
        other => Err(format!(
            "IdP key algorithm {other:?} is not accepted (RS256, ES256 or EdDSA)"
        )),
    }
}

/// A JWK's algorithm: its `alg` if it names one we accept, else the one
/// its key type implies. Symmetric keys are refused.
fn jwk_alg(jwk: &Jwk) -> Result<Algorithm, String> {
    if let Some(alg) = jwk.common.key_algorithm {
        return match alg {
            KeyAlgorithm::RS256 => Ok(Algorithm::RS256),
            KeyAlgorithm::ES256 => Ok(Algorithm::ES256),
            KeyAlgorithm::EdDSA => Ok(Algorithm::EdDSA),
            other => Err(format!("JWK algorithm {other:?} is not accepted")),
        };
    }
    match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => Ok(Algorithm::RS256),
        AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P256 => {
            Ok(Algorithm::ES256)
        }
        AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => {
            Ok(Algorithm::EdDSA)
        }
        AlgorithmParameters::OctetKey(_) => Err("symmetric (oct) keys are not accepted".into()),
        _ => Err("key type or curve is not accepted (RSA, EC P-256, OKP Ed25519)".into()),
    }
}

impl Idp {
    /// Keys from a JWKS document (`{"keys": [...]}`).
    pub fn from_jwks(
        issuer: &str,
        audience: &str,
        subject_claim: &str,
        jwks: &str,
        leeway_secs: u64,
    ) -> Result<Idp, String> {
        Self::new(
            issuer,
            audience,
            subject_claim,
            parse_jwks(jwks)?,
            None,
            leeway_secs,
        )
    }

    /// Keys from a JWKS URL, fetched now (the dispatcher does not start
    /// without them), again by `refresh_every`, and when a token names an
    /// unknown `kid` (at most once per `MIN_REFETCH`).
    pub async fn from_jwks_url(
        issuer: &str,
        audience: &str,
        subject_claim: &str,
        url: &str,
        leeway_secs: u64,
    ) -> Result<Idp, String> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| format!("JWKS client: {e}"))?;
        let keys = fetch(&http, url).await?;
        Self::new(
            issuer,
            audience,
            subject_claim,
            keys,
            Some(JwksUrl {
                url: url.to_owned(),
                http,
                last: Mutex::new(Instant::now()),
                min_refetch: MIN_REFETCH,
            }),
            leeway_secs,
        )
    }

    /// Sets the least time between fetches on unknown kids (tests of
    /// rotation set it to zero).
    pub fn with_min_refetch(mut self, d: Duration) -> Self {
        if let Some(src) = &mut self.source {
            src.min_refetch = d;
        }
        self
    }

    /// Fetches the JWKS URL again and replaces the keys; a failed fetch
    /// keeps the keys there were.
    pub async fn refresh(&self) -> Result<(), String> {
        let Some(src) = &self.source else {
            return Ok(());
        };
        *src.last.lock().expect("jwks clock") = Instant::now();
        let keys = fetch(&src.http, &src.url).await?;
        *self.keys.write().expect("jwks keys") = keys;
        Ok(())
    }

    /// Refreshes the keys every `every` until `shutdown` (JWKS URL only).
    pub async fn refresh_periodically(
        self: std::sync::Arc<Self>,
        every: Duration,
        shutdown: tokio_util::sync::CancellationToken,
    ) {
        if self.source.is_none() {
            return;
        }
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(every) => {
                    if let Err(e) = self.refresh().await {
                        tracing::warn!(error = %e, "refreshing the IdP's JWKS failed; keeping the keys there were");
                    }
                }
            }
        }
    }

    /// One public key in PEM, pinned to `alg`, with an optional `kid`.
    pub fn from_pem(
        issuer: &str,
        audience: &str,
        subject_claim: &str,
        pem: &str,
        alg: Algorithm,
        kid: Option<String>,
        leeway_secs: u64,
    ) -> Result<Idp, String> {
        let key = match alg {
            Algorithm::RS256 => DecodingKey::from_rsa_pem(pem.as_bytes()),
            Algorithm::ES256 => DecodingKey::from_ec_pem(pem.as_bytes()),
            Algorithm::EdDSA => DecodingKey::from_ed_pem(pem.as_bytes()),
            other => return Err(format!("algorithm {other:?} is not accepted")),
        }
        .map_err(|e| format!("IdP key: {e}"))?;
        Self::new(
            issuer,
            audience,
            subject_claim,
            vec![IdpKey { kid, alg, key }],
            None,
            leeway_secs,
        )
    }

    fn new(
        issuer: &str,
        audience: &str,
        subject_claim: &str,
        keys: Vec<IdpKey>,
        source: Option<JwksUrl>,
        leeway_secs: u64,
    ) -> Result<Idp, String> {
        if issuer.is_empty() || audience.is_empty() || subject_claim.is_empty() {
            return Err("the IdP issuer, audience and subject claim must not be empty".into());
        }
        Ok(Idp {
            issuer: issuer.to_owned(),
            audience: audience.to_owned(),
            subject_claim: subject_claim.to_owned(),
            keys: RwLock::new(keys),
            source,
            leeway_secs,
        })
    }

    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// Verifies an IdP token: the key named by `kid` (or the only key),
    /// its pinned algorithm, signature, `exp`, `iss` and `aud`. The user's
    /// subject (the configured claim, a non-empty string) and, when the
    /// token says the IdP verified it (`email_verified: true`), its `email`
    /// (used once, to bind a first sign-in to its invitation). An unknown `kid`
    /// makes a URL-sourced key set fetch again (rotation), at most once per
    /// `MIN_REFETCH`.
    pub async fn verify(&self, token: &str) -> Result<IdpIdentity, TokenError> {
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| TokenError::Malformed(e.to_string()))?;
        if let (Some(kid), Some(src)) = (&header.kid, &self.source) {
            let known = self
                .keys
                .read()
                .expect("jwks keys")
                .iter()
                .any(|k| k.kid.as_deref() == Some(kid.as_str()));
            let due = src.last.lock().expect("jwks clock").elapsed() >= src.min_refetch;
            if !known && due {
                if let Err(e) = self.refresh().await {
                    tracing::warn!(error = %e, "fetching the IdP's JWKS for an unknown kid failed");
                }
            }
        }
        let keys = self.keys.read().expect("jwks keys");
        let key = match &header.kid {
            Some(kid) => keys
                .iter()
                .find(|k| k.kid.as_deref() == Some(kid.as_str()))
                .ok_or_else(|| TokenError::UnknownKid(kid.clone()))?,
            None if keys.len() == 1 => &keys[0],
            None => return Err(TokenError::MissingKid),
        };
        // The algorithm is the key's, never the token's choice.
        if header.alg != key.alg {
            return Err(TokenError::Invalid(format!(
                "algorithm {:?} does not match the key's {:?}",
                header.alg, key.alg
            )));
        }
        let mut validation = Validation::new(key.alg);
        validation.set_audience(&[self.audience.as_str()]);
        validation.set_issuer(&[self.issuer.as_str()]);
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        validation.leeway = self.leeway_secs;
        let data = jsonwebtoken::decode::<HashMap<String, Value>>(token, &key.key, &validation)
            .map_err(|e| TokenError::Invalid(e.to_string()))?;
        let subject = match data.claims.get(&self.subject_claim) {
            Some(Value::String(s)) if !s.is_empty() && s.len() <= 512 => s.clone(),
            _ => {
                return Err(TokenError::Invalid(format!(
                    "claim {:?} is missing or not a string",
                    self.subject_claim
                )))
            }
        };
        // Only a boolean `true` counts: an IdP that does not say it checked
        // the address gives no e-mail to bind by.
        let verified_email = match (data.claims.get("email"), data.claims.get("email_verified")) {
            (Some(Value::String(e)), Some(Value::Bool(true))) if e.len() <= 320 => Some(e.clone()),
            _ => None,
        };
        Ok(IdpIdentity {
            subject,
            verified_email,
        })
    }
}

/// Who a verified IdP token names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdpIdentity {
    /// The configured subject claim.
    pub subject: String,
    /// The token's `email`, when its `email_verified` is `true`.
    pub verified_email: Option<String>,
}

fn parse_jwks(jwks: &str) -> Result<Vec<IdpKey>, String> {
    let set: JwkSet = serde_json::from_str(jwks).map_err(|e| format!("JWKS: {e}"))?;
    if set.keys.is_empty() {
        return Err("JWKS holds no key".into());
    }
    set.keys
        .iter()
        .enumerate()
        .map(|(i, jwk)| {
            let alg = jwk_alg(jwk).map_err(|e| format!("JWKS key {i}: {e}"))?;
            let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("JWKS key {i}: {e}"))?;
            Ok(IdpKey {
                kid: jwk.common.key_id.clone(),
                alg,
                key,
            })
        })
        .collect()
}

async fn fetch(http: &reqwest::Client, url: &str) -> Result<Vec<IdpKey>, String> {
    let resp = http
        .get(url)
        .send()
        .await
        .map_err(|e| format!("fetching the JWKS {url}: {e}"))?;
    if !resp.status().is_success() {
        return Err(format!("fetching the JWKS {url}: {}", resp.status()));
    }
    let body = resp
        .text()
        .await
        .map_err(|e| format!("reading the JWKS {url}: {e}"))?;
    parse_jwks(&body)
}
