//! A minimal vhost-user frontend for tests: it plays the part of a VMM and
//! of a virtio-blk driver, low level enough to put malformed descriptor
//! chains in the ring.
//!
//! Guest memory is a memfd.  Only the middle of it is shared with the
//! backend: the first and last [`GUARD`] bytes of the file are filled with
//! a canary, so a backend that reads or writes past the region it was given
//! (for example by mapping the whole file, or ignoring `mmap_offset`) shows
//! up in [`TestFrontend::assert_guards_intact`].  Guest physical address 0
//! is the start of the shared window; the ring addresses sent with
//! SET_VRING_ADDR are the test process's virtual addresses of the rings, as
//! vhost-user requires.
//!
//! One split virtqueue, at fixed guest addresses ([`DESC_TABLE`],
//! [`AVAIL_RING`], [`USED_RING`]).  The test writes raw descriptors and
//! avail entries, kicks, and waits (always with a timeout) for used
//! entries.  [`TestFrontend::wait_used`] also checks that every used entry
//! was announced through the call eventfd (honouring `used_event` when
//! EVENT_IDX is negotiated), since a guest relies on that interrupt.
//!
//! Every vhost-user exchange and every wait has a timeout ([`TIMEOUT`]): a
//! wedged backend fails the test instead of hanging it.
//!
//! With [`Options::inflight`] the frontend negotiates INFLIGHT_SHMFD and
//! keeps the backend's inflight area as QEMU does; [`TestFrontend::reconnect`]
//! then connects again (to the same backend or to a new one on the same
//! socket) keeping guest memory, rings, indices and the area.
//!
//! With [`Options::backend_req`] it negotiates BACKEND_REQ and, with
//! [`Options::backend_channel`], gives the backend one end of a socket pair
//! with SET_BACKEND_REQ_FD (as QEMU does, right after the feature
//! negotiation); [`TestFrontend::recv_backend`] reads what the backend sends
//! there and [`TestFrontend::answer_backend`] answers it.  With
//! [`Options::reply_ack`] off, REPLY_ACK is not negotiated and messages are
//! sent without NEED_REPLY.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{fence, AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserInflight, VhostUserProtocolFeatures,
    VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};
use vmm_sys_util::eventfd::EventFd;

/// Size of the guest memory shared with the backend.
pub const MEM_SIZE: u64 = 4 << 20;
/// Unshared bytes of the memfd before and after the shared window.
pub const GUARD: u64 = 2 << 20;
/// Byte the guard areas are filled with.
pub const CANARY: u8 = 0xa5;

/// Guest addresses of the ring (room for up to 1024 entries each).  Guest
/// address 0 is left out on purpose: it is valid memory for descriptors
/// but no ring lives there.
pub const DESC_TABLE: u64 = 0x1000;
pub const AVAIL_RING: u64 = 0x5000;
pub const USED_RING: u64 = 0x6000;
/// Free for the test: headers, status bytes, indirect tables.
pub const SCRATCH: u64 = 0x10000;
/// End of [`SCRATCH`].
pub const SCRATCH_END: u64 = 0xf0000;
/// Header and status of [`TestFrontend::request`] (well-formed requests).
pub const GOOD_HDR: u64 = 0xf0000;
pub const GOOD_STATUS: u64 = 0xf0100;
/// Free for the test's data buffers: 2 MiB.
pub const DATA: u64 = 0x100000;
/// Data buffer of well-formed requests: up to [`GOOD_DATA_MAX`] bytes.
pub const GOOD_DATA: u64 = 0x300000;
pub const GOOD_DATA_MAX: u32 = 1 << 20;

/// Descriptor flags (virtio 1.2, 2.7.5).
pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;
pub const F_INDIRECT: u16 = 4;

/// Request types (virtio 1.2, 5.2.6).
pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;
pub const T_GET_ID: u32 = 8;
pub const T_DISCARD: u32 = 11;
pub const T_WRITE_ZEROES: u32 = 13;

/// Status values.
pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;
/// What status bytes hold before the device answers.
pub const SENTINEL: u8 = 0xee;

/// Feature bits.
pub const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// How long a used entry or a vhost-user reply may take.
pub const TIMEOUT: Duration = Duration::from_secs(5);
/// How long a used entry may go unannounced by the call eventfd.
const NOTIFY_GRACE: Duration = Duration::from_secs(1);

/// One split-ring descriptor, as the guest writes it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

impl Desc {
    /// A device-readable buffer.
    pub fn ro(addr: u64, len: u32) -> Desc {
        Desc {
            addr,
            len,
            flags: 0,
            next: 0,
        }
    }

    /// A device-writable buffer.
    pub fn wo(addr: u64, len: u32) -> Desc {
        Desc {
            addr,
            len,
            flags: F_WRITE,
            next: 0,
        }
    }

    /// A descriptor pointing at an indirect table of `len` bytes.
    pub fn indirect(addr: u64, len: u32) -> Desc {
        Desc {
            addr,
            len,
            flags: F_INDIRECT,
            next: 0,
        }
    }

    /// The same descriptor, chained to `next`.
    pub fn then(mut self, next: u16) -> Desc {
        self.flags |= F_NEXT;
        self.next = next;
        self
    }

