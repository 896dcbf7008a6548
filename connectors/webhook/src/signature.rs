//! patchbay's webhook signing scheme, used in both directions: HMAC-SHA256 over
//! `"{timestamp}.{raw body}"` with the channel's secret, sent as
//! `X-Patchbay-Signature: sha256=<lowercase hex>` beside `X-Patchbay-Timestamp: <unix
//! seconds>`. The HMAC and its constant-time check are the SDK's
//! (`runtime::signature`); this file owns the timestamp.
//!
//! The timestamp is inside the signed material so a captured request cannot be replayed
//! with a fresh timestamp; the receiver refuses timestamps further than `max_skew_secs`
//! from its clock (either way, so a clock ahead of ours cannot pre-sign requests).

use patchbay_connector_sdk::runtime::signature::{self, HmacError};

pub const SIGNATURE_HEADER: &str = "X-Patchbay-Signature";
pub const TIMESTAMP_HEADER: &str = "X-Patchbay-Timestamp";

/// Why a request's signature headers were refused; `Display` goes into the 401 body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("missing {TIMESTAMP_HEADER} header")]
    MissingTimestamp,
    #[error("{TIMESTAMP_HEADER} must be unix seconds")]
    BadTimestamp,
    #[error("missing {SIGNATURE_HEADER} header")]
    MissingSignature,
    #[error("{SIGNATURE_HEADER} must be sha256=<64 hex digits>")]
    MalformedSignature,
    #[error("signature does not match")]
    Mismatch,
    #[error(
        "timestamp is {skew_secs} s away from this server's clock (at most {max_skew_secs} s allowed)"
    )]
    Stale { skew_secs: i64, max_skew_secs: u64 },
}

/// The `X-Patchbay-Signature` value for `body` sent at `timestamp`. (A `Result` so
/// callers keep working should signing ever be able to fail; today it cannot.)
pub fn sign(secret: &[u8], timestamp: i64, body: &[u8]) -> Result<String, SignatureError> {
    let ts = timestamp.to_string();
    Ok(signature::sign(secret, &[ts.as_bytes(), b".", body]))
}

/// Checks the two headers against the raw body, in constant time, and the timestamp
/// against `now` (unix seconds). The signature is checked before the clock, so an
/// unauthenticated caller learns nothing about this server's time.
pub fn verify(
    secret: &[u8],
    timestamp: Option<&str>,
    signature: Option<&str>,
    body: &[u8],
    now: i64,
    max_skew_secs: u64,
) -> Result<(), SignatureError> {
    let timestamp = timestamp
        .map(str::trim)
        .ok_or(SignatureError::MissingTimestamp)?;
    let ts: i64 = timestamp
        .parse()
        .map_err(|_| SignatureError::BadTimestamp)?;
    signature::verify(secret, &[timestamp.as_bytes(), b".", body], signature).map_err(
        |e| match e {
            HmacError::Missing => SignatureError::MissingSignature,
            HmacError::Malformed => SignatureError::MalformedSignature,
            HmacError::Mismatch => SignatureError::Mismatch,
        },
    )?;
    let skew_secs = now.saturating_sub(ts).saturating_abs();
    if skew_secs.unsigned_abs() > max_skew_secs {
        return Err(SignatureError::Stale {
            skew_secs,
            max_skew_secs,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &[u8] = b"test-secret";

    #[test]
    fn known_vector() {
        // Computed independently: printf '1700000000.{"a":1}' | openssl dgst -sha256 -hmac test-secret
        let sig = sign(KEY, 1_700_000_000, br#"{"a":1}"#).unwrap();
        assert_eq!(
            sig,
            "sha256=8cb2c3355fca388e9ac2caec004f4d5d7045d74937ab5faad61dc11682247a9f"
        );
    }

    #[test]
    fn round_trip_and_rejections() {
        let body = br#"{"text":"hi"}"#;
        let now = 1_700_000_000;
        let sig = sign(KEY, now, body).unwrap();
        let ts = now.to_string();
        assert_eq!(verify(KEY, Some(&ts), Some(&sig), body, now, 300), Ok(()));
        assert_eq!(
            verify(KEY, Some(&ts), Some(&sig), body, now + 300, 300),
            Ok(())
        );
        assert_eq!(
            verify(KEY, None, Some(&sig), body, now, 300),
            Err(SignatureError::MissingTimestamp)
        );
        assert_eq!(
            verify(KEY, Some("soon"), Some(&sig), body, now, 300),
            Err(SignatureError::BadTimestamp)
        );
        assert_eq!(
            verify(KEY, Some(&ts), None, body, now, 300),
            Err(SignatureError::MissingSignature)
        );
        assert_eq!(
            verify(KEY, Some(&ts), Some("md5=abc"), body, now, 300),
            Err(SignatureError::MalformedSignature)
        );
        assert_eq!(
            verify(KEY, Some(&ts), Some("sha256=abcd"), body, now, 300),
            Err(SignatureError::MalformedSignature)
        );
        // Another body, another key, another timestamp: all mismatches.
        assert_eq!(
            verify(KEY, Some(&ts), Some(&sig), b"{}", now, 300),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify(b"other", Some(&ts), Some(&sig), body, now, 300),
            Err(SignatureError::Mismatch)
        );
        let later = (now + 1).to_string();
        assert_eq!(
            verify(KEY, Some(&later), Some(&sig), body, now, 300),
            Err(SignatureError::Mismatch)
        );
        // Correctly signed but old, or from the future.
        assert!(matches!(
            verify(KEY, Some(&ts), Some(&sig), body, now + 301, 300),
            Err(SignatureError::Stale { skew_secs: 301, .. })
        ));
        assert!(matches!(
            verify(KEY, Some(&ts), Some(&sig), body, now - 301, 300),
            Err(SignatureError::Stale { skew_secs: 301, .. })
        ));
        // Upper-case hex is accepted (hex::decode is case-insensitive).
        let upper = format!("sha256={}", sig[7..].to_uppercase());
        assert_eq!(verify(KEY, Some(&ts), Some(&upper), body, now, 300), Ok(()));
    }
}
