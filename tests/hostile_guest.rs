//! A hostile guest against vubd's vhost-user-blk export: malformed
//! descriptor chains put straight into the ring by a test frontend
//! (`common::frontend`).
//!
//! vubd must answer every malformed chain with an error status, or return
//! it with used length 0 when the chain has no status byte it can write
//! (see `src/export/virtio_blk/error.rs`), never crash, never touch memory
//! outside what the frontend shared, and keep serving good requests.  So
//! every case ends with [`Rig::finish`]: a well-formed write and read
//! round-trip, the daemon alive and answering QMP, the image file equal to
//! what the good requests wrote (nothing else), and the unshared parts of
//! the guest's memfd intact.
//!
//! Each case is a `case_*` function; a test runs one on a fresh daemon,
//! and the `barrage_*` tests run all of them on one connection.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::frontend::*;
use common::*;
use serde_json::json;

/// The image: 1 MiB.
const IMAGE_SECTORS: u64 = 2048;
const SECTOR: usize = 512;
/// Guest addresses the cases use.
const HDR: u64 = SCRATCH;
const STATUS: u64 = SCRATCH + 0x100;
const TABLE: u64 = SCRATCH + 0x1000;
const SERIAL: &str = "vubd-hostile-serial";

/// What a test daemon and its frontend look like.
#[derive(Clone)]
struct Setup {
    fe: Options,
    image_sectors: u64,
    writable: bool,
    /// Appended to the --export option.
    export_extra: String,
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            fe: Options::default(),
            image_sectors: IMAGE_SECTORS,
            writable: true,
            export_extra: format!(",serial={SERIAL}"),
        }
    }
}

/// A daemon exporting a patterned raw image, a frontend connected to it,
/// and what the image should hold.
struct Rig {
    // Dropped first: the frontend disconnects before the daemon is killed.
    fe: TestFrontend,
    d: Daemon,
    image: PathBuf,
    expect: Vec<u8>,
}

/// The image's initial contents: every byte depends on its offset, and
/// none is zero.
fn pattern(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| ((i / SECTOR) as u8).wrapping_mul(29) ^ (i as u8) | 0x01)
        .collect()
}

/// Data for good writes, distinct from the image's pattern.
fn payload(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed) & 0xfe)
        .collect()
}

impl Rig {
    fn start(setup: Setup) -> Rig {
        let builder = Daemon::vubd(&[]).monitor();
        let dir = builder.dir().to_path_buf();
        let image = dir.join("disk.img");
        let expect = pattern((setup.image_sectors * 512) as usize);
        std::fs::write(&image, &expect).unwrap();
        let sock = dir.join("vhost.sock");
        let d = builder
            .arg("--blockdev")
            .arg(&format!("file,node-name=d0,filename={}", image.display()))
            .arg("--export")
            .arg(&format!(
                "type=vhost-user-blk,id=e0,node-name=d0,addr.type=unix,addr.path={},writable={}{}",
                sock.display(),
                if setup.writable { "on" } else { "off" },
                setup.export_extra
            ))
            .start();
        let fe = TestFrontend::connect(&sock, setup.fe);
        Rig {
            fe,
            d,
            image,
            expect,
        }
    }

    fn new() -> Rig {
        Rig::start(Setup::default())
    }

    /// A good write, remembered in the image model.
    fn write(&mut self, sector: u64, data: &[u8]) {
        assert_eq!(self.fe.write_sectors(sector, data), S_OK);
        let at = sector as usize * SECTOR;
        self.expect[at..at + data.len()].copy_from_slice(data);
    }

    /// A good read, checked against the image model.
    fn read_check(&mut self, sector: u64, len: usize) {
        let (status, data) = self.fe.read_sectors(sector, len);
        assert_eq!(status, S_OK, "read at {sector}");
        let at = sector as usize * SECTOR;
        assert!(
            data == self.expect[at..at + len],
            "read at sector {sector} returned other data than the image holds"
        );
    }

    /// The daemon runs and QMP answers query-block-exports with e0.
    fn alive(&self) {
        assert!(
            process_alive(self.d.pid()),
            "vubd died\n{}",
            self.d.describe()
        );
        let mut qmp = self.d.qmp();
        let reply = qmp.execute("query-block-exports", json!({}));
        let exports = assert_return(&reply).as_array().expect("a list");
        assert!(
            exports.iter().any(|e| e["id"] == "e0"),
            "export e0 missing from {reply}"
        );
    }

    /// The image file holds exactly what the good writes put there.
    fn check_image(&self) {
        let now = std::fs::read(&self.image).unwrap();
        assert_eq!(now.len(), self.expect.len(), "image size changed");
        if let Some(i) = now.iter().zip(&self.expect).position(|(a, b)| a != b) {
            panic!(
                "image byte {i:#x} (sector {}) is {:#x}, expected {:#x}: a refused \
                 request changed the disk",
                i / SECTOR,
                now[i],
                self.expect[i]
            );
        }
    }

    /// CPU time vubd used and bytes it logged during `window`.
    fn activity(&self, window: Duration) -> (f64, usize) {
        let pid = self.d.pid();
        let log0 = self.d.stderr().len();
        let t0 = cpu_ticks(pid);
        let start = Instant::now();
        std::thread::sleep(window);
        let ticks = cpu_ticks(pid) - t0;
        let elapsed = start.elapsed().as_secs_f64();
        // SAFETY: sysconf has no memory effects.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        (
            ticks as f64 / hz / elapsed,
            self.d.stderr().len().saturating_sub(log0),
        )
    }

    /// Asserts vubd is idle: not spinning, not flooding its log.
    fn assert_idle(&self, what: &str) {
        let (cpu, logged) = self.activity(Duration::from_millis(500));
        assert!(
            cpu < 0.25,
            "{what}: vubd used {:.0}% of a CPU while idle",
            cpu * 100.0
        );
        assert!(
            logged < 4096,
            "{what}: vubd logged {logged} bytes in 500 ms; last lines:\n{}",
            tail(&self.d.stderr(), 5)
        );
    }

    /// The end of every case: the device still works, the daemon is
    /// alive, nothing outside the good writes changed.
    fn finish(mut self) {
        let data = payload(8 * SECTOR, 0x42);
        self.write(100, &data);
        self.read_check(96, 16 * SECTOR);
        assert_eq!(self.fe.flush(), S_OK);
        self.alive();
        self.check_image();
        self.fe.assert_guards_intact();
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.d.stderr();
            eprintln!(
                "--- vubd stderr ({} bytes), last lines ---\n{}",
                log.len(),
                tail(&log, 20)
            );
        }
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc stat");
    let (_, rest) = stat.rsplit_once(')').unwrap();
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15; `rest` starts at field 3.
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// Runs one case on a fresh daemon.
fn one(case: fn(&mut Rig)) {
    one_with(Setup::default(), case);
}

fn one_with(setup: Setup, case: fn(&mut Rig)) {
    let mut rig = Rig::start(setup);
    case(&mut rig);
    rig.finish();
}

