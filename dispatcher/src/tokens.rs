//! Token service: signs and verifies the three kinds of token (ADR 0002).
//!
//! * **task** capability tokens, one per attempt, minted at claim and on
//!   every heartbeat;
//! * **worker** credentials, held by the platform worker wrapper;
//! * **user** tokens, for the jobs API.
//!
//! All are EdDSA (Ed25519) JWTs with a `kid`. The algorithm is pinned here
//! and never read from the token. Each kind has its own audience *and* its
//! own `typ` header, and verification demands both, so no token of one kind
//! is accepted where another is expected.

use std::collections::BTreeMap;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use chrono::{DateTime, TimeZone, Utc};
use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey};
use ed25519_dalek::{SigningKey, VerifyingKey};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// The only signature algorithm accepted or produced.
pub const ALGORITHM: Algorithm = Algorithm::EdDSA;

/// The three token kinds. Audience and `typ` differ for each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    Task,
    Worker,
    User,
}

impl TokenKind {
    pub fn audience(self) -> &'static str {
        match self {
            TokenKind::Task => "dispatcher:task",
            TokenKind::Worker => "dispatcher:worker",
            TokenKind::User => "dispatcher:user",
        }
    }

    pub fn typ(self) -> &'static str {
        match self {
            TokenKind::Task => "task+jwt",
            TokenKind::Worker => "worker+jwt",
            TokenKind::User => "user+jwt",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("token is malformed: {0}")]
    Malformed(String),
    #[error("token has no `kid` header")]
    MissingKid,
    #[error("token is signed with an unknown key `{0}`")]
    UnknownKid(String),
    #[error("token is not a {expected} token")]
    WrongType { expected: &'static str },
    #[error("token is invalid: {0}")]
    Invalid(String),
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read signing key: {0}")]
    SigningKey(String),
    #[error("cannot read verification key: {0}")]
    VerifyingKey(String),
}

/// Claims of a per-attempt capability token.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TaskClaims {
    pub iss: String,
    pub aud: String,
    /// The task id.
    pub sub: Uuid,
    pub job: Uuid,
    pub org: Uuid,
    /// The attempt this token speaks for.
    pub att: u32,
    /// Datasets the attempt may publish to and stage (its task's `outputs`).
    pub datasets: Vec<String>,
    /// Datasets the attempt may read (its task's `reads`).
    #[serde(default)]
    pub reads: Vec<String>,
    /// Object-store prefixes the attempt may write under.
    pub prefixes: Vec<String>,
    pub iat: i64,
    pub exp: i64,
    pub jti: Uuid,
}

/// Claims of a worker credential.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WorkerClaims {
    pub iss: String,
    pub aud: String,
    /// The worker (or worker pool) identity.
    pub sub: String,
    pub iat: i64,
    pub exp: i64,
    pub jti: Uuid,
}

/// Claims of a user token. `org` names the org the caller acts in; the
/// membership and role are checked in Postgres on every call.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct UserClaims {
    pub iss: String,
    pub aud: String,
    /// The user id.
    pub sub: Uuid,
    pub org: Uuid,
    pub iat: i64,
    pub exp: i64,
    pub jti: Uuid,
}

/// What a task token is minted for.
#[derive(Debug, Clone)]
pub struct TaskScope {
    pub task_id: Uuid,
    pub job_id: Uuid,
    pub org_id: Uuid,
    pub attempt: u32,
    pub datasets: Vec<String>,
    pub reads: Vec<String>,
}

impl TaskScope {
    /// The object prefix owned by this attempt alone. Staged outputs and
    /// buffer batches live under it, so a fenced attempt's objects are never
    /// confused with the current attempt's.
    pub fn attempt_prefix(&self) -> String {
        format!(
            "orgs/{}/jobs/{}/tasks/{}/attempts/{}/",
            self.org_id, self.job_id, self.task_id, self.attempt
        )
    }
}

struct VerifyingEntry {
    key: DecodingKey,
    public: [u8; 32],
}

