//! The typed model of a schema, built from the parsed expressions of a
//! file and everything it includes.

use crate::doc::{self, Doc};
use crate::error::{Error, Pos};
use crate::syntax::{self, Spanned, TopLevel, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The types every schema knows without defining them.
pub const BUILTINS: &[&str] = &[
    "str", "int", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "size",
    "number", "bool", "null", "any",
];

/// A reference to a type: a name, or a list of a named type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TypeRef {
    Named(String),
    List(String),
}

impl TypeRef {
    pub fn name(&self) -> &str {
        match self {
            TypeRef::Named(n) | TypeRef::List(n) => n,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Member {
    pub name: String,
    pub ty: TypeRef,
    pub optional: bool,
    /// Feature names (`deprecated`, `unstable`, ...) given to the member.
    pub features: Vec<String>,
    pub doc: Option<String>,
    pub pos: Pos,
}

#[derive(Debug, Clone)]
pub struct Branch {
    pub name: String,
    pub ty: TypeRef,
    /// Feature names; only enum values can have any.
    pub features: Vec<String>,
    pub doc: Option<String>,
    pub pos: Pos,
}

#[derive(Debug, Clone)]
pub enum Members {
    Named(String, Pos),
    Inline(Vec<Member>),
}

#[derive(Debug, Clone)]
pub enum Kind {
    Enum(Vec<Branch>),
    Struct {
        base: Option<(String, Pos)>,
        members: Vec<Member>,
    },
    FlatUnion {
        base: Members,
        discriminator: String,
        branches: Vec<Branch>,
    },
    SimpleUnion(Vec<Branch>),
    Alternate(Vec<Branch>),
}

#[derive(Debug, Clone)]
pub struct TypeDef {
    pub name: String,
    pub kind: Kind,
    pub features: Vec<String>,
    pub doc: Option<Doc>,
    pub pos: Pos,
}

#[derive(Debug, Clone)]
pub struct Command {
    pub name: String,
    pub data: Option<Members>,
    pub returns: Option<TypeRef>,
    pub boxed: bool,
    /// May run out of band (`exec-oob`).
    pub allow_oob: bool,
    pub features: Vec<String>,
    pub doc: Option<Doc>,
    pub pos: Pos,
}

#[derive(Debug, Clone)]
pub struct Event {
    pub name: String,
    pub data: Option<Members>,
    pub features: Vec<String>,
    pub doc: Option<Doc>,
    pub pos: Pos,
}

/// A whole schema, in definition order.
#[derive(Debug, Default)]
pub struct Schema {
    pub types: Vec<TypeDef>,
    pub commands: Vec<Command>,
    pub events: Vec<Event>,
    /// Commands named by the `vubd-implemented-commands` pragma.
    pub implemented: Vec<String>,
    implemented_pos: Vec<Pos>,
    index: HashMap<String, usize>,
}

/// Reads a schema file, following its includes, and checks it.
pub fn load(path: &Path) -> Result<Schema, Error> {
    let mut loader = Loader {
        seen: Vec::new(),
        schema: Schema::default(),
        root: path.parent().map(Path::to_path_buf).unwrap_or_default(),
    };
    loader.file(path, None)?;
    let schema = loader.schema;
    crate::check::check(&schema)?;
    Ok(schema)
}

/// Parses schema text held in memory (no includes allowed) and checks it.
pub fn load_str(name: &str, text: &str) -> Result<Schema, Error> {
    let mut schema = Schema::default();
    for top in syntax::parse_file(name, text)? {
        if let Some(inc) = include_of(&top)? {
            return Err(Error::new(
                top.expr.pos,
                format!("cannot include '{inc}' from text held in memory"),
            ));
        }
        add_definition(&mut schema, top)?;
    }
    crate::check::check(&schema)?;
    Ok(schema)
}

struct Loader {
    seen: Vec<PathBuf>,
    schema: Schema,
    root: PathBuf,
}

impl Loader {
    fn file(&mut self, path: &Path, from: Option<&Pos>) -> Result<(), Error> {
        let key = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
        if self.seen.contains(&key) {
            return Ok(());
        }
        self.seen.push(key);
        let text = std::fs::read_to_string(path).map_err(|e| {
            let shown = path.strip_prefix(&self.root).unwrap_or(path);
            let msg = format!("cannot read '{}': {e}", shown.display());
            match from {
                Some(pos) => Error::new(pos.clone(), msg),
                None => Error::nowhere(msg),
            }
        })?;
        // Positions name files relative to the top file, so messages and
        // generated code never carry the absolute path of a machine.
        let shown = path
            .strip_prefix(&self.root)
            .unwrap_or(path)
            .display()
            .to_string();
        for top in syntax::parse_file(&shown, &text)? {
            if let Some(inc) = include_of(&top)? {
                let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
                self.file(&dir.join(inc), Some(&top.expr.pos))?;
                continue;
            }
            add_definition(&mut self.schema, top)?;
        }
        Ok(())
    }
}

fn include_of(top: &TopLevel) -> Result<Option<String>, Error> {
    let Value::Dict(entries) = &top.expr.value else {
        return Ok(None);
    };
    match entries.first() {
        Some((k, v)) if k == "include" => {
            check_keys(entries, &["include"])?;
            Ok(Some(string(v, "include")?))
        }
        _ => Ok(None),
    }
}

fn add_definition(schema: &mut Schema, top: TopLevel) -> Result<(), Error> {
    let TopLevel { expr, doc } = top;
    let Value::Dict(entries) = &expr.value else {
        return Err(Error::new(expr.pos, "expected a dictionary"));
    };
    let doc = match &doc {
        Some(raw) => Some(doc::parse(raw)?),
        None => None,
    };
    let Some((meta, name_val)) = entries.first() else {
        return Err(Error::new(expr.pos, "empty expression"));
    };
    let pos = expr.pos.clone();
    if meta == "pragma" {
        return add_pragma(schema, entries, name_val);
    }
    let name = string(name_val, meta)?;
    if let Some((doc, doc_pos)) = &doc {
        if doc.symbol != name {
            return Err(Error::new(
                doc_pos.clone(),
                format!(
                    "documentation block is for '{}' but the definition after it is '{name}'",
                    doc.symbol
                ),
            ));
        }
    }
    let doc = doc.map(|(d, _)| d);
    let doc_of = |m: &str| doc.as_ref().and_then(|d| d.member(m)).map(str::to_string);
    let get = |key: &str| entries.iter().find(|(k, _)| k == key).map(|(_, v)| v);
    let feats = get("features")
        .map(features)
        .transpose()?
        .unwrap_or_default();
    match meta.as_str() {
        "enum" => {
            check_keys(entries, &["enum", "data", "prefix", "features"])?;
            let data = required(&expr, get("data"), "data")?;
            let Value::List(items) = &data.value else {
                return Err(kind_error(data, "'data' of an enum", "a list"));
            };
            let mut values = Vec::new();
            for item in items {
                let (v, features) = enum_value(item)?;
                values.push(Branch {
                    doc: doc_of(&v),
                    name: v,
                    ty: TypeRef::Named("str".into()),
                    features,
                    pos: item.pos.clone(),
                });
            }
            push_type(schema, name, Kind::Enum(values), feats, doc, pos)
        }
        "struct" => {
            check_keys(entries, &["struct", "data", "base", "features"])?;
            let members = match get("data") {
                Some(d) => members(d, &doc_of)?,
                None => Vec::new(),
            };
            let base = match get("base") {
                Some(b) => Some((string(b, "base")?, b.pos.clone())),
                None => None,
            };
            push_type(schema, name, Kind::Struct { base, members }, feats, doc, pos)
        }
        "union" => {
            check_keys(entries, &["union", "data", "base", "discriminator", "features"])?;
            let data = required(&expr, get("data"), "data")?;
            let branches = branches(data, &doc_of)?;
            let kind = match (get("base"), get("discriminator")) {
                (None, None) => Kind::SimpleUnion(branches),
                (Some(base), Some(disc)) => Kind::FlatUnion {
                    base: members_or_name(base, &doc_of)?,
                    discriminator: string(disc, "discriminator")?,
                    branches,
                },
                (Some(_), None) => {
                    return Err(Error::new(pos, "union with a 'base' needs a 'discriminator'"))
                }
                (None, Some(d)) => {
                    return Err(Error::new(
                        d.pos.clone(),
                        "union with a 'discriminator' needs a 'base'",
                    ))
                }
            };
            push_type(schema, name, kind, feats, doc, pos)
        }
        "alternate" => {
            check_keys(entries, &["alternate", "data", "features"])?;
            let data = required(&expr, get("data"), "data")?;
            let branches = branches(data, &doc_of)?;
            push_type(schema, name, Kind::Alternate(branches), feats, doc, pos)
        }
        "command" => {
            check_keys(
                entries,
                &["command", "data", "returns", "boxed", "allow-oob", "features"],
            )?;
            let data = get("data").map(|d| members_or_name(d, &doc_of)).transpose()?;
            let returns = get("returns").map(type_ref).transpose()?;
            let flag = |key: &str| match get(key) {
                Some(Spanned {
                    value: Value::Bool(b),
                    ..
                }) => Ok(*b),
                Some(other) => Err(kind_error(other, &format!("'{key}'"), "true or false")),
                None => Ok(false),
            };
            let boxed = flag("boxed")?;
            let allow_oob = flag("allow-oob")?;
            if name_taken(schema, &name, |s| s.commands.iter().map(|c| &c.name)) {
                return Err(Error::new(pos, format!("command '{name}' is defined twice")));
            }
            schema.commands.push(Command {
                name,
                data,
                returns,
                boxed,
                allow_oob,
                features: feats,
                doc,
                pos,
            });
            Ok(())
        }
        "event" => {
            check_keys(entries, &["event", "data", "features"])?;
            let data = get("data").map(|d| members_or_name(d, &doc_of)).transpose()?;
            if name_taken(schema, &name, |s| s.events.iter().map(|e| &e.name)) {
                return Err(Error::new(pos, format!("event '{name}' is defined twice")));
            }
            schema.events.push(Event {
                name,
                data,
                features: feats,
                doc,
                pos,
            });
            Ok(())
        }
        other => Err(Error::new(
            pos,
            format!("unknown expression kind '{other}' (expected enum, struct, union, alternate, command, event, include or pragma)"),
        )),
    }
}

fn name_taken<'a, F, I>(schema: &'a Schema, name: &str, names: F) -> bool
where
    F: Fn(&'a Schema) -> I,
    I: Iterator<Item = &'a String>,
{
    names(schema).any(|n| n == name)
}

fn push_type(
    schema: &mut Schema,
    name: String,
    kind: Kind,
    features: Vec<String>,
    doc: Option<Doc>,
    pos: Pos,
) -> Result<(), Error> {
    if BUILTINS.contains(&name.as_str()) {
        return Err(Error::new(
            pos,
            format!("'{name}' is a built-in type and cannot be redefined"),
        ));
    }
    if let Some(&i) = schema.index.get(&name) {
        return Err(Error::new(
            pos,
            format!(
                "type '{name}' is already defined at {}",
                schema.types[i].pos
            ),
        ));
    }
    schema.index.insert(name.clone(), schema.types.len());
    schema.types.push(TypeDef {
        name,
        kind,
        features,
        doc,
        pos,
    });
    Ok(())
}

fn add_pragma(
    schema: &mut Schema,
    entries: &[(String, Spanned)],
    body: &Spanned,
) -> Result<(), Error> {
    check_keys(entries, &["pragma"])?;
    let Value::Dict(pragmas) = &body.value else {
        return Err(kind_error(body, "'pragma'", "a dictionary"));
    };
    for (key, value) in pragmas {
        match key.as_str() {
            "vubd-implemented-commands" => {
                let Value::List(items) = &value.value else {
                    return Err(kind_error(
                        value,
                        "pragma 'vubd-implemented-commands'",
                        "a list",
                    ));
                };
                for item in items {
                    schema.implemented.push(string(item, "command name")?);
                    schema.implemented_pos.push(item.pos.clone());
                }
            }
            other => {
                return Err(Error::new(
                    value.pos.clone(),
                    format!("unknown pragma '{other}'"),
                ))
            }
        }
    }
    Ok(())
}

fn check_keys(entries: &[(String, Spanned)], allowed: &[&str]) -> Result<(), Error> {
    for (k, v) in entries {
        if !allowed.contains(&k.as_str()) {
            return Err(Error::new(
                v.pos.clone(),
                format!("'{}' expression has unknown key '{k}'", allowed[0]),
            ));
        }
    }
    Ok(())
}

fn required<'a>(expr: &Spanned, v: Option<&'a Spanned>, key: &str) -> Result<&'a Spanned, Error> {
    v.ok_or_else(|| Error::new(expr.pos.clone(), format!("key '{key}' is missing")))
}

fn kind_error(v: &Spanned, what: &str, expected: &str) -> Error {
    Error::new(
        v.pos.clone(),
        format!("{what} must be {expected}, found {}", v.kind()),
    )
}

fn string(v: &Spanned, what: &str) -> Result<String, Error> {
    match &v.value {
        Value::Str(s) => Ok(s.clone()),
        _ => Err(kind_error(v, &format!("'{what}'"), "a string")),
    }
}

fn type_ref(v: &Spanned) -> Result<TypeRef, Error> {
    match &v.value {
        Value::Str(s) => Ok(TypeRef::Named(s.clone())),
        Value::List(items) => match items.as_slice() {
            [one] => Ok(TypeRef::List(string(one, "list element type")?)),
            _ => Err(Error::new(
                v.pos.clone(),
                "a list type must name exactly one element type",
            )),
        },
        _ => Err(kind_error(v, "a type", "a type name or a one-element list")),
    }
}

fn members(v: &Spanned, doc_of: &dyn Fn(&str) -> Option<String>) -> Result<Vec<Member>, Error> {
    let Value::Dict(entries) = &v.value else {
        return Err(kind_error(v, "'data'", "a dictionary of members"));
    };
    entries
        .iter()
        .map(|(key, ty)| {
            let (name, optional) = match key.strip_prefix('*') {
                Some(rest) => (rest.to_string(), true),
                None => (key.clone(), false),
            };
            let (ty_ref, features) = member_type(&name, ty)?;
            Ok(Member {
                doc: doc_of(&name),
                name,
                ty: ty_ref,
                optional,
                features,
                pos: ty.pos.clone(),
            })
        })
        .collect()
}

/// A member's type: a type name or list, or the long form
/// `{ 'type': TYPE, 'features': [ ... ] }`.
fn member_type(name: &str, v: &Spanned) -> Result<(TypeRef, Vec<String>), Error> {
    let Value::Dict(entries) = &v.value else {
        return Ok((type_ref(v)?, Vec::new()));
    };
    let mut ty = None;
    let mut feats = Vec::new();
    for (key, value) in entries {
        match key.as_str() {
            "type" => ty = Some(type_ref(value)?),
            "features" => feats = features(value)?,
            other => {
                return Err(Error::new(
                    value.pos.clone(),
                    format!("member '{name}' has unknown key '{other}'"),
                ))
            }
        }
    }
    let ty =
        ty.ok_or_else(|| Error::new(v.pos.clone(), format!("member '{name}' needs a 'type'")))?;
    Ok((ty, feats))
}

/// An enum value: its name, or the long form
/// `{ 'name': NAME, 'features': [ ... ] }`.
fn enum_value(v: &Spanned) -> Result<(String, Vec<String>), Error> {
    let Value::Dict(entries) = &v.value else {
        return Ok((string(v, "enum value")?, Vec::new()));
    };
    let mut name = None;
    let mut feats = Vec::new();
    for (key, value) in entries {
        match key.as_str() {
            "name" => name = Some(string(value, "enum value")?),
            "features" => feats = features(value)?,
            other => {
                return Err(Error::new(
                    value.pos.clone(),
                    format!("enum value has unknown key '{other}'"),
                ))
            }
        }
    }
    let name = name.ok_or_else(|| Error::new(v.pos.clone(), "enum value needs a 'name'"))?;
    Ok((name, feats))
}

/// A list of feature names: lower case letters, digits and dashes, each
/// once.
fn features(v: &Spanned) -> Result<Vec<String>, Error> {
    let Value::List(items) = &v.value else {
        return Err(kind_error(v, "'features'", "a list of feature names"));
    };
    let mut out: Vec<String> = Vec::new();
    for item in items {
        let f = string(item, "feature")?;
        let well_formed = f.starts_with(|c: char| c.is_ascii_lowercase())
            && f.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if !well_formed {
            return Err(Error::new(
                item.pos.clone(),
                format!("feature name '{f}' must be lower case letters, digits and '-', starting with a letter"),
            ));
        }
        if out.contains(&f) {
            return Err(Error::new(
                item.pos.clone(),
                format!("feature '{f}' is given twice"),
            ));
        }
        out.push(f);
    }
    Ok(out)
}

fn members_or_name(v: &Spanned, doc_of: &dyn Fn(&str) -> Option<String>) -> Result<Members, Error> {
    match &v.value {
        Value::Str(s) => Ok(Members::Named(s.clone(), v.pos.clone())),
        _ => Ok(Members::Inline(members(v, doc_of)?)),
    }
}

fn branches(v: &Spanned, doc_of: &dyn Fn(&str) -> Option<String>) -> Result<Vec<Branch>, Error> {
    let Value::Dict(entries) = &v.value else {
        return Err(kind_error(v, "'data'", "a dictionary of branches"));
    };
    entries
        .iter()
        .map(|(name, ty)| {
            if name.starts_with('*') {
                return Err(Error::new(
                    ty.pos.clone(),
                    format!("branch '{name}' cannot be optional"),
                ));
            }
            Ok(Branch {
                doc: doc_of(name),
                name: name.clone(),
                ty: type_ref(ty)?,
                features: Vec::new(),
                pos: ty.pos.clone(),
            })
        })
        .collect()
}

impl Schema {
    pub fn lookup(&self, name: &str) -> Option<&TypeDef> {
        self.index.get(name).map(|&i| &self.types[i])
    }