/// Submits `head` and checks the device answered with `status` in the
/// byte at `status_addr` and used length 1.
fn expect_status(rig: &mut Rig, head: u16, status_addr: u64, status: u8) {
    let used = rig.fe.run(head);
    assert_eq!(used.id, u32::from(head), "used id");
    assert_eq!(
        (used.len, rig.fe.read_u8(status_addr)),
        (1, status),
        "(used length, status) of chain {head}"
    );
}

/// Submits `head` and checks the device returned it with used length 0
/// and without touching `status_addr` (which holds [`SENTINEL`]).
fn expect_dropped(rig: &mut Rig, head: u16, status_addr: Option<u64>) {
    let used = rig.fe.run(head);
    assert_eq!(used.id, u32::from(head), "used id");
    assert_eq!(used.len, 0, "used length of chain {head}");
    if let Some(a) = status_addr {
        assert_eq!(rig.fe.read_u8(a), SENTINEL, "status byte was written");
    }
}

/// Panics unless guest memory at `gpa` holds `len` bytes of `byte`.
fn assert_filled(rig: &Rig, gpa: u64, len: usize, byte: u8) {
    let got = rig.fe.read(gpa, len);
    if let Some(i) = got.iter().position(|&b| b != byte) {
        panic!(
            "guest byte {:#x} is {:#x}, expected {byte:#x}: the device wrote a buffer it \
             should have left alone",
            gpa + i as u64,
            got[i]
        );
    }
}

/// A fresh status byte at `STATUS`.
fn reset_status(rig: &Rig) {
    rig.fe.write(STATUS, &[SENTINEL]);
}

// ---------------------------------------------------------------------
// Well-formed requests in unusual but valid shapes (so that the refusals
// below are not a parser refusing everything).

fn case_valid_shapes(rig: &mut Rig) {
    let data = payload(2 * SECTOR, 1);
    // The header split into 16 one-byte descriptors.
    for i in 0..16u64 {
        rig.fe
            .set_desc(i as u16, Desc::ro(HDR + i, 1).then(i as u16 + 1));
    }
    rig.fe.put_header(HDR, T_OUT, 10);
    rig.fe.write(DATA, &data);
    rig.fe.set_desc(16, Desc::ro(DATA, 1024).then(17));
    rig.fe.set_desc(17, Desc::wo(STATUS, 1));
    reset_status(rig);
    expect_status(rig, 0, STATUS, S_OK);
    rig.expect[10 * SECTOR..12 * SECTOR].copy_from_slice(&data);

    // Header and data in one descriptor; status alone.
    let data = payload(SECTOR, 2);
    let both = DATA + 0x10000;
    rig.fe.put_header(both, T_OUT, 20);
    rig.fe.write(both + 16, &data);
    rig.fe
        .chain(0, &[Desc::ro(both, 16 + 512), Desc::wo(STATUS, 1)]);
    reset_status(rig);
    expect_status(rig, 0, STATUS, S_OK);
    rig.expect[20 * SECTOR..21 * SECTOR].copy_from_slice(&data);

    // A read whose data and status share the last descriptor.
    rig.fe.put_header(HDR, T_IN, 20);
    rig.fe.fill(DATA, 513, 0x77);
    rig.fe.chain(0, &[Desc::ro(HDR, 16), Desc::wo(DATA, 513)]);
    let used = rig.fe.run(0);
    assert_eq!(used, Used { id: 0, len: 513 });
    assert_eq!(rig.fe.read_u8(DATA + 512), S_OK);
    assert!(rig.fe.read(DATA, 512) == data, "data read back");

    // An indirect table, and direct descriptors followed by an indirect
    // table (a device must accept both, virtio 1.2 2.7.5.3.2).
    rig.fe.put_header(HDR, T_IN, 10);
    rig.fe.write_table(
        TABLE,
        &[Desc::ro(HDR, 16), Desc::wo(DATA, 1024), Desc::wo(STATUS, 1)],
    );
    rig.fe.set_desc(0, Desc::indirect(TABLE, 48));
    reset_status(rig);
    rig.fe.fill(DATA, 1024, 0);
    let used = rig.fe.run(0);
    assert_eq!((used.len, rig.fe.read_u8(STATUS)), (1025, S_OK));
    assert_eq!(
        rig.fe.read(DATA, 1024),
        rig.expect[10 * SECTOR..12 * SECTOR]
    );

    rig.fe
        .write_table(TABLE, &[Desc::wo(DATA, 1024), Desc::wo(STATUS, 1)]);
    rig.fe
        .chain(0, &[Desc::ro(HDR, 16), Desc::indirect(TABLE, 32)]);
    reset_status(rig);
    rig.fe.fill(DATA, 1024, 0);
    let used = rig.fe.run(0);
    assert_eq!((used.len, rig.fe.read_u8(STATUS)), (1025, S_OK));
    assert_eq!(
        rig.fe.read(DATA, 1024),
        rig.expect[10 * SECTOR..12 * SECTOR]
    );
}

#[test]
fn valid_but_unusual_chains_are_served() {
    one(case_valid_shapes);
}

// ---------------------------------------------------------------------
// Wrong directions and short headers.

fn case_header_device_writable(rig: &mut Rig) {
    rig.fe.put_header(HDR, T_OUT, 0);
    rig.fe.write(DATA, &payload(512, 3));
    rig.fe.chain(
        0,
        &[Desc::wo(HDR, 16), Desc::ro(DATA, 512), Desc::wo(STATUS, 1)],
    );
    reset_status(rig);
    expect_status(rig, 0, STATUS, S_IOERR);
}

#[test]
fn header_in_device_writable_descriptor_is_ioerr() {
    one(case_header_device_writable);
}

fn case_read_into_readable_buffer(rig: &mut Rig) {
    rig.fe.put_header(HDR, T_IN, 0);
    rig.fe.fill(DATA, 512, 0x11);
    rig.fe.chain(
        0,
        &[Desc::ro(HDR, 16), Desc::ro(DATA, 512), Desc::wo(STATUS, 1)],
    );
    reset_status(rig);
    expect_status(rig, 0, STATUS, S_IOERR);
    assert_filled(rig, DATA, 512, 0x11);
    // Mixed directions: one good, one wrong buffer.
    rig.fe.chain(
        0,
        &[
            Desc::ro(HDR, 16),
            Desc::wo(DATA + 512, 512),
            Desc::ro(DATA, 512),
            Desc::wo(STATUS, 1),
        ],
    );
    reset_status(rig);
    expect_status(rig, 0, STATUS, S_IOERR);
}

#[test]
fn read_into_device_readable_buffer_is_ioerr() {
    one(case_read_into_readable_buffer);
}

fn case_write_from_writable_buffer(rig: &mut Rig) {
    rig.fe.put_header(HDR, T_OUT, 4);
    rig.fe.write(DATA, &payload(512, 4));
    rig.fe.chain(
        0,
        &[Desc::ro(HDR, 16), Desc::wo(DATA, 512), Desc::wo(STATUS, 1)],
    );
    reset_status(rig);
    expect_status(rig, 0, STATUS, S_IOERR);
    // The image is checked by finish(): sector 4 must be unchanged.
}