/// The signing key and every key accepted for verification (the signing
/// key's own public half plus any retired or upcoming keys, for rotation).
pub struct Keyring {
    issuer: String,
    leeway_secs: u64,
    signing_kid: String,
    signing: EncodingKey,
    verifying: BTreeMap<String, VerifyingEntry>,
    /// HMAC key of the local object store's presigned URLs, derived from
    /// the signing key (so every replica with that key has it).
    presign_secret: [u8; 32],
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyring")
            .field("issuer", &self.issuer)
            .field("signing_kid", &self.signing_kid)
            .field("verifying", &self.verifying.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// The key id: the first 16 characters of the base64url SHA-256 of the raw
/// public key. Stable for a key, distinct across keys.
pub fn key_id(public: &[u8; 32]) -> String {
    let digest = Sha256::digest(public);
    URL_SAFE_NO_PAD.encode(digest)[..16].to_owned()
}

/// A new Ed25519 key as a PKCS#8 PEM private key and an SPKI PEM public key.
pub fn generate_key_pem() -> (String, String) {
    let signing = SigningKey::from_bytes(&rand::random::<[u8; 32]>());
    let private = signing
        .to_pkcs8_pem(Default::default())
        .expect("encoding a fresh Ed25519 key cannot fail")
        .to_string();
    let public = signing
        .verifying_key()
        .to_public_key_pem(Default::default())
        .expect("encoding a fresh Ed25519 public key cannot fail");
    (private, public)
}

impl Keyring {
    /// A keyring from a PKCS#8 PEM signing key and extra SPKI PEM public keys
    /// that are accepted for verification (rotation).
    pub fn from_pem(
        issuer: &str,
        signing_pem: &str,
        extra_public_pems: &[String],
        leeway_secs: u64,
    ) -> Result<Self, KeyError> {
        let signing = SigningKey::from_pkcs8_pem(signing_pem)
            .map_err(|e| KeyError::SigningKey(e.to_string()))?;
        let mut ring = Self::from_signing_key(issuer, &signing, leeway_secs)?;
        for pem in extra_public_pems {
            let public = VerifyingKey::from_public_key_pem(pem)
                .map_err(|e| KeyError::VerifyingKey(e.to_string()))?;
            ring.add_verifying_key(public.to_bytes());
        }
        Ok(ring)
    }

    /// A keyring with a fresh random key (tests and throw-away setups).
    pub fn generate(issuer: &str, leeway_secs: u64) -> Self {
        let signing = SigningKey::from_bytes(&rand::random::<[u8; 32]>());
        Self::from_signing_key(issuer, &signing, leeway_secs)
            .expect("a freshly generated key is valid")
    }

    fn from_signing_key(
        issuer: &str,
        signing: &SigningKey,
        leeway_secs: u64,
    ) -> Result<Self, KeyError> {
        let der = signing
            .to_pkcs8_der()
            .map_err(|e| KeyError::SigningKey(e.to_string()))?;
        let public = signing.verifying_key().to_bytes();
        let mut ring = Keyring {
            issuer: issuer.to_owned(),
            leeway_secs,
            signing_kid: key_id(&public),
            signing: EncodingKey::from_ed_der(der.as_bytes()),
            verifying: BTreeMap::new(),
            presign_secret: {
                use hmac::{Hmac, Mac};
                let mut mac = Hmac::<Sha256>::new_from_slice(&signing.to_bytes())
                    .expect("HMAC takes any key length");
                mac.update(b"dispatcher/local-presigned-urls/v1");
                mac.finalize().into_bytes().into()
            },
        };
        ring.add_verifying_key(public);
        Ok(ring)
    }

    fn add_verifying_key(&mut self, public: [u8; 32]) {
        self.verifying.insert(
            key_id(&public),
            VerifyingEntry {
                key: DecodingKey::from_ed_der(&public),
                public,
            },
        );
    }

    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// The 32-byte secret that signs the local object store's presigned
    /// URLs, derived from the signing key (never the key itself).
    pub fn presign_secret(&self) -> Vec<u8> {
        self.presign_secret.to_vec()
    }

    pub fn signing_kid(&self) -> &str {
        &self.signing_kid
    }

    /// The `kid` of every key this keyring verifies (the signing key's too).
    pub fn verifying_kids(&self) -> Vec<String> {
        self.verifying.keys().cloned().collect()
    }

    /// The signing key's public half as SPKI PEM (what `--verify-key` reads).
    pub fn signing_public_pem(&self) -> String {
        ed25519_dalek::VerifyingKey::from_bytes(&self.signing_public_key())
            .expect("the signing key's own public half is a valid key")
            .to_public_key_pem(Default::default())
            .expect("encoding an Ed25519 public key cannot fail")
    }

    /// The raw public key of the signing key.
    pub fn signing_public_key(&self) -> [u8; 32] {
        self.verifying[&self.signing_kid].public
    }

    /// The JSON Web Key Set published at `/.well-known/jwks.json`.
    pub fn jwks(&self) -> serde_json::Value {
        let keys: Vec<_> = self
            .verifying
            .iter()
            .map(|(kid, entry)| {
                serde_json::json!({
                    "kty": "OKP",
                    "crv": "Ed25519",
                    "alg": "EdDSA",
                    "use": "sig",
                    "kid": kid,
                    "x": URL_SAFE_NO_PAD.encode(entry.public),
                })
            })
            .collect();
        serde_json::json!({ "keys": keys })
    }

    fn sign<C: Serialize>(&self, kind: TokenKind, claims: &C) -> String {
        let mut header = Header::new(ALGORITHM);
        header.typ = Some(kind.typ().to_owned());
        header.kid = Some(self.signing_kid.clone());
        jsonwebtoken::encode(&header, claims, &self.signing)
            .expect("signing with a loaded Ed25519 key cannot fail")
    }

    /// A capability token for one attempt, valid until `expires_at`.
    pub fn mint_task(&self, scope: &TaskScope, expires_at: DateTime<Utc>) -> String {
        let claims = TaskClaims {
            iss: self.issuer.clone(),
            aud: TokenKind::Task.audience().to_owned(),
            sub: scope.task_id,
            job: scope.job_id,
            org: scope.org_id,
            att: scope.attempt,
            datasets: scope.datasets.clone(),
            reads: scope.reads.clone(),
            prefixes: vec![scope.attempt_prefix()],
            iat: Utc::now().timestamp(),
            exp: expires_at.timestamp(),
            jti: Uuid::new_v4(),
        };
        self.sign(TokenKind::Task, &claims)
    }

    pub fn mint_worker(&self, worker_id: &str, expires_at: DateTime<Utc>) -> String {
        let claims = WorkerClaims {
            iss: self.issuer.clone(),
            aud: TokenKind::Worker.audience().to_owned(),
            sub: worker_id.to_owned(),
            iat: Utc::now().timestamp(),
            exp: expires_at.timestamp(),
            jti: Uuid::new_v4(),
        };
        self.sign(TokenKind::Worker, &claims)
    }

    pub fn mint_user(&self, user_id: Uuid, org_id: Uuid, expires_at: DateTime<Utc>) -> String {
        let claims = UserClaims {
            iss: self.issuer.clone(),
            aud: TokenKind::User.audience().to_owned(),
            sub: user_id,
            org: org_id,
            iat: Utc::now().timestamp(),
            exp: expires_at.timestamp(),
            jti: Uuid::new_v4(),
        };
        self.sign(TokenKind::User, &claims)
    }

    /// Verifies signature (with the key named by `kid`, algorithm pinned),
    /// issuer, audience, expiry and `typ` for the expected kind.
    /// Whether `kid` names one of this dispatcher's own keys.
    pub fn knows_kid(&self, kid: &str) -> bool {
        self.verifying.contains_key(kid)
    }

    pub fn verify<C: DeserializeOwned>(
        &self,
        token: &str,
        kind: TokenKind,
    ) -> Result<C, TokenError> {
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| TokenError::Malformed(e.to_string()))?;
        let kid = header.kid.ok_or(TokenError::MissingKid)?;
        let entry = self
            .verifying
            .get(&kid)
            .ok_or_else(|| TokenError::UnknownKid(kid.clone()))?;
        let mut validation = Validation::new(ALGORITHM);
        validation.set_audience(&[kind.audience()]);
        validation.set_issuer(&[self.issuer.as_str()]);
        validation.set_required_spec_claims(&["exp", "iat", "iss", "aud", "sub"]);
        validation.leeway = self.leeway_secs;
        let data = jsonwebtoken::decode::<C>(token, &entry.key, &validation)
            .map_err(|e| TokenError::Invalid(e.to_string()))?;
        // `typ` is only trusted after the signature has been checked.
        if data.header.typ.as_deref() != Some(kind.typ()) {
            return Err(TokenError::WrongType {
                expected: kind.typ(),
            });
        }
        Ok(data.claims)
    }
}

/// Seconds since the epoch to a UTC time (for `exp` answers).
pub fn from_timestamp(secs: i64) -> DateTime<Utc> {
    Utc.timestamp_opt(secs, 0)
        .single()
        .unwrap_or(DateTime::<Utc>::MIN_UTC)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Duration;

    fn scope() -> TaskScope {
        TaskScope {
            task_id: Uuid::new_v4(),
            job_id: Uuid::new_v4(),
            org_id: Uuid::new_v4(),
            attempt: 2,
            datasets: vec!["alert_events".into()],
            reads: vec!["clicks".into()],
        }
    }

    #[test]
    fn task_token_round_trips_with_its_scope() {
        let ring = Keyring::generate("test", 0);
        let s = scope();
        let token = ring.mint_task(&s, Utc::now() + Duration::minutes(5));
        let claims: TaskClaims = ring.verify(&token, TokenKind::Task).unwrap();
        assert_eq!(claims.sub, s.task_id);
        assert_eq!(claims.att, 2);
        assert_eq!(claims.prefixes, vec![s.attempt_prefix()]);
    }

    #[test]
    fn token_kinds_exclude_one_another() {
        let ring = Keyring::generate("test", 0);
        let exp = Utc::now() + Duration::minutes(5);
        let task = ring.mint_task(&scope(), exp);
        let worker = ring.mint_worker("w1", exp);
        let user = ring.mint_user(Uuid::new_v4(), Uuid::new_v4(), exp);
        assert!(ring
            .verify::<WorkerClaims>(&task, TokenKind::Worker)
            .is_err());
        assert!(ring.verify::<UserClaims>(&task, TokenKind::User).is_err());
        assert!(ring.verify::<TaskClaims>(&worker, TokenKind::Task).is_err());
        assert!(ring.verify::<UserClaims>(&worker, TokenKind::User).is_err());
        assert!(ring.verify::<TaskClaims>(&user, TokenKind::Task).is_err());
        assert!(ring
            .verify::<WorkerClaims>(&user, TokenKind::Worker)
            .is_err());
    }

    #[test]
    fn rotation_accepts_old_key_and_publishes_both() {
        let (old_private, old_public) = generate_key_pem();
        let old = Keyring::from_pem("test", &old_private, &[], 0).unwrap();
        let (new_private, _) = generate_key_pem();
        let new = Keyring::from_pem("test", &new_private, &[old_public], 0).unwrap();
        let token = old.mint_worker("w1", Utc::now() + Duration::minutes(5));
        let claims: WorkerClaims = new.verify(&token, TokenKind::Worker).unwrap();
        assert_eq!(claims.sub, "w1");
        assert_eq!(new.jwks()["keys"].as_array().unwrap().len(), 2);
        // ... but the old ring does not know the new key.
        let token = new.mint_worker("w1", Utc::now() + Duration::minutes(5));
        assert!(matches!(
            old.verify::<WorkerClaims>(&token, TokenKind::Worker),
            Err(TokenError::UnknownKid(_))
        ));
    }
}
