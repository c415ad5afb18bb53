//! The vhost-user-blk export: a UNIX socket a frontend (QEMU's
//! vhost-user-blk-pci, cloud-hypervisor, libblkio) connects to, one
//! connection at a time; its virtqueues run on I/O threads.

pub mod channel;
pub mod handler;
pub mod inflight;
pub mod memory;
pub mod queue;
pub mod worker;

use crate::block::backend::Backend;
use crate::block::drain::RootSlot;
use crate::export::virtio_blk::{device_features, ConfigSpace, DeviceOptions, VIRTIO_BLK_ID_BYTES};
use crate::iothread::IoThread;
use crate::qapi::{BlockExportOptions, BlockExportOptionsVhostUserBlk, SocketAddressBranch};
use channel::BackendChannel;
use handler::Connection;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use vhost::vhost_user::BackendReqHandler;

/// The largest ring vubd accepts unless told otherwise.
const DEFAULT_QUEUE_SIZE: u16 = 1024;
/// The largest single data segment offered to the guest.
const SIZE_MAX: u32 = 4 << 20;

static NEXT_UID: AtomicU64 = AtomicU64::new(1);

/// What the export's connection handler and I/O threads share.
pub struct Device {
    /// Unique in the process, to tell queues of different exports apart.
    pub uid: u64,
    pub id: String,
    pub options: DeviceOptions,
    /// Virtio feature bits offered.
    pub features: u64,
    pub device_id: [u8; VIRTIO_BLK_ID_BYTES],
    /// The disk size in bytes, as the I/O threads check requests against.
    pub capacity: AtomicU64,
    pub config: Mutex<ConfigSpace>,
    pub channel: Mutex<Option<BackendChannel>>,
    /// The medium, the cache mode and the statistics the queues share.
    pub backend: Arc<Backend>,
    threads: Vec<Arc<IoThread>>,
    client: Mutex<Option<UnixStream>>,
    stopping: AtomicBool,
}

impl Device {
    /// The I/O thread that owns queue `index`.
    pub fn thread_for(&self, index: u16) -> &Arc<IoThread> {
        &self.threads[usize::from(index) % self.threads.len()]
    }

    /// Shows a new disk size to the device and, through the backend
    /// channel, to a running guest.
    pub fn resize(&self, bytes: u64) {
        self.capacity.store(bytes, Ordering::Relaxed);
        self.config
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .set_capacity(bytes);
        let mut channel = self.channel.lock().unwrap_or_else(PoisonError::into_inner);
        match channel.as_mut() {
            Some(ch) => {
                if let Err(e) = ch.config_changed() {
                    log::warn!("export '{}': the frontend was not told about the new size: {e}", self.id);
                }
            }
            None => log::info!(
                "export '{}': no backend channel; the frontend sees the new size when it reads the config",
                self.id
            ),
        }
    }

    pub fn has_client(&self) -> bool {
        self.client
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some()
    }
    /// The I/O counters of all queues, added up.
    pub fn io_stats(&self) -> crate::qapi::BlockDeviceStats {
        self.backend.io_stats()
    }
}

/// A running export: the device and the thread accepting connections.
pub struct Server {
    dev: Arc<Device>,
    listener: UnixListener,
    path: Option<PathBuf>,
    accept: Option<std::thread::JoinHandle<()>>,
}

/// What the export needs to know of its node.
pub struct NodeGeometry {
    pub length: u64,
    /// Offsets, lengths and buffers must be multiples of this (O_DIRECT);
    /// 1 when anything goes.
    pub alignment: usize,
    /// The node's preferred write granularity (see
    /// `BlockIo::preferred_alignment`).
    pub preferred: u32,
}

/// The logical and physical block sizes an export shows for a node (see
/// [`device_options`]).
/// The largest logical block size a guest is offered.
const MAX_LOGICAL_BLOCK: u32 = 65536;

fn block_sizes(
    asked: Option<u64>,
    node: &NodeGeometry,
    node_name: &str,
) -> Result<(u32, u32), String> {
    let need = u32::try_from(node.alignment).unwrap_or(u32::MAX).max(512);
    let block = match asked {
        Some(b) => match u32::try_from(b) {
            Ok(b) if (512..=MAX_LOGICAL_BLOCK).contains(&b) && b.is_power_of_two() => b,
            _ => {
                return Err(format!(
                    "parameter logical-block-size must be a power of 2 between 512 and \
                     {MAX_LOGICAL_BLOCK}, not {b}"
                ))
            }
        },
        None => need,
    };
    if block < need {
        return Err(format!(
            "logical-block-size {block} is smaller than the alignment of {need} bytes node '{}' \
             needs for its requests (O_DIRECT); use at least {need}, or cache.direct=off",
            node_name
        ));
    }
    Ok((block, node.preferred.max(block)))
}

