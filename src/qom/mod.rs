//! QOM, the object tree QEMU's qom-* commands browse, as vubd has it:
//!
//! ```text
//! /            container
//! /objects     container: one child per --object / object-add
//! /chardevs    container: one child per --chardev
//! /backend     container, empty (qemu-storage-daemon has it too)
//! ```
//!
//! The tree is not kept anywhere: it is read off the daemon's objects and
//! character devices on each command, so it cannot disagree with them.

pub mod types;

use crate::error::QmpError;
use crate::qapi::{
    IothreadProperties, ObjectOptions, ObjectOptionsBranch, ObjectPropertyInfo, QapiErrorClass,
};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// A `--chardev`: vubd's are UNIX sockets that monitors listen on.
pub struct Chardev {
    pub id: String,
    pub path: PathBuf,
    /// A monitor uses it.
    pub monitor: bool,
    /// Clients connected now.
    pub clients: Arc<AtomicUsize>,
}

impl Chardev {
    /// Where it is, in QEMU's notation.
    pub fn filename(&self) -> String {
        format!("unix:{},server=on", self.path.display())
    }
}

/// What the tree is read from.
pub struct View<'a> {
    pub objects: &'a [ObjectOptions],
    pub chardevs: &'a [Chardev],
}

const CONTAINERS: &[&str] = &["backend", "objects", "chardevs"];

#[derive(Clone, Copy)]
enum Obj<'a> {
    Root,
    Container(&'static str),
    Object(&'a ObjectOptions),
    Chardev(&'a Chardev),
}

impl<'a> Obj<'a> {
    fn type_name(&self) -> &'static str {
        match self {
            Obj::Root | Obj::Container(_) => "container",
            Obj::Object(o) => match &o.u {
                ObjectOptionsBranch::Iothread(_) => "iothread",
                ObjectOptionsBranch::ThrottleGroup(_) => "throttle-group",
            },
            Obj::Chardev(_) => "chardev-socket",
        }
    }

    fn children(&self, view: &View<'a>) -> Vec<(String, Obj<'a>)> {
        match self {
            Obj::Root => CONTAINERS
                .iter()
                .map(|c| (c.to_string(), Obj::Container(c)))
                .collect(),
            Obj::Container("objects") => view
                .objects
                .iter()
                .map(|o| (o.id.clone(), Obj::Object(o)))
                .collect(),
            Obj::Container("chardevs") => view
                .chardevs
                .iter()
                .map(|c| (c.id.clone(), Obj::Chardev(c)))
                .collect(),
            _ => Vec::new(),
        }
    }
}

/// Every object with its path components, parents before children.
fn walk<'a>(view: &View<'a>) -> Vec<(Vec<String>, Obj<'a>)> {
    let mut out = vec![(Vec::new(), Obj::Root)];
    let mut i = 0;
    while i < out.len() {
        let (path, obj) = out[i].clone();
        for (name, child) in obj.children(view) {
            let mut p = path.clone();
            p.push(name);
            out.push((p, child));
        }
        i += 1;
    }
    out
}

fn not_found(path: &str) -> QmpError {
    QmpError::with_class(
        QapiErrorClass::DeviceNotFound,
        format!("Device '{path}' not found"),
    )
}

/// Finds the object at `path`: absolute from the root, or partial, which
/// must match the end of exactly one object's path. Empty components
/// are ignored, as QEMU does.
fn resolve<'a>(view: &View<'a>, path: &str) -> Result<(Vec<String>, Obj<'a>), QmpError> {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    let mut matches = walk(view).into_iter().filter(|(p, _)| {
        if path.starts_with('/') {
            p.len() == parts.len() && p.iter().zip(&parts).all(|(a, b)| a == b)
        } else {
            p.len() >= parts.len()
                && p[p.len() - parts.len()..]
                    .iter()
                    .zip(&parts)
                    .all(|(a, b)| a == b)
        }
    });
    let first = matches.next().ok_or_else(|| not_found(path))?;
    if matches.next().is_some() {
        return Err(QmpError::generic(format!("Path '{path}' is ambiguous")));
    }
    Ok(first)
}

fn absolute(parts: &[String]) -> String {
    format!("/{}", parts.join("/"))
}

fn no_property(ty: &str, prop: &str) -> QmpError {
    QmpError::generic(format!("Property '{ty}.{prop}' not found"))
}

/// qom-list.
pub fn list(view: &View<'_>, path: &str) -> Result<Vec<ObjectPropertyInfo>, QmpError> {
    let (_, obj) = resolve(view, path)?;
    let mut out: Vec<ObjectPropertyInfo> = types::properties(obj.type_name())
        .into_iter()
        .map(|p| types::info(p, false))
        .collect();
    out.extend(
        obj.children(view)
            .into_iter()
            .map(|(name, child)| ObjectPropertyInfo {
                name,
                r#type: format!("child<{}>", child.type_name()),
                description: None,
                default_value: None,
            }),
    );
    Ok(out)
}

/// qom-get.
pub fn get(view: &View<'_>, path: &str, prop: &str) -> Result<Value, QmpError> {
    let (parts, obj) = resolve(view, path)?;
    if prop == "type" {
        return Ok(Value::from(obj.type_name()));
    }
    if obj.children(view).iter().any(|(name, _)| name == prop) {
        let mut child = parts;
        child.push(prop.to_string());
        return Ok(Value::from(absolute(&child)));
    }
    let value = match obj {
        Obj::Object(ObjectOptions {
            u: ObjectOptionsBranch::Iothread(t),
            ..
        }) => iothread_value(t, prop),
        Obj::Object(ObjectOptions {
            u: ObjectOptionsBranch::ThrottleGroup(g),
            ..
        }) => throttle_value(g, prop),
        Obj::Chardev(c) => match prop {
            "connected" => Some(Value::from(c.clients.load(Ordering::SeqCst) > 0)),
            "addr" => Some(json!({"type": "unix", "path": c.path.display().to_string()})),
            _ => None,
        },
        _ => None,
    };
    value.ok_or_else(|| no_property(obj.type_name(), prop))
}

