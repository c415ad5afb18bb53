//! `query-qmp-schema`: the answer is checked against the rules QEMU's
//! introspection follows (every name an entry refers to is defined in the
//! answer, exactly once; unions are tagged by one of their enum-typed
//! members; the commands are exactly those `query-commands` lists; ...).
//! The same checker runs on qemu-storage-daemon's answer, which shows that
//! it accepts QEMU's own output, and on broken answers, which shows that it
//! rejects them.

mod common;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::Path;

use common::*;
use serde_json::{json, Value};

const META_TYPES: &[&str] = &[
    "builtin",
    "enum",
    "array",
    "object",
    "alternate",
    "command",
    "event",
];

const JSON_TYPES: &[&str] = &[
    "string", "number", "int", "boolean", "null", "object", "array", "value",
];

/// The members an entry of each meta-type may have besides `name`,
/// `meta-type` and `features`.
fn allowed_keys(meta: &str) -> &'static [&'static str] {
    match meta {
        "builtin" => &["json-type"],
        "enum" => &["members", "values"],
        "array" => &["element-type"],
        "object" => &["members", "tag", "variants"],
        "alternate" => &["members"],
        "command" => &["arg-type", "ret-type", "allow-oob"],
        "event" => &["arg-type"],
        _ => &[],
    }
}

/// Checks one introspection answer; returns what is wrong with it, empty
/// when nothing is. `commands` is what `query-commands` listed.
fn violations(schema: &Value, commands: &[String]) -> Vec<String> {
    let Some(list) = schema.as_array() else {
        return vec![format!("the answer is not a list: {schema}")];
    };
    let mut c = Checker {
        by_name: HashMap::new(),
        errs: Vec::new(),
    };
    for e in list {
        match e["name"].as_str() {
            Some(name) => {
                if c.by_name.insert(name, e).is_some() {
                    c.errs.push(format!("'{name}' is defined more than once"));
                }
            }
            None => c.errs.push(format!("entry without a name: {e}")),
        }
    }
    for e in list {
        c.entry(e);
    }
    // The commands are exactly the ones the server accepts.
    let listed: BTreeSet<&str> = commands.iter().map(String::as_str).collect();
    let described: BTreeSet<&str> = list
        .iter()
        .filter(|e| e["meta-type"] == "command")
        .filter_map(|e| e["name"].as_str())
        .collect();
    for missing in listed.difference(&described) {
        c.errs.push(format!(
            "command '{missing}' is listed by query-commands but not described"
        ));
    }
    for extra in described.difference(&listed) {
        c.errs.push(format!(
            "command '{extra}' is described but query-commands does not list it"
        ));
    }
    // Every type is there because a command or event uses it (QEMU 10
    // leaves out the rest).
    let mut seen: HashSet<&str> = HashSet::new();
    let mut todo: Vec<&str> = list
        .iter()
        .filter(|e| matches!(e["meta-type"].as_str(), Some("command" | "event")))
        .filter_map(|e| e["name"].as_str())
        .collect();
    while let Some(n) = todo.pop() {
        if seen.insert(n) {
            if let Some(e) = c.by_name.get(n) {
                todo.extend(references(e));
            }
        }
    }
    for name in list.iter().filter_map(|e| e["name"].as_str()) {
        if !seen.contains(name) {
            c.errs
                .push(format!("'{name}' is not used by any command or event"));
        }
    }
    c.errs
}

/// The names an entry refers to.
fn references(e: &Value) -> Vec<&str> {
    let mut out = Vec::new();
    for key in ["element-type", "arg-type", "ret-type"] {
        out.extend(e[key].as_str());
    }
    if matches!(e["meta-type"].as_str(), Some("object" | "alternate")) {
        for m in e["members"].as_array().into_iter().flatten() {
            out.extend(m["type"].as_str());
        }
    }
    for v in e["variants"].as_array().into_iter().flatten() {
        out.extend(v["type"].as_str());
    }
    out
}

struct Checker<'a> {
    by_name: HashMap<&'a str, &'a Value>,
    errs: Vec<String>,
}

impl<'a> Checker<'a> {
    fn err(&mut self, at: &str, what: String) {
        self.errs.push(format!("{at}: {what}"));
    }

