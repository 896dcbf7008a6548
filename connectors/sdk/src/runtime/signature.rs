//! HMAC-SHA256 request signatures in the `sha256=<hex>` header form (GitHub's
//! `X-Hub-Signature-256`, Meta's webhooks, patchbay's webhook connector).
//!
//! The signed material is given as parts (`[timestamp, b".", body]`, or just `[body]`),
//! so a scheme that signs more than the body needs no copy of it. `verify` decodes the
//! header and compares through `Mac::verify_slice`, which is constant-time.

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

/// The prefix of the header value.
pub const PREFIX: &str = "sha256=";

type HmacSha256 = Hmac<Sha256>;

/// Why a signature header was refused. `Display` is fit for a 401 body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HmacError {
    #[error("the signature header is missing")]
    Missing,
    #[error("the signature header must be sha256=<64 hex digits>")]
    Malformed,
    #[error("signature does not match")]
    Mismatch,
}

fn mac(secret: &[u8], parts: &[&[u8]]) -> HmacSha256 {
    // HMAC takes a key of any length: this cannot fail.
    let mut mac = <HmacSha256 as KeyInit>::new_from_slice(secret)
        .unwrap_or_else(|_| unreachable!("HMAC accepts keys of any length"));
    for p in parts {
        mac.update(p);
    }
    mac
}

/// `sha256=<lowercase hex of HMAC-SHA256(secret, parts concatenated)>`.
pub fn sign(secret: &[u8], parts: &[&[u8]]) -> String {
    format!(
        "{PREFIX}{}",
        hex::encode(mac(secret, parts).finalize().into_bytes())
    )
}

/// Checks `header` (the `sha256=<hex>` value, surrounding spaces ignored, hex of either
/// case) against HMAC-SHA256(secret, parts), in constant time.
pub fn verify(secret: &[u8], parts: &[&[u8]], header: Option<&str>) -> Result<(), HmacError> {
    let header = header.map(str::trim).ok_or(HmacError::Missing)?;
    let hex_tag = header.strip_prefix(PREFIX).ok_or(HmacError::Malformed)?;
    let tag = hex::decode(hex_tag).map_err(|_| HmacError::Malformed)?;
    if tag.len() != 32 {
        return Err(HmacError::Malformed);
    }
    mac(secret, parts)
        .verify_slice(&tag)
        .map_err(|_| HmacError::Mismatch)
}