#[test]
fn write_from_device_writable_buffer_is_ioerr() {
    one(case_write_from_writable_buffer);
}

fn case_short_header(rig: &mut Rig) {
    // 12 header bytes, then the status.
    rig.fe.put_header(HDR, T_IN, 0);
    rig.fe.chain(0, &[Desc::ro(HDR, 12), Desc::wo(STATUS, 1)]);
    reset_status(rig);
    expect_status(rig, 0, STATUS, S_IOERR);
    // 8 header bytes, then a device-writable buffer: the header cannot be
    // completed from it.
    rig.fe.chain(
        0,
        &[Desc::ro(HDR, 8), Desc::wo(DATA, 512), Desc::wo(STATUS, 1)],
    );
    reset_status(rig);
    expect_status(rig, 0, STATUS, S_IOERR);
    // No header at all: a lone status descriptor.
    rig.fe.set_desc(0, Desc::wo(STATUS, 1));
    reset_status(rig);
    expect_status(rig, 0, STATUS, S_IOERR);
    // Zero-length descriptors only, then the status.
    rig.fe.chain(
        0,
        &[Desc::ro(HDR, 0), Desc::ro(HDR, 0), Desc::wo(STATUS, 1)],
    );
    reset_status(rig);
    expect_status(rig, 0, STATUS, S_IOERR);
}

#[test]
fn header_shorter_than_16_bytes_is_ioerr() {
    one(case_short_header);
}

fn case_no_status_descriptor(rig: &mut Rig) {
    // A read whose chain ends after the data: the status byte is the last
    // byte of the last device-writable descriptor (vubd: "the status
    // descriptor may start with data"), which leaves 511 bytes of data, not
    // a whole sector: IOERR in that byte.
    rig.fe.put_header(HDR, T_IN, 0);
    rig.fe.fill(DATA, 512, 0x33);
    rig.fe.chain(0, &[Desc::ro(HDR, 16), Desc::wo(DATA, 512)]);
    expect_status(rig, 0, DATA + 511, S_IOERR);
    assert_filled(rig, DATA, 511, 0x33);
    // A write whose chain ends after its (device-readable) data: no status
    // byte can be written; used length 0.
    rig.fe.put_header(HDR, T_OUT, 0);
    rig.fe.write(DATA, &payload(512, 5));
    rig.fe.chain(0, &[Desc::ro(HDR, 16), Desc::ro(DATA, 512)]);
    expect_dropped(rig, 0, None);
    // A lone header.
    rig.fe.set_desc(0, Desc::ro(HDR, 16));
    expect_dropped(rig, 0, None);
}

#[test]
fn chain_ending_after_the_data_has_no_status() {
    one(case_no_status_descriptor);
}

fn case_status_read_only(rig: &mut Rig) {
    rig.fe.put_header(HDR, T_IN, 0);
    rig.fe.fill(DATA, 512, 0x44);
    rig.fe.chain(
        0,
        &[Desc::ro(HDR, 16), Desc::wo(DATA, 512), Desc::ro(STATUS, 1)],
    );
    reset_status(rig);
    expect_dropped(rig, 0, Some(STATUS));
    assert_filled(rig, DATA, 512, 0x44);
    // An empty device-writable status descriptor.
    rig.fe.chain(
        0,
        &[Desc::ro(HDR, 16), Desc::wo(DATA, 512), Desc::wo(STATUS, 0)],
    );
    reset_status(rig);
    expect_dropped(rig, 0, Some(STATUS));
    // A write with a read-only status.
    rig.fe.put_header(HDR, T_OUT, 6);
    rig.fe.write(DATA, &payload(512, 6));
    rig.fe.chain(
        0,
        &[Desc::ro(HDR, 16), Desc::ro(DATA, 512), Desc::ro(STATUS, 1)],
    );
    reset_status(rig);
    expect_dropped(rig, 0, Some(STATUS));
}

#[test]
fn read_only_status_descriptor_is_returned_with_used_len_0() {
    one(case_status_read_only);
}

// ---------------------------------------------------------------------
// Lengths and sectors.

fn case_segment_near_u32_max(rig: &mut Rig) {
    // The whole chain (16 + len + 1 bytes) still fits in a u32: the
    // segment is refused for its size.
    let largest = u32::MAX - 16 - 1;
    for (kind, len) in [
        (T_IN, u32::MAX - 511),
        (T_IN, largest),
        (T_OUT, u32::MAX - 511),
        (T_OUT, largest),
        (T_IN, 0x8000_0000),
    ] {
        rig.fe.put_header(HDR, kind, 0);
        let data = if kind == T_IN {
            Desc::wo(DATA, len)
        } else {
            Desc::ro(DATA, len)
        };
        rig.fe
            .chain(0, &[Desc::ro(HDR, 16), data, Desc::wo(STATUS, 1)]);
        reset_status(rig);
        expect_status(rig, 0, STATUS, S_IOERR);
    }
    // One byte more and the chain is longer than 4 GiB: it is not followed
    // to its status byte (see `case_chain_over_4gib`).
    rig.fe.put_header(HDR, T_IN, 0);
    rig.fe.chain(
        0,
        &[
            Desc::ro(HDR, 16),
            Desc::wo(DATA, largest + 1),
            Desc::wo(STATUS, 1),
        ],
    );
    reset_status(rig);
    expect_dropped(rig, 0, Some(STATUS));
}

#[test]
fn data_length_near_u32_max_is_ioerr() {
    one(case_segment_near_u32_max);
}

fn case_chain_over_4gib(rig: &mut Rig) {
    // The lengths of the chain add up past u32::MAX: the chain is not
    // followed to its end, so no status byte is known.
    rig.fe.put_header(HDR, T_IN, 0);
    rig.fe.chain(
        0,
        &[
            Desc::ro(HDR, 16),
            Desc::wo(DATA, 0x8000_0000),
            Desc::wo(DATA, 0x8000_0000),
            Desc::wo(STATUS, 1),
        ],
    );
    reset_status(rig);
    expect_dropped(rig, 0, Some(STATUS));
}

#[test]
fn chain_longer_than_4gib_is_returned_with_used_len_0() {
    one(case_chain_over_4gib);
}

/// 33 segments of 2 MiB (all over the same guest buffer) are over the 64
/// MiB cap of one request; 32 are not.
fn case_request_over_cap(rig: &mut Rig) {
    const SEG: u32 = 2 << 20;
    let read = |rig: &mut Rig, segments: usize| {
        rig.fe.put_header(HDR, T_IN, 0);
        let mut descs = vec![Desc::ro(HDR, 16)];
        descs.extend(std::iter::repeat_n(Desc::wo(DATA, SEG), segments));
        descs.push(Desc::wo(STATUS, 1));
        rig.fe.write_table(TABLE, &descs);
        rig.fe
            .set_desc(0, Desc::indirect(TABLE, 16 * descs.len() as u32));
        reset_status(rig);
        rig.fe.run(0)
    };
    let used = read(rig, 33);
    assert_eq!((used.len, rig.fe.read_u8(STATUS)), (1, S_IOERR));
    let used = read(rig, 32);
    assert_eq!((used.len, rig.fe.read_u8(STATUS)), ((64 << 20) + 1, S_OK));
    // The buffer holds what the last segment read.
    let last = rig.expect[(62 << 20)..(64 << 20)].to_vec();
    assert!(
        rig.fe.read(DATA, SEG as usize) == last,
        "data of the 64 MiB read"
    );
}

