//! The `blkdebug` filter: passes requests to its `image` child and fails
//! them on purpose, when rules say so, so that error paths (the error
//! policy, a job's on-error, a guest's retry) are driven for real.
//!
//! Rules come from the `inject-error` and `set-state` options and from a
//! `config` file (see [`config_file`]); [`rules`] says how they fire.
//! Events come from the drivers above (a raw node raises `read_aio` and
//! `write_aio` on its child, and `flush_to_disk` when flushed) and from
//! the node itself (`pwritev` for each write, `pwritev_zero` for each
//! write-zeroes). A failed request completes with `-errno`; vubd has no
//! synchronous failure path, so `immediately` changes nothing. `align` is
//! checked and shown as the node's preferred alignment, but requests are
//! not padded to it (QEMU's generic layer would). QEMU names the child
//! `image` in options and keeps it as the node's `file`; so does vubd
//! (its edge has the file role, which is what queries follow).

pub mod config_file;
pub mod rules;

use super::{ChildRole, Driver, DriverKind};
use crate::block::drain::Root;
use crate::block::edge::Child;
use crate::block::error::BlockError;
use crate::block::io::{BlockIo, IoKind, IoRequest};
use crate::io::IoContext;
use crate::qapi::{BlkdebugEvent, BlockdevOptionsBlkdebug};
use rules::{Inject, Machine, SetState};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

pub struct BlkdebugIo {
    child: Child,
    machine: Mutex<Machine>,
    /// Whether any rule exists; a node without rules takes no lock.
    has_rules: bool,
    align: u32,
}

impl BlkdebugIo {
    fn machine(&self) -> MutexGuard<'_, Machine> {
        // The machine is left consistent by every call (no partial
        // updates across a panic), so a poisoned lock is still usable.
        self.machine.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs the rules of `event` (raised by a parent, or by this node).
    pub fn raise(&self, event: BlkdebugEvent) {
        if self.has_rules {
            self.machine().event(event);
        }
    }
}

impl BlockIo for BlkdebugIo {
    fn length(&self) -> Result<u64, BlockError> {
        self.child.get().length()
    }

    fn allocated_size(&self) -> Option<u64> {
        self.child.get().allocated_size()
    }

    fn truncate(&self, size: u64) -> Result<(), BlockError> {
        self.child.get().truncate(size)
    }

    fn mem_alignment(&self) -> usize {
        self.child.get().mem_alignment()
    }

    fn preferred_alignment(&self) -> u32 {
        self.child.get().preferred_alignment().max(self.align)
    }

    fn refresh_length(&self) {
        self.child.get().refresh_length();
    }

    fn flush(&self) -> Result<(), BlockError> {
        self.child.get().flush()
    }

    fn debug_event(&self, event: BlkdebugEvent) {
        self.raise(event);
    }

    fn submit(&self, ctx: &mut IoContext, req: &IoRequest) {
        if self.has_rules {
            let mut m = self.machine();
            match req.kind() {
                IoKind::Write => m.event(BlkdebugEvent::Pwritev),
                IoKind::WriteZeroes { .. } => m.event(BlkdebugEvent::PwritevZero),
                _ => {}
            }
            if req.kind() != IoKind::Flush {
                if let Some((errno, _immediately)) = m.check(req.offset(), req.len()) {
                    drop(m);
                    log::debug!(
                        "blkdebug: failing a {:?} at {} with errno {errno}",
                        req.kind(),
                        req.offset()
                    );
                    ctx.complete_now(req.tag(), -errno);
                    return;
                }
            }
        }
        self.child.get().submit(ctx, req);
    }
}

/// Builds an injection rule from option values, with QEMU's checks.
pub(crate) fn inject_rule(
    event: BlkdebugEvent,
    state: i64,
    errno: i64,
    sector: i64,
    once: bool,
    immediately: bool,
) -> Result<Inject, String> {
    let errno = i32::try_from(errno)
        .ok()
        .filter(|e| *e > 0)
        .ok_or_else(|| "Parameter 'errno' expects a positive error number".to_string())?;
    Ok(Inject {
        event,
        state,
        errno,
        sector: u64::try_from(sector).ok(),
        once,
        immediately,
    })
}

pub struct BlkdebugDriver {
    io: Arc<BlkdebugIo>,
    filename: String,
    read_only: bool,
}

