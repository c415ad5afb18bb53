//! QEMU's `json:` filenames: a node that its file name cannot describe is
//! named by its options as JSON, written with QEMU's spacing (`"a": 1,
//! "b": 2`), with a child given by its own options when it has a `json:`
//! name itself, else by its driver and file name.

use serde_json::Value;

/// `v` as QEMU writes JSON in file names.
pub fn spaced(v: &Value) -> String {
    match v {
        Value::Object(map) => {
            let members: Vec<String> = map
                .iter()
                .map(|(k, v)| format!("{}: {}", Value::from(k.as_str()), spaced(v)))
                .collect();
            format!("{{{}}}", members.join(", "))
        }
        Value::Array(items) => {
            let items: Vec<String> = items.iter().map(spaced).collect();
            format!("[{}]", items.join(", "))
        }
        other => other.to_string(),
    }
}

/// How a parent's `json:` name describes its child.
pub fn child(driver: &str, filename: &str) -> Value {
    if let Some(Ok(v @ Value::Object(_))) = filename
        .strip_prefix("json:")
        .map(serde_json::from_str::<Value>)
    {
        return v;
    }
    serde_json::json!({"driver": driver, "filename": filename})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spacing_and_nesting() {
        let c = child("null-co", "json:{\"driver\": \"null-co\", \"size\": 5}");
        assert_eq!(spaced(&c), "{\"driver\": \"null-co\", \"size\": 5}");
        let f = child("file", "/a \"b\".img");
        assert_eq!(
            spaced(&f),
            "{\"driver\": \"file\", \"filename\": \"/a \\\"b\\\".img\"}"
        );
    }
}