    /// `v` must name a defined entry, of meta-type `want` if given;
    /// returns that entry.
    fn refer(&mut self, at: &str, v: &Value, want: Option<&str>) -> Option<&'a Value> {
        let Some(name) = v.as_str() else {
            self.err(at, format!("type reference {v} is not a string"));
            return None;
        };
        let Some(&target) = self.by_name.get(name) else {
            self.err(at, format!("refers to '{name}', which is not defined"));
            return None;
        };
        match (want, target["meta-type"].as_str()) {
            (Some(w), Some(m)) if w != m => {
                self.err(
                    at,
                    format!("'{name}' has meta-type {m}, where {w} is needed"),
                );
                None
            }
            _ => Some(target),
        }
    }

    fn features(&mut self, at: &str, owner: &Value) {
        if let Some(f) = owner.get("features") {
            let ok = f.as_array().is_some_and(|l| l.iter().all(Value::is_string));
            if !ok {
                self.err(at, format!("features {f} is not a list of strings"));
            }
        }
    }

    /// Each element must be an object; returns them.
    fn list(&mut self, at: &str, v: &'a Value) -> &'a [Value] {
        match v.as_array() {
            Some(l) => {
                if l.iter().any(|m| !m.is_object()) {
                    self.err(at, format!("{v} has elements that are not objects"));
                }
                l
            }
            None => {
                self.err(at, format!("{v} is not a list"));
                &[]
            }
        }
    }

    fn entry(&mut self, e: &'a Value) {
        let name = e["name"].as_str().unwrap_or("?");
        let at = format!("'{name}'");
        let meta = e["meta-type"].as_str().unwrap_or("");
        if !META_TYPES.contains(&meta) {
            self.err(&at, format!("meta-type {} is not valid", e["meta-type"]));
            return;
        }
        self.features(&at, e);
        if let Some(obj) = e.as_object() {
            for key in obj.keys() {
                let base = ["name", "meta-type", "features"].contains(&key.as_str());
                if !base && !allowed_keys(meta).contains(&key.as_str()) {
                    self.err(&at, format!("a {meta} has no member '{key}'"));
                }
            }
        }
        // Type names are hidden: numbers, arrays named after their
        // element; only the built-in types keep theirs.
        match meta {
            "command" | "event" | "builtin" => {}
            "array" => {
                let want = format!("[{}]", e["element-type"].as_str().unwrap_or(""));
                if name != want {
                    self.err(&at, format!("an array of this element is named '{want}'"));
                }
            }
            _ => {
                if name.is_empty() || !name.chars().all(|c| c.is_ascii_digit()) {
                    self.err(&at, "type name is not hidden behind a number".into());
                }
            }
        }
        match meta {
            "builtin"
                if !e["json-type"]
                    .as_str()
                    .is_some_and(|j| JSON_TYPES.contains(&j)) =>
            {
                self.err(&at, format!("json-type {} is not valid", e["json-type"]));
            }
            "enum" => self.enumeration(&at, e),
            "array" => {
                self.refer(&at, &e["element-type"], None);
            }
            "object" => self.object(&at, e),
            "alternate" => {
                let members = self.list(&at, &e["members"]);
                if members.is_empty() {
                    self.err(&at, "alternate without members".into());
                }
                for m in members {
                    self.refer(&at, &m["type"], None);
                }
            }
            "command" => {
                self.refer(&format!("{at} arg-type"), &e["arg-type"], Some("object"));
                self.refer(&format!("{at} ret-type"), &e["ret-type"], None);
                if let Some(oob) = e.get("allow-oob") {
                    if !oob.is_boolean() {
                        self.err(&at, format!("allow-oob {oob} is not a boolean"));
                    }
                }
            }
            "event" => {
                self.refer(&format!("{at} arg-type"), &e["arg-type"], Some("object"));
            }
            _ => {}
        }
    }

    fn enumeration(&mut self, at: &str, e: &'a Value) {
        let mut names = Vec::new();
        for m in self.list(at, &e["members"]) {
            self.features(at, m);
            match m["name"].as_str() {
                Some(n) if names.contains(&n) => self.err(at, format!("value '{n}' twice")),
                Some(n) => names.push(n),
                None => self.err(at, format!("enum member without a name: {m}")),
            }
        }
        if let Some(values) = e.get("values") {
            let values: Vec<&str> = values
                .as_array()
                .map(|l| l.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            if values != names {
                self.err(
                    at,
                    format!("values {values:?} differ from members {names:?}"),
                );
            }
        }
    }

    fn object(&mut self, at: &str, e: &'a Value) {
        let mut names: Vec<&str> = Vec::new();
        let members = self.list(at, &e["members"]);
        for m in members {
            let Some(n) = m["name"].as_str() else {
                self.err(at, format!("member without a name: {m}"));
                continue;
            };
            if names.contains(&n) {
                self.err(at, format!("member '{n}' twice"));
            }
            names.push(n);
            self.refer(&format!("{at} member '{n}'"), &m["type"], None);
            if m.get("default").is_some_and(|d| !d.is_null()) {
                self.err(at, format!("member '{n}' has a default other than null"));
            }
            self.features(at, m);
        }
        match (e.get("tag"), e.get("variants")) {
            (None, None) => {}
            (Some(tag), Some(variants)) => {
                let tag_type = members
                    .iter()
                    .find(|m| m.get("name") == Some(tag))
                    .map(|m| &m["type"]);
                let Some(tag_type) = tag_type else {
                    self.err(at, format!("tag {tag} is not one of the members"));
                    return;
                };
                let Some(tag_enum) = self.refer(&format!("{at} tag"), tag_type, Some("enum"))
                else {
                    return;
                };
                let values: Vec<&Value> = tag_enum["members"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|m| &m["name"])
                    .collect();
                let mut cases = Vec::new();
                for v in self.list(at, variants) {
                    let case = &v["case"];
                    if !values.contains(&case) {
                        self.err(
                            at,
                            format!("variant {case} is not a value of the tag's enum"),
                        );
                    }
                    if cases.contains(&case) {
                        self.err(at, format!("variant {case} twice"));
                    }
                    cases.push(case);
                    self.refer(&format!("{at} variant {case}"), &v["type"], Some("object"));
                }
            }
            _ => self.err(at, "tag and variants come only together".into()),
        }
    }
}

/// Asks `qmp` for the schema and the command list.
fn fetch(qmp: &mut Qmp) -> (Value, Vec<String>) {
    let schema = assert_return(&qmp.execute("query-qmp-schema", Value::Null)).clone();
    let commands = assert_return(&qmp.execute("query-commands", Value::Null))
        .as_array()
        .expect("query-commands returns a list")
        .iter()
        .map(|c| c["name"].as_str().expect("command name").to_string())
        .collect();
    (schema, commands)
}

/// Answers a question about the schema in the manner of libvirt's
/// capability probing: the first step names a command or event, then
/// `arg-type` or `ret-type` go to that type, a plain step to an object
/// member's type, `+case` to a variant's type, `^value` to an enum value,
/// and `$feature` asks whether the last entry, member or enum value
/// reached has that feature. Arrays are looked through.
fn probe(schema: &Value, path: &str) -> bool {
    let by_name: HashMap<&str, &Value> = schema
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| Some((e["name"].as_str()?, e)))
        .collect();
    let get = |name: &Value| name.as_str().and_then(|n| by_name.get(n).copied());
    let find = |list: &Value, key: &str, want: &str| -> Option<Value> {
        list.as_array()?.iter().find(|m| m[key] == want).cloned()
    };
    let mut steps = path.split('/');
    let Some(mut at) = steps.next().and_then(|n| by_name.get(n).copied()) else {
        return false;
    };
    // What `$feature` looks at.
    let mut owner: Value = at.clone();
    for step in steps {
        while at["meta-type"] == "array" {
            match get(&at["element-type"]) {
                Some(elem) => at = elem,
                None => return false,
            }
        }
        if let Some(feature) = step.strip_prefix('$') {
            let has = owner["features"]
                .as_array()
                .is_some_and(|f| f.iter().any(|x| x == feature));
            if !has {
                return false;
            }
        } else if let Some(value) = step.strip_prefix('^') {
            match find(&at["members"], "name", value) {
                Some(m) if at["meta-type"] == "enum" => owner = m,
                _ => return false,
            }
        } else if step == "arg-type" || step == "ret-type" || step.starts_with('+') {
            let next = match step.strip_prefix('+') {
                Some(case) => find(&at["variants"], "case", case).and_then(|v| get(&v["type"])),
                None => get(&at[step]),
            };
            let Some(next) = next else { return false };
            owner = next.clone();
            at = next;
        } else {
            let Some(m) = find(&at["members"], "name", step) else {
                return false;
            };
            let Some(next) = get(&m["type"]) else {
                return false;
            };
            owner = m;
            at = next;
        }
    }
    true
}

