//! Additional fields of the chat card: their types, definitions and value checks.
//!
//! A value is checked against its field's type and stored in a normalised JSON form
//! (numbers as numbers, phones as E.164, dates as YYYY-MM-DD), so readers never
//! re-validate.

use std::str::FromStr;

use serde::Serialize;
use serde_json::Value;

use crate::error::DomainError;
use crate::model::Id;
use crate::phone;
use crate::validate;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FieldType {
    Text,
    Number,
    Date,
    Link,
    Email,
    Phone,
    Checkbox,
    List,
}

const TYPES: &str = "text, number, date, link, email, phone, checkbox, list";
/// Built-in fields of every chat card; additional fields may not take these names.
pub const BUILT_IN: [&str; 5] = ["name", "email", "e-mail", "url", "notes"];
pub const MAX_TEXT_CHARS: usize = 10_000;

impl TryFrom<String> for FieldType {
    type Error = DomainError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl FieldType {
    pub fn as_str(self) -> &'static str {
        match self {
            FieldType::Text => "text",
            FieldType::Number => "number",
            FieldType::Date => "date",
            FieldType::Link => "link",
            FieldType::Email => "email",
            FieldType::Phone => "phone",
            FieldType::Checkbox => "checkbox",
            FieldType::List => "list",
        }
    }
}

impl FromStr for FieldType {
    type Err = DomainError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "text" => FieldType::Text,
            "number" => FieldType::Number,
            "date" => FieldType::Date,
            "link" => FieldType::Link,
            "email" => FieldType::Email,
            "phone" => FieldType::Phone,
            "checkbox" => FieldType::Checkbox,
            "list" => FieldType::List,
            other => {
                return Err(DomainError::InvalidValue(format!(
                    "field type {other:?} is not allowed; use one of {TYPES}"
                )));
            }
        })
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct FieldDef {
    pub id: Id,
    pub account: Id,
    pub name: String,
    #[serde(rename = "type")]
    pub field_type: FieldType,
    pub options: Option<Vec<String>>,
    pub created_at: i64,
}

/// Checks a new definition; returns the trimmed name and the options to store.
pub fn check_definition(
    name: &str,
    field_type: FieldType,
    options: Option<&[String]>,
) -> Result<(String, Option<Vec<String>>), DomainError> {
    let name = validate::name("name", name)?;
    if BUILT_IN.contains(&name.to_lowercase().as_str()) {
        return Err(DomainError::InvalidValue(format!(
            "{name:?} is a built-in field of every chat (name, email, url, notes); choose another name"
        )));
    }
    let options = match (field_type, options) {
        (FieldType::List, Some(opts)) => {
            let opts: Vec<String> = opts.iter().map(|o| o.trim().to_owned()).collect();
            let mut seen = std::collections::HashSet::new();
            if opts.is_empty() || opts.iter().any(|o| o.is_empty() || !seen.insert(o.clone())) {
                return Err(DomainError::InvalidValue(
                    "a list field needs options: distinct, non-empty strings".into(),
                ));
            }
            Some(opts)
        }
        (FieldType::List, None) => {
            return Err(DomainError::InvalidValue(
                "a list field needs options, e.g. [\"new\", \"vip\"]".into(),
            ));
        }
        (_, Some(_)) => {
            return Err(DomainError::InvalidValue(format!(
                "only list fields take options, not {} fields",
                field_type.as_str()
            )));
        }
        (_, None) => None,
    };
    Ok((name, options))
}

