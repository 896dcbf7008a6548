//! The four general settings of an account (SPEC §5), their defaults and allowed
//! values. `parse` checks a change of one setting; the caller stores just that one.

use serde_json::Value;

use crate::error::DomainError;
use crate::phone;

pub const KEYS: [&str; 4] = [
    "reset_responsible_on_close",
    "mark_read_on_open",
    "phone_format",
    "balance_notify_days",
];

/// One checked change of one setting. `settings.set` stores exactly this column, so
/// concurrent changes of different settings never undo each other.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Setting {
    ResetResponsibleOnClose(bool),
    MarkReadOnOpen(bool),
    PhoneFormat(String),
    BalanceNotifyDays(i64),
}

/// Checks `value` for the setting `key`; `invalid_value` says what is allowed.
pub fn parse(key: &str, value: &Value) -> Result<Setting, DomainError> {
    let bad = |allowed: &str| {
        Err(DomainError::InvalidValue(format!(
            "{key} = {value} is not allowed: {allowed}"
        )))
    };
    match key {
        "reset_responsible_on_close" | "mark_read_on_open" => {
            let Some(b) = value.as_bool() else {
                return bad("use true or false");
            };
            Ok(if key == "mark_read_on_open" {
                Setting::MarkReadOnOpen(b)
            } else {
                Setting::ResetResponsibleOnClose(b)
            })
        }
        "phone_format" => {
            let Some(mask) = value.as_str() else {
                return bad("use \"none\" or a mask like \"+7 (###) ###-##-##\"");
            };
            phone::validate_mask(mask)?;
            Ok(Setting::PhoneFormat(mask.to_owned()))
        }
        "balance_notify_days" => match value.as_i64() {
            Some(d) if (1..=30).contains(&d) => Ok(Setting::BalanceNotifyDays(d)),
            _ => bad("a whole number of days from 1 to 30"),
        },
        other => Err(DomainError::InvalidValue(format!(
            "unknown setting {other:?}; settings are {}",
            KEYS.join(", ")
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn values_are_checked() {
        for (key, value, want) in [
            (
                "balance_notify_days",
                json!(1),
                Setting::BalanceNotifyDays(1),
            ),
            (
                "balance_notify_days",
                json!(30),
                Setting::BalanceNotifyDays(30),
            ),
            (
                "mark_read_on_open",
                json!(false),
                Setting::MarkReadOnOpen(false),
            ),
            (
                "reset_responsible_on_close",
                json!(true),
                Setting::ResetResponsibleOnClose(true),
            ),
            (
                "phone_format",
                json!("+7 (###) ###-##-##"),
                Setting::PhoneFormat("+7 (###) ###-##-##".into()),
            ),
            (
                "phone_format",
                json!("none"),
                Setting::PhoneFormat("none".into()),
            ),
        ] {
            assert_eq!(parse(key, &value).ok(), Some(want), "{key} {value}");
        }
        for (key, value) in [
            ("balance_notify_days", json!(0)),
            ("balance_notify_days", json!(31)),
            ("balance_notify_days", json!(2.5)),
            ("mark_read_on_open", json!("no")),
            ("phone_format", json!("abc")),
            ("phone_format", json!("8 (###) ###-##-##")),
            ("colour", json!(1)),
        ] {
            assert!(parse(key, &value).is_err(), "{key} {value}");
        }
        let err = parse("balance_notify_days", &json!(31))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("from 1 to 30"), "{err}");
    }
}
