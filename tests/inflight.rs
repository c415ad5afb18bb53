//! Inflight I/O tracking (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD) for real:
//! a test frontend (`common::frontend`) negotiates the feature and keeps
//! the area vubd gives it; vubd is SIGKILLed with requests in flight,
//! started again on the same socket, and the frontend reconnects as QEMU
//! does (same guest memory and rings, SET_INFLIGHT_FD with the kept area,
//! each ring's base set to its used index).  Every request must then be
//! completed exactly once: each head once in the used ring, with an OK
//! status, none missing, none twice, and nothing that had already
//! completed done again.
//!
//! Requests in flight are made with a `null-aio` node whose latency
//! ([`LATENCY_NS`]) is far longer than the test needs to kill vubd; GET_ID
//! requests, answered by vubd without the node, are the quick ones that
//! complete before the kill (out of order with the slow ones).  Besides the
//! used ring, the tests look at what vubd recorded: the heads the area
//! marks (laid out as the vhost-user spec says) and the number vubd logs
//! as resubmitted (which is why the daemons run with `VUBD_LOG=info` unless
//! the variable is set).
//!
//! qemu-storage-daemon 10.0 does not offer INFLIGHT_SHMFD, so with
//! `VUBD_TEST_BINARY=qsd` these tests say so and pass without running.

mod common;

use std::collections::HashMap;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::frontend::*;
use common::*;
use serde_json::json;

/// Latency of the slow node: requests stay in flight this long.
const LATENCY_NS: u64 = 2_000_000_000;
/// How long the test waits to see that nothing completes early.
const QUIET: Duration = Duration::from_millis(300);
/// How long all the requests of a batch may take once resubmitted.
const BATCH_TIMEOUT: Duration = Duration::from_secs(10);
/// Data length of reads and writes.
const LEN: usize = 4096;
/// Length of a GET_ID answer.
const ID_LEN: usize = 20;
const SECTOR: u64 = 512;
/// Size of the disks.
const DISK_BYTES: u64 = 16 << 20;
/// Where a buffer that a read must overwrite starts.
const POISON: u8 = 0xdd;

// ---- Daemons that can be killed and started again on the same socket.

/// The daemon log level the tests need (the "resubmitting" line is at
/// info level), unless the caller chose one.
fn log_level() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if std::env::var_os("VUBD_LOG").is_none() {
            std::env::set_var("VUBD_LOG", "info");
        }
    });
}

/// One export, served by a succession of daemons ("incarnations") with the
/// same options on the same socket path.  The socket and images live in
/// the rig's directory, which outlives every daemon.
struct Rig {
    dir: TempDir,
    sock: PathBuf,
    blockdevs: Vec<String>,
    node: String,
    d: Option<Daemon>,
    /// stderr of the daemons that were killed or stopped, in order.
    logs: Vec<String>,
}

impl Rig {
    /// A writable export of a `null-aio` node, `latency_ns` per request,
    /// reads returning zeroes.
    fn null(latency_ns: u64) -> Rig {
        Rig::start(
            vec![format!(
                "null-aio,node-name=n0,size={DISK_BYTES},latency-ns={latency_ns},read-zeroes=on"
            )],
            "n0",
            |_| {},
        )
    }

    /// A writable export of a raw node over a file of [`DISK_BYTES`].
    fn file() -> Rig {
        Rig::start(
            vec![
                "file,node-name=f0,filename={image}".to_string(),
                "raw,node-name=d0,file=f0".to_string(),
            ],
            "d0",
            |image| {
                std::fs::write(image, vec![0u8; DISK_BYTES as usize]).unwrap();
            },
        )
    }

    fn start(blockdevs: Vec<String>, node: &str, init: impl FnOnce(&Path)) -> Rig {
        log_level();
        let dir = TempDir::new("vubd-inflight");
        let image = dir.path().join("disk.img");
        init(&image);
        let blockdevs = blockdevs
            .into_iter()
            .map(|b| b.replace("{image}", image.to_str().unwrap()))
            .collect();
        let mut rig = Rig {
            sock: dir.path().join("vhost.sock"),
            dir,
            blockdevs,
            node: node.to_string(),
            d: None,
            logs: Vec::new(),
        };
        rig.launch();
        rig
    }

