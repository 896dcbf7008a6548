//! Meta's webhook signature: `X-Hub-Signature-256: sha256=<hex>`, the lowercase hex
//! HMAC-SHA256 of the raw body keyed with the app secret, compared in constant time.

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

pub const SIGNATURE_HEADER: &str = "X-Hub-Signature-256";
const PREFIX: &str = "sha256=";

type HmacSha256 = Hmac<Sha256>;

/// Why a signature was refused; `Display` goes into the 401/403 body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("missing X-Hub-Signature-256 header")]
    Missing,
    #[error("X-Hub-Signature-256 must be sha256=<64 hex digits>")]
    Malformed,
    #[error("X-Hub-Signature-256 does not match the body (is app_secret the app's secret?)")]
    Mismatch,
}

fn mac(secret: &[u8], body: &[u8]) -> HmacSha256 {
    // HMAC takes keys of any length; new_from_slice cannot fail for it.
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(body);
    mac
}

/// The header value Meta would send for `body`.
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    format!(
        "{PREFIX}{}",
        hex::encode(mac(secret, body).finalize().into_bytes())
    )
}

/// The tag of a header value, decoded; checked before any secret is tried.
pub fn decode(header: Option<&str>) -> Result<Vec<u8>, SignatureError> {
    let header = header.ok_or(SignatureError::Missing)?.trim();
    let hex_tag = header
        .strip_prefix(PREFIX)
        .filter(|h| h.len() == 64)
        .ok_or(SignatureError::Malformed)?;
    hex::decode(hex_tag).map_err(|_| SignatureError::Malformed)
}

/// Whether `tag` is the body's HMAC under `secret`, in constant time.
pub fn matches(secret: &[u8], tag: &[u8], body: &[u8]) -> bool {
    mac(secret, body).verify_slice(tag).is_ok()
}

/// Whether two secrets are equal, in time independent of where they differ: both are
/// MACed under a fixed key and the tags compared in constant time.
pub fn same_secret(given: &[u8], expected: &[u8]) -> bool {
    const KEY: &[u8] = b"patchbay-whatsapp-verify-token";
    let tag = mac(KEY, given).finalize().into_bytes();
    matches(KEY, &tag, expected)
}