#[test]
fn request_over_the_64mib_cap_is_ioerr() {
    let setup = Setup {
        image_sectors: (65 << 20) / 512,
        ..Setup::default()
    };
    one_with(setup, case_request_over_cap);
}

fn case_sector_overflow(rig: &mut Rig) {
    for sector in [1u64 << 55, u64::MAX, u64::MAX - 1, (u64::MAX / 512) + 1] {
        for kind in [T_IN, T_OUT] {
            rig.fe.put_header(HDR, kind, sector);
            let data = if kind == T_IN {
                Desc::wo(DATA, 512)
            } else {
                Desc::ro(DATA, 512)
            };
            rig.fe
                .chain(0, &[Desc::ro(HDR, 16), data, Desc::wo(STATUS, 1)]);
            reset_status(rig);
            expect_status(rig, 0, STATUS, S_IOERR);
        }
    }
}

#[test]
fn sector_whose_byte_offset_overflows_is_ioerr() {
    one(case_sector_overflow);
}

fn case_beyond_capacity(rig: &mut Rig) {
    let cap = rig.fe.capacity_sectors();
    assert_eq!(cap, rig.expect.len() as u64 / 512);
    rig.fe.write(DATA, &payload(1024, 7));
    for (kind, sector, len) in [
        (T_IN, cap, 512),
        (T_OUT, cap, 512),
        (T_IN, cap - 1, 1024),
        (T_OUT, cap - 1, 1024),
        (T_OUT, cap + 1_000_000, 512),
    ] {
        rig.fe.put_header(HDR, kind, sector);
        let data = if kind == T_IN {
            Desc::wo(DATA + 2048, len)
        } else {
            Desc::ro(DATA, len)
        };
        rig.fe
            .chain(0, &[Desc::ro(HDR, 16), data, Desc::wo(STATUS, 1)]);
        reset_status(rig);
        expect_status(rig, 0, STATUS, S_IOERR);
    }
    // The last sector itself is fine.
    rig.read_check(cap - 1, 512);
    let last = payload(512, 8);
    rig.write(cap - 1, &last);
    rig.read_check(cap - 1, 512);
}

#[test]
fn request_beyond_or_straddling_the_capacity_is_ioerr() {
    one(case_beyond_capacity);
}

fn case_unaligned_length(rig: &mut Rig) {
    for (kind, len) in [(T_IN, 100), (T_OUT, 513), (T_IN, 1)] {
        rig.fe.put_header(HDR, kind, 0);
        let data = if kind == T_IN {
            Desc::wo(DATA, len)
        } else {
            Desc::ro(DATA, len)
        };
        rig.fe
            .chain(0, &[Desc::ro(HDR, 16), data, Desc::wo(STATUS, 1)]);
        reset_status(rig);
        expect_status(rig, 0, STATUS, S_IOERR);
    }
}

#[test]
fn data_length_not_a_multiple_of_the_sector_is_ioerr() {
    one(case_unaligned_length);
}

fn case_too_many_segments(rig: &mut Rig) {
    let seg_max = u32::from_le_bytes(rig.fe.config()[12..16].try_into().unwrap());
    assert!(seg_max > 1 && seg_max < 1000);
    let read = |rig: &mut Rig, n: u32| {
        rig.fe.put_header(HDR, T_IN, 0);
        let mut descs = vec![Desc::ro(HDR, 16)];
        descs.extend((0..n).map(|i| Desc::wo(DATA + 512 * u64::from(i), 512)));
        descs.push(Desc::wo(STATUS, 1));
        rig.fe.write_table(TABLE, &descs);
        rig.fe
            .set_desc(0, Desc::indirect(TABLE, 16 * descs.len() as u32));
        reset_status(rig);
        rig.fe.run(0)
    };
    let used = read(rig, seg_max + 1);
    assert_eq!((used.len, rig.fe.read_u8(STATUS)), (1, S_IOERR));
    let used = read(rig, seg_max);
    assert_eq!(
        (used.len, rig.fe.read_u8(STATUS)),
        (512 * seg_max + 1, S_OK)
    );
}

#[test]
fn more_segments_than_seg_max_is_ioerr() {
    one(case_too_many_segments);
}

// ---------------------------------------------------------------------
// Addresses outside the shared memory.

fn case_data_outside_memory(rig: &mut Rig) {
    rig.fe.fill(MEM_SIZE - 256, 256, 0x55);
    for (kind, addr, len) in [
        (T_IN, MEM_SIZE, 512),
        (T_OUT, MEM_SIZE, 512),
        (T_IN, MEM_SIZE - 256, 512),
        (T_OUT, MEM_SIZE - 256, 512),
        (T_IN, MEM_SIZE + GUARD, 512),
        (T_IN, 1 << 40, 4096),
        (T_IN, u64::MAX - 255, 512),
        (T_OUT, u64::MAX - 511, 512),
    ] {
        rig.fe.put_header(HDR, kind, 8);
        let data = if kind == T_IN {
            Desc::wo(addr, len)
        } else {
            Desc::ro(addr, len)
        };
        rig.fe
            .chain(0, &[Desc::ro(HDR, 16), data, Desc::wo(STATUS, 1)]);
        reset_status(rig);
        expect_status(rig, 0, STATUS, S_IOERR);
    }
    // A second, good segment before the bad one: the good one is not
    // written either.
    rig.fe.fill(DATA, 512, 0x66);
    rig.fe.put_header(HDR, T_IN, 8);
    rig.fe.chain(
        0,
        &[
            Desc::ro(HDR, 16),
            Desc::wo(DATA, 512),
            Desc::wo(MEM_SIZE - 256, 512),
            Desc::wo(STATUS, 1),
        ],
    );
    reset_status(rig);
    expect_status(rig, 0, STATUS, S_IOERR);
    assert_filled(rig, DATA, 512, 0x66);
    assert_filled(rig, MEM_SIZE - 256, 256, 0x55);
    // Header and data in one descriptor that wraps around the address
    // space.
    rig.fe
        .chain(0, &[Desc::ro(u64::MAX - 7, 16 + 512), Desc::wo(STATUS, 1)]);
    reset_status(rig);
    expect_status(rig, 0, STATUS, S_IOERR);
}

#[test]
fn data_outside_guest_memory_is_ioerr() {
    one(case_data_outside_memory);
}

