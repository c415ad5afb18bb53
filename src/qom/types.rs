//! The object types vubd has, with their properties: what qom-list-types
//! and qom-list-properties answer. A type is listed only if vubd can
//! really have objects of it, since tools probe for features by type.

use crate::qapi::{ObjectPropertyInfo, ObjectTypeInfo};
use serde_json::Value;

/// One property of a type.
pub struct PropDef {
    pub name: &'static str,
    /// QOM's type string ("int", "bool", "string", a QAPI type name).
    pub ty: &'static str,
    pub writable: bool,
    pub description: Option<&'static str>,
    /// The value an object starts with when none is given.
    pub default: Option<i64>,
}

pub struct TypeDef {
    pub name: &'static str,
    pub parent: Option<&'static str>,
    pub is_abstract: bool,
    /// The properties this type adds to its parent's.
    pub props: &'static [PropDef],
}

const fn int_prop(name: &'static str, description: &'static str, default: i64) -> PropDef {
    PropDef {
        name,
        ty: "int",
        writable: true,
        description: Some(description),
        default: Some(default),
    }
}

/// QEMU's default longest polling time of an iothread, in nanoseconds.
pub const DEFAULT_POLL_MAX_NS: i64 = 32768;

pub const TYPES: &[TypeDef] = &[
    TypeDef {
        name: "object",
        parent: None,
        is_abstract: true,
        props: &[PropDef {
            name: "type",
            ty: "string",
            writable: false,
            description: None,
            default: None,
        }],
    },
    TypeDef {
        name: "container",
        parent: Some("object"),
        is_abstract: false,
        props: &[],
    },
    TypeDef {
        name: "event-loop-base",
        parent: Some("object"),
        is_abstract: true,
        props: &[int_prop(
            "aio-max-batch",
            "most requests submitted to the I/O engine at once (0: its default)",
            0,
        )],
    },
    TypeDef {
        name: "iothread",
        parent: Some("event-loop-base"),
        is_abstract: false,
        props: &[
            int_prop(
                "poll-max-ns",
                "longest busy-polling time in nanoseconds (0: no polling)",
                DEFAULT_POLL_MAX_NS,
            ),
            int_prop(
                "poll-grow",
                "factor by which the polling time grows (0: the default, 2)",
                0,
            ),
            int_prop(
                "poll-shrink",
                "divisor by which the polling time shrinks (0: back to none at once)",
                0,
            ),
        ],
    },
    TypeDef {
        name: "throttle-group",
        parent: Some("object"),
        is_abstract: false,
        props: &[
            PropDef {
                name: "limits",
                ty: "ThrottleLimits",
                writable: true,
                description: Some("the group's I/O limits"),
                default: None,
            },
            int_prop("x-iops-total", "alias of limits.iops-total", 0),
            int_prop("x-iops-total-max", "alias of limits.iops-total-max", 0),
            int_prop(
                "x-iops-total-max-length",
                "alias of limits.iops-total-max-length",
                1,
            ),
            int_prop("x-iops-read", "alias of limits.iops-read", 0),
            int_prop("x-iops-read-max", "alias of limits.iops-read-max", 0),
            int_prop(
                "x-iops-read-max-length",
                "alias of limits.iops-read-max-length",
                1,
            ),
            int_prop("x-iops-write", "alias of limits.iops-write", 0),
            int_prop("x-iops-write-max", "alias of limits.iops-write-max", 0),
            int_prop(
                "x-iops-write-max-length",
                "alias of limits.iops-write-max-length",
                1,
            ),
            int_prop("x-bps-total", "alias of limits.bps-total", 0),
            int_prop("x-bps-total-max", "alias of limits.bps-total-max", 0),
            int_prop(
                "x-bps-total-max-length",
                "alias of limits.bps-total-max-length",
                1,
            ),
            int_prop("x-bps-read", "alias of limits.bps-read", 0),
            int_prop("x-bps-read-max", "alias of limits.bps-read-max", 0),
            int_prop(
                "x-bps-read-max-length",
                "alias of limits.bps-read-max-length",
                1,
            ),
            int_prop("x-bps-write", "alias of limits.bps-write", 0),
            int_prop("x-bps-write-max", "alias of limits.bps-write-max", 0),
            int_prop(
                "x-bps-write-max-length",
                "alias of limits.bps-write-max-length",
                1,
            ),
            int_prop("x-iops-size", "alias of limits.iops-size", 0),
        ],
    },
    TypeDef {
        name: "chardev",
        parent: Some("object"),
        is_abstract: true,
        props: &[],
    },
    TypeDef {
        name: "chardev-socket",
        parent: Some("chardev"),
        is_abstract: false,
        props: &[
            PropDef {
                name: "connected",
                ty: "bool",
                writable: false,
                description: None,
                default: None,
            },
            PropDef {
                name: "addr",
                ty: "SocketAddress",
                writable: false,
                description: None,
                default: None,
            },
        ],
    },
];