/// The device an export shows. Its logical block size is the one asked
/// for, or 512, or the node's alignment where that is larger (an O_DIRECT
/// file on a 4K-sector disk); asking for less than the node's alignment is
/// refused, as such requests would fail. The topology (physical block,
/// minimum I/O size) is the node's preferred alignment, so that guests
/// align and size their writes to what the storage below does well.
/// The export's accounting options, checked as QEMU checks -drive's.
fn accounting(
    vu: &BlockExportOptionsVhostUserBlk,
) -> std::io::Result<crate::block::stats::Accounting> {
    let intervals = vu.stats_intervals.clone().unwrap_or_default();
    if let Some(bad) = intervals.iter().find(|i| **i == 0) {
        return Err(std::io::Error::other(format!(
            "Invalid interval length: {bad}"
        )));
    }
    Ok(crate::block::stats::Accounting {
        account_invalid: vu.account_invalid.unwrap_or(true),
        account_failed: vu.account_failed.unwrap_or(true),
        intervals: intervals.into_iter().map(u64::from).collect(),
    })
}

fn device_options(
    opts: &BlockExportOptions,
    vu: &BlockExportOptionsVhostUserBlk,
    node: &NodeGeometry,
) -> std::io::Result<DeviceOptions> {
    let writable = opts.writable.unwrap_or(false);
    let (block, physical) =
        block_sizes(vu.logical_block_size, node, &opts.node_name).map_err(std::io::Error::other)?;
    let queue_size = vu.queue_size.unwrap_or(DEFAULT_QUEUE_SIZE);
    let o = DeviceOptions {
        capacity_bytes: node.length,
        logical_block_size: block,
        physical_block_size: physical,
        min_io_size: physical,
        num_queues: vu.num_queues.unwrap_or(1),
        queue_size,
        seg_max: u32::from(queue_size.min(256)).saturating_sub(2).max(1),
        size_max: SIZE_MAX,
        read_only: !writable,
        writeback: !opts.writethrough.unwrap_or(false),
        discard: writable,
        write_zeroes: writable,
        discard_sector_alignment: block / 512,
        serial: vu.serial.clone().unwrap_or_else(|| opts.id.clone()),
        ..DeviceOptions::default()
    };
    o.validate()
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    Ok(o)
}

fn bind(vu: &BlockExportOptionsVhostUserBlk) -> std::io::Result<(UnixListener, Option<PathBuf>)> {
    match &vu.addr.u {
        SocketAddressBranch::Unix(u) => {
            let path = PathBuf::from(&u.path);
            let listener = crate::qmp::server::listen(&path).map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!(
                        "Failed to bind socket to {}: {}",
                        path.display(),
                        crate::error::os_reason(&e)
                    ),
                )
            })?;
            Ok((listener, Some(path)))
        }
        SocketAddressBranch::Fd(fd) => {
            let n: i32 = fd.str.parse().map_err(|_| {
                std::io::Error::other(format!("'{}' is not a file descriptor number", fd.str))
            })?;
            let mut kind: libc::c_int = 0;
            let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
            // SAFETY: getsockopt writes an int into `kind` of the size given.
            let r = unsafe {
                libc::getsockopt(
                    n,
                    libc::SOL_SOCKET,
                    libc::SO_ACCEPTCONN,
                    (&mut kind as *mut libc::c_int).cast(),
                    &mut len,
                )
            };
            if r != 0 || kind == 0 {
                return Err(std::io::Error::other(format!(
                    "file descriptor {n} is not a listening socket"
                )));
            }
            // SAFETY: the descriptor was handed to vubd for this export,
            // which takes it over.
            Ok((unsafe { UnixListener::from_raw_fd(n) }, None))
        }
        _ => Err(std::io::Error::other(
            "Only socket address types 'unix' and 'fd' are supported",
        )),
    }
}

impl Server {
    pub fn start(
        opts: &BlockExportOptions,
        vu: &BlockExportOptionsVhostUserBlk,
        node: &NodeGeometry,
        slot: Arc<RootSlot>,
        threads: Vec<Arc<IoThread>>,
    ) -> std::io::Result<Server> {
        let options = device_options(opts, vu, node)?;
        let length = node.length;
        let backend = Backend::with_options(
            &opts.id,
            slot,
            usize::from(options.num_queues),
            &crate::block::backend::BackendOptions {
                writeback: options.writeback,
                accounting: accounting(vu)?,
                policy: crate::block::backend::ErrorPolicy::new(vu.rerror, vu.werror),
            },
        );
        let dev = Arc::new(Device {
            uid: NEXT_UID.fetch_add(1, Ordering::Relaxed),
            id: opts.id.clone(),
            features: device_features(&options),
            device_id: options.device_id(),
            capacity: AtomicU64::new(length),
            config: Mutex::new(ConfigSpace::new(&options)),
            options,
            channel: Mutex::new(None),
            backend,
            threads,
            client: Mutex::new(None),
            stopping: AtomicBool::new(false),
        });
        let (listener, path) = bind(vu)?;
        let accepting = listener.try_clone()?;
        let thread_dev = dev.clone();
        let accept = std::thread::Builder::new()
            .name(format!("vhost-user-{}", opts.id))
            .spawn(move || accept_loop(&thread_dev, &accepting))?;
        Ok(Server {
            dev,
            listener,
            path,
            accept: Some(accept),
        })
    }