fn case_header_outside_memory(rig: &mut Rig) {
    for addr in [
        MEM_SIZE,
        MEM_SIZE - 8,
        MEM_SIZE + GUARD + 4096,
        u64::MAX - 7,
        u64::MAX - 3,
    ] {
        rig.fe.chain(
            0,
            &[Desc::ro(addr, 16), Desc::wo(DATA, 512), Desc::wo(STATUS, 1)],
        );
        reset_status(rig);
        expect_status(rig, 0, STATUS, S_IOERR);
    }
}

#[test]
fn header_outside_guest_memory_is_ioerr() {
    one(case_header_outside_memory);
}

fn case_status_outside_memory(rig: &mut Rig) {
    rig.fe.put_header(HDR, T_IN, 0);
    rig.fe.fill(DATA, 512, 0x12);
    for (addr, len) in [
        (MEM_SIZE, 1),
        (MEM_SIZE + GUARD - 1, 1),
        (u64::MAX, 1),
        // Status descriptor starting inside memory, ending outside.
        (MEM_SIZE - 0x800, 0x1000),
        // A status descriptor whose last byte wraps around.
        (u64::MAX - 10, 100),
    ] {
        rig.fe.chain(
            0,
            &[Desc::ro(HDR, 16), Desc::wo(DATA, 512), Desc::wo(addr, len)],
        );
        expect_dropped(rig, 0, None);
        assert_filled(rig, DATA, 512, 0x12);
    }
}

#[test]
fn status_outside_guest_memory_is_returned_with_used_len_0() {
    one(case_status_outside_memory);
}

// ---------------------------------------------------------------------
// Broken chains.

fn case_self_loop(rig: &mut Rig) {
    rig.fe.put_header(HDR, T_IN, 0);
    rig.fe.set_desc(0, Desc::ro(HDR, 16).then(0));
    expect_dropped(rig, 0, None);
    // A loop after a valid start.
    rig.fe.set_desc(0, Desc::ro(HDR, 16).then(1));
    rig.fe.set_desc(1, Desc::wo(DATA, 512).then(1));
    expect_dropped(rig, 0, None);
}

#[test]
fn descriptor_pointing_to_itself_is_returned_with_used_len_0() {
    one(case_self_loop);
}

fn case_two_cycle(rig: &mut Rig) {
    rig.fe.put_header(HDR, T_IN, 0);
    rig.fe.set_desc(0, Desc::ro(HDR, 16).then(1));
    rig.fe.set_desc(1, Desc::wo(STATUS, 1).then(0));
    reset_status(rig);
    expect_dropped(rig, 0, Some(STATUS));
    // A chain through every descriptor of the ring and back to its head.
    let qs = rig.fe.queue_size();
    for i in 0..qs {
        rig.fe.set_desc(i, Desc::ro(HDR, 16).then((i + 1) % qs));
    }
    expect_dropped(rig, 5, None);
}

#[test]
fn two_descriptor_cycle_is_returned_with_used_len_0() {
    one(case_two_cycle);
}

fn case_next_past_ring(rig: &mut Rig) {
    let qs = rig.fe.queue_size();
    rig.fe.put_header(HDR, T_IN, 0);
    for next in [qs, qs + 44, u16::MAX] {
        rig.fe.set_desc(0, Desc::ro(HDR, 16).then(next));
        // Something plausible where an unchecked index would land.
        rig.fe.set_desc(qs, Desc::wo(STATUS, 1));
        reset_status(rig);
        expect_dropped(rig, 0, Some(STATUS));
    }
}

#[test]
fn next_index_past_the_ring_size_is_returned_with_used_len_0() {
    one(case_next_past_ring);
}

fn case_head_past_ring(rig: &mut Rig) {
    // The avail ring names a head that is not in the table. There is no
    // valid id to return it with: the queue stops (a device that needs a
    // reset) and takes nothing more until the frontend sets the ring up
    // again, which then works from the entry after the bad one.
    let qs = rig.fe.queue_size();
    for head in [qs, u16::MAX] {
        rig.fe.submit(head);
        if let Some(u) = rig.fe.wait_used(Duration::from_millis(200)) {
            panic!("a head of {head} came back as {u:?}");
        }
        rig.fe.put_header(HDR, T_IN, 0);
        rig.fe.chain(
            0,
            &[Desc::ro(HDR, 16), Desc::wo(DATA, 512), Desc::wo(STATUS, 1)],
        );
        reset_status(rig);
        rig.fe.submit(0);
        if let Some(u) = rig.fe.wait_used(Duration::from_millis(200)) {
            panic!("the queue went on after a head of {head}: {u:?}");
        }
        assert_eq!(rig.fe.read_u8(STATUS), SENTINEL, "the request after it ran");
        let base = rig.fe.stop_ring();
        assert_eq!(
            base,
            rig.fe.avail_idx().wrapping_sub(1),
            "the bad entry is consumed, the good one after it is not"
        );
        rig.fe.restart_ring(base);
        assert_eq!(rig.fe.expect_used(), Used { id: 0, len: 513 });
        assert_eq!(rig.fe.read_u8(STATUS), S_OK);
        rig.read_check(0, 512);
    }
}

#[test]
fn head_index_past_the_ring_size_stops_the_queue_until_it_is_set_up_again() {
    one(case_head_past_ring);
}

#[test]
fn head_index_past_the_ring_size_does_not_flood_the_log_or_spin() {
    let mut rig = Rig::new();
    let qs = rig.fe.queue_size();
    let before = rig.d.stderr().len();
    let cpu_before = rig.d.cpu_time();
    for _ in 0..5 {
        for _ in 0..200 {
            rig.fe.push_avail(qs);
        }
        rig.fe.kick();
        std::thread::sleep(Duration::from_millis(50));
    }
    // 250 ms with a stopped queue and 1000 bogus entries: an idle daemon
    // (a loop retrying them would use all of it).
    let cpu = rig.d.cpu_time() - cpu_before;
    assert!(
        cpu < Duration::from_millis(100),
        "{cpu:?} of CPU while stopped"
    );
    let logged = rig.d.stderr().len() - before;
    assert!(
        logged < 1024,
        "1000 bogus heads logged {logged} bytes; last lines:\n{}",
        tail(&rig.d.stderr(), 3)
    );
    // Set up again past the bogus entries, the queue serves.
    let end = rig.fe.avail_idx();
    rig.fe.stop_ring();
    rig.fe.restart_ring(end);
    rig.read_check(0, 512);
    rig.finish();
}

fn case_indirect_loop(rig: &mut Rig) {
    rig.fe.put_header(HDR, T_IN, 0);
    rig.fe.write_desc_at(TABLE, Desc::ro(HDR, 16).then(1));
    rig.fe
        .write_desc_at(TABLE + 16, Desc::wo(DATA, 512).then(2));
    rig.fe
        .write_desc_at(TABLE + 32, Desc::wo(STATUS, 1).then(0));
    rig.fe.set_desc(0, Desc::indirect(TABLE, 48));
    reset_status(rig);
    expect_dropped(rig, 0, Some(STATUS));
    // An entry pointing to itself.
    rig.fe
        .write_desc_at(TABLE + 16, Desc::wo(DATA, 512).then(1));
    expect_dropped(rig, 0, Some(STATUS));
    // Next past the table's end.
    rig.fe
        .write_desc_at(TABLE + 16, Desc::wo(DATA, 512).then(3));
    rig.fe.write_desc_at(TABLE + 48, Desc::wo(STATUS, 1));
    expect_dropped(rig, 0, Some(STATUS));
}

