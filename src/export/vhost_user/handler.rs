//! One frontend connection: the vhost-user messages, handled at the level
//! of the `vhost` crate's request handler so that vubd controls the whole
//! life of a connection (rings handed to I/O threads and taken back,
//! memory, config space, the backend channel).
//!
//! A ring starts once it has a kick descriptor and is enabled, and is
//! handed to its I/O thread; GET_VRING_BASE and disconnection take it back
//! after its requests finished.

use super::channel::BackendChannel;
use super::inflight::InflightArea;
use super::memory::GuestMem;
use super::worker::{QueueMsg, QueueStart};
use super::Device;
use std::fs::File;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;
use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig,
    VhostUserSharedMsg, VhostUserSingleMemoryRegion, VhostUserVirtioFeatures,
    VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{
    Backend, Error as VuError, GpuBackend, Result as VuResult, VhostUserBackendReqHandlerMut,
};
use virtio_queue::{Queue, QueueT};

/// The base address a region was mapped at, for postcopy (unused here).
type VhostUserMemoryRegionBase = u64;
use vmm_sys_util::eventfd::EventFd;

/// Memory slots vubd accepts (CONFIGURE_MEM_SLOTS).
const MAX_MEM_SLOTS: u64 = 509;
/// How long taking a ring back may wait for its requests.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Default)]
struct Ring {
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    base: u16,
    kick: Option<EventFd>,
    call: Option<EventFd>,
    enabled: bool,
    running: bool,
}

pub struct Connection {
    dev: Arc<Device>,
    owned: bool,
    acked_features: u64,
    acked_protocol: VhostUserProtocolFeatures,
    mem: GuestMem,
    rings: Vec<Ring>,
    /// The backend channel peeked from SET_BACKEND_REQ_FD, installed when
    /// the message itself arrives.
    pub pending_channel: Option<BackendChannel>,
    /// The inflight tracking area, when the frontend uses one.
    inflight: Option<Arc<InflightArea>>,
}

fn invalid(what: &str) -> VuError {
    log::debug!("vhost-user: {what}");
    VuError::InvalidParam
}

fn handler_error(e: impl std::fmt::Display) -> VuError {
    VuError::ReqHandlerError(std::io::Error::other(e.to_string()))
}

impl Connection {
    pub fn new(dev: Arc<Device>) -> Self {
        let queues = usize::from(dev.options.num_queues);
        Connection {
            dev,
            owned: false,
            acked_features: 0,
            acked_protocol: VhostUserProtocolFeatures::empty(),
            mem: GuestMem::default(),
            rings: (0..queues).map(|_| Ring::default()).collect(),
            pending_channel: None,
            inflight: None,
        }
    }

    pub fn reply_ack(&self) -> bool {
        self.acked_protocol
            .contains(VhostUserProtocolFeatures::REPLY_ACK)
    }

    fn ring(&mut self, index: u32) -> VuResult<&mut Ring> {
        self.rings
            .get_mut(index as usize)
            .ok_or_else(|| invalid("ring index out of range"))
    }

    fn protocol_features_on(&self) -> bool {
        self.acked_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0
    }

    /// Hands a ring to its I/O thread when it has all it needs.
    fn maybe_start(&mut self, index: u32) -> VuResult<()> {
        let protocol = self.protocol_features_on();
        let event_idx =
            self.acked_features & (1 << crate::export::virtio_blk::VIRTIO_RING_F_EVENT_IDX) != 0;
        let max = self.dev.options.queue_size;
        let atomic = self.mem.atomic();
        let dev = self.dev.clone();
        let inflight_area = self.inflight.clone();
        let ring = self.ring(index)?;
        // Without protocol features a ring runs as soon as it is kicked.
        let enabled = ring.enabled || !protocol;
        if ring.running || !enabled || ring.kick.is_none() || ring.size == 0 {
            return Ok(());
        }
        let mut queue = Queue::new(max).map_err(handler_error)?;
        queue.set_size(ring.size);
        queue.set_desc_table_address(Some(ring.desc as u32), Some((ring.desc >> 32) as u32));
        queue.set_avail_ring_address(Some(ring.avail as u32), Some((ring.avail >> 32) as u32));
        queue.set_used_ring_address(Some(ring.used as u32), Some((ring.used >> 32) as u32));
        queue.set_event_idx(event_idx);
        queue.set_ready(true);
        let mem = atomic.memory();
        if !queue.is_valid(&*mem) {
            return Err(invalid(
                "ring addresses or size are not valid in guest memory",
            ));
        }
        queue.set_next_avail(ring.base);
        // The used index lives in guest memory; after a reconnect it is
        // where the previous connection left it.
        let used = queue
            .used_idx(&*mem, std::sync::atomic::Ordering::Acquire)
            .map_err(handler_error)?;
        queue.set_next_used(used.0);
        let (Some(kick), Some(call)) = (ring.kick.as_ref(), ring.call.as_ref()) else {
            return Ok(());
        };
        let inflight = inflight_area
            .as_ref()
            .and_then(|a| a.queue(index as u16, ring.size));
        let start = QueueStart {
            dev: dev.clone(),
            index: index as u16,
            queue,
            kick: kick.try_clone().map_err(handler_error)?,
            call: call.try_clone().map_err(handler_error)?,
            mem: atomic,
            inflight,
        };
        let thread = dev.thread_for(index as u16);
        if !thread.send(QueueMsg::Start(Box::new(start))) {
            return Err(handler_error("I/O thread is gone"));
        }
        ring.running = true;
        Ok(())
    }