    fn image(&self) -> PathBuf {
        self.dir.path().join("disk.img")
    }

    /// Starts a daemon; ready once its monitor answers.
    fn launch(&mut self) {
        assert!(self.d.is_none());
        let mut b = Daemon::vubd(&[]).monitor();
        for bd in &self.blockdevs {
            b = b.arg("--blockdev").arg(bd);
        }
        let d = b
            .arg("--export")
            .arg(&format!(
                "type=vhost-user-blk,id=e0,node-name={},addr.type=unix,addr.path={},writable=on",
                self.node,
                self.sock.display()
            ))
            .start();
        self.d = Some(d);
    }

    fn daemon(&self) -> &Daemon {
        self.d.as_ref().expect("no daemon running")
    }

    /// SIGKILLs the daemon (no clean shutdown) and waits until it is gone.
    fn kill(&mut self) {
        let mut d = self.d.take().expect("no daemon running");
        d.send_signal("KILL");
        let status = d
            .wait_exit(TIMEOUT)
            .unwrap_or_else(|| panic!("daemon survived SIGKILL\n{}", d.describe()));
        assert_eq!(
            status.signal(),
            Some(libc::SIGKILL),
            "daemon ended otherwise than by SIGKILL\n{}",
            d.describe()
        );
        self.logs.push(d.stderr());
    }

    /// SIGKILL, then a new daemon with the same options on the same socket.
    fn kill_and_restart(&mut self) {
        self.kill();
        self.launch();
    }

    /// The daemon runs and its export is there.
    fn alive(&self) {
        let d = self.daemon();
        assert!(process_alive(d.pid()), "vubd died\n{}", d.describe());
        let reply = d.qmp().execute("query-block-exports", json!({}));
        let exports = assert_return(&reply).as_array().expect("a list").clone();
        assert_eq!(exports.len(), 1, "{reply}");
    }

    /// How many requests the running daemon logged as resubmitted.  Polls
    /// briefly: the line is written by an I/O thread.  None when the
    /// daemon is not vubd (its log says nothing of the kind).
    fn resubmitted(&self) -> Option<usize> {
        let d = self.daemon();
        if d.flavor() != Flavor::Vubd {
            return None;
        }
        let mut n = 0;
        poll_until(Duration::from_millis(500), || {
            n = resubmitted_in(&d.stderr());
            n > 0
        });
        Some(n)
    }
}

/// True (and says why) when the daemon under test is one without inflight
/// tracking: the test then returns early.
fn no_inflight_in_daemon() -> bool {
    let qsd = Flavor::under_test() == Flavor::Qsd;
    if qsd {
        eprintln!("skipped: qemu-storage-daemon does not offer INFLIGHT_SHMFD");
    }
    qsd
}

/// The sum of the "resubmitting N requests" figures of a log.
fn resubmitted_in(log: &str) -> usize {
    log.lines()
        .filter_map(|l| l.split("resubmitting ").nth(1))
        .filter_map(|rest| rest.split_whitespace().next()?.parse::<usize>().ok())
        .sum()
}

impl Drop for Rig {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for (i, log) in self.logs.iter().enumerate() {
                eprintln!("---- daemon {} (killed), stderr:\n{log}", i + 1);
            }
            if let Some(d) = &self.d {
                eprintln!(
                    "---- daemon {} (running):\n{}",
                    self.logs.len() + 1,
                    d.describe()
                );
            }
        }
    }
}

// ---- Requests built straight into the ring.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Read,
    /// A read whose chain is an indirect table.
    ReadIndirect,
    Write,
    Flush,
    /// Answered by vubd itself: completes at once.
    GetId,
}
use Kind::*;

/// A request placed in the ring: slot `slot` owns descriptors
/// 3*slot..3*slot+2, a header and status at [`SCRATCH`] + 0x100*slot, an
/// indirect table at [`SCRATCH`] + 0x80000 + 0x100*slot and [`LEN`] bytes
/// of data at [`DATA`] + [`LEN`]*slot.
#[derive(Clone, Copy, Debug)]
struct Req {
    slot: u16,
    kind: Kind,
    sector: u64,
    /// The byte a write's data is made of.
    fill: u8,
}