#[test]
fn indirect_table_with_a_loop_is_returned_with_used_len_0() {
    one(case_indirect_loop);
}

fn case_nested_indirect(rig: &mut Rig) {
    let inner = TABLE + 0x1000;
    rig.fe.put_header(HDR, T_IN, 0);
    rig.fe.write_table(
        inner,
        &[Desc::ro(HDR, 16), Desc::wo(DATA, 512), Desc::wo(STATUS, 1)],
    );
    rig.fe.write_desc_at(TABLE, Desc::indirect(inner, 48));
    rig.fe.set_desc(0, Desc::indirect(TABLE, 16));
    reset_status(rig);
    expect_dropped(rig, 0, Some(STATUS));
    // A table that refers to itself.
    rig.fe.write_desc_at(TABLE, Desc::indirect(TABLE, 16));
    expect_dropped(rig, 0, Some(STATUS));
    // An indirect descriptor after a valid start inside a table.
    rig.fe
        .write_table(TABLE, &[Desc::ro(HDR, 16), Desc::indirect(inner + 16, 32)]);
    rig.fe.set_desc(0, Desc::indirect(TABLE, 32));
    expect_dropped(rig, 0, Some(STATUS));
}

#[test]
fn nested_indirect_table_is_returned_with_used_len_0() {
    one(case_nested_indirect);
}

fn case_indirect_absurd(rig: &mut Rig) {
    rig.fe.put_header(HDR, T_IN, 0);
    // Zeroed memory: a table whose entries are empty descriptors.
    rig.fe.fill(DATA, 1 << 20, 0);
    for (addr, len) in [
        // Longer than any table can be (more than 65535 entries).
        (TABLE, u32::MAX - 15),
        (TABLE, 0x10_0000 * 16),
        // Not a whole number of descriptors.
        (TABLE, 47),
        // Empty.
        (TABLE, 0),
        // Outside memory, and running off its end.
        (MEM_SIZE + 4096, 4096),
        (MEM_SIZE - 32, 0xffff * 16),
        (u64::MAX - 15, 32),
    ] {
        rig.fe.write_table(
            TABLE,
            &[Desc::ro(HDR, 16), Desc::wo(DATA, 512), Desc::wo(STATUS, 1)],
        );
        rig.fe.set_desc(0, Desc::indirect(addr, len));
        reset_status(rig);
        let used = rig.fe.run(0);
        assert_eq!(used.id, 0);
        assert_eq!(used.len, 0, "used length for a table at {addr:#x}+{len:#x}");
        assert_eq!(rig.fe.read_u8(STATUS), SENTINEL, "status written");
    }
    // 65535 chained descriptors (the longest table there can be): the walk
    // is bounded and ends at the status.
    let n = 0xffffu32;
    let big = DATA;
    for i in 0..n - 2 {
        rig.fe
            .write_desc_at(big + 16 * u64::from(i), Desc::ro(HDR, 0).then(i as u16 + 1));
    }
    rig.fe.write_desc_at(
        big + 16 * u64::from(n - 3),
        Desc::ro(HDR, 16).then((n - 2) as u16),
    );
    rig.fe.write_desc_at(
        big + 16 * u64::from(n - 2),
        Desc::wo(DATA + (2 << 20) - 4096, 512).then((n - 1) as u16),
    );
    rig.fe
        .write_desc_at(big + 16 * u64::from(n - 1), Desc::wo(STATUS, 1));
    rig.fe.set_desc(0, Desc::indirect(big, 16 * n));
    reset_status(rig);
    let used = rig.fe.run(0);
    assert_eq!((used.id, used.len), (0, 513));
    assert_eq!(rig.fe.read_u8(STATUS), S_OK);
}

#[test]
fn indirect_table_of_absurd_length_is_refused() {
    one(case_indirect_absurd);
}

fn case_indirect_with_next(rig: &mut Rig) {
    // INDIRECT and NEXT together (a driver must not do that): whatever
    // vubd makes of it, the chain comes back once.
    rig.fe.put_header(HDR, T_IN, 0);
    rig.fe.write_table(
        TABLE,
        &[Desc::ro(HDR, 16), Desc::wo(DATA, 512), Desc::wo(STATUS, 1)],
    );
    rig.fe.set_desc(0, Desc::indirect(TABLE, 48).then(1));
    rig.fe.set_desc(1, Desc::wo(STATUS + 1, 1));
    reset_status(rig);
    let used = rig.fe.run(0);
    assert_eq!(used.id, 0);
    assert!(used.len <= 513, "used length {}", used.len);
}

#[test]
fn indirect_descriptor_with_next_flag_comes_back() {
    one(case_indirect_with_next);
}

// ---------------------------------------------------------------------
// Request types.

fn case_unknown_type(rig: &mut Rig) {
    for kind in [2u32, 3, 5, 7, 10, 14, 0x42, 0x8000_0000, u32::MAX] {
        rig.fe.put_header(HDR, kind, 0);
        rig.fe.chain(
            0,
            &[Desc::ro(HDR, 16), Desc::wo(DATA, 512), Desc::wo(STATUS, 1)],
        );
        reset_status(rig);
        expect_status(rig, 0, STATUS, S_UNSUPP);
    }
}

#[test]
fn unknown_request_type_is_unsupp() {
    one(case_unknown_type);
}

fn case_discard_unmap(rig: &mut Rig) {
    rig.fe.put_header(HDR, T_DISCARD, 0);
    rig.fe.put_range(DATA, 64, 8, 1);
    rig.fe.chain(
        0,
        &[Desc::ro(HDR, 16), Desc::ro(DATA, 16), Desc::wo(STATUS, 1)],
    );
    reset_status(rig);
    expect_status(rig, 0, STATUS, S_UNSUPP);
    // Unknown flags on WRITE_ZEROES.
    rig.fe.put_header(HDR, T_WRITE_ZEROES, 0);
    rig.fe.put_range(DATA, 64, 8, 2);
    reset_status(rig);
    expect_status(rig, 0, STATUS, S_UNSUPP);
    // A good WRITE_ZEROES with the unmap flag zeroes the range.
    rig.fe.put_range(DATA, 64, 8, 1);
    reset_status(rig);
    expect_status(rig, 0, STATUS, S_OK);
    rig.expect[64 * SECTOR..72 * SECTOR].fill(0);
    rig.read_check(64, 8 * SECTOR);
    // Segments of the wrong size.
    rig.fe.put_header(HDR, T_DISCARD, 0);
    rig.fe.chain(
        0,
        &[Desc::ro(HDR, 16), Desc::ro(DATA, 15), Desc::wo(STATUS, 1)],
    );
    reset_status(rig);
    expect_status(rig, 0, STATUS, S_IOERR);
}