fn iothread_value(t: &IothreadProperties, prop: &str) -> Option<Value> {
    let (given, default) = match prop {
        "poll-max-ns" => (t.poll_max_ns, types::DEFAULT_POLL_MAX_NS),
        "poll-grow" => (t.poll_grow, 0),
        "poll-shrink" => (t.poll_shrink, 0),
        "aio-max-batch" => (t.aio_max_batch, 0),
        _ => return None,
    };
    Some(Value::from(given.unwrap_or(default)))
}

/// A throttle-group's `limits` (every member) or one `x-` alias of them.
fn throttle_value(g: &crate::qapi::ThrottleGroupProperties, prop: &str) -> Option<Value> {
    let cfg = throttle_config(g).ok()?;
    let all = serde_json::to_value(crate::block::throttle::limits::to_limits(&cfg)).ok()?;
    match prop {
        "limits" => Some(all),
        _ => all.get(prop.strip_prefix("x-")?).cloned(),
    }
}

/// The limits a throttle-group object holds.
pub fn throttle_config(
    g: &crate::qapi::ThrottleGroupProperties,
) -> Result<crate::block::throttle::Config, QmpError> {
    crate::block::throttle::limits::from_properties(g).map_err(QmpError::generic)
}

/// A throttle-group's properties after qom-set of `prop` to `value`.
fn throttle_set(
    g: &crate::qapi::ThrottleGroupProperties,
    prop: &str,
    value: &Value,
) -> Result<crate::qapi::ThrottleGroupProperties, QmpError> {
    use crate::block::throttle::limits;
    let current = throttle_config(g)?;
    let given: crate::qapi::ThrottleLimits = if prop == "limits" {
        crate::qapi::rt::read(value, crate::qapi::rt::Syntax::Json)
            .map_err(|e| QmpError::generic(e.to_string()))?
    } else {
        let n = value.as_i64().ok_or_else(|| {
            QmpError::generic(format!(
                "Invalid parameter type for '{prop}', expected: integer"
            ))
        })?;
        if n < 0 {
            return Err(QmpError::generic("Property values cannot be negative"));
        }
        let name = prop.strip_prefix("x-").unwrap_or(prop);
        crate::qapi::rt::read(&json!({ name: n }), crate::qapi::rt::Syntax::Json)
            .map_err(|e| QmpError::generic(e.to_string()))?
    };
    let next = limits::apply(&current, &given).map_err(QmpError::generic)?;
    Ok(crate::qapi::ThrottleGroupProperties {
        limits: Some(limits::to_limits(&next)),
        ..Default::default()
    })
}

/// Checks an iothread's properties as QEMU does: none may be negative.
pub fn check_iothread(t: &IothreadProperties) -> Result<(), QmpError> {
    let values = [
        ("poll-max-ns", t.poll_max_ns),
        ("poll-grow", t.poll_grow),
        ("poll-shrink", t.poll_shrink),
        ("aio-max-batch", t.aio_max_batch),
    ];
    match values.iter().find(|(_, v)| v.is_some_and(|v| v < 0)) {
        Some((name, _)) => Err(QmpError::generic(format!(
            "{name} value must be in range [0, {}]",
            i64::MAX
        ))),
        None => Ok(()),
    }
}

/// qom-set: changes the property in `objects` and returns the id of the
/// object changed, for the caller to apply.
pub fn set(
    objects: &mut [ObjectOptions],
    chardevs: &[Chardev],
    path: &str,
    prop: &str,
    value: &Value,
) -> Result<String, QmpError> {
    let view = View { objects, chardevs };
    let (_, obj) = resolve(&view, path)?;
    let ty = obj.type_name();
    let def = types::property(ty, prop).ok_or_else(|| no_property(ty, prop))?;
    let id = match obj {
        Obj::Object(o) if def.writable => o.id.clone(),
        _ => {
            return Err(QmpError::generic(format!(
                "Property '{ty}.{prop}' is not writable"
            )))
        }
    };
    let branch = objects.iter_mut().find(|o| o.id == id).map(|o| &mut o.u);
    if let Some(ObjectOptionsBranch::ThrottleGroup(g)) = branch {
        *g = throttle_set(g, prop, value)?;
        return Ok(id);
    }
    let n = value.as_i64().ok_or_else(|| {
        QmpError::generic(format!(
            "Invalid parameter type for '{prop}', expected: integer"
        ))
    })?;
    let Some(ObjectOptionsBranch::Iothread(t)) =
        objects.iter_mut().find(|o| o.id == id).map(|o| &mut o.u)
    else {
        return Err(no_property(ty, prop));
    };
    let mut changed = t.clone();
    let field = match prop {
        "poll-max-ns" => &mut changed.poll_max_ns,
        "poll-grow" => &mut changed.poll_grow,
        "poll-shrink" => &mut changed.poll_shrink,
        "aio-max-batch" => &mut changed.aio_max_batch,
        _ => return Err(no_property(ty, prop)),
    };
    *field = Some(n);
    check_iothread(&changed)?;
    *t = changed;
    Ok(id)
}

#[cfg(test)]
mod tests;
