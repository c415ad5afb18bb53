//! Semantic checks on a loaded schema: every name resolves, members are
//! unique, unions and alternates are well formed, and the generated Rust
//! names cannot collide.

use crate::error::{Error, Pos};
use crate::names;
use crate::schema::{Branch, Kind, Member, Members, Schema, TypeRef, BUILTINS};
use std::collections::HashMap;

pub fn check(schema: &Schema) -> Result<(), Error> {
    for t in &schema.types {
        check_type(schema, &t.name, &t.kind, &t.pos)?;
    }
    for c in &schema.commands {
        if let Some(data) = &c.data {
            check_data(schema, data, c.boxed, &format!("command '{}'", c.name))?;
        }
        if let Some(r) = &c.returns {
            known(schema, r, &c.pos)?;
        }
    }
    for e in &schema.events {
        if let Some(data) = &e.data {
            check_data(schema, data, false, &format!("event '{}'", e.name))?;
        }
    }
    for (name, pos) in schema.implemented_positions() {
        if !schema.commands.iter().any(|c| &c.name == name) {
            return Err(Error::new(
                pos.clone(),
                format!("pragma 'vubd-implemented-commands' names unknown command '{name}'"),
            ));
        }
    }
    check_docs(schema)?;
    check_rust_names(schema)
}

fn known(schema: &Schema, ty: &TypeRef, pos: &Pos) -> Result<(), Error> {
    let n = ty.name();
    if BUILTINS.contains(&n) || schema.lookup(n).is_some() {
        Ok(())
    } else {
        Err(Error::new(pos.clone(), format!("unknown type '{n}'")))
    }
}

fn check_members(schema: &Schema, members: &[&Member], owner: &str) -> Result<(), Error> {
    let mut seen: HashMap<&str, &Member> = HashMap::new();
    for m in members {
        known(schema, &m.ty, &m.pos)?;
        if let Some(first) = seen.insert(m.name.as_str(), m) {
            return Err(Error::new(
                m.pos.clone(),
                format!(
                    "{owner} has member '{}' twice (first at {})",
                    m.name, first.pos
                ),
            ));
        }
    }
    Ok(())
}

fn check_struct_base(schema: &Schema, name: &str, pos: &Pos) -> Result<(), Error> {
    let mut at = name.to_string();
    let mut steps = 0;
    while let Some(Kind::Struct {
        base: Some((b, bpos)),
        ..
    }) = schema.lookup(&at).map(|t| &t.kind)
    {
        if !schema.is_struct(b) {
            let what = if schema.lookup(b).is_some() {
                "is not a struct"
            } else {
                "is not defined"
            };
            return Err(Error::new(
                bpos.clone(),
                format!("base '{b}' of '{at}' {what}"),
            ));
        }
        steps += 1;
        if b == name || steps > schema.types.len() {
            return Err(Error::new(
                pos.clone(),
                format!("struct '{name}' is its own base"),
            ));
        }
        at = b.clone();
    }
    Ok(())
}

fn check_type(schema: &Schema, name: &str, kind: &Kind, pos: &Pos) -> Result<(), Error> {
    match kind {
        Kind::Enum(values) => unique_branches(values, &format!("enum '{name}'")),
        Kind::Struct { .. } => {
            check_struct_base(schema, name, pos)?;
            check_members(
                schema,
                &schema.struct_members(name),
                &format!("struct '{name}'"),
            )
        }
        Kind::SimpleUnion(branches) => {
            unique_branches(branches, &format!("union '{name}'"))?;
            for b in branches {
                known(schema, &b.ty, &b.pos)?;
            }
            Ok(())
        }
        Kind::FlatUnion {
            base,
            discriminator,
            branches,
        } => check_flat_union(schema, name, base, discriminator, branches, pos),
        Kind::Alternate(branches) => check_alternate(schema, name, branches, pos),
    }
}

