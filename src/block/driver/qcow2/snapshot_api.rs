//! The qcow2 driver's side of the internal snapshot commands: checks,
//! the new snapshot's id, name and dates, and the run of [`super::snapshots`]'s
//! work as one task on the control thread ([`sync_io::run_task`]).

use super::snapshots::{self, SnapTable};
use super::Qcow2Driver;
use crate::block::driver::InternalSnapshots;
use crate::block::error::BlockError;
use crate::block::qcow2::format::Snapshot;
use crate::block::sync_io;
use crate::qapi::SnapshotInfo;

impl SnapTable {
    pub(super) fn position(&self, id: Option<&str>, name: Option<&str>) -> Option<usize> {
        self.list
            .iter()
            .position(|sn| snapshots::matches(sn, id, name))
    }
}

impl InternalSnapshots for Qcow2Driver {
    fn create(&self, name: &str) -> Result<(), BlockError> {
        if self.read_only || self.io.alloc.is_none() {
            return Err(BlockError::ReadOnly);
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let id = snapshots::next_id(&self.io.snapshots().list);
        let mut sn = Snapshot::new(id, name.as_bytes().to_vec());
        sn.date_sec = u32::try_from(now.as_secs()).unwrap_or(u32::MAX);
        // Microseconds, as QEMU keeps the date.
        sn.date_nsec = now.subsec_micros() * 1000;
        let io = self.io.clone();
        let r = sync_io::run_task(async move {
            match snapshots::create(&io, sn).await {
                Ok(()) => 0,
                Err(e) => e,
            }
        })?;
        if r < 0 {
            return Err(BlockError::io(
                "snapshot creation",
                &std::io::Error::from_raw_os_error(-r),
            ));
        }
        log::info!(
            "qcow2 node '{}': internal snapshot '{name}' taken",
            self.io.name
        );
        Ok(())
    }

    fn delete(&self, id: Option<&str>, name: Option<&str>) -> Result<SnapshotInfo, BlockError> {
        if self.read_only || self.io.alloc.is_none() {
            return Err(BlockError::ReadOnly);
        }
        let Some(index) = self.io.snapshots().position(id, name) else {
            return Err(BlockError::invalid("no such snapshot"));
        };
        let io = self.io.clone();
        let pass = self.io.pass_discard_snapshot;
        let out = std::rc::Rc::new(std::cell::RefCell::new(None));
        let slot = out.clone();
        let r = sync_io::run_task(async move {
            match snapshots::delete(&io, index, pass).await {
                Ok(sn) => {
                    *slot.borrow_mut() = Some(sn);
                    0
                }
                Err(e) => e,
            }
        })?;
        if r < 0 {
            return Err(BlockError::io(
                "snapshot deletion",
                &std::io::Error::from_raw_os_error(-r),
            ));
        }
        let sn = out
            .borrow_mut()
            .take()
            .ok_or_else(|| BlockError::invalid("the snapshot deletion gave no result"))?;
        log::info!(
            "qcow2 node '{}': internal snapshot '{}' deleted",
            self.io.name,
            String::from_utf8_lossy(&sn.name)
        );
        Ok(snapshots::info(&sn))
    }

    fn find(&self, id: Option<&str>, name: Option<&str>) -> Option<SnapshotInfo> {
        let t = self.io.snapshots();
        t.position(id, name).map(|i| snapshots::info(&t.list[i]))
    }
}
