//! The four general settings of an account (SPEC §5), their defaults and allowed
//! values. `apply` changes one setting in memory after checking it; the caller stores.

use serde_json::Value;

use crate::error::DomainError;
use crate::model::Settings;
use crate::phone;

pub const KEYS: [&str; 4] = [
    "reset_responsible_on_close",
    "mark_read_on_open",
    "phone_format",
    "balance_notify_days",
];

pub fn apply(settings: &mut Settings, key: &str, value: &Value) -> Result<(), DomainError> {
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
            if key == "mark_read_on_open" {
                settings.mark_read_on_open = b;
            } else {
                settings.reset_responsible_on_close = b;
            }
        }
        "phone_format" => {
            let Some(mask) = value.as_str() else {
                return bad("use \"none\" or a mask like \"+7 (###) ###-##-##\"");
            };
            phone::validate_mask(mask)?;
            settings.phone_format = mask.to_owned();
        }
        "balance_notify_days" => match value.as_i64() {
            Some(d) if (1..=30).contains(&d) => settings.balance_notify_days = d,
            _ => return bad("a whole number of days from 1 to 30"),
        },
        other => {
            return Err(DomainError::InvalidValue(format!(
                "unknown setting {other:?}; settings are {}",
                KEYS.join(", ")
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn defaults() -> Settings {
        Settings {
            reset_responsible_on_close: false,
            mark_read_on_open: true,
            phone_format: "none".into(),
            balance_notify_days: 3,
        }
    }

    #[test]
    fn values_are_checked() {
        let mut s = defaults();
        assert!(apply(&mut s, "balance_notify_days", &json!(30)).is_ok());
        assert!(apply(&mut s, "balance_notify_days", &json!(0)).is_err());
        assert!(apply(&mut s, "balance_notify_days", &json!(31)).is_err());
        assert!(apply(&mut s, "mark_read_on_open", &json!("no")).is_err());
        assert!(apply(&mut s, "phone_format", &json!("+7 (###) ###-##-##")).is_ok());
        assert!(apply(&mut s, "phone_format", &json!("abc")).is_err());
        assert!(apply(&mut s, "colour", &json!(1)).is_err());
        assert_eq!(s.balance_notify_days, 30);
        assert_eq!(s.phone_format, "+7 (###) ###-##-##");
    }
}