fn check_flat_union(
    schema: &Schema,
    name: &str,
    base: &Members,
    discriminator: &str,
    branches: &[Branch],
    pos: &Pos,
) -> Result<(), Error> {
    let owner = format!("union '{name}'");
    if let Members::Named(b, bpos) = base {
        if !schema.is_struct(b) {
            return Err(Error::new(
                bpos.clone(),
                format!("base '{b}' of {owner} is not a struct"),
            ));
        }
    }
    let base_members = schema.members_of(base);
    check_members(schema, &base_members, &owner)?;
    let Some(disc) = base_members.iter().find(|m| m.name == discriminator) else {
        return Err(Error::new(
            pos.clone(),
            format!("discriminator '{discriminator}' of {owner} is not a member of its base"),
        ));
    };
    if disc.optional {
        return Err(Error::new(
            disc.pos.clone(),
            format!("discriminator '{discriminator}' of {owner} must not be optional"),
        ));
    }
    let values = match (&disc.ty, schema.lookup(disc.ty.name()).map(|t| &t.kind)) {
        (TypeRef::Named(_), Some(Kind::Enum(values))) => values,
        _ => {
            return Err(Error::new(
                disc.pos.clone(),
                format!("discriminator '{discriminator}' of {owner} must be of an enum type"),
            ))
        }
    };
    unique_branches(branches, &owner)?;
    for b in branches {
        if !values.iter().any(|v| v.name == b.name) {
            return Err(Error::new(
                b.pos.clone(),
                format!(
                    "branch '{}' of {owner} is not a value of enum '{}'",
                    b.name,
                    disc.ty.name()
                ),
            ));
        }
        known(schema, &b.ty, &b.pos)?;
        let (TypeRef::Named(bt), true) = (&b.ty, schema.is_struct(b.ty.name())) else {
            return Err(Error::new(
                b.pos.clone(),
                format!("branch '{}' of {owner} must be a struct type", b.name),
            ));
        };
        let mut all = base_members.clone();
        all.extend(schema.struct_members(bt));
        check_members(schema, &all, &format!("{owner} branch '{}'", b.name))?;
    }
    Ok(())
}

/// The JSON shape a value of a type has on the wire, for alternates.
fn json_shape(schema: &Schema, ty: &TypeRef) -> &'static str {
    if let TypeRef::List(_) = ty {
        return "array";
    }
    match ty.name() {
        "str" => "string",
        "bool" => "boolean",
        "null" => "null",
        "number" => "number",
        "any" => "any",
        n if BUILTINS.contains(&n) => "number",
        n => match schema.lookup(n).map(|t| &t.kind) {
            Some(Kind::Enum(_)) => "string",
            Some(Kind::Alternate(_)) => "alternate",
            _ => "object",
        },
    }
}

fn check_alternate(
    schema: &Schema,
    name: &str,
    branches: &[Branch],
    pos: &Pos,
) -> Result<(), Error> {
    let owner = format!("alternate '{name}'");
    if branches.is_empty() {
        return Err(Error::new(pos.clone(), format!("{owner} has no branches")));
    }
    unique_branches(branches, &owner)?;
    let mut shapes: HashMap<&str, &Branch> = HashMap::new();
    for b in branches {
        known(schema, &b.ty, &b.pos)?;
        let shape = json_shape(schema, &b.ty);
        if matches!(shape, "any" | "alternate") {
            return Err(Error::new(
                b.pos.clone(),
                format!(
                    "branch '{}' of {owner} cannot be of type '{}'",
                    b.name,
                    b.ty.name()
                ),
            ));
        }
        if let Some(other) = shapes.insert(shape, b) {
            return Err(Error::new(
                b.pos.clone(),
                format!(
                    "branches '{}' and '{}' of {owner} are both a JSON {shape} and cannot be told apart",
                    other.name, b.name
                ),
            ));
        }
    }
    Ok(())
}

fn unique_branches(branches: &[Branch], owner: &str) -> Result<(), Error> {
    let mut seen: HashMap<&str, &Pos> = HashMap::new();
    for b in branches {
        if let Some(first) = seen.insert(b.name.as_str(), &b.pos) {
            return Err(Error::new(
                b.pos.clone(),
                format!("{owner} has '{}' twice (first at {first})", b.name),
            ));
        }
    }
    Ok(())
}

fn check_data(schema: &Schema, data: &Members, boxed: bool, owner: &str) -> Result<(), Error> {
    match data {
        Members::Inline(list) => {
            let refs: Vec<&Member> = list.iter().collect();
            check_members(schema, &refs, owner)
        }
        Members::Named(n, pos) => match schema.lookup(n).map(|t| &t.kind) {
            Some(Kind::Struct { .. }) => Ok(()),
            Some(Kind::FlatUnion { .. }) if boxed => Ok(()),
            Some(_) => Err(Error::new(
                pos.clone(),
                format!("'data' of {owner} must be a struct (or a union with 'boxed': true)"),
            )),
            None => Err(Error::new(pos.clone(), format!("unknown type '{n}'"))),
        },
    }
}