impl Req {
    fn head(&self) -> u16 {
        3 * self.slot
    }
    fn hdr(&self) -> u64 {
        SCRATCH + 0x100 * u64::from(self.slot)
    }
    fn status(&self) -> u64 {
        self.hdr() + 0x80
    }
    fn table(&self) -> u64 {
        SCRATCH + 0x80000 + 0x100 * u64::from(self.slot)
    }
    fn data(&self) -> u64 {
        DATA + LEN as u64 * u64::from(self.slot)
    }
    /// The used length a successful request returns.
    fn used_len(&self) -> u32 {
        match self.kind {
            Read | ReadIndirect => LEN as u32 + 1,
            Write | Flush => 1,
            GetId => ID_LEN as u32 + 1,
        }
    }
}

/// Requests of the given kinds on slots `first`, `first`+1, ..., each at
/// its own sector, writes filled with a byte that names them.
fn reqs(first: u16, kinds: &[Kind]) -> Vec<Req> {
    kinds
        .iter()
        .enumerate()
        .map(|(i, &kind)| {
            let slot = first + i as u16;
            Req {
                slot,
                kind,
                sector: 8 * u64::from(slot),
                fill: 0x10 + slot as u8,
            }
        })
        .collect()
}

/// Writes a request's header, buffers and descriptors (not the ring).
fn place(fe: &TestFrontend, r: &Req) {
    assert!(
        r.slot < 80,
        "slot {} collides with other descriptors",
        r.slot
    );
    let req_type = match r.kind {
        Read | ReadIndirect => T_IN,
        Write => T_OUT,
        Flush => T_FLUSH,
        GetId => T_GET_ID,
    };
    fe.put_header(r.hdr(), req_type, r.sector);
    fe.write(r.status(), &[SENTINEL]);
    let mut descs = vec![Desc::ro(r.hdr(), 16)];
    match r.kind {
        Read | ReadIndirect => {
            fe.fill(r.data(), LEN, POISON);
            descs.push(Desc::wo(r.data(), LEN as u32));
        }
        Write => {
            fe.fill(r.data(), LEN, r.fill);
            descs.push(Desc::ro(r.data(), LEN as u32));
        }
        GetId => {
            fe.fill(r.data(), ID_LEN, POISON);
            descs.push(Desc::wo(r.data(), ID_LEN as u32));
        }
        Flush => {}
    }
    descs.push(Desc::wo(r.status(), 1));
    if r.kind == ReadIndirect {
        fe.write_table(r.table(), &descs);
        fe.set_desc(r.head(), Desc::indirect(r.table(), 16 * descs.len() as u32));
    } else {
        fe.chain(r.head(), &descs);
    }
}

/// Places the requests, publishes them in order and kicks once.
fn submit(fe: &mut TestFrontend, rs: &[Req]) {
    for r in rs {
        place(fe, r);
        fe.push_avail(r.head());
    }
    fe.kick();
}

/// Waits for `n` used entries (all within [`BATCH_TIMEOUT`]), then checks
/// for [`QUIET`] that no more come.
fn collect(fe: &mut TestFrontend, n: usize) -> Vec<Used> {
    let deadline = Instant::now() + BATCH_TIMEOUT;
    let mut got = Vec::with_capacity(n);
    while got.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        match fe.wait_used(left) {
            Some(u) => got.push(u),
            None => panic!(
                "{} of {n} used entries after {BATCH_TIMEOUT:?}: {got:?} (avail {}, used {})",
                got.len(),
                fe.avail_idx(),
                fe.used_idx()
            ),
        }
    }
    if let Some(extra) = fe.wait_used(QUIET) {
        panic!("a used entry beyond the {n} expected: {extra:?} (after {got:?})");
    }
    got
}