    /// The same descriptor with `flags` added.
    pub fn with(mut self, flags: u16) -> Desc {
        self.flags |= flags;
        self
    }

    fn to_bytes(self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&self.addr.to_le_bytes());
        b[8..12].copy_from_slice(&self.len.to_le_bytes());
        b[12..14].copy_from_slice(&self.flags.to_le_bytes());
        b[14..16].copy_from_slice(&self.next.to_le_bytes());
        b
    }
}

/// A used ring entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Used {
    pub id: u32,
    pub len: u32,
}

/// A completed well-formed request.
#[derive(Clone, Debug)]
pub struct Done {
    pub used: Used,
    pub status: u8,
}

/// How the frontend sets up the device.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// Negotiate VIRTIO_RING_F_EVENT_IDX.
    pub event_idx: bool,
    /// Negotiate VIRTIO_RING_F_INDIRECT_DESC.
    pub indirect: bool,
    /// Share memory with ADD_MEM_REG (CONFIGURE_MEM_SLOTS) instead of
    /// SET_MEM_TABLE.
    pub mem_slots: bool,
    pub queue_size: u16,
    /// Where the avail and used indices start (SET_VRING_BASE and the used
    /// index in memory), to test wrap-around.
    pub base: u16,
    /// Negotiate INFLIGHT_SHMFD: GET_INFLIGHT_FD before the ring starts,
    /// then SET_INFLIGHT_FD with what came back (as QEMU does); the area
    /// is kept for [`TestFrontend::reconnect`].
    pub inflight: bool,
    /// Negotiate REPLY_ACK and ask for an acknowledgement of every message
    /// (on by default).  Off, a call that expects no reply returns once
    /// the message is sent.
    pub reply_ack: bool,
    /// Negotiate BACKEND_REQ.
    pub backend_req: bool,
    /// Send SET_BACKEND_REQ_FD with one end of a socket pair, keeping the
    /// other as the backend channel (needs `backend_req`).
    pub backend_channel: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            event_idx: false,
            indirect: true,
            mem_slots: false,
            queue_size: 256,
            base: 0,
            inflight: false,
            reply_ack: true,
            backend_req: false,
            backend_channel: false,
        }
    }
}

/// VHOST_USER_VERSION, in the flags of every message.
pub const VU_VERSION: u32 = 0x1;
/// Header flag of a reply.
pub const VU_REPLY: u32 = 0x4;
/// Header flag asking for a reply.
pub const VU_NEED_REPLY: u32 = 0x8;
/// VHOST_USER_BACKEND_CONFIG_CHANGE_MSG.
pub const BACKEND_CONFIG_CHANGE_MSG: u32 = 2;
/// The largest backend-channel payload [`TestFrontend::recv_backend`]
/// accepts (the spec's messages are far smaller).
const BACKEND_PAYLOAD_MAX: u32 = 4096;

/// What [`TestFrontend::backend_state`] saw on the backend channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendState {
    /// Nothing within the wait.
    Quiet,
    /// Bytes of a message.
    Data,
    /// The backend closed its end.
    Closed,
}

/// A message the backend sent on the backend channel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendMsg {
    pub request: u32,
    pub flags: u32,
    pub size: u32,
    pub payload: Vec<u8>,
}