#[test]
fn discard_with_the_unmap_flag_is_unsupp() {
    one(case_discard_unmap);
}

fn case_range_out_of_bounds(rig: &mut Rig) {
    let cap = rig.fe.capacity_sectors();
    rig.fe.chain(
        0,
        &[Desc::ro(HDR, 16), Desc::ro(DATA, 16), Desc::wo(STATUS, 1)],
    );
    for kind in [T_DISCARD, T_WRITE_ZEROES] {
        for (sector, sectors) in [
            (cap, 8),
            (cap - 4, 8),
            (u64::MAX - 3, 8),
            (u64::MAX, u32::MAX),
            (1 << 55, 8),
            (0, 0),
        ] {
            rig.fe.put_header(HDR, kind, 0);
            rig.fe.put_range(DATA, sector, sectors, 0);
            reset_status(rig);
            expect_status(rig, 0, STATUS, S_IOERR);
        }
    }
    // Two segments where one is allowed (max_*_seg is 1), the second one
    // out of range.
    rig.fe.put_header(HDR, T_WRITE_ZEROES, 0);
    rig.fe.put_range(DATA, 0, 8, 0);
    rig.fe.put_range(DATA + 16, cap, 8, 0);
    rig.fe.chain(
        0,
        &[Desc::ro(HDR, 16), Desc::ro(DATA, 32), Desc::wo(STATUS, 1)],
    );
    reset_status(rig);
    expect_status(rig, 0, STATUS, S_IOERR);
    // The image is checked by finish(): nothing was zeroed.
}

#[test]
fn discard_or_write_zeroes_out_of_range_is_ioerr() {
    one(case_range_out_of_bounds);
}

fn case_get_id_short(rig: &mut Rig) {
    rig.fe.put_header(HDR, T_GET_ID, 0);
    rig.fe.fill(DATA, 64, 0x99);
    rig.fe.chain(
        0,
        &[Desc::ro(HDR, 16), Desc::wo(DATA, 19), Desc::wo(STATUS, 1)],
    );
    reset_status(rig);
    expect_status(rig, 0, STATUS, S_IOERR);
    assert_filled(rig, DATA, 19, 0x99);
    // A device-readable buffer.
    rig.fe.chain(
        0,
        &[Desc::ro(HDR, 16), Desc::ro(DATA, 20), Desc::wo(STATUS, 1)],
    );
    reset_status(rig);
    expect_status(rig, 0, STATUS, S_IOERR);
}

#[test]
fn get_id_with_a_short_buffer_is_ioerr() {
    one(case_get_id_short);
}

fn case_get_id(rig: &mut Rig) {
    let mut expected = [0u8; 20];
    expected[..SERIAL.len()].copy_from_slice(SERIAL.as_bytes());
    // Exactly 20 bytes.
    let mut id = [0u8; 20];
    let done = rig.fe.request(T_GET_ID, 0, &mut id, true);
    assert_eq!((done.status, done.used.len), (S_OK, 21));
    assert_eq!(id, expected);
    // A larger buffer over two segments: 20 bytes written, no more.
    rig.fe.put_header(HDR, T_GET_ID, 0);
    rig.fe.fill(DATA, 512, 0x99);
    rig.fe.chain(
        0,
        &[
            Desc::ro(HDR, 16),
            Desc::wo(DATA, 7),
            Desc::wo(DATA + 7, 505),
            Desc::wo(STATUS, 1),
        ],
    );
    reset_status(rig);
    let used = rig.fe.run(0);
    assert_eq!((used.len, rig.fe.read_u8(STATUS)), (21, S_OK));
    assert_eq!(rig.fe.read(DATA, 20), expected);
    assert_filled(rig, DATA + 20, 492, 0x99);
}

#[test]
fn get_id_returns_the_serial() {
    one(case_get_id);
}

// ---------------------------------------------------------------------
// The rings themselves.

/// The guest claims 1000 new entries in a 256-entry ring.
fn case_avail_far_ahead(rig: &mut Rig) {
    let real = rig.fe.avail_idx();
    let used = rig.fe.used_idx();
    rig.fe.set_avail_idx(real.wrapping_add(1000));
    rig.fe.kick();
    std::thread::sleep(Duration::from_millis(50));
    rig.fe.kick();
    rig.alive();
    rig.assert_idle("avail index 1000 entries ahead");
    assert_eq!(
        rig.fe.used_idx(),
        used,
        "entries of a bogus avail index were used"
    );
    // The ring can still be taken back and restarted (its thread answers).
    assert_eq!(
        rig.fe.stop_ring(),
        real,
        "next avail index of the stopped ring"
    );
    rig.fe.restart_ring(real);
    rig.assert_idle("ring restarted with the avail index still 1000 ahead");
    // The guest puts the index back: the queue goes on.
    rig.fe.set_avail_idx(real);
    rig.read_check(0, 4096);
}

#[test]
fn avail_index_far_ahead_does_not_wedge_vubd() {
    one(case_avail_far_ahead);
}

#[test]
fn avail_index_far_ahead_with_event_idx_does_not_wedge_vubd() {
    let setup = Setup {
        fe: Options {
            event_idx: true,
            ..Options::default()
        },
        ..Setup::default()
    };
    one_with(setup, case_avail_far_ahead);
}

#[test]
fn avail_index_far_ahead_with_polling_does_not_wedge_vubd() {
    let setup = Setup {
        export_extra: format!(",serial={SERIAL},poll-us=50"),
        ..Setup::default()
    };
    one_with(setup, case_avail_far_ahead);
}

#[test]
fn avail_index_far_ahead_does_not_flood_the_log() {
    let mut rig = Rig::new();
    let real = rig.fe.avail_idx();
    rig.fe.set_avail_idx(real.wrapping_add(1000));
    let before = rig.d.stderr().len();
    for _ in 0..2000 {
        rig.fe.kick();
        std::thread::sleep(Duration::from_micros(50));
    }
    std::thread::sleep(Duration::from_millis(100));
    let logged = rig.d.stderr().len() - before;
    assert!(
        logged < 4096,
        "2000 kicks with a bogus avail index logged {logged} bytes; last lines:\n{}",
        tail(&rig.d.stderr(), 3)
    );
    rig.fe.set_avail_idx(real);
    rig.finish();
}

fn case_kick_without_entries(rig: &mut Rig) {
    rig.fe.kick();
    rig.fe.expect_no_used(Duration::from_millis(100));
    for _ in 0..10_000 {
        rig.fe.kick();
    }
    rig.fe.expect_no_used(Duration::from_millis(100));
    rig.assert_idle("after 10000 empty kicks");
    // One request, kicked many times, comes back once.
    rig.fe.put_header(HDR, T_IN, 0);
    rig.fe.chain(
        0,
        &[Desc::ro(HDR, 16), Desc::wo(DATA, 512), Desc::wo(STATUS, 1)],
    );
    rig.fe.push_avail(0);
    for _ in 0..1000 {
        rig.fe.kick();
        std::thread::yield_now();
    }
    let used = rig.fe.expect_used();
    assert_eq!(used, Used { id: 0, len: 513 });
    rig.fe.expect_no_used(Duration::from_millis(200));
}

