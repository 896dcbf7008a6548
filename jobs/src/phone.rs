//! Phone numbers: the account's input mask (SPEC §5) and the E.164 form we store.
//!
//! A mask is `+`, the country calling code, then literal characters plus `#` for one
//! digit, e.g. `+7 (###) ###-##-##`. The code is required: a mask without it (`8 (###)
//! ###-##-##`) would give numbers that never parse as E.164, so no phone could ever fit.
//! Input matches when its digits are either all the mask's digits (literal digits
//! included: `+7 (916) 123-45-67`, `79161234567`) or only the `#` digits
//! (`916 123 45 67`); spacing and punctuation may be typed or left out. A digit that
//! contradicts a literal one is refused: `89161234567` does not fit `+7 (###)…`,
//! because 8 is a trunk prefix, not the country code 7. Numbers that fit a mask are
//! also checked with libphonenumber's metadata (the `phonenumber` crate).

use std::sync::LazyLock;

use quick_cache::sync::Cache;

use crate::error::DomainError;

pub const NO_MASK: &str = "none";
const PUNCTUATION: &str = " +()-./";

/// Checks a mask as an administrator types it into the settings.
pub fn validate_mask(mask: &str) -> Result<(), DomainError> {
    if mask == NO_MASK {
        return Ok(());
    }
    let bad = |why: String| {
        Err(DomainError::InvalidValue(format!(
            "phone_format must be \"none\" or a mask that starts with '+' and the country \
             calling code, then '#' (one digit each), digits and \" ()-./\", with 5 to 15 \
             digits in all, e.g. \"+7 (###) ###-##-##\"; {why}, got {mask:?}"
        )))
    };
    let slots = mask.chars().filter(|c| *c == '#').count();
    let digits = mask.chars().filter(char::is_ascii_digit).count();
    let valid_chars = mask
        .chars()
        .all(|c| c == '#' || c.is_ascii_digit() || PUNCTUATION.contains(c));
    if !valid_chars || slots == 0 || !(5..=15).contains(&(slots + digits)) {
        return bad("it has other characters, no '#' or the wrong number of digits".into());
    }
    if !mask.starts_with('+') || mask[1..].contains('+') {
        return bad("'+' must come first, and only there".into());
    }
    // The fixed digits before the first '#' must begin with a calling code; codes are
    // prefix-free (ITU E.164), so at most one of the 1- to 3-digit prefixes is one.
    let fixed: String = mask
        .chars()
        .take_while(|c| *c != '#')
        .filter(char::is_ascii_digit)
        .collect();
    let known = (1..=fixed.len().min(3)).any(|n| {
        fixed[..n]
            .parse::<u16>()
            .is_ok_and(|code| phonenumber::metadata::DATABASE.by_code(&code).is_some())
    });
    if !known {
        return bad(format!(
            "{:?} does not begin with a country calling code",
            format!("+{fixed}")
        ));
    }
    Ok(())
}

/// Turns what a user typed into E.164 (`+79161234567`), checked against `mask`.
pub fn parse_with_mask(input: &str, mask: &str) -> Result<String, DomainError> {
    let bad = |why: &str| {
        let expected = if mask == NO_MASK {
            "5 to 15 digits with an optional leading +".to_owned()
        } else {
            format!("the mask {mask}")
        };
        Err(DomainError::InvalidValue(format!(
            "phone {input:?} does not fit {expected}: {why}"
        )))
    };
    if let Some(c) = input
        .chars()
        .find(|c| !c.is_ascii_digit() && !PUNCTUATION.contains(*c))
    {
        return bad(&format!("{c:?} is not a digit or punctuation"));
    }
    if input.trim_start().chars().skip(1).any(|c| c == '+') {
        return bad("'+' may only lead");
    }
    let digits: String = input.chars().filter(char::is_ascii_digit).collect();
    if mask == NO_MASK {
        if !(5..=15).contains(&digits.len()) {
            return bad(&format!("it has {} digits", digits.len()));
        }
        return Ok(format!("+{digits}"));
    }
    let full: Vec<char> = mask
        .chars()
        .filter(|c| *c == '#' || c.is_ascii_digit())
        .collect();
    let slots = full.iter().filter(|c| **c == '#').count();
    let filled: String = if digits.len() == full.len() {
        for (typed, want) in digits.chars().zip(&full) {
            if *want != '#' && typed != *want {
                return bad(&format!("the mask has {want} where {typed} was typed"));
            }
        }
        digits
    } else if digits.len() == slots {
        let mut typed = digits.chars();
        full.iter()
            .map(|c| {
                if *c == '#' {
                    typed.next().unwrap_or('0')
                } else {
                    *c
                }
            })
            .collect()
    } else {
        return bad(&format!(
            "it has {} digits; the mask takes {} (or {} without its fixed digits)",
            digits.len(),
            full.len(),
            slots
        ));
    };
    let e164 = format!("+{filled}");
    match phonenumber::parse(None, &e164) {
        Ok(n) if phonenumber::is_valid(&n) => Ok(e164),
        _ => bad("it is not a valid phone number"),
    }
}

