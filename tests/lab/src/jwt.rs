//! RS256 JSON Web Tokens for the Azure doubles: signing (the Entra double issues access tokens)
//! and verification against a JWKS (the apiserver's service-account keys, the Entra double's own).

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use ring::rand::SystemRandom;
use ring::signature::{RSA_PKCS1_2048_8192_SHA256, RSA_PKCS1_SHA256, RsaKeyPair, RsaPublicKeyComponents};
use serde_json::{Value, json};

/// Seconds since the Unix epoch.
pub fn now_secs() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or_default()
}

/// An RSA signing key with a key id, published as a JWK.
pub struct SigningKey {
    kid: String,
    pair: RsaKeyPair,
    rng: SystemRandom,
}

impl SigningKey {
    /// Generates a 2048-bit key (through `openssl`, which ring cannot replace for RSA generation).
    pub fn generate(dir: &Path, kid: &str) -> Result<Self> {
        let (key, _) = crate::pki::rsa_key_pair(dir, kid)?;
        Self::from_file(&key, kid)
    }

    /// Loads a PKCS#8 PEM RSA key (the apiserver's service-account key, say) under `kid`.
    pub fn from_file(path: &Path, kid: &str) -> Result<Self> {
        let pem = std::fs::read_to_string(path)?;
        let der = pem_body(&pem).context("reading the RSA key PEM")?;
        let pair = RsaKeyPair::from_pkcs8(&der).map_err(|e| anyhow!("RSA key rejected: {e}"))?;
        Ok(Self { kid: kid.to_string(), pair, rng: SystemRandom::new() })
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// Signs `claims` as a compact RS256 JWT.
    pub fn sign(&self, claims: &Value) -> String {
        let header = json!({"alg": "RS256", "typ": "JWT", "kid": self.kid});
        let input = format!("{}.{}", B64.encode(header.to_string()), B64.encode(claims.to_string()));
        let mut signature = vec![0; self.pair.public().modulus_len()];
        self.pair.sign(&RSA_PKCS1_SHA256, &self.rng, input.as_bytes(), &mut signature).expect("RSA signing cannot fail with a valid key");
        format!("{input}.{}", B64.encode(signature))
    }

    /// The public key as a JWK (`kty`, `kid`, `use`, `alg`, `n`, `e`).
    pub fn jwk(&self) -> Value {
        let public = self.pair.public();
        let components: RsaPublicKeyComponents<Vec<u8>> = public.into();
        json!({"kty": "RSA", "use": "sig", "alg": "RS256", "kid": self.kid, "n": B64.encode(&components.n), "e": B64.encode(&components.e)})
    }

    /// A JWKS document holding this key.
    pub fn jwks(&self) -> Value {
        json!({"keys": [self.jwk()]})
    }
}

fn pem_body(pem: &str) -> Option<Vec<u8>> {
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    base64::engine::general_purpose::STANDARD.decode(body).ok()
}

/// A token split into its parts, not yet trusted.
#[derive(Debug)]
pub struct Unverified {
    pub header: Value,
    pub claims: Value,
    signing_input: String,
    signature: Vec<u8>,
}

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwtError {
    Malformed(String),
    UnknownKey(String),
    BadSignature,
}

impl std::fmt::Display for JwtError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            JwtError::Malformed(why) => write!(f, "malformed token: {why}"),
            JwtError::UnknownKey(kid) => write!(f, "no signing key {kid} in the issuer's JWKS"),
            JwtError::BadSignature => f.write_str("signature does not verify"),
        }
    }
}

/// Splits and decodes a compact JWT without checking anything.
pub fn decode(token: &str) -> Result<Unverified, JwtError> {
    let mut parts = token.trim().split('.');
    let (Some(h), Some(c), Some(s), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(JwtError::Malformed("not three dot-separated parts".into()));
    };
    let json_part = |part: &str, what: &str| -> Result<Value, JwtError> {
        let bytes = B64.decode(part).map_err(|_| JwtError::Malformed(format!("{what} is not base64url")))?;
        serde_json::from_slice(&bytes).map_err(|_| JwtError::Malformed(format!("{what} is not JSON")))
    };
    Ok(Unverified {
        header: json_part(h, "header")?,
        claims: json_part(c, "claims")?,
        signing_input: format!("{h}.{c}"),
        signature: B64.decode(s).map_err(|_| JwtError::Malformed("signature is not base64url".into()))?,
    })
}

impl Unverified {
    /// Verifies the RS256 signature with the key of the header's `kid` in `jwks`.
    pub fn verify(self, jwks: &Value) -> Result<Value, JwtError> {
        if self.header["alg"] != "RS256" {
            return Err(JwtError::Malformed(format!("alg {} is not RS256", self.header["alg"])));
        }
        let kid = self.header["kid"].as_str().unwrap_or_default().to_string();
        let keys = jwks["keys"].as_array().cloned().unwrap_or_default();
        let key = keys
            .iter()
            .find(|k| k["kid"].as_str() == Some(kid.as_str()) || (kid.is_empty() && keys.len() == 1))
            .ok_or_else(|| JwtError::UnknownKey(kid.clone()))?;
        let n = B64.decode(key["n"].as_str().unwrap_or_default()).map_err(|_| JwtError::UnknownKey(kid.clone()))?;
        let e = B64.decode(key["e"].as_str().unwrap_or_default()).map_err(|_| JwtError::UnknownKey(kid.clone()))?;
        RsaPublicKeyComponents { n, e }
            .verify(&RSA_PKCS1_2048_8192_SHA256, self.signing_input.as_bytes(), &self.signature)
            .map_err(|_| JwtError::BadSignature)?;
        Ok(self.claims)
    }
}

/// `aud` as a list, whether the claim is a string or an array.
pub fn audiences(claims: &Value) -> Vec<String> {
    match &claims["aud"] {
        Value::String(aud) => vec![aud.clone()],
        Value::Array(list) => list.iter().filter_map(|a| a.as_str().map(str::to_string)).collect(),
        _ => Vec::new(),
    }
}

/// Checks that a verified token is inside its validity window (with `leeway` seconds).
pub fn check_time(claims: &Value, leeway: i64) -> Result<()> {
    let now = now_secs();
    let exp = claims["exp"].as_i64().ok_or_else(|| anyhow!("no exp claim"))?;
    if now > exp + leeway {
        bail!("expired at {exp}, now {now}");
    }
    if let Some(nbf) = claims["nbf"].as_i64()
        && now + leeway < nbf
    {
        bail!("not valid before {nbf}, now {now}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signs_and_verifies_and_refuses_tampering_and_unknown_keys() {
        let dir = crate::RunDir::new("jwt").unwrap();
        let key = SigningKey::generate(dir.path(), "k1").unwrap();
        let other = SigningKey::generate(dir.path(), "k2").unwrap();
        let token = key.sign(&json!({"sub": "a", "exp": now_secs() + 60}));
        let claims = decode(&token).unwrap().verify(&key.jwks()).unwrap();
        assert_eq!(claims["sub"], "a");
        check_time(&claims, 0).unwrap();

        assert_eq!(decode(&token).unwrap().verify(&other.jwks()).unwrap_err(), JwtError::UnknownKey("k1".into()));
        let forged = format!("{}.{}", token.rsplit_once('.').unwrap().0, B64.encode(vec![0u8; 256]));
        assert_eq!(decode(&forged).unwrap().verify(&key.jwks()).unwrap_err(), JwtError::BadSignature);
        assert!(check_time(&json!({"exp": now_secs() - 10}), 0).is_err());
        assert!(matches!(decode("a.b").unwrap_err(), JwtError::Malformed(_)));
    }
}