    pub fn implemented_positions(&self) -> impl Iterator<Item = (&String, &Pos)> {
        self.implemented.iter().zip(self.implemented_pos.iter())
    }

    /// The members of a struct, its base's first. Unknown or cyclic bases
    /// are reported by the checker; here they simply end the chain.
    pub fn struct_members(&self, name: &str) -> Vec<&Member> {
        let mut chain = Vec::new();
        let mut next = Some(name);
        while let Some(n) = next {
            if chain.len() > self.types.len() {
                break;
            }
            match self.lookup(n).map(|t| &t.kind) {
                Some(Kind::Struct { base, members }) => {
                    chain.push(members);
                    next = base.as_ref().map(|(b, _)| b.as_str());
                }
                _ => break,
            }
        }
        chain.into_iter().rev().flatten().collect()
    }

    /// The members a set of members stands for: inline ones, or a struct's.
    pub fn members_of<'a>(&'a self, m: &'a Members) -> Vec<&'a Member> {
        match m {
            Members::Inline(list) => list.iter().collect(),
            Members::Named(n, _) => self.struct_members(n),
        }
    }

    /// Whether `name` is defined as a struct.
    pub fn is_struct(&self, name: &str) -> bool {
        matches!(
            self.lookup(name).map(|t| &t.kind),
            Some(Kind::Struct { .. })
        )
    }
}