/// A phone typed into a `phone` field of the chat card: in the account's `mask` where
/// it fits it, else in international form (`+44 20 7946 0958`; the `+` may be left
/// out). Either way it must be a valid number by libphonenumber's metadata; returns
/// E.164.
pub fn parse_field(input: &str, mask: &str) -> Result<String, DomainError> {
    if mask != NO_MASK
        && let Ok(e164) = parse_with_mask(input, mask)
    {
        return Ok(e164);
    }
    let international = input
        .trim()
        .strip_prefix('+')
        .unwrap_or(input.trim())
        .chars()
        .all(|c| c.is_ascii_digit() || (c != '+' && PUNCTUATION.contains(c)));
    let digits: String = input.chars().filter(char::is_ascii_digit).collect();
    let parsed = international
        .then(|| phonenumber::parse(None, format!("+{digits}")).ok())
        .flatten()
        .filter(phonenumber::is_valid);
    match parsed {
        Some(n) => Ok(n.format().mode(phonenumber::Mode::E164).to_string()),
        None => {
            let in_mask = if mask == NO_MASK {
                String::new()
            } else {
                format!(" or in the mask {mask}")
            };
            Err(DomainError::InvalidValue(format!(
                "{input:?} is not a valid phone number: expected international form with \
                 the country code, e.g. +7 916 123-45-67{in_mask}"
            )))
        }
    }
}

/// Normalises a phone a messenger reported (no mask applies): E.164 where it parses,
/// else `+` and its digits; `None` when it has too few digits to be a phone.
///
/// Every inbound message runs this, and `phonenumber`'s parse (metadata lookups and
/// regexes) was ~7 % of the daemon's CPU at full inbound load: the answers for recent
/// inputs are kept, since the same clients write again and again.
pub fn normalize_reported(input: &str) -> Option<String> {
    static RECENT: LazyLock<Cache<String, Option<String>>> =
        LazyLock::new(|| Cache::new(RECENT_PHONES));
    if let Some(known) = RECENT.get(input) {
        return known;
    }
    let normalized = parse_reported(input);
    // A sender-supplied string: only plausible lengths are worth a slot.
    if input.len() <= 64 {
        RECENT.insert(input.to_owned(), normalized.clone());
    }
    normalized
}

/// Reported phones whose normalised form is kept (see `normalize_reported`).
const RECENT_PHONES: usize = 16_384;