/// Checks that `used` holds each of `rs` exactly once and nothing else,
/// each successful: status OK, used length right, read buffers zeroed by
/// the (null, read-zeroes) node, GET_ID answered.
fn check_completed(fe: &TestFrontend, rs: &[Req], used: &[Used]) {
    let mut seen: HashMap<u32, usize> = HashMap::new();
    for u in used {
        *seen.entry(u.id).or_default() += 1;
    }
    for r in rs {
        match seen.remove(&u32::from(r.head())) {
            Some(1) => {}
            Some(k) => panic!("{r:?} completed {k} times: used entries {used:?}"),
            None => panic!("{r:?} never completed: used entries {used:?}"),
        }
        let u = used.iter().find(|u| u.id == u32::from(r.head())).unwrap();
        assert_eq!(fe.read_u8(r.status()), S_OK, "status of {r:?}");
        assert_eq!(u.len, r.used_len(), "used length of {r:?}");
    }
    assert!(
        seen.is_empty(),
        "used entries for heads that were not submitted: {seen:?} (all: {used:?})"
    );
}

/// Read buffers hold zeroes (what the null node reads); GET_ID buffers
/// were written.
fn check_null_data(fe: &TestFrontend, rs: &[Req]) {
    for r in rs {
        match r.kind {
            Read | ReadIndirect => assert!(
                fe.read(r.data(), LEN).iter().all(|&b| b == 0),
                "{r:?}: the buffer does not hold what the node read"
            ),
            GetId => assert!(
                fe.read(r.data(), ID_LEN) != vec![POISON; ID_LEN],
                "{r:?}: no id written"
            ),
            _ => {}
        }
    }
}

/// After the kill: no request had completed (the latency held), and the
/// buffers reads must fill are poisoned again, so that what the
/// resubmitted reads write shows.
fn check_untouched_and_repoison(fe: &TestFrontend, rs: &[Req]) {
    for r in rs {
        assert_eq!(
            fe.read_u8(r.status()),
            SENTINEL,
            "{r:?} completed before the kill: the node's latency is too short for this machine"
        );
        if matches!(r.kind, Read | ReadIndirect) {
            fe.fill(r.data(), LEN, POISON);
        }
    }
}

fn heads(rs: &[Req]) -> Vec<u16> {
    let mut h: Vec<u16> = rs.iter().map(Req::head).collect();
    h.sort_unstable();
    h
}

fn inflight_opts() -> Options {
    Options {
        inflight: true,
        ..Options::default()
    }
}

/// Checks the figure vubd logged against the number of requests that were
/// in flight.
fn check_resubmitted(rig: &Rig, expect: usize) {
    if let Some(n) = rig.resubmitted() {
        eprintln!("{expect} requests were in flight; vubd logged {n} resubmitted");
        assert_eq!(
            n, expect,
            "vubd logged {n} requests resubmitted, {expect} were in flight"
        );
    }
}

// ---- The tests.

/// The basic case: 8 requests (reads, an indirect read, writes, a flush)
/// in flight when vubd is SIGKILLed, and 2 more the guest queued while vubd
/// was down.  After the restart and reconnection, each of the 10 completes
/// exactly once.
#[test]
fn requests_in_flight_when_vubd_is_killed_complete_after_restart() {
    if no_inflight_in_daemon() {
        return;
    }
    let mut rig = Rig::null(LATENCY_NS);
    let mut fe = TestFrontend::connect(&rig.sock, inflight_opts());
    let info = fe.inflight_info().unwrap();
    assert!(info.mmap_size > 0 && info.num_queues == 1 && info.queue_size == 256);

    let slow = reqs(
        0,
        &[Read, Write, ReadIndirect, Write, Flush, Read, Write, Read],
    );
    submit(&mut fe, &slow);
    fe.expect_no_used(QUIET);
    assert_eq!(
        fe.inflight_marks(0),
        heads(&slow),
        "the inflight area does not mark the requests taken"
    );

    rig.kill();
    check_untouched_and_repoison(&fe, &slow);
    assert_eq!(fe.inflight_marks(0), heads(&slow), "marks after the kill");
    // The guest goes on queueing while the backend is away.
    let later = reqs(slow.len() as u16, &[Write, Read]);
    submit(&mut fe, &later);

    rig.launch();
    fe.reconnect(&rig.sock, None);
    fe.kick();
    let all: Vec<Req> = slow.iter().chain(&later).copied().collect();
    let used = collect(&mut fe, all.len());
    check_completed(&fe, &all, &used);
    check_null_data(&fe, &all);
    check_resubmitted(&rig, slow.len());
    assert!(
        fe.inflight_marks(0).is_empty(),
        "marks left after completion"
    );
    assert_eq!(fe.used_idx(), fe.avail_idx());

    // The device goes on working.
    assert_eq!(fe.flush(), S_OK);
    assert_eq!(fe.read_sectors(0, LEN).0, S_OK);
    rig.alive();
    fe.assert_guards_intact();
}

