//! The answer of `query-qmp-schema`, worked out once from the schema.
//!
//! The answer is a list of entities in QEMU's introspection format: every
//! command the daemon implements, every event, and each type those reach,
//! once. Types are referred to by name, and their schema names are not
//! part of the wire interface, so they are replaced by numbers in the
//! order they are first used; built-in types keep their names and an
//! array is named after its element, `[3]` or `[str]`. What the schema
//! leaves implicit is spelled out the way QEMU does:
//!
//! * every integer type is `int`;
//! * a command without arguments or without a return type, and an event
//!   without data, refer to one empty object type;
//! * inline arguments and event data become object types of their own;
//! * a struct lists its base's members before its own;
//! * a flat union is an object with its base's members, the discriminator
//!   as tag, and one variant for every value of the tag's enum (values
//!   without a branch get the empty object);
//! * a simple union is an object whose tag `type` is an enum of the branch
//!   names, and whose variants are wrapper objects with a single member
//!   `data` (QEMU made all of its simple unions look like this);
//! * optional members carry `"default": null`.
//!
//! The output is deterministic: the entities come in schema order
//! (commands, then events), followed by the types in the order they were
//! first used.

use crate::schema::{Kind, Member, Members, Schema, TypeRef};
use std::collections::HashMap;

/// A type as introspection sees it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Ty<'a> {
    /// A built-in type, by the name introspection gives it.
    Builtin(&'static str),
    /// A type the schema defines.
    Named(&'a str),
    Array(Box<Ty<'a>>),
    /// The object without members.
    Empty,
    /// The inline arguments of a command.
    CommandArgs(&'a str),
    /// The inline data of an event.
    EventData(&'a str),
    /// The enum of a simple union's branch names.
    UnionTag(&'a str),
    /// The object `{ "data": T }` a simple union branch of type T stands for.
    Wrapper(Box<Ty<'a>>),
}

/// The introspection name of a built-in type, or `None` if `name` is not
/// built in.
fn builtin(name: &str) -> Option<&'static str> {
    Some(match name {
        "str" => "str",
        "int" | "int8" | "int16" | "int32" | "int64" | "uint8" | "uint16" | "uint32" | "uint64"
        | "size" => "int",
        "number" => "number",
        "bool" => "bool",
        "null" => "null",
        "any" => "any",
        _ => return None,
    })
}

/// The JSON type a built-in type has on the wire.
fn json_type(builtin: &str) -> &'static str {
    match builtin {
        "str" => "string",
        "int" => "int",
        "number" => "number",
        "bool" => "boolean",
        "null" => "null",
        _ => "value",
    }
}

fn resolve_name(name: &str) -> Ty<'_> {
    match builtin(name) {
        Some(b) => Ty::Builtin(b),
        None => Ty::Named(name),
    }
}

fn resolve(ty: &TypeRef) -> Ty<'_> {
    match ty {
        TypeRef::Named(n) => resolve_name(n),
        TypeRef::List(n) => Ty::Array(Box::new(resolve_name(n))),
    }
}

/// A JSON value, written with its members in the order given.
#[derive(Debug, Clone, PartialEq)]
enum Json {
    Str(String),
    Bool(bool),
    Null,
    List(Vec<Json>),
    Obj(Vec<(&'static str, Json)>),
}

impl Json {
    fn str(s: impl Into<String>) -> Json {
        Json::Str(s.into())
    }

    fn write(&self, out: &mut String) {
        match self {
            Json::Str(s) => write_str(s, out),
            Json::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Json::Null => out.push_str("null"),
            Json::List(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    item.write(out);
                }
                out.push(']');
            }
            Json::Obj(members) => {
                out.push('{');
                for (i, (key, value)) in members.iter().enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    write_str(key, out);
                    out.push_str(": ");
                    value.write(out);
                }
                out.push('}');
            }
        }
    }
}

fn write_str(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Adds `"features": [...]` when there are any.
fn push_features(obj: &mut Vec<(&'static str, Json)>, features: &[String]) {
    if !features.is_empty() {
        obj.push((
            "features",
            Json::List(features.iter().map(Json::str).collect()),
        ));
    }
}

struct Intro<'a> {
    schema: &'a Schema,
    /// Types in the order they were first used; each gets an entry.
    used: Vec<Ty<'a>>,
    /// The numbers given to types that are neither built in nor arrays.
    numbers: HashMap<Ty<'a>, usize>,
}

impl<'a> Intro<'a> {
    /// Notes that `ty` is used and returns the name it goes by.
    fn use_type(&mut self, ty: Ty<'a>) -> String {
        if !self.used.contains(&ty) {
            self.used.push(ty.clone());
        }
        match ty {
            Ty::Builtin(b) => b.to_string(),
            Ty::Array(elem) => format!("[{}]", self.use_type(*elem)),
            other => {
                let next = self.numbers.len();
                self.numbers.entry(other).or_insert(next).to_string()
            }
        }
    }

    fn args_type(data: &'a Option<Members>, inline: Ty<'a>) -> Ty<'a> {
        match data {
            None => Ty::Empty,
            Some(Members::Inline(list)) if list.is_empty() => Ty::Empty,
            Some(Members::Inline(_)) => inline,
            Some(Members::Named(n, _)) => Ty::Named(n),
        }
    }

    fn entities(&mut self) -> Vec<Json> {
        let schema = self.schema;
        let mut out = Vec::new();
        for c in &schema.commands {
            if !schema.implemented.contains(&c.name) {
                continue;
            }
            let arg = self.use_type(Self::args_type(&c.data, Ty::CommandArgs(&c.name)));
            let ret = self.use_type(c.returns.as_ref().map(resolve).unwrap_or(Ty::Empty));
            let mut obj = vec![
                ("name", Json::str(&c.name)),
                ("meta-type", Json::str("command")),
            ];
            push_features(&mut obj, &c.features);
            obj.push(("arg-type", Json::Str(arg)));
            obj.push(("ret-type", Json::Str(ret)));
            if c.allow_oob {
                obj.push(("allow-oob", Json::Bool(true)));
            }
            out.push(Json::Obj(obj));
        }
        for e in &schema.events {
            let arg = self.use_type(Self::args_type(&e.data, Ty::EventData(&e.name)));
            let mut obj = vec![
                ("name", Json::str(&e.name)),
                ("meta-type", Json::str("event")),
            ];
            push_features(&mut obj, &e.features);
            obj.push(("arg-type", Json::Str(arg)));
            out.push(Json::Obj(obj));
        }
        // Describing a type may use more types; they join the end.
        let mut i = 0;
        while let Some(ty) = self.used.get(i).cloned() {
            out.push(self.type_entry(ty));
            i += 1;
        }
        out
    }

    fn members(&mut self, members: &[&'a Member]) -> Json {
        let list = members
            .iter()
            .map(|m| {
                let mut obj = vec![
                    ("name", Json::str(&m.name)),
                    ("type", Json::Str(self.use_type(resolve(&m.ty)))),
                ];
                if m.optional {
                    obj.push(("default", Json::Null));
                }
                push_features(&mut obj, &m.features);
                Json::Obj(obj)
            })
            .collect();
        Json::List(list)
    }

    /// The members of an object type's entry, before any tag.
    fn object_fields(
        &mut self,
        name: String,
        features: &[String],
        members: &[&'a Member],
    ) -> Vec<(&'static str, Json)> {
        let mut obj = vec![
            ("name", Json::Str(name)),
            ("meta-type", Json::str("object")),
        ];
        push_features(&mut obj, features);
        obj.push(("members", self.members(members)));
        obj
    }

    fn object(&mut self, name: String, features: &[String], members: &[&'a Member]) -> Json {
        Json::Obj(self.object_fields(name, features, members))
    }

    fn enumeration<'n>(
        name: String,
        features: &[String],
        values: impl Iterator<Item = (&'n str, &'n [String])>,
    ) -> Json {
        let mut obj = vec![("name", Json::Str(name)), ("meta-type", Json::str("enum"))];
        push_features(&mut obj, features);
        let mut members = Vec::new();
        let mut names = Vec::new();
        for (value, features) in values {
            let mut m = vec![("name", Json::str(value))];
            push_features(&mut m, features);
            members.push(Json::Obj(m));
            names.push(Json::str(value));
        }
        obj.push(("members", Json::List(members)));
        obj.push(("values", Json::List(names)));
        Json::Obj(obj)
    }

    fn type_entry(&mut self, ty: Ty<'a>) -> Json {
        let schema = self.schema;
        let name = self.use_type(ty.clone());
        match ty {
            Ty::Builtin(b) => Json::Obj(vec![
                ("name", Json::Str(name)),
                ("meta-type", Json::str("builtin")),
                ("json-type", Json::str(json_type(b))),
            ]),
            Ty::Array(elem) => {
                let elem = self.use_type(*elem);
                Json::Obj(vec![
                    ("name", Json::Str(name)),
                    ("meta-type", Json::str("array")),
                    ("element-type", Json::Str(elem)),
                ])
            }
            Ty::Empty => self.object(name, &[], &[]),
            Ty::CommandArgs(c) => {
                let data = schema
                    .commands
                    .iter()
                    .find(|x| x.name == c)
                    .and_then(|x| x.data.as_ref());
                let members = data.map(|d| schema.members_of(d)).unwrap_or_default();
                self.object(name, &[], &members)
            }
            Ty::EventData(e) => {
                let data = schema
                    .events
                    .iter()
                    .find(|x| x.name == e)
                    .and_then(|x| x.data.as_ref());
                let members = data.map(|d| schema.members_of(d)).unwrap_or_default();
                self.object(name, &[], &members)
            }
            Ty::UnionTag(u) => {
                let branches = match schema.lookup(u).map(|t| &t.kind) {
                    Some(Kind::SimpleUnion(b)) => b.as_slice(),
                    _ => &[],
                };
                Self::enumeration(
                    name,
                    &[],
                    branches.iter().map(|b| (b.name.as_str(), &[][..])),
                )
            }
            Ty::Wrapper(inner) => {
                let data = self.use_type(*inner);
                Json::Obj(vec![
                    ("name", Json::Str(name)),
                    ("meta-type", Json::str("object")),
                    (
                        "members",
                        Json::List(vec![Json::Obj(vec![
                            ("name", Json::str("data")),
                            ("type", Json::Str(data)),
                        ])]),
                    ),
                ])
            }
            Ty::Named(n) => match schema.lookup(n) {
                Some(t) => self.defined(name, &t.kind, &t.features, n),
                // The checker refuses unknown types; an entry that says
                // nothing is the least wrong answer if one slips through.
                None => self.object(name, &[], &[]),
            },
        }
    }

    fn defined(&mut self, name: String, kind: &'a Kind, features: &[String], n: &'a str) -> Json {
        let schema = self.schema;
        match kind {
            Kind::Enum(values) => Self::enumeration(
                name,
                features,
                values
                    .iter()
                    .map(|v| (v.name.as_str(), v.features.as_slice())),
            ),
            Kind::Struct { .. } => self.object(name, features, &schema.struct_members(n)),
            Kind::FlatUnion {
                base,
                discriminator,
                branches,
            } => {
                let base = schema.members_of(base);
                let mut obj = self.object_fields(name, features, &base);
                let tag_values = base
                    .iter()
                    .find(|m| &m.name == discriminator)
                    .and_then(|m| schema.lookup(m.ty.name()))
                    .map(|t| match &t.kind {
                        Kind::Enum(values) => values.as_slice(),
                        _ => &[],
                    })
                    .unwrap_or_default();
                let mut variants = Vec::new();
                for b in branches {
                    let ty = self.use_type(resolve(&b.ty));
                    variants.push(variant(&b.name, ty));
                }
                for v in tag_values {
                    if !branches.iter().any(|b| b.name == v.name) {
                        let ty = self.use_type(Ty::Empty);
                        variants.push(variant(&v.name, ty));
                    }
                }
                obj.push(("tag", Json::str(discriminator)));
                obj.push(("variants", Json::List(variants)));
                Json::Obj(obj)
            }
            Kind::SimpleUnion(branches) => {
                let tag = self.use_type(Ty::UnionTag(n));
                let mut obj = vec![
                    ("name", Json::Str(name)),
                    ("meta-type", Json::str("object")),
                ];
                push_features(&mut obj, features);
                obj.push((
                    "members",
                    Json::List(vec![Json::Obj(vec![
                        ("name", Json::str("type")),
                        ("type", Json::Str(tag)),
                    ])]),
                ));
                let mut variants = Vec::new();
                for b in branches {
                    let ty = self.use_type(Ty::Wrapper(Box::new(resolve(&b.ty))));
                    variants.push(variant(&b.name, ty));
                }
                obj.push(("tag", Json::str("type")));
                obj.push(("variants", Json::List(variants)));
                Json::Obj(obj)
            }
            Kind::Alternate(branches) => {
                let mut obj = vec![
                    ("name", Json::Str(name)),
                    ("meta-type", Json::str("alternate")),
                ];
                push_features(&mut obj, features);
                let members = branches
                    .iter()
                    .map(|b| Json::Obj(vec![("type", Json::Str(self.use_type(resolve(&b.ty))))]))
                    .collect();
                obj.push(("members", Json::List(members)));
                Json::Obj(obj)
            }
        }
    }
}

fn variant(case: &str, ty: String) -> Json {
    Json::Obj(vec![("case", Json::str(case)), ("type", Json::Str(ty))])
}

/// The whole answer as JSON text: a list with one entity per line.
pub fn generate(schema: &Schema) -> String {
    let mut intro = Intro {
        schema,
        used: Vec::new(),
        numbers: HashMap::new(),
    };
    let entities = intro.entities();
    let mut out = String::from("[\n");
    for (i, e) in entities.iter().enumerate() {
        e.write(&mut out);
        if i + 1 < entities.len() {
            out.push(',');
        }
        out.push('\n');
    }
    out.push_str("]\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::load_str;

    fn answer(text: &str) -> Vec<String> {
        let schema = load_str("t.json", text).unwrap_or_else(|e| panic!("{e}"));
        generate(&schema)
            .lines()
            .filter(|l| l.starts_with('{'))
            .map(|l| l.trim_end_matches(',').to_string())
            .collect()
    }

    #[test]
    fn commands_without_arguments_or_return_share_the_empty_object() {
        let got = answer(
            "{ 'command': 'quit' }
             { 'command': 'stop', 'data': {} }
             { 'event': 'STOPPED' }
             { 'pragma': { 'vubd-implemented-commands': [ 'quit', 'stop' ] } }",
        );
        assert_eq!(
            got,
            [
                r#"{"name": "quit", "meta-type": "command", "arg-type": "0", "ret-type": "0"}"#,
                r#"{"name": "stop", "meta-type": "command", "arg-type": "0", "ret-type": "0"}"#,
                r#"{"name": "STOPPED", "meta-type": "event", "arg-type": "0"}"#,
                r#"{"name": "0", "meta-type": "object", "members": []}"#,
            ]
        );
    }

    #[test]
    fn allow_oob_is_shown_only_when_true() {
        let got = answer(
            "{ 'command': 'ping', 'allow-oob': true }
             { 'command': 'slow', 'allow-oob': false }
             { 'pragma': { 'vubd-implemented-commands': [ 'ping', 'slow' ] } }",
        );
        assert_eq!(
            got[..2],
            [
                r#"{"name": "ping", "meta-type": "command", "arg-type": "0", "ret-type": "0", "allow-oob": true}"#,
                r#"{"name": "slow", "meta-type": "command", "arg-type": "0", "ret-type": "0"}"#,
            ]
        );
    }

    #[test]
    fn unimplemented_commands_and_their_types_are_left_out() {
        let got = answer(
            "{ 'struct': 'Only', 'data': { 'x': 'str' } }
             { 'command': 'hidden', 'data': 'Only' }
             { 'command': 'shown', 'returns': [ 'uint8' ] }
             { 'pragma': { 'vubd-implemented-commands': [ 'shown' ] } }",
        );
        assert_eq!(
            got,
            [
                r#"{"name": "shown", "meta-type": "command", "arg-type": "0", "ret-type": "[int]"}"#,
                r#"{"name": "0", "meta-type": "object", "members": []}"#,
                r#"{"name": "[int]", "meta-type": "array", "element-type": "int"}"#,
                r#"{"name": "int", "meta-type": "builtin", "json-type": "int"}"#,
            ]
        );
    }

    #[test]
    fn simple_union_becomes_tag_enum_and_wrappers() {
        let got = answer(
            "{ 'struct': 'A', 'data': { '*n': 'int64' } }
             { 'union': 'U', 'data': { 'a': 'A', 'b': 'A', 's': 'str' } }
             { 'command': 'get', 'returns': 'U' }
             { 'pragma': { 'vubd-implemented-commands': [ 'get' ] } }",
        );
        assert_eq!(
            got,
            [
                r#"{"name": "get", "meta-type": "command", "arg-type": "0", "ret-type": "1"}"#,
                r#"{"name": "0", "meta-type": "object", "members": []}"#,
                r#"{"name": "1", "meta-type": "object", "members": [{"name": "type", "type": "2"}], "tag": "type", "variants": [{"case": "a", "type": "3"}, {"case": "b", "type": "3"}, {"case": "s", "type": "4"}]}"#,
                r#"{"name": "2", "meta-type": "enum", "members": [{"name": "a"}, {"name": "b"}, {"name": "s"}], "values": ["a", "b", "s"]}"#,
                r#"{"name": "3", "meta-type": "object", "members": [{"name": "data", "type": "5"}]}"#,
                r#"{"name": "4", "meta-type": "object", "members": [{"name": "data", "type": "str"}]}"#,
                r#"{"name": "5", "meta-type": "object", "members": [{"name": "n", "type": "int", "default": null}]}"#,
                r#"{"name": "str", "meta-type": "builtin", "json-type": "string"}"#,
                r#"{"name": "int", "meta-type": "builtin", "json-type": "int"}"#,
            ]
        );
    }

    #[test]
    fn flat_union_lists_every_tag_value_and_features() {
        let got = answer(
            "{ 'enum': 'K', 'data': [ 'x', { 'name': 'y', 'features': [ 'deprecated' ] } ] }
             { 'struct': 'X', 'data': { 'v': { 'type': 'bool', 'features': [ 'unstable' ] } } }
             { 'union': 'F', 'base': { 'kind': 'K' }, 'discriminator': 'kind',
               'data': { 'x': 'X' } }
             { 'command': 'set', 'data': 'F', 'boxed': true, 'features': [ 'unstable' ] }
             { 'pragma': { 'vubd-implemented-commands': [ 'set' ] } }",
        );
        assert_eq!(
            got,
            [
                r#"{"name": "set", "meta-type": "command", "features": ["unstable"], "arg-type": "0", "ret-type": "1"}"#,
                r#"{"name": "0", "meta-type": "object", "members": [{"name": "kind", "type": "2"}], "tag": "kind", "variants": [{"case": "x", "type": "3"}, {"case": "y", "type": "1"}]}"#,
                r#"{"name": "1", "meta-type": "object", "members": []}"#,
                r#"{"name": "2", "meta-type": "enum", "members": [{"name": "x"}, {"name": "y", "features": ["deprecated"]}], "values": ["x", "y"]}"#,
                r#"{"name": "3", "meta-type": "object", "members": [{"name": "v", "type": "bool", "features": ["unstable"]}]}"#,
                r#"{"name": "bool", "meta-type": "builtin", "json-type": "boolean"}"#,
            ]
        );
    }

    #[test]
    fn strings_are_escaped() {
        let mut out = String::new();
        Json::str("a\"b\\c\n").write(&mut out);
        assert_eq!(out, r#""a\"b\\c\u000a""#);
    }
}
