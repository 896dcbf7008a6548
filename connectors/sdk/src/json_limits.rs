//! Bounds on untrusted JSON, shared by every place where JSON enters patchbay (plugin
//! events, webhook bodies, the control socket, `job.enqueue`).
//!
//! serde_json refuses nesting deeper than 128 while it parses into a `Value` or a
//! struct, and every later stage (the job envelope, the queue's stored job, the
//! journal) adds levels of its own. A value that is legal where it enters but too deep
//! for a later stage would become a job no worker can decode. So nesting is bounded at
//! the entry, with [`MAX_JSON_DEPTH`] far inside what the later stages accept, and
//! checked on the raw bytes before any parser recurses into them.

/// Deepest nesting of arrays and objects accepted where JSON enters (header:
/// `PB_MAX_JSON_DEPTH`). `{"a":[1]}` has depth 2. The job envelope and its stores add
/// at most a handful of levels, well inside serde_json's 128.
pub const MAX_JSON_DEPTH: usize = 32;

/// JSON nested deeper than allowed; `Display` says by how much.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("JSON nested deeper than {max} levels of arrays and objects")]
pub struct TooDeep {
    pub max: usize,
}

/// The deepest nesting of `[`/`{` in `bytes`, brackets inside strings not counted. It
/// does not validate: malformed JSON gets some depth, and the parser that runs after
/// this check refuses it. Iterative, so any input is safe to measure.
pub fn json_depth(bytes: &[u8]) -> usize {
    let (mut depth, mut deepest) = (0usize, 0usize);
    let (mut in_string, mut escaped) = (false, false);
    for &b in bytes {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

/// `Ok` when `bytes` nest at most `max` levels.
pub fn check_depth(bytes: &[u8], max: usize) -> Result<(), TooDeep> {
    if json_depth(bytes) > max {
        Err(TooDeep { max })
    } else {
        Ok(())
    }
}

/// The nesting depth of a parsed value (`{"a":[1]}`: 2), without recursion.
pub fn value_depth(value: &serde_json::Value) -> usize {
    use serde_json::Value;
    let mut deepest = 0;
    let mut stack = vec![(value, 0usize)];
    while let Some((v, d)) = stack.pop() {
        match v {
            Value::Array(items) => {
                deepest = deepest.max(d + 1);
                stack.extend(items.iter().map(|i| (i, d + 1)));
            }
            Value::Object(map) => {
                deepest = deepest.max(d + 1);
                stack.extend(map.values().map(|i| (i, d + 1)));
            }
            _ => {}
        }
    }
    deepest
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nested(levels: usize) -> String {
        format!("{}{}", "[".repeat(levels), "]".repeat(levels))
    }

    #[test]
    fn depth_counts_arrays_and_objects_not_strings() {
        assert_eq!(json_depth(b"1"), 0);
        assert_eq!(json_depth(br#"{"a":[1]}"#), 2);
        assert_eq!(json_depth(br#"{"a":"[[[[{{{","b":{"c":{}}}"#), 3);
        assert_eq!(json_depth(br#"["\"[[[", []]"#), 2);
        assert_eq!(json_depth(nested(100_000).as_bytes()), 100_000);
    }

    #[test]
    fn check_and_value_depth_agree() {
        let at = nested(MAX_JSON_DEPTH);
        let over = nested(MAX_JSON_DEPTH + 1);
        assert!(check_depth(at.as_bytes(), MAX_JSON_DEPTH).is_ok());
        assert_eq!(
            check_depth(over.as_bytes(), MAX_JSON_DEPTH),
            Err(TooDeep {
                max: MAX_JSON_DEPTH
            })
        );
        let v: serde_json::Value = serde_json::from_str(&at).unwrap();
        assert_eq!(value_depth(&v), MAX_JSON_DEPTH);
        assert_eq!(value_depth(&serde_json::json!({"a": [1, {"b": 2}]})), 3);
    }
}