/// Cuts a connection whose answer is late.
///
/// The `vhost` crate retries a socket read that times out (EAGAIN is a
/// "temporary" error to it), so socket timeouts do not bound a call.  The
/// watchdog shuts the socket down instead once an armed deadline passes;
/// the call in progress then fails.
struct Watchdog {
    deadline: Arc<Mutex<Option<Instant>>>,
    fired: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Watchdog {
    fn new(sock: UnixStream) -> Watchdog {
        let deadline = Arc::new(Mutex::new(None::<Instant>));
        let fired = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let (d, f, s) = (deadline.clone(), fired.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(10));
                let mut armed = d.lock().unwrap();
                if armed.is_some_and(|at| Instant::now() >= at) {
                    f.store(true, Ordering::SeqCst);
                    let _ = sock.shutdown(std::net::Shutdown::Both);
                    *armed = None;
                }
            }
        });
        Watchdog {
            deadline,
            fired,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The vhost-user connection: every message has [`TIMEOUT`] to be answered.
struct Conn {
    fe: Frontend,
    watchdog: Watchdog,
    /// The socket, to close the connection while `fe` lives on.
    sock: UnixStream,
}

impl Conn {
    fn connect(path: &Path) -> Conn {
        let sock = connect_socket(path);
        let watchdog = Watchdog::new(sock.try_clone().expect("dup socket"));
        Conn {
            fe: Frontend::from_stream(sock.try_clone().expect("dup socket"), 1),
            watchdog,
            sock,
        }
    }

    /// Ends the connection as a frontend that goes away does.
    fn close(&self) {
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
    }

    /// Runs one exchange; panics if it fails or takes over [`TIMEOUT`].
    fn call<T>(&mut self, what: &str, f: impl FnOnce(&mut Frontend) -> vhost::Result<T>) -> T {
        assert!(
            !self.watchdog.fired.load(Ordering::SeqCst),
            "{what}: the connection was cut after an earlier timeout"
        );
        *self.watchdog.deadline.lock().unwrap() = Some(Instant::now() + TIMEOUT);
        let result = f(&mut self.fe);
        *self.watchdog.deadline.lock().unwrap() = None;
        if self.watchdog.fired.load(Ordering::SeqCst) {
            panic!("{what}: no answer within {TIMEOUT:?}: the backend is wedged");
        }
        result.unwrap_or_else(|e| panic!("{what}: {e}"))
    }
}

/// A frontend with one running virtqueue.
pub struct TestFrontend {
    conn: Conn,
    /// The whole memfd, guards included (file offset = address here).
    backing: GuestMemoryMmap<()>,
    /// The shared window, at guest physical address 0.
    mem: GuestMemoryMmap<()>,
    region: VhostUserMemoryRegionInfo,
    /// Keeps the memfd open for the region's descriptor.
    _memfd: File,
    kick: EventFd,
    call: EventFd,
    opts: Options,
    features: u64,
    /// Next avail index the driver publishes.
    avail_idx: u16,
    /// Used entries consumed so far.
    last_used: u16,
    /// The used index read right after the last notification: entries
    /// before it were announced.
    notified_upto: u16,
    /// Notifications received.
    pub calls: u64,
    /// The inflight area the backend gave (GET_INFLIGHT_FD), kept as a
    /// VMM keeps it across reconnections.
    inflight: Option<(VhostUserInflight, File)>,
    /// The frontend's end of the backend channel
    /// ([`Options::backend_channel`]).
    backend: Option<UnixStream>,
}

fn memfd(name: &str, size: u64) -> File {
    let cname = std::ffi::CString::new(name).unwrap();
    // SAFETY: memfd_create with a valid NUL-terminated name; the result is
    // checked before it is used.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is a new descriptor that nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size).expect("sizing the memfd");
    file
}

/// Maps `size` bytes of `file` from `offset` as guest memory at guest
/// address 0; also returns what vhost-user says of that region.
fn map(file: &File, offset: u64, size: u64) -> (GuestMemoryMmap<()>, VhostUserMemoryRegionInfo) {
    let fo = FileOffset::new(file.try_clone().expect("dup memfd"), offset);
    let region = MmapRegion::<()>::from_file(fo, size as usize).expect("mmap memfd");
    let region = GuestRegionMmap::new(region, GuestAddress(0)).expect("guest region");
    let info = VhostUserMemoryRegionInfo::from_guest_region(&region).expect("region info");
    let mem = GuestMemoryMmap::from_regions(vec![region]).expect("guest memory");
    (mem, info)
}

fn connect_socket(path: &Path) -> UnixStream {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return s,
            Err(e) if Instant::now() >= deadline => {
                panic!("cannot connect to {}: {e}", path.display())
            }
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// Waits up to `timeout` for `fd` to be readable.
fn poll_in(fd: i32, timeout: Duration) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: poll on one valid pollfd that lives across the call.
    unsafe { libc::poll(&mut pfd, 1, ms) > 0 }
}

/// Claims the backend and negotiates features (virtio and protocol) as
/// `opts` asks, and sets up the backend channel if asked; returns the
/// connection (acknowledging every message from then on, with
/// [`Options::reply_ack`]), the virtio features acked and the frontend's
/// end of the backend channel.
fn handshake(path: &Path, opts: &Options) -> (Conn, u64, Option<UnixStream>) {
    let mut conn = Conn::connect(path);
    conn.call("SET_OWNER", |fe| fe.set_owner());
    let offered = conn.call("GET_FEATURES", |fe| fe.get_features());
    let protocol_bit = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
    assert!(offered & protocol_bit != 0, "no PROTOCOL_FEATURES offered");
    assert!(offered & VIRTIO_F_VERSION_1 != 0, "no VERSION_1 offered");
    let mut features = offered;
    if !opts.event_idx {
        features &= !VIRTIO_RING_F_EVENT_IDX;
    }
    if !opts.indirect {
        features &= !VIRTIO_RING_F_INDIRECT_DESC;
    }
    if opts.event_idx {
        assert!(offered & VIRTIO_RING_F_EVENT_IDX != 0, "no EVENT_IDX");
    }
    conn.call("SET_FEATURES", |fe| fe.set_features(features));
    let offered_protocol = conn.call("GET_PROTOCOL_FEATURES", |fe| fe.get_protocol_features());
    let mut protocol = VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::CONFIG;
    if opts.reply_ack {
        protocol |= VhostUserProtocolFeatures::REPLY_ACK;
    }
    if opts.backend_req {
        protocol |= VhostUserProtocolFeatures::BACKEND_REQ;
    }
    if opts.mem_slots {
        protocol |= VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS;
    }
    if opts.inflight {
        protocol |= VhostUserProtocolFeatures::INFLIGHT_SHMFD;
    }
    assert!(
        offered_protocol.contains(protocol),
        "protocol features {offered_protocol:?} lack some of {protocol:?}"
    );
    conn.call("SET_PROTOCOL_FEATURES", |fe| {
        fe.set_protocol_features(protocol)
    });
    // From here on every message is acknowledged: when a call returns,
    // the backend has handled the message.
    if opts.reply_ack {
        conn.fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    }
    let queues = conn.call("GET_QUEUE_NUM", |fe| fe.get_queue_num());
    assert!(queues >= 1, "backend has {queues} queues");
    assert!(
        opts.backend_req || !opts.backend_channel,
        "Options::backend_channel needs Options::backend_req"
    );
    let backend = opts.backend_channel.then(|| {
        let (ours, theirs) = UnixStream::pair().expect("socket pair for the backend channel");
        conn.call("SET_BACKEND_REQ_FD", |fe| {
            fe.set_backend_request_fd(&theirs)
        });
        // `theirs` closes here: the backend holds its own copy.
        ours
    });
    (conn, features, backend)
}

/// Shares the guest memory window (SET_MEM_TABLE, or ADD_MEM_REG).
fn share_memory(conn: &mut Conn, opts: &Options, region: &VhostUserMemoryRegionInfo) {
    if opts.mem_slots {
        let slots = conn.call("GET_MAX_MEM_SLOTS", |fe| fe.get_max_mem_slots());
        assert!(slots >= 1);
        conn.call("ADD_MEM_REG", |fe| fe.add_mem_region(region));
    } else {
        conn.call("SET_MEM_TABLE", |fe| {
            fe.set_mem_table(std::slice::from_ref(region))
        });
    }
}

impl TestFrontend {
    /// Connects to the vhost-user socket at `path` and brings up queue 0.
    pub fn connect(path: &Path, opts: Options) -> TestFrontend {
        let qs = opts.queue_size;
        assert!(qs.is_power_of_two() && qs <= 1024, "queue size {qs}");
        let (mut conn, features, backend) = handshake(path, &opts);
        let inflight = opts.inflight.then(|| {
            // As QEMU: ask for an area, then give it back at once.
            let ask = VhostUserInflight::new(0, 0, 1, qs);
            let (info, file) = conn.call("GET_INFLIGHT_FD", |fe| fe.get_inflight_fd(&ask));
            assert!(
                info.mmap_size > 0,
                "GET_INFLIGHT_FD answered an empty area ({} bytes)",
                info.mmap_size
            );
            conn.call("SET_INFLIGHT_FD", |fe| {
                fe.set_inflight_fd(&info, file.as_raw_fd())
            });
            (info, file)
        });

        let memfd = memfd("vubd-test-guest", MEM_SIZE + 2 * GUARD);
        let (backing, _) = map(&memfd, 0, MEM_SIZE + 2 * GUARD);
        let (mem, region) = map(&memfd, GUARD, MEM_SIZE);
        backing
            .write_slice(&vec![CANARY; GUARD as usize], GuestAddress(0))
            .unwrap();
        backing
            .write_slice(
                &vec![CANARY; GUARD as usize],
                GuestAddress(GUARD + MEM_SIZE),
            )
            .unwrap();
        assert_eq!(region.mmap_offset, GUARD);
        share_memory(&mut conn, &opts, &region);

        let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let call = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut t = TestFrontend {
            conn,
            backing,
            mem,
            region,
            _memfd: memfd,
            kick,
            call,
            opts,
            features,
            avail_idx: opts.base,
            last_used: opts.base,
            notified_upto: opts.base,
            calls: 0,
            inflight,
            backend,
        };
        // The ring as a fresh driver leaves it.
        t.mem
            .write_slice(&vec![0u8; 0xf000], GuestAddress(DESC_TABLE))
            .unwrap();
        t.store_u16(AVAIL_RING + 2, opts.base);
        t.store_u16(USED_RING + 2, opts.base);
        t.set_used_event(opts.base);
        t.start_ring(opts.base);
        t
    }

    /// Closes the connection, as a frontend that goes away does (no
    /// GET_VRING_BASE, no RESET_OWNER).  Guest memory, rings and the
    /// inflight area stay; [`reconnect`](Self::reconnect) picks them up.
    pub fn disconnect(&mut self) {
        self.conn.close();
    }

    /// Connects again to the socket at `path` (the same backend after
    /// [`disconnect`](Self::disconnect), or a new one after the old died)
    /// and starts queue 0 again on the same guest memory, descriptor table,
    /// avail and used rings, and call and kick eventfds.  As QEMU does, the
    /// kept inflight area is given back with SET_INFLIGHT_FD before the
    /// ring starts, and the ring's base is `base`, or the ring's used index
    /// when `None` (what QEMU sets once the backend's last avail index is
    /// lost).  Does not kick.
    pub fn reconnect(&mut self, path: &Path, base: Option<u16>) {
        self.conn.close();
        let (mut conn, features, backend) = handshake(path, &self.opts);
        assert_eq!(
            features, self.features,
            "the backend offers other features after reconnecting"
        );
        if let Some((info, file)) = &self.inflight {
            conn.call("SET_INFLIGHT_FD", |fe| {
                fe.set_inflight_fd(info, file.as_raw_fd())
            });
        }
        share_memory(&mut conn, &self.opts, &self.region);
        // The old connection (and its watchdog) goes only now: the new
        // one is up.
        self.conn = conn;
        self.backend = backend;
        let base = base.unwrap_or_else(|| self.used_idx());
        self.start_ring(base);
    }

    /// The inflight area this frontend keeps: what GET_INFLIGHT_FD
    /// answered.
    pub fn inflight_info(&self) -> Option<VhostUserInflight> {
        self.inflight.as_ref().map(|(info, _)| *info)
    }

    /// The heads the inflight area marks as in flight for queue `queue`,
    /// read as the vhost-user spec lays out a split queue's region
    /// (a 16-byte header, then 16 bytes per descriptor whose first byte is
    /// the `inflight` flag; the area split evenly between the queues).
    /// A frontend does not need to read the area; tests do, to see what
    /// the backend recorded.
    pub fn inflight_marks(&self, queue: u16) -> Vec<u16> {
        let (info, file) = self
            .inflight
            .as_ref()
            .expect("no inflight area (Options::inflight)");
        assert!(queue < info.num_queues, "queue {queue} outside the area");
        let per_queue = info.mmap_size / u64::from(info.num_queues);
        let at = info.mmap_offset + per_queue * u64::from(queue);
        let mut region = vec![0u8; per_queue as usize];
        file.read_exact_at(&mut region, at)
            .expect("reading the inflight area");
        let descs = (region.len().saturating_sub(16) / 16).min(usize::from(self.opts.queue_size));
        (0..descs)
            .filter(|&h| region[16 + 16 * h] != 0)
            .map(|h| h as u16)
            .collect()
    }

    /// SET_VRING_NUM/ADDR/BASE/CALL/KICK/ENABLE for queue 0.
    fn start_ring(&mut self, base: u16) {
        let qs = self.opts.queue_size;
        let host = |gpa: u64| self.region.userspace_addr + gpa;
        let config = VringConfigData {
            queue_max_size: qs,
            queue_size: qs,
            flags: 0,
            desc_table_addr: host(DESC_TABLE),
            used_ring_addr: host(USED_RING),
            avail_ring_addr: host(AVAIL_RING),
            log_addr: None,
        };
        let (call, kick) = (&self.call, &self.kick);
        let c = &mut self.conn;
        c.call("SET_VRING_NUM", |fe| fe.set_vring_num(0, qs));
        c.call("SET_VRING_ADDR", |fe| fe.set_vring_addr(0, &config));
        c.call("SET_VRING_BASE", |fe| fe.set_vring_base(0, base));
        c.call("SET_VRING_CALL", |fe| fe.set_vring_call(0, call));
        c.call("SET_VRING_KICK", |fe| fe.set_vring_kick(0, kick));
        c.call("SET_VRING_ENABLE", |fe| fe.set_vring_enable(0, true));
    }

    /// Takes the ring back (GET_VRING_BASE) and returns the backend's next
    /// avail index.  Fails if the backend does not answer in time.
    pub fn stop_ring(&mut self) -> u16 {
        let base = self.conn.call("GET_VRING_BASE", |fe| fe.get_vring_base(0));
        base as u16
    }

    /// Starts the ring again at avail index `base` (after
    /// [`stop_ring`](Self::stop_ring)); the driver's own indices are left
    /// as they are.
    pub fn restart_ring(&mut self, base: u16) {
        self.start_ring(base);
    }

    /// Sends vhost-user messages the helpers do not cover, with the same
    /// timeout (`what` names them in failures).
    pub fn vhost_user<T>(
        &mut self,
        what: &str,
        f: impl FnOnce(&mut Frontend) -> vhost::Result<T>,
    ) -> T {
        self.conn.call(what, f)
    }

    pub fn features(&self) -> u64 {
        self.features
    }

    pub fn queue_size(&self) -> u16 {
        self.opts.queue_size
    }

    // ---- The backend channel.

    fn backend(&self) -> &UnixStream {
        self.backend
            .as_ref()
            .expect("no backend channel (Options::backend_channel, or closed)")
    }

    /// Waits up to `timeout` for a message on the backend channel and
    /// reads it whole (header and payload, the rest with [`TIMEOUT`]);
    /// `None` if none started within `timeout`.  Panics if the backend
    /// closed the channel or sent a malformed message.
    pub fn recv_backend(&mut self, timeout: Duration) -> Option<BackendMsg> {
        let sock = self.backend();
        if !poll_in(sock.as_raw_fd(), timeout) {
            return None;
        }
        sock.set_read_timeout(Some(TIMEOUT)).unwrap();
        let mut hdr = [0u8; 12];
        let mut r = sock;
        std::io::Read::read_exact(&mut r, &mut hdr)
            .unwrap_or_else(|e| panic!("backend channel: reading a header: {e}"));
        let word = |i: usize| u32::from_le_bytes(hdr[i..i + 4].try_into().unwrap());
        let (request, flags, size) = (word(0), word(4), word(8));
        assert!(
            size <= BACKEND_PAYLOAD_MAX,
            "backend channel: request {request} announces a {size}-byte payload"
        );
        let mut payload = vec![0u8; size as usize];
        std::io::Read::read_exact(&mut r, &mut payload).unwrap_or_else(|e| {
            panic!("backend channel: reading the {size}-byte payload of request {request}: {e}")
        });
        Some(BackendMsg {
            request,
            flags,
            size,
            payload,
        })
    }

    /// Answers `msg` as QEMU does: its request, VERSION | REPLY, and the
    /// u64 `status` (0 for success).
    pub fn answer_backend(&mut self, msg: &BackendMsg, status: u64) {
        let mut reply = [0u8; 20];
        reply[0..4].copy_from_slice(&msg.request.to_le_bytes());
        reply[4..8].copy_from_slice(&(VU_VERSION | VU_REPLY).to_le_bytes());
        reply[8..12].copy_from_slice(&8u32.to_le_bytes());
        reply[12..20].copy_from_slice(&status.to_le_bytes());
        let sock = self.backend();
        sock.set_write_timeout(Some(TIMEOUT)).unwrap();
        let mut w = sock;
        std::io::Write::write_all(&mut w, &reply)
            .unwrap_or_else(|e| panic!("backend channel: answering request {}: {e}", msg.request));
    }

    /// What waits on the backend channel within `wait`, without reading
    /// it.
    pub fn backend_state(&self, wait: Duration) -> BackendState {
        let sock = self.backend();
        if !poll_in(sock.as_raw_fd(), wait) {
            return BackendState::Quiet;
        }
        let mut byte = 0u8;
        // SAFETY: recv into one byte that lives across the call; MSG_PEEK
        // leaves it on the socket.
        let n = unsafe {
            libc::recv(
                sock.as_raw_fd(),
                (&mut byte as *mut u8).cast(),
                1,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        match n {
            0 => BackendState::Closed,
            n if n > 0 => BackendState::Data,
            _ => BackendState::Quiet,
        }
    }

    /// Closes the frontend's end of the backend channel.
    pub fn close_backend_channel(&mut self) {
        self.backend = None;
    }

    /// Whether the backend sent anything unasked on the main socket
    /// within `wait` (it must not: every message there is a reply).
    pub fn main_socket_has_data(&self, wait: Duration) -> bool {
        poll_in(self.conn.sock.as_raw_fd(), wait)
    }

    /// The device's config space (GET_CONFIG of 60 bytes).
    pub fn config(&mut self) -> Vec<u8> {
        let (_, payload) = self.conn.call("GET_CONFIG", |fe| {
            fe.get_config(0, 60, VhostUserConfigFlags::empty(), &[0u8; 60])
        });
        payload
    }

    /// The disk size in 512-byte sectors, from the config space.
    pub fn capacity_sectors(&mut self) -> u64 {
        let c = self.config();
        u64::from_le_bytes(c[0..8].try_into().unwrap())
    }

    // ---- Guest memory.

    /// The shared window (guest physical addresses).
    pub fn mem(&self) -> &GuestMemoryMmap<()> {
        &self.mem
    }

    pub fn write(&self, gpa: u64, data: &[u8]) {
        self.mem
            .write_slice(data, GuestAddress(gpa))
            .unwrap_or_else(|e| panic!("guest write at {gpa:#x}: {e}"));
    }

    pub fn read(&self, gpa: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem
            .read_slice(&mut v, GuestAddress(gpa))
            .unwrap_or_else(|e| panic!("guest read at {gpa:#x}: {e}"));
        v
    }

    pub fn fill(&self, gpa: u64, len: usize, byte: u8) {
        self.write(gpa, &vec![byte; len]);
    }

    pub fn read_u8(&self, gpa: u64) -> u8 {
        self.read(gpa, 1)[0]
    }

    fn store_u16(&self, gpa: u64, v: u16) {
        self.mem
            .store(v.to_le(), GuestAddress(gpa), Ordering::Release)
            .unwrap();
    }

    fn load_u16(&self, gpa: u64) -> u16 {
        u16::from_le(self.mem.load(GuestAddress(gpa), Ordering::Acquire).unwrap())
    }

    /// Writes a request header (type, reserved 0, sector).
    pub fn put_header(&self, gpa: u64, req_type: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&req_type.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.write(gpa, &h);
    }

    /// Writes a DISCARD / WRITE_ZEROES segment.
    pub fn put_range(&self, gpa: u64, sector: u64, sectors: u32, flags: u32) {
        let mut r = [0u8; 16];
        r[0..8].copy_from_slice(&sector.to_le_bytes());
        r[8..12].copy_from_slice(&sectors.to_le_bytes());
        r[12..16].copy_from_slice(&flags.to_le_bytes());
        self.write(gpa, &r);
    }

    /// Panics unless the unshared parts of the memfd still hold the canary.
    pub fn assert_guards_intact(&self) {
        for start in [0, GUARD + MEM_SIZE] {
            let mut v = vec![0u8; GUARD as usize];
            self.backing
                .read_slice(&mut v, GuestAddress(start))
                .unwrap();
            if let Some(i) = v.iter().position(|&b| b != CANARY) {
                panic!(
                    "memfd byte {:#x} outside the shared region was changed to {:#x}",
                    start + i as u64,
                    v[i]
                );
            }
        }
    }

    // ---- Descriptors and the avail ring.

    /// Writes descriptor `index` of the ring's table.  `index` may be out
    /// of range only up to 1024 (the room reserved for the table).
    pub fn set_desc(&self, index: u16, d: Desc) {
        assert!(index < 1024);
        self.write(DESC_TABLE + 16 * u64::from(index), &d.to_bytes());
    }

    /// Writes a descriptor anywhere (indirect tables).
    pub fn write_desc_at(&self, gpa: u64, d: Desc) {
        self.write(gpa, &d.to_bytes());
    }

    /// Writes an indirect table at `gpa`: entry i is `descs[i]`, chained
    /// to i+1 except the last (whose flags are kept as given).
    pub fn write_table(&self, gpa: u64, descs: &[Desc]) {
        for (i, d) in descs.iter().enumerate() {
            let d = if i + 1 < descs.len() {
                d.then(i as u16 + 1)
            } else {
                *d
            };
            self.write_desc_at(gpa + 16 * i as u64, d);
        }
    }

    /// Writes `descs` at ring indices `first`, `first`+1, ... chained in
    /// that order (the last keeps its flags as given); returns `first`.
    pub fn chain(&self, first: u16, descs: &[Desc]) -> u16 {
        for (i, d) in descs.iter().enumerate() {
            let index = first + i as u16;
            let d = if i + 1 < descs.len() {
                d.then(index + 1)
            } else {
                *d
            };
            self.set_desc(index, d);
        }
        first
    }

    /// The avail index published so far.
    pub fn avail_idx(&self) -> u16 {
        self.avail_idx
    }

    /// Writes avail ring slot `pos % size` without publishing it.
    pub fn write_avail_entry(&self, pos: u16, head: u16) {
        let slot = u64::from(pos % self.opts.queue_size);
        self.store_u16(AVAIL_RING + 4 + 2 * slot, head);
    }

    /// Publishes `idx` as the avail index, whatever the ring holds.
    pub fn set_avail_idx(&mut self, idx: u16) {
        fence(Ordering::SeqCst);
        self.store_u16(AVAIL_RING + 2, idx);
        self.avail_idx = idx;
        fence(Ordering::SeqCst);
    }

    /// Puts `head` in the next avail slot and publishes it.
    pub fn push_avail(&mut self, head: u16) {
        self.write_avail_entry(self.avail_idx, head);
        self.set_avail_idx(self.avail_idx.wrapping_add(1));
    }

    /// Notifies the device.
    pub fn kick(&self) {
        self.kick.write(1).expect("kick");
    }

    /// The `avail_event` the device last wrote (EVENT_IDX).
    pub fn avail_event(&self) -> u16 {
        self.load_u16(USED_RING + 4 + 8 * u64::from(self.opts.queue_size))
    }

    /// Kicks only if the device asked for it: always without EVENT_IDX,
    /// with it when `avail_event` lies in [old, new) as a driver computes
    /// (`vring_need_event`).  Returns whether it kicked.
    pub fn kick_if_needed(&self, old: u16) -> bool {
        fence(Ordering::SeqCst);
        let new = self.avail_idx;
        let needed = if self.opts.event_idx {
            let event = self.avail_event();
            new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
        } else {
            self.load_u16(USED_RING) & 1 == 0
        };
        if needed {
            self.kick();
        }
        needed
    }

    /// Pushes `head` and kicks.
    pub fn submit(&mut self, head: u16) {
        self.push_avail(head);
        self.kick();
    }

    /// Pushes `head`, kicks and waits for the next used entry.
    pub fn run(&mut self, head: u16) -> Used {
        self.submit(head);
        self.expect_used()
    }

    // ---- The used ring.

    /// The used index the device published.
    pub fn used_idx(&self) -> u16 {
        self.load_u16(USED_RING + 2)
    }

    fn set_used_event(&self, v: u16) {
        self.store_u16(AVAIL_RING + 4 + 2 * u64::from(self.opts.queue_size), v);
    }

    /// Reads notifications that arrived, without waiting.
    fn drain_calls(&mut self) {
        if let Ok(n) = self.call.read() {
            self.calls += n;
            fence(Ordering::SeqCst);
            self.notified_upto = self.used_idx();
        }
    }

    /// Whether the next used entry was announced by a notification.
    fn next_was_notified(&self) -> bool {
        let ahead = self.notified_upto.wrapping_sub(self.last_used);
        ahead != 0 && ahead < 0x8000
    }

    /// Waits up to `timeout` for the next used entry.  Panics if the device
    /// published an entry but did not notify within a second.
    pub fn wait_used(&mut self, timeout: Duration) -> Option<Used> {
        let deadline = Instant::now() + timeout;
        let mut seen_at: Option<Instant> = None;
        loop {
            self.drain_calls();
            let idx = self.used_idx();
            if idx != self.last_used {
                let seen = *seen_at.get_or_insert_with(Instant::now);
                if self.next_was_notified() {
                    return Some(self.take_used());
                }
                if seen.elapsed() > NOTIFY_GRACE {
                    panic!(
                        "used index moved to {idx} (driver at {}) without a notification \
                         (used_event {}, event_idx {})",
                        self.last_used, self.last_used, self.opts.event_idx
                    );
                }
            } else if Instant::now() >= deadline {
                return None;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            poll_in(
                self.call.as_raw_fd(),
                left.clamp(Duration::from_millis(1), Duration::from_millis(20)),
            );
        }
    }

    fn take_used(&mut self) -> Used {
        fence(Ordering::Acquire);
        let slot = u64::from(self.last_used % self.opts.queue_size);
        let at = USED_RING + 4 + 8 * slot;
        let e = self.read(at, 8);
        let used = Used {
            id: u32::from_le_bytes(e[0..4].try_into().unwrap()),
            len: u32::from_le_bytes(e[4..8].try_into().unwrap()),
        };
        self.last_used = self.last_used.wrapping_add(1);
        // Ask to be told about the next entry, as a driver with callbacks
        // enabled does.
        self.set_used_event(self.last_used);
        fence(Ordering::SeqCst);
        // And, as a driver must, look at the used index once more: entries
        // the device published before it could see the new used_event are
        // found this way and need no notification. Entries published after
        // this read must still be notified.
        let idx = self.used_idx();
        let ahead = |v: u16| v.wrapping_sub(self.last_used);
        if ahead(idx) < 0x8000 && ahead(idx) > ahead(self.notified_upto) {
            self.notified_upto = idx;
        }
        used
    }

    /// The next used entry; panics after [`TIMEOUT`].
    pub fn expect_used(&mut self) -> Used {
        match self.wait_used(TIMEOUT) {
            Some(u) => u,
            None => panic!(
                "no used entry within {TIMEOUT:?} (avail {}, used {})",
                self.avail_idx,
                self.used_idx()
            ),
        }
    }

    /// Panics if a used entry shows up within `wait`.
    pub fn expect_no_used(&mut self, wait: Duration) {
        if let Some(u) = self.wait_used(wait) {
            panic!("unexpected used entry {u:?}");
        }
    }

    /// Entries the device has published but the driver not consumed.
    pub fn pending_used(&self) -> u16 {
        self.used_idx().wrapping_sub(self.last_used)
    }

    // ---- Well-formed requests.

    /// Descriptor indices used by [`request`](Self::request): the last
    /// three of the table.
    pub fn good_head(&self) -> u16 {
        self.opts.queue_size - 3
    }

    /// Sends a well-formed request (header, one data buffer of `data.len()`
    /// bytes unless empty, status) and waits for it.  For `device_writes`
    /// the buffer is filled with 0xdd first and `data` receives what the
    /// device wrote; otherwise `data` is what the device reads.
    pub fn request(
        &mut self,
        req_type: u32,
        sector: u64,
        data: &mut [u8],
        device_writes: bool,
    ) -> Done {
        assert!(data.len() <= GOOD_DATA_MAX as usize);
        let head = self.good_head();
        self.put_header(GOOD_HDR, req_type, sector);
        self.write(GOOD_STATUS, &[SENTINEL]);
        let mut descs = vec![Desc::ro(GOOD_HDR, 16)];
        if !data.is_empty() {
            if device_writes {
                self.fill(GOOD_DATA, data.len(), 0xdd);
                descs.push(Desc::wo(GOOD_DATA, data.len() as u32));
            } else {
                self.write(GOOD_DATA, data);
                descs.push(Desc::ro(GOOD_DATA, data.len() as u32));
            }
        }
        descs.push(Desc::wo(GOOD_STATUS, 1));
        self.chain(head, &descs);
        let used = self.run(head);
        assert_eq!(
            used.id,
            u32::from(head),
            "used entry for another chain than the well-formed request"
        );
        if device_writes && !data.is_empty() {
            let back = self.read(GOOD_DATA, data.len());
            data.copy_from_slice(&back);
        }
        Done {
            used,
            status: self.read_u8(GOOD_STATUS),
        }
    }

    /// A write of `data` at `sector`; returns the status.
    pub fn write_sectors(&mut self, sector: u64, data: &[u8]) -> u8 {
        let mut buf = data.to_vec();
        let done = self.request(T_OUT, sector, &mut buf, false);
        assert_eq!(done.used.len, 1, "used length of a write");
        done.status
    }

    /// A read of `len` bytes at `sector`: status and data.
    pub fn read_sectors(&mut self, sector: u64, len: usize) -> (u8, Vec<u8>) {
        let mut buf = vec![0u8; len];
        let done = self.request(T_IN, sector, &mut buf, true);
        if done.status == S_OK {
            assert_eq!(done.used.len, len as u32 + 1, "used length of a read");
        }
        (done.status, buf)
    }

    /// Writes `data` at `sector`, reads it back and checks both worked.
    pub fn roundtrip(&mut self, sector: u64, data: &[u8]) {
        assert_eq!(self.write_sectors(sector, data), S_OK, "write at {sector}");
        let (status, back) = self.read_sectors(sector, data.len());
        assert_eq!(status, S_OK, "read at {sector}");
        assert!(back == data, "read at {sector} returned other data");
    }

    /// FLUSH; returns the status.
    pub fn flush(&mut self) -> u8 {
        self.request(T_FLUSH, 0, &mut [], false).status
    }
}