    /// Takes a running ring back from its thread; returns the next
    /// available index.
    fn stop(&mut self, index: u32) -> VuResult<Option<u16>> {
        let dev = self.dev.clone();
        let ring = self.ring(index)?;
        if !ring.running {
            return Ok(None);
        }
        ring.running = false;
        let (tx, rx) = mpsc::channel();
        let thread = dev.thread_for(index as u16);
        thread.send(QueueMsg::Stop {
            key: (dev.uid, index as u16),
            reply: tx,
        });
        match rx.recv_timeout(STOP_TIMEOUT) {
            Ok(next) => Ok(Some(next)),
            Err(_) => Err(handler_error("ring did not stop in time")),
        }
    }

    /// The frontend went away: take every ring back.
    pub fn disconnect(&mut self) {
        for i in 0..self.rings.len() {
            if let Err(e) = self.stop(i as u32) {
                log::warn!("export '{}': stopping queue {i}: {e}", self.dev.id);
            }
        }
        self.rings.iter_mut().for_each(|r| *r = Ring::default());
        *self
            .dev
            .channel
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
    }
}

impl VhostUserBackendReqHandlerMut for Connection {
    fn set_owner(&mut self) -> VuResult<()> {
        if self.owned {
            return Err(VuError::InvalidOperation("already claimed"));
        }
        self.owned = true;
        Ok(())
    }

    fn reset_owner(&mut self) -> VuResult<()> {
        self.disconnect();
        self.owned = false;
        self.acked_features = 0;
        Ok(())
    }

    fn reset_device(&mut self) -> VuResult<()> {
        self.disconnect();
        Ok(())
    }

    fn get_features(&mut self) -> VuResult<u64> {
        Ok(self.dev.features | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits())
    }