/// Questions both daemons answer yes to.
const COMMON_PROBES: &[&str] = &[
    "blockdev-add/arg-type/+file/filename",
    "blockdev-add/arg-type/driver/^null-co",
    "blockdev-add/arg-type/driver/^gluster/$deprecated",
    "block-export-add/arg-type/+vhost-user-blk/num-queues",
    "block-export-add/arg-type/+vhost-user-blk/addr/+unix/path",
    "query-named-block-nodes/arg-type/flat",
    "query-named-block-nodes/ret-type/image/format-specific/+file/data/extent-size-hint",
    "query-blockstats/ret-type/stats/rd_operations",
    "object-add/arg-type/+iothread/poll-max-ns",
    "object-add/arg-type/+throttle-group/x-iops-total/$unstable",
    "query-qmp-schema/ret-type/+enum/values/$deprecated",
    "BLOCK_EXPORT_DELETED/arg-type/id",
];

#[test]
fn vubd_answer_follows_qemu_introspection_rules() {
    let d = Daemon::vubd(&[]).monitor().start();
    let mut qmp = d.qmp();
    let (schema, commands) = fetch(&mut qmp);
    let errs = violations(&schema, &commands);
    assert!(
        errs.is_empty(),
        "{} problem(s):\n{}",
        errs.len(),
        errs.join("\n")
    );
    for p in COMMON_PROBES {
        assert!(probe(&schema, p), "probe {p} failed");
    }
}