/// A documentation block may only describe members and features the
/// definition has.
fn check_docs(schema: &Schema) -> Result<(), Error> {
    for t in &schema.types {
        let Some(doc) = &t.doc else { continue };
        let mut features: Vec<&str> = t.features.iter().map(String::as_str).collect();
        match &t.kind {
            Kind::Enum(values) => features.extend(
                values
                    .iter()
                    .flat_map(|v| v.features.iter().map(String::as_str)),
            ),
            Kind::Struct { .. } => features.extend(member_features(schema.struct_members(&t.name))),
            Kind::FlatUnion { base, .. } => {
                features.extend(member_features(schema.members_of(base)))
            }
            Kind::SimpleUnion(_) | Kind::Alternate(_) => {}
        }
        undocumented_feature(doc, &features, &t.pos)?;
        let names: Vec<&str> = match &t.kind {
            Kind::Enum(b) | Kind::SimpleUnion(b) | Kind::Alternate(b) => {
                b.iter().map(|b| b.name.as_str()).collect()
            }
            Kind::Struct { .. } => schema
                .struct_members(&t.name)
                .iter()
                .map(|m| m.name.as_str())
                .collect(),
            Kind::FlatUnion { base, branches, .. } => {
                let mut n: Vec<&str> = schema
                    .members_of(base)
                    .iter()
                    .map(|m| m.name.as_str())
                    .collect();
                n.extend(branches.iter().map(|b| b.name.as_str()));
                n
            }
        };
        undocumented_member(doc, &names, &t.pos)?;
    }
    let with_data = schema
        .commands
        .iter()
        .map(|c| (&c.doc, &c.data, &c.features, &c.pos))
        .chain(
            schema
                .events
                .iter()
                .map(|e| (&e.doc, &e.data, &e.features, &e.pos)),
        );
    for (doc, data, own, pos) in with_data {
        let Some(doc) = doc else { continue };
        let mut features: Vec<&str> = own.iter().map(String::as_str).collect();
        if let Some(data) = data {
            features.extend(member_features(schema.members_of(data)));
        }
        undocumented_feature(doc, &features, pos)?;
        let Some(data) = data else { continue };
        let names: Vec<&str> = schema
            .members_of(data)
            .iter()
            .map(|m| m.name.as_str())
            .collect();
        undocumented_member(doc, &names, pos)?;
    }
    Ok(())
}

fn member_features(members: Vec<&Member>) -> impl Iterator<Item = &str> {
    members
        .into_iter()
        .flat_map(|m| m.features.iter().map(String::as_str))
}

fn undocumented_feature(doc: &crate::doc::Doc, features: &[&str], pos: &Pos) -> Result<(), Error> {
    for (f, _) in &doc.features {
        if !features.contains(&f.as_str()) {
            return Err(Error::new(
                pos.clone(),
                format!(
                    "documentation of '{}' describes feature '@{f}', which neither it nor its members have",
                    doc.symbol
                ),
            ));
        }
    }
    Ok(())
}

fn undocumented_member(doc: &crate::doc::Doc, names: &[&str], pos: &Pos) -> Result<(), Error> {
    for (m, _) in &doc.members {
        if !names.contains(&m.as_str()) {
            return Err(Error::new(
                pos.clone(),
                format!(
                    "documentation of '{}' describes '@{m}', which it does not have",
                    doc.symbol
                ),
            ));
        }
    }
    Ok(())
}

/// Two schema names must not become one Rust name.
fn check_rust_names(schema: &Schema) -> Result<(), Error> {
    let mut types: HashMap<String, (&str, &Pos)> = HashMap::new();
    let generated = schema
        .types
        .iter()
        .map(|t| (names::type_name(&t.name), t.name.as_str(), &t.pos))
        .chain(schema.types.iter().filter_map(|t| match t.kind {
            Kind::FlatUnion { .. } => Some((names::branch_enum(&t.name), t.name.as_str(), &t.pos)),
            _ => None,
        }))
        .chain(schema.commands.iter().filter_map(|c| match c.data {
            Some(Members::Inline(_)) => {
                Some((names::command_arg(&c.name), c.name.as_str(), &c.pos))
            }
            _ => None,
        }))
        .chain(schema.events.iter().filter_map(|e| match e.data {
            Some(Members::Inline(_)) => Some((names::event_data(&e.name), e.name.as_str(), &e.pos)),
            _ => None,
        }));
    for (rust, origin, pos) in generated {
        if let Some((first, _)) = types.insert(rust.clone(), (origin, pos)) {
            return Err(Error::new(
                pos.clone(),
                format!("'{origin}' and '{first}' would both become the Rust type '{rust}'"),
            ));
        }
    }
    for t in &schema.types {
        let lists: Vec<(Vec<&str>, &str)> = match &t.kind {
            Kind::Enum(b) | Kind::SimpleUnion(b) | Kind::Alternate(b) => {
                vec![(b.iter().map(|b| b.name.as_str()).collect(), "variant")]
            }
            Kind::Struct { .. } => vec![(
                schema
                    .struct_members(&t.name)
                    .iter()
                    .map(|m| m.name.as_str())
                    .collect(),
                "field",
            )],
            Kind::FlatUnion { .. } => Vec::new(),
        };
        for (list, what) in lists {
            let mut seen: HashMap<String, &str> = HashMap::new();
            for n in list {
                let rust = if what == "field" {
                    names::field_name(n)
                } else {
                    names::variant_name(n)
                };
                if let Some(first) = seen.insert(rust.clone(), n) {
                    return Err(Error::new(
                        t.pos.clone(),
                        format!("'{n}' and '{first}' of '{}' would both become the Rust {what} '{rust}'", t.name),
                    ));
                }
            }
        }
    }
    Ok(())
}
