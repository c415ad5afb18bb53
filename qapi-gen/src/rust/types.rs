//! Rust for the schema's types: enums, structs, flat and simple unions,
//! alternates; each with a serde `Serialize`, and an input function that
//! reads JSON (or keyval strings) and words its errors as QEMU does.

use super::Gen;
use crate::names::{branch_enum, field_name, type_name, variant_name};
use crate::schema::{Branch, Kind, Member, Members, TypeDef, TypeRef};

impl Gen<'_> {
    pub(super) fn type_def(&mut self, t: &TypeDef) {
        let doc_body = t.doc.as_ref().map(|d| d.body.as_slice()).unwrap_or(&[]);
        match &t.kind {
            Kind::Enum(values) => self.enum_def(&t.name, doc_body, values),
            Kind::Struct { .. } => {
                let members = self.schema.struct_members(&t.name);
                self.struct_def(&t.name, doc_body, &members);
            }
            Kind::FlatUnion {
                base,
                discriminator,
                branches,
            } => {
                let base = self.schema.members_of(base);
                self.flat_union(&t.name, doc_body, &base, discriminator, branches);
            }
            Kind::SimpleUnion(branches) => self.simple_union(&t.name, doc_body, branches),
            Kind::Alternate(branches) => self.alternate(&t.name, doc_body, branches),
        }
    }

    /// The Rust type of a member, boxed where the type can contain its
    /// owner (a list already adds the indirection).
    fn rust_type(&self, owner: &str, ty: &TypeRef) -> String {
        match ty {
            TypeRef::List(n) => format!("Vec<{}>", scalar_type(n)),
            TypeRef::Named(n) => {
                let inner = scalar_type(n);
                if self.reaches(n, owner) {
                    format!("Box<{inner}>")
                } else {
                    inner
                }
            }
        }
    }

    /// The expression that reads a value of `ty` (a `fn(&Value, &At)`).
    fn reader(&self, owner: &str, ty: &TypeRef) -> String {
        let one = |n: &str| match n {
            "size" => "rt::size".to_string(),
            _ => format!("<{} as rt::FromQapi>::from_qapi", scalar_type(n)),
        };
        match ty {
            TypeRef::List(n) => format!("|v, at| rt::list(v, at, {})", one(n)),
            TypeRef::Named(n) if self.reaches(n, owner) => {
                format!("|v, at| {}(v, at).map(Box::new)", one(n))
            }
            TypeRef::Named(n) => one(n),
        }
    }

    fn member_fields(&mut self, owner: &str, members: &[&Member]) {
        for m in members {
            self.doc(
                m.doc
                    .as_deref()
                    .map(|d| vec![d.to_string()])
                    .as_deref()
                    .unwrap_or(&[]),
                1,
            );
            let ty = self.rust_type(owner, &m.ty);
            let ty = if m.optional {
                format!("Option<{ty}>")
            } else {
                ty
            };
            self.line(1, &format!("pub {}: {ty},", field_name(&m.name)));
        }
    }

    /// Statements that read `members` from the object reader `obj`.
    fn member_reads(&mut self, owner: &str, members: &[&Member], indent: usize) {
        for m in members {
            let call = if m.optional { "opt" } else { "req" };
            let reader = self.reader(owner, &m.ty);
            self.line(
                indent,
                &format!(
                    "let {} = obj.{call}(\"{}\", {reader})?;",
                    field_name(&m.name),
                    m.name
                ),
            );
        }
    }

    fn member_writes(&mut self, members: &[&Member], indent: usize, prefix: &str) {
        for m in members {
            let f = field_name(&m.name);
            if m.optional {
                self.line(
                    indent,
                    &format!(
                        "if let Some(v) = &{prefix}{f} {{ map.serialize_entry(\"{}\", v)?; }}",
                        m.name
                    ),
                );
            } else {
                self.line(
                    indent,
                    &format!("map.serialize_entry(\"{}\", &{prefix}{f})?;", m.name),
                );
            }
        }
    }

    fn field_list(members: &[&Member]) -> String {
        members
            .iter()
            .map(|m| field_name(&m.name))
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn derives(&mut self, members: &[&Member]) {
        let default = if self.all_defaultable(members) {
            ", Default"
        } else {
            ""
        };
        self.line(0, &format!("#[derive(Debug, Clone, PartialEq{default})]"));
    }

    pub(super) fn struct_def(&mut self, schema_name: &str, doc: &[String], members: &[&Member]) {
        let name = type_name(schema_name);
        self.doc(doc, 0);
        self.derives(members);
        self.line(0, &format!("pub struct {name} {{"));
        self.member_fields(schema_name, members);
        self.line(0, "}");
        self.blank();
        self.line(0, &format!("impl {name} {{"));
        self.line(
            1,
            "/// Reads the members from an object, leaving the rest to the caller.",
        );
        self.line(
            1,
            "pub fn read_members(obj: &mut rt::Obj<'_>) -> Result<Self, rt::InputError> {",
        );
        self.member_reads(schema_name, members, 2);
        self.line(2, &format!("Ok(Self {{ {} }})", Self::field_list(members)));
        self.line(1, "}");
        self.blank();
        self.line(1, "/// Writes the members into a map being serialized.");
        self.line(1, "pub fn serialize_members<M: SerializeMap>(&self, map: &mut M) -> Result<(), M::Error> {");
        if members.is_empty() {
            self.line(2, "let _ = map;");
        }
        self.member_writes(members, 2, "self.");
        self.line(2, "Ok(())");
        self.line(1, "}");
        self.line(0, "}");
        self.blank();
        self.object_impls(&name);
    }

    /// FromQapi and Serialize for a type that is a JSON object.
    fn object_impls(&mut self, name: &str) {
        self.line(0, &format!("impl rt::FromQapi for {name} {{"));
        self.line(
            1,
            "fn from_qapi(v: &Value, at: &rt::At<'_>) -> Result<Self, rt::InputError> {",
        );
        self.line(2, "let mut obj = rt::Obj::new(v, at)?;");
        self.line(2, "let out = Self::read_members(&mut obj)?;");
        self.line(2, "obj.finish()?;");
        self.line(2, "Ok(out)");
        self.line(1, "}");
        self.line(0, "}");
        self.blank();
        self.line(0, &format!("impl Serialize for {name} {{"));
        self.line(
            1,
            "fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {",
        );
        self.line(2, "let mut map = s.serialize_map(None)?;");
        self.line(2, "self.serialize_members(&mut map)?;");
        self.line(2, "map.end()");
        self.line(1, "}");
        self.line(0, "}");
        self.line(0, &format!("rt::deserialize_via_qapi!({name});"));
        self.blank();
    }

    fn enum_def(&mut self, schema_name: &str, doc: &[String], values: &[Branch]) {
        let name = type_name(schema_name);
        self.doc(doc, 0);
        self.line(
            0,
            "#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]",
        );
        self.line(0, &format!("pub enum {name} {{"));
        for v in values {
            self.doc(
                v.doc
                    .as_deref()
                    .map(|d| vec![d.to_string()])
                    .as_deref()
                    .unwrap_or(&[]),
                1,
            );
            self.line(1, &format!("{},", variant_name(&v.name)));
        }
        self.line(0, "}");
        self.blank();
        self.line(0, &format!("impl {name} {{"));
        self.line(1, "/// Every value, in schema order.");
        let all: Vec<String> = values
            .iter()
            .map(|v| format!("Self::{}", variant_name(&v.name)))
            .collect();
        self.line(
            1,
            &format!("pub const ALL: &'static [Self] = &[{}];", all.join(", ")),
        );
        self.line(1, "/// Every value's wire name, in schema order.");
        let wire: Vec<String> = values.iter().map(|v| format!("\"{}\"", v.name)).collect();
        self.line(
            1,
            &format!(
                "pub const NAMES: &'static [&'static str] = &[{}];",
                wire.join(", ")
            ),
        );
        self.blank();
        self.line(1, "/// The name of the value on the wire.");
        self.line(1, "pub fn as_str(&self) -> &'static str {");
        if values.is_empty() {
            self.line(2, "match *self {}");
        } else {
            self.line(2, "match self {");
            for v in values {
                self.line(
                    3,
                    &format!("Self::{} => \"{}\",", variant_name(&v.name), v.name),
                );
            }
            self.line(2, "}");
        }
        self.line(1, "}");
        self.line(0, "}");
        self.blank();
        self.line(0, &format!("impl rt::FromQapi for {name} {{"));
        self.line(
            1,
            "fn from_qapi(v: &Value, at: &rt::At<'_>) -> Result<Self, rt::InputError> {",
        );
        self.line(2, "rt::one_of(v, at, Self::NAMES).map(|i| Self::ALL[i])");
        self.line(1, "}");
        self.line(0, "}");
        self.blank();
        self.line(0, &format!("impl Serialize for {name} {{"));
        self.line(
            1,
            "fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {",
        );
        self.line(2, "s.serialize_str(self.as_str())");
        self.line(1, "}");
        self.line(0, "}");
        self.line(0, &format!("rt::deserialize_via_qapi!({name});"));
        self.blank();
        self.line(0, &format!("impl std::fmt::Display for {name} {{"));
        self.line(
            1,
            "fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {",
        );
        self.line(2, "f.write_str(self.as_str())");
        self.line(1, "}");
        self.line(0, "}");
        self.blank();
    }

    fn flat_union(
        &mut self,
        schema_name: &str,
        doc: &[String],
        base: &[&Member],
        discriminator: &str,
        branches: &[Branch],
    ) {
        let name = type_name(schema_name);
        let benum = branch_enum(schema_name);
        let Some(disc) = base.iter().find(|m| m.name == discriminator) else {
            return;
        };
        let disc_ty = type_name(disc.ty.name());
        let disc_field = field_name(discriminator);
        let Some(Kind::Enum(values)) = self.schema.lookup(disc.ty.name()).map(|t| t.kind.clone())
        else {
            return;
        };
        let others: Vec<&Member> = base
            .iter()
            .copied()
            .filter(|m| m.name != discriminator)
            .collect();
        let branch_of = |v: &str| branches.iter().find(|b| b.name == v);

        self.doc(doc, 0);
        self.line(
            0,
            &format!("///\n/// The discriminator `{discriminator}` is held by the variant of `u`."),
        );
        self.line(0, "#[derive(Debug, Clone, PartialEq)]");
        self.line(0, &format!("pub struct {name} {{"));
        self.member_fields(schema_name, &others);
        self.line(
            1,
            &format!("/// The members that depend on `{discriminator}`."),
        );
        self.line(1, &format!("pub u: {benum},"));
        self.line(0, "}");
        self.blank();
        self.line(
            0,
            &format!("/// The branches of [`{name}`], one per value of [`{disc_ty}`]."),
        );
        self.line(0, "#[derive(Debug, Clone, PartialEq)]");
        self.line(0, &format!("pub enum {benum} {{"));
        for v in &values {
            match branch_of(&v.name) {
                Some(b) => {
                    let ty = self.rust_type(schema_name, &b.ty);
                    self.line(1, &format!("{}({ty}),", variant_name(&v.name)));
                }
                None => self.line(1, &format!("{},", variant_name(&v.name))),
            }
        }
        self.line(0, "}");
        self.blank();
        self.line(0, &format!("impl {benum} {{"));
        self.line(
            1,
            &format!("/// The value of `{discriminator}` this branch stands for."),
        );
        self.line(1, &format!("pub fn {disc_field}(&self) -> {disc_ty} {{"));
        self.line(2, "match self {");
        for v in &values {
            let pat = if branch_of(&v.name).is_some() {
                "(_)"
            } else {
                ""
            };
            let var = variant_name(&v.name);
            self.line(3, &format!("Self::{var}{pat} => {disc_ty}::{var},"));
        }
        self.line(2, "}");
        self.line(1, "}");
        self.line(0, "}");
        self.blank();
        self.line(0, &format!("impl {name} {{"));
        self.line(1, &format!("/// The value of `{discriminator}`."));
        self.line(1, &format!("pub fn {disc_field}(&self) -> {disc_ty} {{"));
        self.line(2, &format!("self.u.{disc_field}()"));
        self.line(1, "}");
        self.blank();
        self.line(
            1,
            "/// Reads the members from an object, leaving the rest to the caller.",
        );
        self.line(
            1,
            "pub fn read_members(obj: &mut rt::Obj<'_>) -> Result<Self, rt::InputError> {",
        );
        for m in base {
            if m.name == discriminator {
                self.line(
                    2,
                    &format!(
                        "let {disc_field}: {disc_ty} = obj.req(\"{discriminator}\", <{disc_ty} as rt::FromQapi>::from_qapi)?;"
                    ),
                );
            } else {
                self.member_reads(schema_name, &[m], 2);
            }
        }
        self.line(2, &format!("let u = match {disc_field} {{"));
        for v in &values {
            let var = variant_name(&v.name);
            match branch_of(&v.name) {
                Some(b) => {
                    let bty = type_name(b.ty.name());
                    let read = format!("{bty}::read_members(obj)?");
                    let read = if self.reaches(b.ty.name(), schema_name) {
                        format!("Box::new({read})")
                    } else {
                        read
                    };
                    self.line(3, &format!("{disc_ty}::{var} => {benum}::{var}({read}),"));
                }
                None => self.line(3, &format!("{disc_ty}::{var} => {benum}::{var},")),
            }
        }
        self.line(2, "};");
        let mut fields = Self::field_list(&others);
        if !fields.is_empty() {
            fields.push_str(", ");
        }
        self.line(2, &format!("Ok(Self {{ {fields}u }})"));
        self.line(1, "}");
        self.blank();
        self.line(1, "/// Writes the members into a map being serialized.");
        self.line(1, "pub fn serialize_members<M: SerializeMap>(&self, map: &mut M) -> Result<(), M::Error> {");
        for m in base {
            if m.name == discriminator {
                self.line(
                    2,
                    &format!("map.serialize_entry(\"{discriminator}\", &self.u.{disc_field}())?;"),
                );
            } else {
                self.member_writes(&[m], 2, "self.");
            }
        }
        self.line(2, "match &self.u {");
        for v in &values {
            let var = variant_name(&v.name);
            if branch_of(&v.name).is_some() {
                self.line(
                    3,
                    &format!("{benum}::{var}(b) => b.serialize_members(map),"),
                );
            } else {
                self.line(3, &format!("{benum}::{var} => Ok(()),"));
            }
        }
        self.line(2, "}");
        self.line(1, "}");
        self.line(0, "}");
        self.blank();
        self.object_impls(&name);
    }

    fn simple_union(&mut self, schema_name: &str, doc: &[String], branches: &[Branch]) {
        let name = type_name(schema_name);
        self.doc(doc, 0);
        self.line(
            0,
            "///\n/// On the wire: `{\"type\": BRANCH, \"data\": VALUE}`.",
        );
        self.line(0, "#[derive(Debug, Clone, PartialEq)]");
        self.line(0, &format!("pub enum {name} {{"));
        for b in branches {
            let ty = self.rust_type(schema_name, &b.ty);
            self.line(1, &format!("{}({ty}),", variant_name(&b.name)));
        }
        self.line(0, "}");
        self.blank();
        let wire: Vec<String> = branches.iter().map(|b| format!("\"{}\"", b.name)).collect();
        self.line(0, &format!("impl rt::FromQapi for {name} {{"));
        self.line(
            1,
            "fn from_qapi(v: &Value, at: &rt::At<'_>) -> Result<Self, rt::InputError> {",
        );
        self.line(2, "let mut obj = rt::Obj::new(v, at)?;");
        self.line(
            2,
            &format!(
                "let kind = obj.req(\"type\", |v, at| rt::one_of(v, at, &[{}]))?;",
                wire.join(", ")
            ),
        );
        self.line(2, "let out = match kind {");
        for (i, b) in branches.iter().enumerate() {
            let reader = self.reader(schema_name, &b.ty);
            self.line(
                3,
                &format!(
                    "{i} => Self::{}(obj.req(\"data\", {reader})?),",
                    variant_name(&b.name)
                ),
            );
        }
        self.line(
            3,
            "_ => return Err(rt::InputError::internal(\"union branch index out of range\")),",
        );
        self.line(2, "};");
        self.line(2, "obj.finish()?;");
        self.line(2, "Ok(out)");
        self.line(1, "}");
        self.line(0, "}");
        self.blank();
        self.line(0, &format!("impl Serialize for {name} {{"));
        self.line(
            1,
            "fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {",
        );
        self.line(2, "let mut map = s.serialize_map(Some(2))?;");
        self.line(2, "match self {");
        for b in branches {
            self.line(3, &format!("Self::{}(d) => {{", variant_name(&b.name)));
            self.line(
                4,
                &format!("map.serialize_entry(\"type\", \"{}\")?;", b.name),
            );
            self.line(4, "map.serialize_entry(\"data\", d)?;");
            self.line(3, "}");
        }
        self.line(2, "}");
        self.line(2, "map.end()");
        self.line(1, "}");
        self.line(0, "}");
        self.line(0, &format!("rt::deserialize_via_qapi!({name});"));
        self.blank();
    }

    fn alternate(&mut self, schema_name: &str, doc: &[String], branches: &[Branch]) {
        let name = type_name(schema_name);
        self.doc(doc, 0);
        self.line(0, "#[derive(Debug, Clone, PartialEq)]");
        self.line(0, &format!("pub enum {name} {{"));
        for b in branches {
            self.doc(
                b.doc
                    .as_deref()
                    .map(|d| vec![d.to_string()])
                    .as_deref()
                    .unwrap_or(&[]),
                1,
            );
            let ty = self.rust_type(schema_name, &b.ty);
            self.line(1, &format!("{}({ty}),", variant_name(&b.name)));
        }
        self.line(0, "}");
        self.blank();
        self.line(0, &format!("impl rt::FromQapi for {name} {{"));
        self.line(
            1,
            "fn from_qapi(v: &Value, at: &rt::At<'_>) -> Result<Self, rt::InputError> {",
        );
        self.line(2, "match rt::Shape::of(v) {");
        let mut has_string = false;
        for b in branches {
            let shape = self.shape(&b.ty);
            has_string |= shape == "String";
            let reader = self.reader(schema_name, &b.ty);
            self.line(
                3,
                &format!(
                    "rt::Shape::{shape} => ({reader})(v, at).map(Self::{}),",
                    variant_name(&b.name)
                ),
            );
        }
        if !has_string {
            // Keyval input only has strings: let the first scalar branch
            // convert them.
            if let Some(b) = branches
                .iter()
                .find(|b| !matches!(self.shape(&b.ty), "Object"))
            {
                let reader = self.reader(schema_name, &b.ty);
                self.line(
                    3,
                    &format!(
                        "rt::Shape::String if at.is_keyval() => ({reader})(v, at).map(Self::{}),",
                        variant_name(&b.name)
                    ),
                );
            }
        }
        self.line(
            3,
            &format!("_ => Err(rt::InputError::wrong_type(at, \"{schema_name}\")),"),
        );
        self.line(2, "}");
        self.line(1, "}");
        self.line(0, "}");
        self.blank();
        self.line(0, &format!("impl Serialize for {name} {{"));
        self.line(
            1,
            "fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {",
        );
        self.line(2, "match self {");
        for b in branches {
            self.line(
                3,
                &format!("Self::{}(v) => v.serialize(s),", variant_name(&b.name)),
            );
        }
        self.line(2, "}");
        self.line(1, "}");
        self.line(0, "}");
        self.line(0, &format!("rt::deserialize_via_qapi!({name});"));
        self.blank();
    }

    /// The `rt::Shape` variant a type's values have in JSON.
    fn shape(&self, ty: &TypeRef) -> &'static str {
        match ty {
            TypeRef::List(_) => "Array",
            TypeRef::Named(n) => match n.as_str() {
                "str" => "String",
                "bool" => "Bool",
                "null" => "Null",
                "number" | "int" | "int8" | "int16" | "int32" | "int64" | "uint8" | "uint16"
                | "uint32" | "uint64" | "size" => "Number",
                other => match self.schema.lookup(other).map(|t| &t.kind) {
                    Some(Kind::Enum(_)) => "String",
                    _ => "Object",
                },
            },
        }
    }

    /// Members of inline data (commands, events) as a struct of their own.
    pub(super) fn inline_struct(&mut self, rust_name: &str, doc: &[String], data: &Members) {
        let members = self.schema.members_of(data);
        self.struct_def(rust_name, doc, &members);
    }
}

/// The Rust type of a built-in or named schema type.
pub(super) fn scalar_type(name: &str) -> String {
    match name {
        "str" => "String".into(),
        "int" | "int64" => "i64".into(),
        "int8" => "i8".into(),
        "int16" => "i16".into(),
        "int32" => "i32".into(),
        "uint8" => "u8".into(),
        "uint16" => "u16".into(),
        "uint32" => "u32".into(),
        "uint64" | "size" => "u64".into(),
        "number" => "f64".into(),
        "bool" => "bool".into(),
        "null" => "()".into(),
        "any" => "Value".into(),
        other => type_name(other),
    }
}
