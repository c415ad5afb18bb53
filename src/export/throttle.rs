//! `block_set_io_throttle`: I/O limits on an export's BlockBackend, by
//! the export id (`device` or `id`, both name the export in vubd).
//!
//! The seed's group rules: a device whose limits become non-zero joins
//! the group named by `group`, or stays in the one it is in, or joins the
//! group named after itself; the limits given become the group's (every
//! member shares them). Setting every limit to 0 takes the device out of
//! its group. Groups made this way share their names with throttle-group
//! objects (a device may join an object's group by its id) and disappear
//! with their last member.

use super::manager::Exports;
use crate::block::graph::Graph;
use crate::block::throttle::limits;
use crate::block::throttle::shared::{Membership, SharedGroup};
use crate::error::QmpError;
use crate::qapi::{BlockIOThrottle, QapiErrorClass};
use std::collections::HashSet;
use std::sync::Arc;

/// Names of the groups `block_set_io_throttle` made (not objects).
#[derive(Default)]
pub struct ImplicitGroups(HashSet<String>);

pub fn set_io_throttle(
    exports: &mut Exports,
    graph: &mut Graph,
    arg: &BlockIOThrottle,
) -> Result<(), QmpError> {
    let (list, implicit) = exports.parts();
    let name = match (&arg.device, &arg.id) {
        (Some(d), None) => d,
        (None, Some(i)) => i,
        _ => return Err(QmpError::generic("Need exactly one of 'device' and 'id'")),
    };
    let export = list.iter().find(|e| &e.id == name).ok_or_else(|| {
        QmpError::with_class(
            QapiErrorClass::DeviceNotFound,
            format!("Device '{name}' not found"),
        )
    })?;
    let cfg = limits::from_io_throttle(arg).map_err(QmpError::generic)?;
    let backend = &export.device().backend;
    let current = backend.throttle();
    if !cfg.enabled() {
        backend.set_throttle(None);
        if let Some(m) = current {
            let group = m.name.clone();
            drop(m);
            forget_if_unused(graph, implicit, &group);
        }
        log::info!("export '{name}': I/O limits off");
        return Ok(());
    }
    let wanted = arg
        .group
        .clone()
        .or_else(|| current.as_ref().map(|m| m.name.clone()))
        .unwrap_or_else(|| name.clone());
    let membership = match current {
        Some(m) if m.name == wanted => m,
        other => {
            let group = match graph.throttle_groups.get(&wanted) {
                Some(g) => g.clone(),
                None => {
                    let g = SharedGroup::new(cfg);
                    graph.throttle_groups.insert(wanted.clone(), g.clone());
                    implicit.0.insert(wanted.clone());
                    g
                }
            };
            let m = Membership::join(&wanted, group);
            backend.set_throttle(Some(m.clone()));
            if let Some(old) = other {
                let group = old.name.clone();
                drop(old);
                forget_if_unused(graph, implicit, &group);
            }
            m
        }
    };
    membership.group.set_config(cfg);
    log::info!("export '{name}': I/O limits set, group '{wanted}'");
    Ok(())
}

/// Drops a group `block_set_io_throttle` made once nothing uses it.
fn forget_if_unused(graph: &mut Graph, implicit: &mut ImplicitGroups, name: &str) {
    if !implicit.0.contains(name) {
        return;
    }
    if graph
        .throttle_groups
        .get(name)
        .is_some_and(|g| Arc::strong_count(g) == 1)
    {
        graph.throttle_groups.remove(name);
        implicit.0.remove(name);
    }
}

/// The limits and group an export's device has, for query-block.
pub fn device_limits(
    exports: &Exports,
    id: &str,
) -> Option<(crate::block::throttle::Config, String)> {
    let e = exports.iter().find(|e| e.id == id)?;
    let m = e.device().backend.throttle()?;
    Some((m.group.config(), m.name.clone()))
}