/// Validates `value` for `field` and returns the form to store. `null` clears it.
/// `phone_mask` is the account's `phone_format`: a phone field takes numbers typed in it
/// as well as in international form. Every type reads a string as typed by a person
/// ("42", "true", "89161234567"); text-like types take only strings, so a JSON number
/// is not silently turned into text.
pub fn check_value(
    field: &FieldDef,
    value: &Value,
    phone_mask: &str,
) -> Result<Value, DomainError> {
    if value.is_null() {
        return Ok(Value::Null);
    }
    let bad = |expected: &str| {
        Err(DomainError::InvalidValue(format!(
            "field {:?} is a {} field: expected {expected}, got {value}",
            field.name,
            field.field_type.as_str()
        )))
    };
    let text = value.as_str();
    match field.field_type {
        FieldType::Text => match text {
            Some(s) if s.chars().count() <= MAX_TEXT_CHARS => Ok(Value::from(s)),
            _ => bad(&format!("a string of at most {MAX_TEXT_CHARS} characters")),
        },
        FieldType::Number => {
            let n = match value {
                Value::Number(n) => n.as_f64(),
                Value::String(s) => s.trim().parse::<f64>().ok(),
                _ => None,
            };
            match n.filter(|n| n.is_finite()) {
                Some(n) if n.fract() == 0.0 && n.abs() < 9.0e15 => Ok(Value::from(n as i64)),
                Some(n) => Ok(Value::from(n)),
                None => bad("a number like 42 or 3.5"),
            }
        }
        FieldType::Date => match text.map(|s| chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d")) {
            Some(Ok(d)) => Ok(Value::from(d.to_string())),
            _ => bad("an ISO 8601 date like 2026-11-25"),
        },
        FieldType::Link => match text.map(url::Url::parse) {
            Some(Ok(u)) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {
                Ok(Value::from(u.to_string()))
            }
            _ => bad("an http:// or https:// URL"),
        },
        FieldType::Email => match text.map(|s| validate::email(&field.name, s)) {
            Some(Ok(e)) => Ok(Value::from(e)),
            _ => bad("an e-mail address like name@example.com"),
        },
        FieldType::Phone => match text {
            Some(s) => phone::parse_field(s, phone_mask)
                .map(Value::from)
                .map_err(|e| DomainError::InvalidValue(format!("field {:?}: {e}", field.name))),
            None => bad("a phone number as a string, e.g. \"+7 916 123-45-67\""),
        },
        // Like numbers, a checkbox also reads its typed text ("true"), so a client that
        // sends what the user typed (patchbayctl) works for every type.
        FieldType::Checkbox => match (value, text.map(str::trim)) {
            (Value::Bool(b), _) => Ok(Value::from(*b)),
            (_, Some("true")) => Ok(Value::from(true)),
            (_, Some("false")) => Ok(Value::from(false)),
            _ => bad("true or false"),
        },
        FieldType::List => {
            let options = field.options.as_deref().unwrap_or_default();
            match text {
                Some(s) if options.iter().any(|o| o == s) => Ok(Value::from(s)),
                _ => bad(&format!("one of {}", options.join(", "))),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn field(t: FieldType, options: Option<Vec<String>>) -> FieldDef {
        FieldDef {
            id: 1,
            account: 1,
            name: "f".into(),
            field_type: t,
            options,
            created_at: 0,
        }
    }

    #[test]
    fn every_type_takes_a_good_value_and_refuses_a_bad_one() {
        let list = Some(vec!["new".to_owned(), "vip".to_owned()]);
        let cases = [
            (
                FieldType::Text,
                None,
                json!("hello"),
                json!("hello"),
                json!(5),
            ),
            (
                FieldType::Number,
                None,
                json!("42"),
                json!(42),
                json!("forty"),
            ),
            (
                FieldType::Date,
                None,
                json!("2026-11-25"),
                json!("2026-11-25"),
                json!("25.11.2026"),
            ),
            (
                FieldType::Link,
                None,
                json!("https://acme.test/x"),
                json!("https://acme.test/x"),
                json!("ftp://acme.test"),
            ),
            (
                FieldType::Email,
                None,
                json!("a@acme.test"),
                json!("a@acme.test"),
                json!("a@"),
            ),
            (
                FieldType::Phone,
                None,
                json!("+7 916 123-45-67"),
                json!("+79161234567"),
                json!("12"),
            ),
            (
                FieldType::Checkbox,
                None,
                json!(true),
                json!(true),
                json!("yes"),
            ),
            (
                FieldType::List,
                list,
                json!("vip"),
                json!("vip"),
                json!("gold"),
            ),
        ];
        for (t, opts, good, stored, bad) in cases {
            let f = field(t, opts);
            assert_eq!(
                check_value(&f, &good, phone::NO_MASK).ok(),
                Some(stored),
                "{t:?}"
            );
            assert!(
                check_value(&f, &bad, phone::NO_MASK).is_err(),
                "{t:?} {bad}"
            );
        }
    }

    #[test]
    fn phone_fields_use_libphonenumber_and_the_mask() {
        let f = field(FieldType::Phone, None);
        let mask = "+7 (###) ###-##-##";
        let stored = |v: Value, m: &str| check_value(&f, &v, m).ok();
        assert_eq!(
            stored(json!("8 916 123 45 67"), phone::NO_MASK),
            None,
            "a trunk prefix is not a country code"
        );
        assert_eq!(
            stored(json!("916 123-45-67"), mask),
            Some(json!("+79161234567"))
        );
        assert_eq!(
            stored(json!("+1 (650) 253-0000"), mask),
            Some(json!("+16502530000"))
        );
        assert_eq!(stored(json!("+7 000 000 00 00"), phone::NO_MASK), None);
        assert_eq!(stored(json!(79161234567_i64), phone::NO_MASK), None);
        assert_eq!(stored(Value::Null, mask), Some(Value::Null));
    }

    #[test]
    fn typed_text_is_read_by_the_field_type() {
        let typed = |t: FieldType, s: &str| check_value(&field(t, None), &json!(s), "none").ok();
        assert_eq!(typed(FieldType::Text, "42"), Some(json!("42")));
        assert_eq!(typed(FieldType::Text, "true"), Some(json!("true")));
        assert_eq!(typed(FieldType::Number, "42"), Some(json!(42)));
        assert_eq!(typed(FieldType::Checkbox, "true"), Some(json!(true)));
        assert_eq!(typed(FieldType::Checkbox, "false"), Some(json!(false)));
        assert_eq!(typed(FieldType::Checkbox, "yes"), None);
        assert_eq!(
            typed(FieldType::Phone, "79161234567"),
            Some(json!("+79161234567"))
        );
    }

    #[test]
    fn definitions_are_checked() {
        assert!(check_definition("Email", FieldType::Text, None).is_err());
        assert!(check_definition("Notes", FieldType::Text, None).is_err());
        assert!(check_definition("Tier", FieldType::List, None).is_err());
        assert!(check_definition("Tier", FieldType::Text, Some(&["a".to_owned()])).is_err());
        assert!(
            check_definition(
                "Tier",
                FieldType::List,
                Some(&["a".to_owned(), "a".to_owned()])
            )
            .is_err()
        );
        assert!(check_definition("Birthday", FieldType::Date, None).is_ok());
    }
}