impl BlkdebugDriver {
    /// Opens the filter over `child`; `child_json` describes the child for
    /// the node's json: filename.
    pub fn open(
        opts: &BlockdevOptionsBlkdebug,
        child: Root,
        child_json: serde_json::Value,
        read_only: bool,
    ) -> Result<Self, BlockError> {
        let align = match opts.align {
            None | Some(0) => 0,
            Some(a) if a < 0 => {
                return Err(BlockError::invalid(format!(
                    "Value '{a}' is out of range for parameter 'align'"
                )))
            }
            Some(a) => match u32::try_from(a) {
                Ok(a) if a.is_power_of_two() => a,
                _ => {
                    return Err(BlockError::invalid(format!(
                        "Cannot meet constraints with align {a}"
                    )))
                }
            },
        };
        let mut inject = Vec::new();
        let mut set_state = Vec::new();
        if let Some(path) = &opts.config {
            let from_file = config_file::read(path).map_err(BlockError::invalid)?;
            inject.extend(from_file.inject);
            set_state.extend(from_file.set_state);
        }
        for r in opts.inject_error.iter().flatten() {
            inject.push(
                inject_rule(
                    r.event,
                    r.state.unwrap_or(0),
                    r.errno.unwrap_or(i64::from(libc::EIO)),
                    r.sector.unwrap_or(-1),
                    r.once.unwrap_or(false),
                    r.immediately.unwrap_or(false),
                )
                .map_err(BlockError::invalid)?,
            );
        }
        for r in opts.set_state.iter().flatten() {
            set_state.push(SetState {
                event: r.event,
                state: r.state.unwrap_or(0),
                new_state: r.new_state,
            });
        }
        let has_rules = !inject.is_empty() || !set_state.is_empty();
        Ok(BlkdebugDriver {
            filename: filename(opts, child_json),
            io: Arc::new(BlkdebugIo {
                child: Child::new(ChildRole::File, child),
                machine: Mutex::new(Machine::new(inject, set_state)),
                has_rules,
                align,
            }),
            read_only,
        })
    }
}

/// QEMU describes a blkdebug node by its options, flattened.
fn filename(opts: &BlockdevOptionsBlkdebug, child_json: serde_json::Value) -> String {
    let mut parts = vec![
        format!(
            "\"image\": {}",
            crate::block::json_name::spaced(&child_json)
        ),
        "\"driver\": \"blkdebug\"".to_string(),
    ];
    if let Some(c) = &opts.config {
        parts.push(format!(
            "\"config\": {}",
            serde_json::Value::from(c.as_str())
        ));
    }
    if let Some(a) = opts.align {
        parts.push(format!("\"align\": {a}"));
    }
    for (i, r) in opts.inject_error.iter().flatten().enumerate() {
        let p = format!("inject-error.{i}");
        parts.push(format!("\"{p}.event\": \"{}\"", r.event.as_str()));
        for (k, v) in [("state", r.state), ("errno", r.errno), ("sector", r.sector)] {
            if let Some(v) = v {
                parts.push(format!("\"{p}.{k}\": {v}"));
            }
        }
        for (k, v) in [("once", r.once), ("immediately", r.immediately)] {
            if let Some(v) = v {
                parts.push(format!("\"{p}.{k}\": {v}"));
            }
        }
    }
    for (i, r) in opts.set_state.iter().flatten().enumerate() {
        let p = format!("set-state.{i}");
        parts.push(format!("\"{p}.event\": \"{}\"", r.event.as_str()));
        if let Some(s) = r.state {
            parts.push(format!("\"{p}.state\": {s}"));
        }
        parts.push(format!("\"{p}.new_state\": {}", r.new_state));
    }
    format!("json:{{{}}}", parts.join(", "))
}

impl Driver for BlkdebugDriver {
    fn name(&self) -> &'static str {
        "blkdebug"
    }

    fn kind(&self) -> DriverKind {
        DriverKind::Filter
    }

    fn io(&self) -> Root {
        self.io.clone()
    }

    fn child(&self, role: ChildRole) -> Option<&Child> {
        (role == ChildRole::File).then_some(&self.io.child)
    }

    fn filename(&self) -> String {
        self.filename.clone()
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }
}
