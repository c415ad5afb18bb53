//! Rust for commands and events: argument structs, the `Commands` trait
//! (one method per implemented command), the dispatcher, the command
//! lists, and the `Event` enum.

use super::types::scalar_type;
use super::Gen;
use crate::names::{command_arg, event_data, event_variant, field_name, type_name};
use crate::schema::{Command, Members, TypeRef};

impl Gen<'_> {
    pub(super) fn command_types(&mut self) {
        for c in &self.schema.commands {
            if let Some(data @ Members::Inline(_)) = &c.data {
                let doc = vec![format!("Arguments of the `{}` command.", c.name)];
                self.inline_struct(&command_arg(&c.name), &doc, data);
            }
        }
    }

    /// The Rust type of a command's argument, if it takes any.
    fn arg_type(c: &Command) -> Option<String> {
        match &c.data {
            None => None,
            Some(Members::Inline(m)) if m.is_empty() => None,
            Some(Members::Inline(_)) => Some(command_arg(&c.name)),
            Some(Members::Named(n, _)) => Some(type_name(n)),
        }
    }

    fn return_type(c: &Command) -> String {
        match &c.returns {
            None => "()".into(),
            Some(TypeRef::List(n)) => format!("Vec<{}>", scalar_type(n)),
            Some(TypeRef::Named(n)) => scalar_type(n),
        }
    }

    pub(super) fn commands(&mut self) {
        let implemented: Vec<&Command> = self
            .schema
            .implemented
            .iter()
            .filter_map(|n| self.schema.commands.iter().find(|c| &c.name == n))
            .collect();
        let all: Vec<String> = self
            .schema
            .commands
            .iter()
            .map(|c| format!("\"{}\"", c.name))
            .collect();
        self.line(0, "/// Every command the schema defines, in schema order.");
        self.line(
            0,
            &format!("pub const ALL_COMMANDS: &[&str] = &[{}];", all.join(", ")),
        );
        self.blank();
        let imp: Vec<String> = implemented
            .iter()
            .map(|c| format!("\"{}\"", c.name))
            .collect();
        self.line(
            0,
            "/// The commands vubd implements (the schema's `vubd-implemented-commands` pragma).",
        );
        self.line(
            0,
            &format!(
                "pub const IMPLEMENTED_COMMANDS: &[&str] = &[{}];",
                imp.join(", ")
            ),
        );
        self.blank();
        let oob: Vec<String> = implemented
            .iter()
            .filter(|c| c.allow_oob)
            .map(|c| format!("\"{}\"", c.name))
            .collect();
        self.line(
            0,
            "/// The implemented commands the schema lets run out of band (`allow-oob`).",
        );
        self.line(
            0,
            &format!("pub const OOB_COMMANDS: &[&str] = &[{}];", oob.join(", ")),
        );
        self.blank();
        self.line(
            0,
            "/// One method per implemented command. Arguments arrive already checked",
        );
        self.line(
            0,
            "/// against the schema; the return value is serialized for the reply.",
        );
        self.line(0, "pub trait Commands {");
        self.line(1, "/// The error a command answers with.");
        self.line(1, "type Error: From<rt::InputError>;");
        for c in &implemented {
            self.blank();
            let body = c.doc.as_ref().map(|d| d.body.clone()).unwrap_or_default();
            self.doc(&body, 1);
            let arg = Self::arg_type(c)
                .map(|t| format!(", arg: {t}"))
                .unwrap_or_default();
            let ret = Self::return_type(c);
            self.line(
                1,
                &format!(
                    "fn {}(&mut self{arg}) -> Result<{ret}, Self::Error>;",
                    field_name(&c.name)
                ),
            );
        }
        self.line(0, "}");
        self.blank();
        self.line(
            0,
            "/// Runs command `name` with `args` (the `arguments` member, `{}` when",
        );
        self.line(0, "/// absent). `None` means vubd has no such command.");
        self.line(
            0,
            "pub fn dispatch<C: Commands + ?Sized>(c: &mut C, name: &str, args: &Value) -> Option<Result<Value, C::Error>> {",
        );
        self.line(1, "let at = rt::At::root(rt::Syntax::Json);");
        self.line(1, "Some(match name {");
        for cmd in &implemented {
            let method = field_name(&cmd.name);
            let call = match Self::arg_type(cmd) {
                Some(t) => format!(
                    "<{t} as rt::FromQapi>::from_qapi(args, &at).map_err(C::Error::from).and_then(|a| c.{method}(a))"
                ),
                None => format!("rt::no_args(args, &at).map_err(C::Error::from).and_then(|()| c.{method}())"),
            };
            // A command without a return type answers an empty object.
            let ret = if cmd.returns.is_some() {
                ".and_then(|r| rt::to_value(&r).map_err(C::Error::from))"
            } else {
                ".map(|()| Value::Object(Default::default()))"
            };
            self.line(2, &format!("\"{}\" => {call}{ret},", cmd.name));
        }
        self.line(2, "_ => return None,");
        self.line(1, "})");
        self.line(0, "}");
        self.blank();
    }

    pub(super) fn events(&mut self) {
        for e in &self.schema.events {
            if let Some(data @ Members::Inline(_)) = &e.data {
                let doc = vec![format!("Data of the `{}` event.", e.name)];
                self.inline_struct(&event_data(&e.name), &doc, data);
            }
        }
        self.line(0, "/// Every event the schema defines.");
        self.line(0, "#[derive(Debug, Clone, PartialEq)]");
        self.line(0, "pub enum Event {");
        let mut rows = Vec::new();
        for e in &self.schema.events {
            let body = e.doc.as_ref().map(|d| d.body.clone()).unwrap_or_default();
            self.doc(&body, 1);
            let var = event_variant(&e.name);
            let data = match &e.data {
                Some(Members::Inline(_)) => Some(event_data(&e.name)),
                Some(Members::Named(n, _)) => Some(type_name(n)),
                None => None,
            };
            match &data {
                Some(t) => self.line(1, &format!("{var}({t}),")),
                None => self.line(1, &format!("{var},")),
            }
            rows.push((e.name.clone(), var, data.is_some()));
        }
        self.line(0, "}");
        self.blank();
        self.line(0, "impl Event {");
        self.line(1, "/// The event's name on the wire.");
        self.line(1, "pub fn name(&self) -> &'static str {");
        self.line(2, "match self {");
        for (name, var, has) in &rows {
            let pat = if *has { "(_)" } else { "" };
            self.line(3, &format!("Self::{var}{pat} => \"{name}\","));
        }
        if rows.is_empty() {
            self.line(3, "_ => \"\",");
        }
        self.line(2, "}");
        self.line(1, "}");
        self.blank();
        self.line(1, "/// The event's `data` member, if it has one.");
        self.line(
            1,
            "pub fn data(&self) -> Result<Option<Value>, rt::InputError> {",
        );
        self.line(2, "match self {");
        for (_, var, has) in &rows {
            if *has {
                self.line(3, &format!("Self::{var}(d) => rt::to_value(d).map(Some),"));
            } else {
                self.line(3, &format!("Self::{var} => Ok(None),"));
            }
        }
        if rows.is_empty() {
            self.line(3, "_ => Ok(None),");
        }
        self.line(2, "}");
        self.line(1, "}");
        self.line(0, "}");
        self.blank();
    }
}