    pub fn device(&self) -> &Arc<Device> {
        &self.dev
    }

    pub fn has_client(&self) -> bool {
        self.dev.has_client()
    }

    /// Disconnects the client, stops accepting and removes the socket.
    pub fn stop(mut self) {
        self.dev.stopping.store(true, Ordering::SeqCst);
        // SAFETY: shutdown on descriptors this export owns; it only makes
        // blocked accept/recv calls return.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        if let Some(c) = self
            .dev
            .client
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
        {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        if let Some(p) = &self.path {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn accept_loop(dev: &Arc<Device>, listener: &UnixListener) {
    loop {
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) => {
                if dev.stopping.load(Ordering::SeqCst) {
                    return;
                }
                log::warn!("export '{}': accept: {e}", dev.id);
                std::thread::sleep(std::time::Duration::from_millis(50));
                continue;
            }
        };
        if dev.stopping.load(Ordering::SeqCst) {
            return;
        }
        log::info!("export '{}': frontend connected", dev.id);
        if let Ok(c) = stream.try_clone() {
            *dev.client.lock().unwrap_or_else(PoisonError::into_inner) = Some(c);
        }
        serve(dev, stream);
        *dev.client.lock().unwrap_or_else(PoisonError::into_inner) = None;
        log::info!("export '{}': frontend disconnected", dev.id);
    }
}

/// Handles one connection's messages until it ends.
fn serve(dev: &Arc<Device>, stream: UnixStream) {
    let peek = match stream.try_clone() {
        Ok(p) => p,
        Err(e) => {
            log::warn!("export '{}': {e}", dev.id);
            return;
        }
    };
    let conn = Arc::new(Mutex::new(Connection::new(dev.clone())));
    let mut handler = BackendReqHandler::from_stream(stream, conn.clone());
    loop {
        let reply_ack = conn
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .reply_ack();
        if let Some(ch) = channel::peek_backend_channel(peek.as_raw_fd(), reply_ack) {
            conn.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .pending_channel = Some(ch);
        }
        if let Err(e) = handler.handle_request() {
            use vhost::vhost_user::Error as E;
            match e {
                E::Disconnected | E::PartialMessage | E::SocketBroken(_) => {}
                other => log::warn!("export '{}': vhost-user: {other}", dev.id),
            }
            break;
        }
    }
    conn.lock()
        .unwrap_or_else(PoisonError::into_inner)
        .disconnect();
}

#[cfg(test)]
mod tests {
    use super::{block_sizes, NodeGeometry};

    fn node(alignment: usize, preferred: u32) -> NodeGeometry {
        NodeGeometry {
            length: 1 << 20,
            alignment,
            preferred,
        }
    }

    #[test]
    fn buffered_file_shows_512_byte_blocks_and_the_file_system_block_as_physical() {
        assert_eq!(block_sizes(None, &node(1, 4096), "n0"), Ok((512, 4096)));
    }

    #[test]
    fn asked_block_size_wins_over_a_smaller_preference() {
        assert_eq!(
            block_sizes(Some(4096), &node(1, 512), "n0"),
            Ok((4096, 4096))
        );
        assert_eq!(
            block_sizes(Some(4096), &node(512, 4096), "n0"),
            Ok((4096, 4096))
        );
        assert_eq!(
            block_sizes(Some(1024), &node(1, 4096), "n0"),
            Ok((1024, 4096))
        );
    }

    #[test]
    fn direct_io_on_4k_sectors_defaults_to_4k_logical_blocks() {
        assert_eq!(block_sizes(None, &node(4096, 4096), "n0"), Ok((4096, 4096)));
    }

    #[test]
    fn asking_for_blocks_below_the_direct_io_alignment_is_refused() {
        let e = block_sizes(Some(512), &node(4096, 4096), "n0").unwrap_err();
        assert!(e.contains("4096") && e.contains("cache.direct=off"), "{e}");
    }

    #[test]
    fn huge_block_size_is_an_error_not_a_wrap() {
        assert!(block_sizes(Some(1 << 40), &node(1, 512), "n0").is_err());
    }

    #[test]
    fn block_size_that_is_no_power_of_two_is_refused_naming_the_option() {
        let e = block_sizes(Some(100), &node(1, 512), "n0").unwrap_err();
        assert!(e.starts_with("parameter logical-block-size must be"), "{e}");
    }
}