/// Quick requests complete before the kill, some of them after slow ones
/// in the ring (out of order): the used index is not zero and the
/// requests in flight are not contiguous.  After the restart only the slow
/// ones complete; none of the quick ones is done again.
#[test]
fn resubmission_starts_in_the_middle_of_the_ring() {
    if no_inflight_in_daemon() {
        return;
    }
    let mut rig = Rig::null(LATENCY_NS);
    let mut fe = TestFrontend::connect(&rig.sock, inflight_opts());

    // Phase 1: five requests complete.
    let quick = reqs(0, &[GetId; 5]);
    submit(&mut fe, &quick);
    let used = collect(&mut fe, quick.len());
    check_completed(&fe, &quick, &used);

    // Phase 2: slow requests interleaved with quick ones.
    let mixed = reqs(
        5,
        &[
            Read,
            GetId,
            Write,
            ReadIndirect,
            GetId,
            Write,
            Flush,
            GetId,
            Read,
            Write,
        ],
    );
    let (fast, slow): (Vec<Req>, Vec<Req>) = mixed.iter().partition(|r| r.kind == GetId);
    submit(&mut fe, &mixed);
    let used = collect(&mut fe, fast.len());
    check_completed(&fe, &fast, &used);
    assert_eq!(fe.used_idx(), 8);
    assert_eq!(fe.avail_idx(), 15);
    assert_eq!(fe.inflight_marks(0), heads(&slow));

    rig.kill_and_restart();
    check_untouched_and_repoison(&fe, &slow);
    // The quick requests' buffers are the guest's again: a replay would
    // write them.
    for r in &fast {
        fe.write(r.status(), &[SENTINEL]);
        fe.fill(r.data(), ID_LEN, POISON);
    }
    fe.reconnect(&rig.sock, None);
    fe.kick();
    let used = collect(&mut fe, slow.len());
    check_completed(&fe, &slow, &used);
    check_null_data(&fe, &slow);
    for r in &fast {
        assert_eq!(fe.read_u8(r.status()), SENTINEL, "{r:?} was done again");
        assert_eq!(fe.read(r.data(), ID_LEN), vec![POISON; ID_LEN]);
    }
    check_resubmitted(&rig, slow.len());
    assert!(fe.inflight_marks(0).is_empty());

    // New requests go on from the right place.
    let next = reqs(20, &[GetId, GetId]);
    submit(&mut fe, &next);
    let used = collect(&mut fe, next.len());
    check_completed(&fe, &next, &used);
    rig.alive();
}

/// The same across the wrap-around of the 16-bit indices and of the ring
/// slots (indices from 0xfff9, a 256-entry ring), with EVENT_IDX.
#[test]
fn resubmission_across_the_index_wrap_around() {
    if no_inflight_in_daemon() {
        return;
    }
    let mut rig = Rig::null(LATENCY_NS);
    let mut fe = TestFrontend::connect(
        &rig.sock,
        Options {
            inflight: true,
            event_idx: true,
            base: 0xfff9,
            ..Options::default()
        },
    );
    let quick = reqs(0, &[GetId; 3]);
    submit(&mut fe, &quick);
    let used = collect(&mut fe, quick.len());
    check_completed(&fe, &quick, &used);
    assert_eq!(fe.used_idx(), 0xfffc);

    let mixed = reqs(
        3,
        &[
            Read,
            Write,
            GetId,
            ReadIndirect,
            Write,
            Read,
            GetId,
            Flush,
            Write,
            Read,
        ],
    );
    let (fast, slow): (Vec<Req>, Vec<Req>) = mixed.iter().partition(|r| r.kind == GetId);
    submit(&mut fe, &mixed);
    let used = collect(&mut fe, fast.len());
    check_completed(&fe, &fast, &used);
    assert_eq!(fe.used_idx(), 0xfffe);
    assert_eq!(fe.avail_idx(), 0x0006);
    assert_eq!(fe.inflight_marks(0), heads(&slow));

    rig.kill_and_restart();
    check_untouched_and_repoison(&fe, &slow);
    fe.reconnect(&rig.sock, None);
    fe.kick();
    let used = collect(&mut fe, slow.len());
    check_completed(&fe, &slow, &used);
    check_null_data(&fe, &slow);
    check_resubmitted(&rig, slow.len());
    assert_eq!(fe.used_idx(), 0x0006);

    let next = reqs(20, &[GetId, Read]);
    submit(&mut fe, &next);
    let used = collect(&mut fe, next.len());
    check_completed(&fe, &next, &used);
    rig.alive();
}