    fn set_features(&mut self, features: u64) -> VuResult<()> {
        let offered = self.get_features()?;
        if features & !offered != 0 {
            return Err(invalid("frontend acked features that were not offered"));
        }
        self.acked_features = features;
        // Rings that ran before keep their EVENT_IDX setting until restarted.
        Ok(())
    }

    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        _postcopy: Option<bool>,
    ) -> VuResult<Option<Vec<VhostUserMemoryRegionBase>>> {
        self.mem.set_table(ctx, files).map_err(handler_error)?;
        Ok(None)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> VuResult<()> {
        let max = u32::from(self.dev.options.queue_size);
        if num == 0 || num > max || !num.is_power_of_two() {
            return Err(invalid("ring size not a power of two up to the queue size"));
        }
        self.ring(index)?.size = num as u16;
        Ok(())
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        _flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> VuResult<()> {
        let desc = self.mem.to_gpa(descriptor).map_err(handler_error)?;
        let used = self.mem.to_gpa(used).map_err(handler_error)?;
        let avail = self.mem.to_gpa(available).map_err(handler_error)?;
        let ring = self.ring(index)?;
        ring.desc = desc;
        ring.used = used;
        ring.avail = avail;
        Ok(())
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> VuResult<()> {
        self.ring(index)?.base = base as u16;
        Ok(())
    }

    fn get_vring_base(&mut self, index: u32) -> VuResult<VhostUserVringState> {
        let next = self.stop(index)?;
        let ring = self.ring(index)?;
        let base = next.unwrap_or(ring.base);
        ring.kick = None;
        ring.enabled = false;
        Ok(VhostUserVringState::new(index, u32::from(base)))
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        let Some(file) = fd else {
            return Err(invalid(
                "polling rings without a kick descriptor are not supported",
            ));
        };
        // SAFETY: the descriptor came with the message and is ours alone.
        let kick = unsafe {
            <EventFd as std::os::fd::FromRawFd>::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(
                file,
            ))
        };
        self.ring(u32::from(index))?.kick = Some(kick);
        self.maybe_start(u32::from(index))
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        let dev = self.dev.clone();
        let ring = self.ring(u32::from(index))?;
        let call = fd.map(|file| {
            // SAFETY: the descriptor came with the message and is ours alone.
            unsafe {
                <EventFd as std::os::fd::FromRawFd>::from_raw_fd(
                    std::os::fd::IntoRawFd::into_raw_fd(file),
                )
            }
        });
        if ring.running {
            if let Some(c) = call.as_ref().and_then(|c| c.try_clone().ok()) {
                dev.thread_for(u16::from(index)).send(QueueMsg::SetCall {
                    key: (dev.uid, u16::from(index)),
                    call: c,
                });
            }
        }
        ring.call = call;
        self.maybe_start(u32::from(index))
    }

    fn set_vring_err(&mut self, _index: u8, _fd: Option<File>) -> VuResult<()> {
        Ok(())
    }

    fn get_protocol_features(&mut self) -> VuResult<VhostUserProtocolFeatures> {
        Ok(VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::BACKEND_REQ
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD)
    }

    fn set_protocol_features(&mut self, features: u64) -> VuResult<()> {
        self.acked_protocol = VhostUserProtocolFeatures::from_bits_truncate(features);
        Ok(())
    }

    fn get_queue_num(&mut self) -> VuResult<u64> {
        Ok(u64::from(self.dev.options.num_queues))
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> VuResult<()> {
        self.ring(index)?.enabled = enable;
        if enable {
            self.maybe_start(index)
        } else {
            self.stop(index).map(|_| ())
        }
    }

    fn get_config(
        &mut self,
        offset: u32,
        size: u32,
        _flags: VhostUserConfigFlags,
    ) -> VuResult<Vec<u8>> {
        let config = self
            .dev
            .config
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Ok(config.read(offset, size))
    }

    fn set_config(
        &mut self,
        offset: u32,
        buf: &[u8],
        _flags: VhostUserConfigFlags,
    ) -> VuResult<()> {
        let mut config = self
            .dev
            .config
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(writeback) = config.write(offset, buf) {
            self.dev.backend.set_writeback(writeback);
            log::info!(
                "export '{}': guest switched to {}",
                self.dev.id,
                if writeback {
                    "writeback"
                } else {
                    "writethrough"
                }
            );
        }
        Ok(())
    }

    fn set_backend_req_fd(&mut self, _backend: Backend) {
        // vubd writes on its own copy of the channel (see channel.rs).
        if let Some(ch) = self.pending_channel.take() {
            *self
                .dev
                .channel
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(ch);
        }
    }

    fn set_gpu_socket(&mut self, _gpu: GpuBackend) -> VuResult<()> {
        Err(VuError::InvalidOperation("not a GPU device"))
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> VuResult<File> {
        Err(VuError::InvalidOperation(
            "shared objects are not supported",
        ))
    }

    fn get_inflight_fd(
        &mut self,
        inflight: &VhostUserInflight,
    ) -> VuResult<(VhostUserInflight, File)> {
        if inflight.num_queues == 0 || inflight.queue_size == 0 {
            return Err(invalid("inflight area for no queues"));
        }
        let area = InflightArea::create(inflight.num_queues, inflight.queue_size)
            .map_err(handler_error)?;
        let file = area.file.try_clone().map_err(handler_error)?;
        let reply = VhostUserInflight {
            mmap_size: area.len() as u64,
            mmap_offset: 0,
            num_queues: inflight.num_queues,
            queue_size: inflight.queue_size,
        };
        self.inflight = Some(area);
        Ok((reply, file))
    }

    fn set_inflight_fd(&mut self, inflight: &VhostUserInflight, file: File) -> VuResult<()> {
        let len =
            usize::try_from(inflight.mmap_size).map_err(|_| invalid("inflight area too large"))?;
        let area = InflightArea::map(
            file,
            len,
            inflight.mmap_offset,
            inflight.num_queues,
            inflight.queue_size,
        )
        .map_err(handler_error)?;
        log::info!(
            "export '{}': frontend gave back its inflight area",
            self.dev.id
        );
        self.inflight = Some(area);
        Ok(())
    }

    fn get_max_mem_slots(&mut self) -> VuResult<u64> {
        Ok(MAX_MEM_SLOTS)
    }

    fn add_mem_region(
        &mut self,
        region: &VhostUserSingleMemoryRegion,
        fd: File,
        _postcopy: Option<bool>,
    ) -> VuResult<Option<VhostUserMemoryRegionBase>> {
        self.mem.add(region, fd).map_err(handler_error)?;
        Ok(None)
    }

    fn remove_mem_region(&mut self, region: &VhostUserSingleMemoryRegion) -> VuResult<()> {
        self.mem.remove(region).map_err(handler_error)
    }

    fn set_device_state_fd(
        &mut self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _fd: File,
    ) -> VuResult<Option<File>> {
        Err(VuError::InvalidOperation(
            "device state transfer is not supported",
        ))
    }

    fn check_device_state(&mut self) -> VuResult<()> {
        Err(VuError::InvalidOperation(
            "device state transfer is not supported",
        ))
    }

    fn get_shmem_config(&mut self) -> VuResult<VhostUserShMemConfig> {
        Err(VuError::InvalidOperation(
            "shared memory regions are not supported",
        ))
    }

    fn set_log_base(&mut self, _log: &VhostUserLog, _file: File) -> VuResult<()> {
        Err(VuError::InvalidOperation("dirty logging is not supported"))
    }
}