#[test]
fn kicks_without_new_entries_are_harmless() {
    one(case_kick_without_entries);
}

/// Many requests in flight at once, one kick: all come back, once each.
fn case_batch(rig: &mut Rig) {
    let n: u16 = 64;
    for i in 0..n {
        let hdr = SCRATCH + 32 * u64::from(i);
        let status = SCRATCH + 0x4000 + u64::from(i);
        let data = DATA + 4096 * u64::from(i);
        rig.fe.put_header(hdr, T_IN, u64::from(i) * 8);
        rig.fe.write(status, &[SENTINEL]);
        rig.fe.chain(
            3 * i,
            &[Desc::ro(hdr, 16), Desc::wo(data, 4096), Desc::wo(status, 1)],
        );
        rig.fe.push_avail(3 * i);
    }
    rig.fe.kick();
    let mut seen = vec![false; usize::from(n)];
    for _ in 0..n {
        let used = rig.fe.expect_used();
        let i = (used.id / 3) as usize;
        assert!(
            used.id % 3 == 0 && i < seen.len() && !seen[i],
            "used {used:?}"
        );
        seen[i] = true;
        assert_eq!(used.len, 4097);
        assert_eq!(rig.fe.read_u8(SCRATCH + 0x4000 + i as u64), S_OK);
        let at = i * 8 * SECTOR;
        assert!(rig.fe.read(DATA + 4096 * i as u64, 4096) == rig.expect[at..at + 4096]);
    }
    rig.fe.expect_no_used(Duration::from_millis(100));
}

#[test]
fn many_requests_in_flight_come_back_once_each() {
    one(case_batch);
}

#[test]
fn event_idx_notifications_and_avail_event() {
    let setup = Setup {
        fe: Options {
            event_idx: true,
            ..Options::default()
        },
        ..Setup::default()
    };
    let mut rig = Rig::start(setup);
    // Kick only when the device asks for it (vring_need_event on
    // avail_event): every request must still be seen.
    for i in 0..50u64 {
        rig.fe.put_header(HDR, T_IN, i);
        rig.fe.chain(
            0,
            &[Desc::ro(HDR, 16), Desc::wo(DATA, 512), Desc::wo(STATUS, 1)],
        );
        let old = rig.fe.avail_idx();
        rig.fe.push_avail(0);
        rig.fe.kick_if_needed(old);
        let used = rig.fe.expect_used();
        assert_eq!(used, Used { id: 0, len: 513 });
        // Idle again, the device wants to hear about the next entry.
        assert!(
            poll_until(TIMEOUT, || rig.fe.avail_event() == rig.fe.avail_idx()),
            "avail_event {} after avail index {}",
            rig.fe.avail_event(),
            rig.fe.avail_idx()
        );
    }
    case_batch(&mut rig);
    rig.finish();
}

#[test]
fn indices_wrap_around() {
    let setup = Setup {
        fe: Options {
            base: 0xfff0,
            ..Options::default()
        },
        ..Setup::default()
    };
    let mut rig = Rig::start(setup);
    for i in 0..40u64 {
        rig.read_check(i, 512);
    }
    assert!(rig.fe.avail_idx() < 0x100, "indices did not wrap");
    rig.finish();
}

#[test]
fn ring_can_be_stopped_and_restarted_after_hostile_chains() {
    let mut rig = Rig::new();
    case_self_loop(&mut rig);
    case_data_outside_memory(&mut rig);
    let base = rig.fe.stop_ring();
    assert_eq!(base, rig.fe.avail_idx());
    rig.fe.restart_ring(base);
    rig.read_check(0, 4096);
    rig.finish();
}

#[test]
fn write_to_read_only_export_is_refused() {
    let setup = Setup {
        writable: false,
        ..Setup::default()
    };
    let mut rig = Rig::start(setup);
    rig.fe.put_header(HDR, T_OUT, 0);
    rig.fe.write(DATA, &payload(512, 9));
    rig.fe.chain(
        0,
        &[Desc::ro(HDR, 16), Desc::ro(DATA, 512), Desc::wo(STATUS, 1)],
    );
    reset_status(&rig);
    expect_status(&mut rig, 0, STATUS, S_IOERR);
    // DISCARD and WRITE_ZEROES are not offered.
    for kind in [T_DISCARD, T_WRITE_ZEROES] {
        rig.fe.put_header(HDR, kind, 0);
        rig.fe.put_range(DATA, 0, 8, 0);
        rig.fe.chain(
            0,
            &[Desc::ro(HDR, 16), Desc::ro(DATA, 16), Desc::wo(STATUS, 1)],
        );
        reset_status(&rig);
        expect_status(&mut rig, 0, STATUS, S_UNSUPP);
    }
    rig.read_check(0, 4096);
    rig.alive();
    rig.check_image();
    rig.fe.assert_guards_intact();
}

// ---------------------------------------------------------------------
// Everything on one connection.

/// Every case whose outcome vubd gets right, in one session.
const ALL_CASES: &[fn(&mut Rig)] = &[
    case_valid_shapes,
    case_header_device_writable,
    case_read_into_readable_buffer,
    case_write_from_writable_buffer,
    case_short_header,
    case_no_status_descriptor,
    case_status_read_only,
    case_segment_near_u32_max,
    case_chain_over_4gib,
    case_sector_overflow,
    case_beyond_capacity,
    case_unaligned_length,
    case_too_many_segments,
    case_data_outside_memory,
    case_header_outside_memory,
    case_status_outside_memory,
    case_self_loop,
    case_two_cycle,
    case_next_past_ring,
    case_head_past_ring,
    case_indirect_loop,
    case_nested_indirect,
    case_indirect_absurd,
    case_indirect_with_next,
    case_unknown_type,
    case_discard_unmap,
    case_range_out_of_bounds,
    case_get_id_short,
    case_get_id,
    case_kick_without_entries,
    case_batch,
];

fn barrage(setup: Setup) {
    let mut rig = Rig::start(setup);
    for (i, case) in ALL_CASES.iter().enumerate() {
        case(&mut rig);
        // A good request between any two cases.
        let data = payload(4 * SECTOR, i as u8);
        rig.write(200 + 8 * i as u64, &data);
        rig.read_check(200 + 8 * i as u64, 4 * SECTOR);
    }
    rig.alive();
    rig.finish();
}

#[test]
fn barrage_then_device_still_works() {
    barrage(Setup::default());
}

#[test]
fn barrage_with_event_idx_then_device_still_works() {
    barrage(Setup {
        fe: Options {
            event_idx: true,
            ..Options::default()
        },
        ..Setup::default()
    });
}

#[test]
fn barrage_with_add_mem_reg_and_a_512_entry_ring() {
    barrage(Setup {
        fe: Options {
            mem_slots: true,
            queue_size: 512,
            ..Options::default()
        },
        ..Setup::default()
    });
}