/// vubd is killed a second time while it is resubmitting: the third vubd
/// still finishes each request exactly once.
#[test]
fn vubd_killed_again_while_resubmitting_still_completes_each_request_once() {
    if no_inflight_in_daemon() {
        return;
    }
    let mut rig = Rig::null(LATENCY_NS);
    let mut fe = TestFrontend::connect(&rig.sock, inflight_opts());
    let slow = reqs(0, &[Write, Read, GetId, Write, ReadIndirect, Flush]);
    let quick: Vec<Req> = slow.iter().filter(|r| r.kind == GetId).copied().collect();
    let slow: Vec<Req> = slow.iter().filter(|r| r.kind != GetId).copied().collect();
    let mut all = slow.clone();
    all.extend(&quick);
    all.sort_by_key(|r| r.slot);
    submit(&mut fe, &all);
    let used = collect(&mut fe, quick.len());
    check_completed(&fe, &quick, &used);

    rig.kill_and_restart();
    check_untouched_and_repoison(&fe, &slow);
    fe.reconnect(&rig.sock, None);
    fe.kick();
    // Resubmitted, and in flight again.
    fe.expect_no_used(QUIET);
    check_resubmitted(&rig, slow.len());
    assert_eq!(fe.inflight_marks(0), heads(&slow));

    rig.kill_and_restart();
    check_untouched_and_repoison(&fe, &slow);
    fe.reconnect(&rig.sock, None);
    fe.kick();
    let used = collect(&mut fe, slow.len());
    check_completed(&fe, &slow, &used);
    check_null_data(&fe, &slow);
    check_resubmitted(&rig, slow.len());
    assert!(fe.inflight_marks(0).is_empty());
    rig.alive();
}

/// A frontend that stops the ring cleanly (GET_VRING_BASE) after all its
/// requests completed, disconnects and reconnects with the area: nothing
/// is resubmitted, nothing spurious shows up, and I/O works.  The same
/// after a plain disconnection (base = used index).
#[test]
fn clean_reconnect_with_inflight_area_resubmits_nothing() {
    if no_inflight_in_daemon() {
        return;
    }
    let rig = Rig::null(0);
    let mut fe = TestFrontend::connect(&rig.sock, inflight_opts());
    let first = reqs(0, &[Write, Read, GetId, ReadIndirect, Flush, Write]);
    submit(&mut fe, &first);
    let used = collect(&mut fe, first.len());
    check_completed(&fe, &first, &used);
    let base = fe.stop_ring();
    assert_eq!(base, fe.avail_idx(), "GET_VRING_BASE");
    assert!(fe.inflight_marks(0).is_empty());

    // Reuse the buffers: a replay would show.
    for r in &first {
        fe.write(r.status(), &[SENTINEL]);
        fe.fill(r.data(), LEN, POISON);
    }
    fe.disconnect();
    fe.reconnect(&rig.sock, Some(base));
    fe.kick();
    fe.expect_no_used(QUIET);
    for r in &first {
        assert_eq!(fe.read_u8(r.status()), SENTINEL, "{r:?} was done again");
    }

    let second = reqs(10, &[Read, Write, GetId]);
    submit(&mut fe, &second);
    let used = collect(&mut fe, second.len());
    check_completed(&fe, &second, &used);
    check_null_data(&fe, &second);

    // A plain disconnection, the ring idle; QEMU's base: the used index.
    fe.disconnect();
    fe.reconnect(&rig.sock, None);
    fe.kick();
    fe.expect_no_used(QUIET);
    let third = reqs(20, &[Write, Read]);
    submit(&mut fe, &third);
    let used = collect(&mut fe, third.len());
    check_completed(&fe, &third, &used);
    assert!(fe.inflight_marks(0).is_empty());
    if let Some(n) = rig.resubmitted() {
        assert_eq!(n, 0, "vubd resubmitted requests on a clean reconnection");
    }
    rig.alive();
}