#[test]
fn qsd_answer_follows_the_same_rules() {
    if skip_without_qsd("qsd_answer_follows_the_same_rules") {
        return;
    }
    let d = Daemon::qsd(&[]).monitor().start();
    let mut qmp = d.qmp();
    let (schema, commands) = fetch(&mut qmp);
    let errs = violations(&schema, &commands);
    assert!(
        errs.is_empty(),
        "{} problem(s):\n{}",
        errs.len(),
        errs.join("\n")
    );
    for p in COMMON_PROBES {
        assert!(probe(&schema, p), "probe {p} failed on qsd");
    }
}

/// vubd's own answer: what it leaves out and what it includes.
#[test]
fn vubd_describes_what_it_offers() {
    let d = Daemon::with_flavor(Flavor::Vubd, &[]).monitor().start();
    let mut qmp = d.qmp();
    let (schema, _) = fetch(&mut qmp);
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let defined = qapi_gen::schema::load(&root.join("qapi/vubd.json"))
        .unwrap_or_else(|e| panic!("schema does not load: {e}"));
    let entry = |name: &str| {
        schema
            .as_array()
            .and_then(|l| l.iter().find(|e| e["name"] == name))
            .cloned()
    };
    // The answer is the one generated with the code, and does not change.
    let generated: Value = serde_json::from_str(vubd::qapi::QMP_SCHEMA_JSON).unwrap();
    assert_eq!(schema, generated);
    assert_eq!(fetch(&mut qmp).0, schema, "a second answer differs");
    // Commands the schema defines but vubd does not implement are absent
    // (clients decide what to use by presence) and really not there.
    for c in &defined.commands {
        let implemented = defined.implemented.contains(&c.name);
        assert_eq!(
            entry(&c.name).is_some(),
            implemented,
            "command {} (implemented: {implemented})",
            c.name
        );
        if !implemented {
            let reply = qmp.execute(&c.name, Value::Null);
            assert_error_class(&reply, "CommandNotFound");
        }
    }
    // Every event is there, as QEMU lists all of its events.
    for e in &defined.events {
        let found = entry(&e.name).unwrap_or_else(|| panic!("event {} missing", e.name));
        assert_eq!(found["meta-type"], "event");
    }
    // No arguments and no return value: QEMU's empty object.
    for (cmd, key) in [("query-version", "arg-type"), ("quit", "ret-type")] {
        let ty = entry(cmd).unwrap()[key].clone();
        let ty = entry(ty.as_str().unwrap()).unwrap();
        assert_eq!(ty["members"], json!([]), "{cmd} {key}");
        assert!(ty.get("tag").is_none());
    }
    // Integers of every width are `int`, and no schema type name shows:
    // not as the name of an entry, nor where an entry refers to a type.
    let mut names: Vec<&str> = Vec::new();
    for e in schema.as_array().unwrap() {
        names.push(e["name"].as_str().unwrap());
        names.extend(references(e));
    }
    for n in names {
        const SIZED: &[&str] = &[
            "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "size",
        ];
        assert!(!SIZED.contains(&n), "integer type {n} shows");
        assert!(defined.lookup(n).is_none(), "schema type name {n} shows");
    }
    // The simple union ImageInfoSpecific looks as QEMU 10's flat one:
    // tag `type` and wrapper objects with a `data` member.
    let path = "query-named-block-nodes/ret-type/image/format-specific";
    assert!(probe(&schema, &format!("{path}/type/^qcow2")));
    assert!(probe(&schema, &format!("{path}/+qcow2/data/compat")));
    // Features of vubd's own and unimplemented questions.
    assert!(probe(&schema, "x-blockdev-del/$deprecated"));
    assert!(!probe(&schema, "blockdev-del/$deprecated"));
    assert!(!probe(&schema, "drive-backup"));
    assert!(!probe(
        &schema,
        "blockdev-add/arg-type/+file/no-such-member"
    ));
}