fn parse_reported(input: &str) -> Option<String> {
    let with_plus = if input.trim_start().starts_with('+') {
        input.trim().to_owned()
    } else {
        format!("+{}", input.trim())
    };
    if let Ok(n) = phonenumber::parse(None, &with_plus) {
        return Some(n.format().mode(phonenumber::Mode::E164).to_string());
    }
    let digits: String = input.chars().filter(char::is_ascii_digit).collect();
    (5..=15)
        .contains(&digits.len())
        .then(|| format!("+{digits}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const RU: &str = "+7 (###) ###-##-##";

    #[test]
    fn mask_accepts_full_or_slot_digits_with_any_punctuation() {
        for ok in [
            "+7 (916) 123-45-67",
            "+79161234567",
            "79161234567",
            "916 123 45 67",
            "(916)1234567",
        ] {
            assert_eq!(
                parse_with_mask(ok, RU).ok().as_deref(),
                Some("+79161234567"),
                "{ok}"
            );
        }
    }

    #[test]
    fn mask_rejects_what_does_not_fit_and_says_why() {
        // 8 is the Russian trunk prefix, not the country code the mask fixes.
        let err = parse_with_mask("89161234567", RU)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.contains("+7 (###) ###-##-##") && err.contains("7 where 8"),
            "{err}"
        );
        for bad in [
            "916123456",
            "+7 916 123-45-67 8",
            "+7 (916) abc-45-67",
            "+7 (000) 000-00-00",
            "7+9161234567",
        ] {
            assert!(parse_with_mask(bad, RU).is_err(), "{bad}");
        }
    }

    #[test]
    fn no_mask_takes_5_to_15_digits() {
        assert_eq!(
            parse_with_mask("12345", NO_MASK).ok().as_deref(),
            Some("+12345")
        );
        assert_eq!(
            parse_with_mask("+44 20 7946 0958", NO_MASK).ok().as_deref(),
            Some("+442079460958")
        );
        assert!(parse_with_mask("1234", NO_MASK).is_err());
        assert!(parse_with_mask("1234567890123456", NO_MASK).is_err());
        assert!(parse_with_mask("12+345", NO_MASK).is_err());
    }

    #[test]
    fn masks_are_validated() {
        assert!(validate_mask(RU).is_ok());
        assert!(validate_mask("none").is_ok());
        assert!(validate_mask("+7 (XXX)").is_err());
        assert!(validate_mask("+7").is_err());
        assert!(validate_mask("+1 (###) ###-####").is_ok());
        assert!(validate_mask("+44 20 #### ####").is_ok());
    }

    #[test]
    fn masks_need_a_leading_plus_and_a_country_code() {
        // No phone could ever fit these: the digits never form an E.164 number.
        for mask in [
            "8 (###) ###-##-##",
            "(###) ###-####",
            "7 (###) ###-##-##",
            "+0 (###) ###-##-##",
            "+(###) ###-##-##",
            "+7 (###) +###-##-##",
        ] {
            let err = validate_mask(mask)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(
                err.contains("starts with '+' and the country calling code"),
                "{mask}: {err}"
            );
        }
    }

    #[test]
    fn field_phones_are_checked_and_stored_as_e164() {
        for ok in ["+7 916 123-45-67", "79161234567", "+7 (916) 1234567"] {
            assert_eq!(
                parse_field(ok, NO_MASK).ok().as_deref(),
                Some("+79161234567"),
                "{ok}"
            );
        }
        assert_eq!(
            parse_field("+44 20 7946 0958", RU).ok().as_deref(),
            Some("+442079460958"),
            "a foreign number in international form, whatever the mask"
        );
        assert_eq!(
            parse_field("916 123 45 67", RU).ok().as_deref(),
            Some("+79161234567"),
            "the account's mask fills in the country code"
        );
        for bad in ["12", "12345", "+7 000 000-00-00", "call me", "7+9161234567"] {
            let err = parse_field(bad, RU)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(
                err.contains("international form") && err.contains(RU),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn reported_phones_normalise() {
        assert_eq!(
            normalize_reported("79161234567").as_deref(),
            Some("+79161234567")
        );
        assert_eq!(
            normalize_reported("+7 916 123-45-67").as_deref(),
            Some("+79161234567")
        );
        assert_eq!(normalize_reported("12"), None);
        // Remembered answers are the same answers.
        for input in ["79161234567", "+7 916 123-45-67", "12", "+1 650 253 0000"] {
            assert_eq!(normalize_reported(input), parse_reported(input), "{input}");
            assert_eq!(normalize_reported(input), parse_reported(input), "{input}");
        }
    }
}