/// The frontend loses the connection while requests are in flight and
/// vubd lives on.  vubd finishes those requests after the connection is
/// gone, but the frontend, as QEMU does when the connection drops
/// (`virtio_queue_restore_last_avail_idx` in `vhost_virtqueue_stop`), has
/// already set its last avail index to the used index it saw then, and
/// passes that as the base when it reconnects with the area.  The area
/// says nothing is in flight, so nothing may be done again: the next
/// avail index is the used index, whatever the base says (as
/// libvhost-user computes it: used index + requests marked).
#[test]
fn frontend_reconnects_after_losing_the_connection_with_requests_in_flight() {
    if no_inflight_in_daemon() {
        return;
    }
    let rig = Rig::null(LATENCY_NS / 2);
    let mut fe = TestFrontend::connect(&rig.sock, inflight_opts());
    let slow = reqs(0, &[Write, Read, Write, ReadIndirect]);
    submit(&mut fe, &slow);
    fe.expect_no_used(QUIET);
    assert_eq!(fe.inflight_marks(0), heads(&slow));
    // What QEMU keeps as the ring's base when the connection drops.
    let base = fe.used_idx();
    fe.disconnect();
    // vubd completes them on its way out of the connection.
    let used = collect(&mut fe, slow.len());
    check_completed(&fe, &slow, &used);
    assert!(fe.inflight_marks(0).is_empty());
    // The guest reuses the buffers of requests that completed.
    for r in &slow {
        fe.write(r.status(), &[SENTINEL]);
    }
    fe.reconnect(&rig.sock, Some(base));
    fe.kick();
    if let Some(u) = fe.wait_used(Duration::from_secs(3)) {
        panic!(
            "used entry {u:?} after reconnecting: a completed request was done again \
             (base {base}, used index {}, nothing marked in flight)",
            fe.used_idx()
        );
    }
    for r in &slow {
        assert_eq!(fe.read_u8(r.status()), SENTINEL, "{r:?} was done again");
    }
    let next = reqs(10, &[GetId, Read]);
    submit(&mut fe, &next);
    let used = collect(&mut fe, next.len());
    check_completed(&fe, &next, &used);
    rig.alive();
}

/// A guest that put a head outside the ring between a request that then
/// was in flight at the kill and another one: the queue stops at the bad
/// entry (a device that needs a reset), so nothing after it is taken or
/// marked, and after the restart "used index + marks" leads to the bad
/// entry again. The request in flight completes exactly once, the one
/// after the bad entry is not served, and nothing completes twice.
#[test]
fn bad_head_after_a_request_in_flight_stops_the_queue_consistently() {
    if no_inflight_in_daemon() {
        return;
    }
    let mut rig = Rig::null(LATENCY_NS);
    let mut fe = TestFrontend::connect(&rig.sock, inflight_opts());
    let rs = reqs(0, &[Write, Read]);
    let (slow, after) = (&rs[..1], &rs[1..]);
    place(&fe, &slow[0]);
    place(&fe, &after[0]);
    fe.push_avail(slow[0].head());
    fe.push_avail(fe.queue_size() + 44);
    fe.push_avail(after[0].head());
    fe.kick();
    fe.expect_no_used(QUIET);
    assert_eq!(fe.inflight_marks(0), heads(slow), "marked before the kill");

    rig.kill_and_restart();
    check_untouched_and_repoison(&fe, &rs);
    fe.reconnect(&rig.sock, None);
    fe.kick();
    let used = collect(&mut fe, slow.len());
    check_completed(&fe, slow, &used);
    fe.expect_no_used(QUIET);
    assert_eq!(
        fe.read_u8(after[0].status()),
        SENTINEL,
        "the request after the bad entry was served"
    );
    assert!(
        fe.inflight_marks(0).is_empty(),
        "marks left after completion"
    );
    rig.alive();
}

