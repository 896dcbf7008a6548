//! Checks on values people type: names, e-mail addresses, currency codes.
//!
//! Each returns `InvalidValue` with a message that says what is allowed.

use crate::error::DomainError;

pub const MAX_NAME_CHARS: usize = 200;

/// Largest single top-up in minor units (10^15): far above any real payment, and small
/// enough that sums of them stay far from the end of an `i64`.
pub const MAX_TOPUP: i64 = 1_000_000_000_000_000;

/// Largest balance in minor units (10^18, under `i64::MAX` ≈ 9.2·10^18). SQLite turns an
/// integer sum that overflows into a REAL, which the store then cannot read back.
pub const MAX_BALANCE: i64 = 1_000_000_000_000_000_000;

pub fn name(field: &str, value: &str) -> Result<String, DomainError> {
    let v = value.trim();
    if v.is_empty() || v.chars().count() > MAX_NAME_CHARS || v.chars().any(char::is_control) {
        return Err(DomainError::InvalidValue(format!(
            "{field} must be 1 to {MAX_NAME_CHARS} printable characters, got {value:?}"
        )));
    }
    Ok(v.to_owned())
}

pub fn email(field: &str, value: &str) -> Result<String, DomainError> {
    let v = value.trim();
    if email_address::EmailAddress::is_valid(v) {
        Ok(v.to_owned())
    } else {
        Err(DomainError::InvalidValue(format!(
            "{field} must be an e-mail address like name@example.com, got {value:?}"
        )))
    }
}

/// A top-up amount: a positive integer of minor units, at most [`MAX_TOPUP`].
pub fn topup_amount(amount: i64) -> Result<i64, DomainError> {
    if (1..=MAX_TOPUP).contains(&amount) {
        Ok(amount)
    } else {
        Err(DomainError::InvalidValue(format!(
            "amount must be a positive integer of minor units, at most {MAX_TOPUP}, got {amount}"
        )))
    }
}

/// Longest top-up reference, in bytes (after trimming).
pub const MAX_REFERENCE_BYTES: usize = 256;

/// A top-up's amount and reference as `account.topup` and a `topup` job both take them:
/// the amount by [`topup_amount`], the reference trimmed — it names the payment once
/// (`UNIQUE (account, reference)`), so " pay-1" is "pay-1" — and 1 to
/// [`MAX_REFERENCE_BYTES`] bytes.
pub fn topup(amount: i64, reference: &str) -> Result<(i64, &str), DomainError> {
    let amount = topup_amount(amount)?;
    let reference = reference.trim();
    if reference.is_empty() || reference.len() > MAX_REFERENCE_BYTES {
        return Err(DomainError::InvalidValue(format!(
            "reference must be 1 to {MAX_REFERENCE_BYTES} bytes, not counting spaces around \
             it: it makes a repeated top-up harmless"
        )));
    }
    Ok((amount, reference))
}

pub fn currency(value: &str) -> Result<String, DomainError> {
    if value.len() == 3 && value.bytes().all(|b| b.is_ascii_uppercase()) {
        Ok(value.to_owned())
    } else {
        Err(DomainError::InvalidValue(format!(
            "currency must be a three-letter ISO 4217 code like USD, got {value:?}"
        )))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn rejects_what_people_get_wrong() {
        assert!(super::name("name", "  Acme ").is_ok_and(|n| n == "Acme"));
        assert!(super::name("name", "   ").is_err());
        assert!(super::name("name", "a\u{0}b").is_err());
        assert!(super::email("email", "ann@example.com").is_ok());
        assert!(super::email("email", "ann.example.com").is_err());
        assert!(super::currency("EUR").is_ok());
        assert!(super::currency("eur").is_err());
        assert!(super::topup_amount(1).is_ok());
        assert!(super::topup_amount(super::MAX_TOPUP).is_ok());
        assert!(super::topup_amount(super::MAX_TOPUP + 1).is_err());
        assert!(super::topup_amount(0).is_err());
        assert!(super::topup(5, "  pay-1\t").is_ok_and(|t| t == (5, "pay-1")));
        assert!(super::topup(5, "   ").is_err());
        assert!(super::topup(super::MAX_TOPUP + 1, "r").is_err());
        let long = "r".repeat(super::MAX_REFERENCE_BYTES);
        assert!(super::topup(5, &format!(" {long} ")).is_ok());
        assert!(super::topup(5, &format!("{long}r")).is_err());
    }
}