/// The checker finds what is wrong in broken answers.
#[test]
fn checker_rejects_broken_answers() {
    let good = json!([
        {"name": "get", "meta-type": "command", "arg-type": "0", "ret-type": "1"},
        {"name": "0", "meta-type": "object", "members": []},
        {"name": "1", "meta-type": "object",
         "members": [{"name": "kind", "type": "2"}, {"name": "n", "type": "int", "default": null}],
         "tag": "kind", "variants": [{"case": "a", "type": "0"}]},
        {"name": "2", "meta-type": "enum", "members": [{"name": "a"}], "values": ["a"]},
        {"name": "int", "meta-type": "builtin", "json-type": "int"}
    ]);
    let get = vec!["get".to_string()];
    assert_eq!(violations(&good, &get), Vec::<String>::new());
    let broken = |path: &str, value: Value| {
        let mut v = good.clone();
        *v.pointer_mut(path).unwrap() = value;
        v
    };
    let cases = [
        (
            broken("/0/ret-type", json!("7")),
            "refers to '7', which is not defined",
        ),
        (
            broken("/3/name", json!("0")),
            "'0' is defined more than once",
        ),
        (broken("/2/tag", json!("m")), "is not one of the members"),
        (
            broken("/2/members/0/type", json!("int")),
            "'int' has meta-type builtin, where enum is needed",
        ),
        (
            broken("/2/variants/0/case", json!("b")),
            "is not a value of the tag's enum",
        ),
        (
            broken("/2/members/1/default", json!(0)),
            "default other than null",
        ),
        (broken("/3/values", json!(["b"])), "differ from members"),
        (
            broken("/1/name", json!("Empty")),
            "not hidden behind a number",
        ),
        (
            broken("/4/json-type", json!("integer")),
            "json-type \"integer\" is not valid",
        ),
        (broken("/0/meta-type", json!("procedure")), "not described"),
        (
            broken("/0/arg-type", json!("int")),
            "'int' has meta-type builtin, where object is needed",
        ),
    ];
    for (answer, want) in cases {
        let errs = violations(&answer, &get);
        assert!(
            errs.iter().any(|e| e.contains(want)),
            "expected {want:?} in {errs:?}"
        );
    }
    // Commands must match query-commands both ways.
    let errs = violations(&good, &["get".to_string(), "put".to_string()]);
    assert!(
        errs.iter().any(|e| e.contains("'put' is listed")),
        "{errs:?}"
    );
    let errs = violations(&good, &[]);
    assert!(
        errs.iter().any(|e| e.contains("'get' is described")),
        "{errs:?}"
    );
}