/// The bad entry first: nothing is taken, nothing marked, before or after a
/// restart.
#[test]
fn bad_head_before_a_request_stops_the_queue_across_a_restart() {
    if no_inflight_in_daemon() {
        return;
    }
    let mut rig = Rig::null(LATENCY_NS);
    let mut fe = TestFrontend::connect(&rig.sock, inflight_opts());
    let rs = reqs(0, &[Write]);
    place(&fe, &rs[0]);
    fe.push_avail(fe.queue_size() + 44);
    fe.push_avail(rs[0].head());
    fe.kick();
    fe.expect_no_used(QUIET);
    assert!(
        fe.inflight_marks(0).is_empty(),
        "a request after the bad entry was taken"
    );

    rig.kill_and_restart();
    fe.reconnect(&rig.sock, None);
    fe.kick();
    fe.expect_no_used(QUIET);
    assert_eq!(
        fe.read_u8(rs[0].status()),
        SENTINEL,
        "served after the bad entry"
    );
    assert!(fe.inflight_marks(0).is_empty());
    rig.alive();
}

/// A file-backed raw node: data written (and completed) before the kill
/// reads back after the restart and reconnection with the area, and
/// nothing that had completed is replayed (the guest reused the write
/// buffers with other bytes before reconnecting).
#[test]
fn data_written_before_the_kill_reads_back_after_restart() {
    if no_inflight_in_daemon() {
        return;
    }
    let mut rig = Rig::file();
    let mut fe = TestFrontend::connect(&rig.sock, inflight_opts());
    let writes = reqs(0, &[Write; 8]);
    submit(&mut fe, &writes);
    let used = collect(&mut fe, writes.len());
    check_completed(&fe, &writes, &used);
    // Some reads of it too, completed before the kill.
    let reads = reqs(8, &[Read, ReadIndirect]);
    let reads: Vec<Req> = reads
        .iter()
        .zip(&writes)
        .map(|(r, w)| Req {
            sector: w.sector,
            ..*r
        })
        .collect();
    submit(&mut fe, &reads);
    let used = collect(&mut fe, reads.len());
    check_completed(&fe, &reads, &used);
    assert!(fe.inflight_marks(0).is_empty());

    rig.kill();
    let expect = |w: &Req| vec![w.fill; LEN];
    let on_disk = std::fs::read(rig.image()).unwrap();
    for w in &writes {
        let at = (w.sector * SECTOR) as usize;
        assert!(
            on_disk[at..at + LEN] == expect(w)[..],
            "{w:?}: the image does not hold the write after the kill"
        );
    }
    // The guest reuses the completed requests' buffers.
    for r in writes.iter().chain(&reads) {
        fe.fill(r.data(), LEN, 0x5a);
        fe.write(r.status(), &[SENTINEL]);
    }

    rig.launch();
    fe.reconnect(&rig.sock, None);
    fe.kick();
    fe.expect_no_used(QUIET);
    for r in writes.iter().chain(&reads) {
        assert_eq!(fe.read_u8(r.status()), SENTINEL, "{r:?} was done again");
    }
    for w in &writes {
        let (status, data) = fe.read_sectors(w.sector, LEN);
        assert_eq!(status, S_OK, "read of {w:?}");
        assert!(data == expect(w), "{w:?}: reads back other data");
    }
    let on_disk = std::fs::read(rig.image()).unwrap();
    for w in &writes {
        let at = (w.sector * SECTOR) as usize;
        assert!(
            on_disk[at..at + LEN] == expect(w)[..],
            "{w:?}: the image changed after the restart"
        );
    }
    fe.roundtrip(200, &[0x77; 1024]);
    if let Some(n) = rig.resubmitted() {
        assert_eq!(n, 0, "vubd resubmitted completed requests");
    }
    rig.alive();
}
