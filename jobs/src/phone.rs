//! Phone numbers: the account's input mask (SPEC §5) and the E.164 form we store.
//!
//! A mask is literal characters plus `#` for one digit, e.g. `+7 (###) ###-##-##`.
//! Input matches when its digits are either all the mask's digits (literal digits
//! included: `+7 (916) 123-45-67`, `79161234567`) or only the `#` digits
//! (`916 123 45 67`); spacing and punctuation may be typed or left out. A digit that
//! contradicts a literal one is refused: `89161234567` does not fit `+7 (###)…`,
//! because 8 is a trunk prefix, not the country code 7. Numbers that fit a mask are
//! also checked with libphonenumber's metadata (the `phonenumber` crate).

use crate::error::DomainError;

pub const NO_MASK: &str = "none";
const PUNCTUATION: &str = " +()-./";

/// Checks a mask as an administrator types it into the settings.
pub fn validate_mask(mask: &str) -> Result<(), DomainError> {
    if mask == NO_MASK {
        return Ok(());
    }
    let slots = mask.chars().filter(|c| *c == '#').count();
    let digits = mask.chars().filter(char::is_ascii_digit).count();
    let valid_chars = mask
        .chars()
        .all(|c| c == '#' || c.is_ascii_digit() || PUNCTUATION.contains(c));
    if !valid_chars || slots == 0 || !(5..=15).contains(&(slots + digits)) {
        return Err(DomainError::InvalidValue(format!(
            "phone_format must be \"none\" or a mask of '#' (one digit each), digits and \
             \" +()-./\" with 5 to 15 digits in all, e.g. \"+7 (###) ###-##-##\"; got {mask:?}"
        )));
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
    let digits: String = input.chars().filter(char::is_ascii_digit).collect();
    if mask == NO_MASK {
        if input.trim_start().chars().skip(1).any(|c| c == '+') {
            return bad("'+' may only lead");
        }
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

/// Normalises a phone a messenger reported (no mask applies): E.164 where it parses,
/// else `+` and its digits; `None` when it has too few digits to be a phone.
pub fn normalize_reported(input: &str) -> Option<String> {
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
    }
}