pub fn find(name: &str) -> Option<&'static TypeDef> {
    TYPES.iter().find(|t| t.name == name)
}

/// `name` and the types it derives from, the type itself first.
fn lineage(name: &str) -> impl Iterator<Item = &'static TypeDef> {
    let mut next = find(name);
    std::iter::from_fn(move || {
        let t = next?;
        next = t.parent.and_then(find);
        Some(t)
    })
}

/// Every property of a type, inherited ones first (so `type` leads).
pub fn properties(name: &str) -> Vec<&'static PropDef> {
    let mut chain: Vec<_> = lineage(name).collect();
    chain.reverse();
    chain.iter().flat_map(|t| t.props.iter()).collect()
}

pub fn property(ty: &str, prop: &str) -> Option<&'static PropDef> {
    properties(ty).into_iter().find(|p| p.name == prop)
}

fn implements(name: &str, ancestor: &str) -> bool {
    lineage(name).any(|t| t.name == ancestor)
}

/// qom-list-types.
pub fn list_types(implements_type: Option<&str>, with_abstract: bool) -> Vec<ObjectTypeInfo> {
    TYPES
        .iter()
        .filter(|t| with_abstract || !t.is_abstract)
        .filter(|t| implements_type.is_none_or(|a| implements(t.name, a)))
        .map(|t| ObjectTypeInfo {
            name: t.name.into(),
            r#abstract: t.is_abstract.then_some(true),
            parent: t.parent.map(Into::into),
        })
        .collect()
}

/// The description of a property as the qom-list commands give it.
pub fn info(p: &PropDef, with_details: bool) -> ObjectPropertyInfo {
    ObjectPropertyInfo {
        name: p.name.into(),
        r#type: p.ty.into(),
        description: p.description.filter(|_| with_details).map(Into::into),
        default_value: p.default.filter(|_| with_details).map(Value::from),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iothread_properties_start_with_type_then_inherited_ones() {
        let names: Vec<_> = properties("iothread").iter().map(|p| p.name).collect();
        assert_eq!(
            names,
            [
                "type",
                "aio-max-batch",
                "poll-max-ns",
                "poll-grow",
                "poll-shrink"
            ]
        );
    }

    #[test]
    fn implements_includes_descendants_and_the_type_itself() {
        let names: Vec<_> = list_types(Some("event-loop-base"), true)
            .into_iter()
            .map(|t| t.name)
            .collect();
        assert_eq!(names, ["event-loop-base", "iothread"]);
    }

    #[test]
    fn abstract_types_are_left_out_unless_asked_for() {
        let names: Vec<_> = list_types(None, false)
            .into_iter()
            .map(|t| t.name)
            .collect();
        assert_eq!(
            names,
            ["container", "iothread", "throttle-group", "chardev-socket"]
        );
    }

    #[test]
    fn every_parent_is_a_known_type() {
        assert!(TYPES
            .iter()
            .all(|t| t.parent.is_none_or(|p| find(p).is_some())));
    }
}
