//! Disk resizes announced to a running frontend: after QMP `block_resize`,
//! vubd updates the virtio-blk config space and, when the frontend
//! negotiated BACKEND_REQ and gave it a backend channel (SET_BACKEND_REQ_FD),
//! sends VHOST_USER_BACKEND_CONFIG_CHANGE_MSG there, asking for a reply when
//! REPLY_ACK was negotiated and then waiting up to 5 s for it.
//!
//! A test frontend (`common::frontend`) plays QEMU: it keeps the other end
//! of the channel, reads the message, reads the config space with
//! GET_CONFIG before answering (as QEMU's vhost-user-blk does when it
//! handles the message), answers 0, and goes on doing I/O over the same
//! connection, with the new size.  Frontends without a channel, one that
//! never answers, one that answers too late, one that closed its end and
//! one without REPLY_ACK must not wedge vubd.
//!
//! The export is a raw node (`r0`) over a file node (`f0`) of [`DISK`]
//! bytes; `r0` is resized.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::frontend::*;
use common::*;
use serde_json::{json, Value};

const SECTOR: u64 = 512;
/// The disk's initial size.
const DISK: u64 = 1 << 20;
/// Sizes it is resized to.
const GROWN: u64 = 2 << 20;
const SHRUNK: u64 = 512 << 10;
/// What vubd logs when the frontend was not told.
const NOT_TOLD: &str = "was not told about the new size";
/// How long vubd waits for the frontend's answer.
const ACK_TIMEOUT: Duration = Duration::from_secs(5);
/// How long `block_resize` may take when vubd waits for nothing.
const QUICK: Duration = Duration::from_secs(1);
/// How long the test waits to see that something does not happen.
const QUIET: Duration = Duration::from_millis(300);

/// Data distinct for each sector and seed, never all zero.
fn data(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| ((i / 512) as u8).wrapping_mul(31) ^ (i as u8).wrapping_add(seed) | 1)
        .collect()
}

/// A daemon exporting `r0`, a QMP session and a frontend connected with
/// `opts`.
struct Rig {
    // Dropped first: the frontend goes before the daemon is killed.
    fe: TestFrontend,
    qmp: Qmp,
    d: Daemon,
    image: PathBuf,
}

impl Rig {
    fn start(opts: Options) -> Rig {
        let builder = Daemon::vubd(&[]).monitor();
        let dir = builder.dir().to_path_buf();
        let image = dir.join("disk.img");
        std::fs::write(&image, vec![0u8; DISK as usize]).unwrap();
        let sock = dir.join("vhost.sock");
        let d = builder
            .arg("--blockdev")
            .arg(&format!("file,node-name=f0,filename={}", image.display()))
            .arg("--blockdev")
            .arg("raw,node-name=r0,file=f0")
            .arg("--export")
            .arg(&format!(
                "type=vhost-user-blk,id=e0,node-name=r0,addr.type=unix,addr.path={},writable=on",
                sock.display()
            ))
            .start();
        let qmp = d.qmp();
        let mut fe = TestFrontend::connect(&sock, opts);
        assert_eq!(fe.capacity_sectors(), DISK / SECTOR, "initial capacity");
        Rig { fe, qmp, d, image }
    }

    fn socket(&self) -> PathBuf {
        self.d.dir().join("vhost.sock")
    }

    /// Sends `block_resize` of `r0` without waiting for the reply.
    fn send_resize(&mut self, size: u64) -> Instant {
        self.qmp.send_value(&json!({
            "execute": "block_resize",
            "arguments": {"node-name": "r0", "size": size}
        }));
        Instant::now()
    }

    /// The next QMP reply (events skipped), within `timeout`.
    fn reply(&mut self, timeout: Duration) -> Value {
        self.qmp.read_reply(timeout)
    }

    /// Panics if a QMP reply (not an event) arrives within `wait`.
    fn expect_no_reply(&mut self, wait: Duration, why: &str) {
        let deadline = Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            match self.qmp.read_message(left) {
                None => return,
                Some(m) if m.get("event").is_some() => {}
                Some(m) => panic!("{why}: QMP answered {m}\n{}", self.d.describe()),
            }
        }
    }

    /// Resizes `r0` when no answer is awaited: the reply must come within
    /// [`QUICK`] and be a success.
    fn resize_quick(&mut self, size: u64) {
        let sent = self.send_resize(size);
        let reply = self.reply(QUICK + Duration::from_secs(4));
        assert_eq!(reply, json!({"return": {}}), "block_resize to {size}");
        assert!(
            sent.elapsed() < QUICK,
            "block_resize to {size} took {:?} though vubd had nothing to wait for\n{}",
            sent.elapsed(),
            self.d.describe()
        );
    }

    /// Reads the next backend-channel message (within [`TIMEOUT`]) and
    /// checks it is CONFIG_CHANGE_MSG with the given flags.
    fn expect_config_change(&mut self, need_reply: bool) -> BackendMsg {
        let msg = self.fe.recv_backend(TIMEOUT).unwrap_or_else(|| {
            panic!(
                "no message on the backend channel within {TIMEOUT:?}\n{}",
                self.d.describe()
            )
        });
        let flags = VU_VERSION | if need_reply { VU_NEED_REPLY } else { 0 };
        assert_eq!(
            msg,
            BackendMsg {
                request: BACKEND_CONFIG_CHANGE_MSG,
                flags,
                size: 0,
                payload: Vec::new(),
            },
            "CONFIG_CHANGE_MSG header (flags: version {VU_VERSION:#x}, need_reply {VU_NEED_REPLY:#x})"
        );
        msg
    }

    /// Panics if anything arrives on the backend channel within `wait`.
    fn expect_backend_quiet(&mut self, wait: Duration) {
        if let Some(m) = self.fe.recv_backend(wait) {
            panic!("unexpected backend-channel message {m:?}");
        }
    }

    fn capacity(&mut self) -> u64 {
        self.fe.capacity_sectors()
    }

    fn image_len(&self) -> u64 {
        std::fs::metadata(&self.image).unwrap().len()
    }

    fn warnings(&self) -> usize {
        self.d.stderr().matches(NOT_TOLD).count()
    }

    /// vubd is alive, answers QMP, and the export shows a client.
    fn check_alive(&mut self) {
        assert!(
            process_alive(self.d.pid()),
            "vubd died\n{}",
            self.d.describe()
        );
        let reply = self.qmp.execute("query-block-exports", Value::Null);
        let exports = assert_return(&reply);
        assert_eq!(exports[0]["id"], "e0", "{reply}");
        assert!(!self.fe.main_socket_has_data(Duration::ZERO));
    }
}

// ---- Growing, shrinking.

#[test]
fn resize_is_announced_on_the_backend_channel() {
    let mut rig = Rig::start(Options {
        backend_req: true,
        backend_channel: true,
        ..Options::default()
    });
    let last = DISK / SECTOR - 1;
    let first = data(4096, 1);
    let tail = data(512, 2);
    rig.fe.roundtrip(0, &first);
    rig.fe.roundtrip(last, &tail);
    // Past the end, before the resize.
    assert_eq!(rig.fe.read_sectors(last + 1, 512).0, S_IOERR);
    rig.expect_backend_quiet(Duration::ZERO);

    rig.send_resize(GROWN);
    let msg = rig.expect_config_change(true);
    let read_at = Instant::now();
    // As QEMU handles the message: the config space first, then the
    // answer.  The new size is already there.
    assert_eq!(
        rig.capacity(),
        GROWN / SECTOR,
        "GET_CONFIG while handling CONFIG_CHANGE_MSG"
    );
    // The guest goes on with I/O meanwhile, in the old range and in the
    // added one.
    rig.fe.roundtrip(100, &data(1024, 24));
    rig.fe.roundtrip(last + 1, &data(512, 25));
    // vubd waits for the answer: block_resize has not returned yet.
    rig.expect_no_reply(
        Duration::from_millis(800),
        "block_resize returned before the frontend answered CONFIG_CHANGE_MSG",
    );
    rig.fe.answer_backend(&msg, 0);
    let answered_at = Instant::now();
    let reply = rig.reply(TIMEOUT);
    assert_eq!(reply, json!({"return": {}}));
    assert!(
        answered_at.elapsed() < QUICK,
        "block_resize took {:?} after the answer",
        answered_at.elapsed()
    );
    assert!(read_at.elapsed() < TIMEOUT);

    // The same connection, no reconnection: the new size and I/O in the
    // added range.
    assert_eq!(rig.capacity(), GROWN / SECTOR);
    assert_eq!(rig.image_len(), GROWN);
    let new_last = GROWN / SECTOR - 1;
    rig.fe.roundtrip(last + 1, &data(4096, 3));
    rig.fe.roundtrip(new_last, &data(512, 4));
    // A request across the old end.
    rig.fe.roundtrip(last - 1, &data(2048, 5));
    assert_eq!(rig.fe.read_sectors(new_last + 1, 512).0, S_IOERR);
    assert_eq!(rig.fe.write_sectors(new_last, &data(1024, 6)), S_IOERR);
    let (status, back) = rig.fe.read_sectors(0, 4096);
    assert_eq!(status, S_OK);
    assert!(back == first, "data before the old end changed");
    assert_eq!(rig.fe.flush(), S_OK);

    rig.expect_backend_quiet(QUIET);
    assert_eq!(rig.warnings(), 0, "{}", rig.d.stderr());
    rig.check_alive();
    rig.fe.assert_guards_intact();
}

#[test]
fn shrink_is_announced_and_requests_past_the_new_end_fail() {
    let mut rig = Rig::start(Options {
        backend_req: true,
        backend_channel: true,
        ..Options::default()
    });
    let new_end = SHRUNK / SECTOR;
    let kept = data(1024, 7);
    rig.fe.roundtrip(new_end - 2, &kept);
    rig.fe.roundtrip(new_end + 10, &data(512, 8));

    rig.send_resize(SHRUNK);
    let msg = rig.expect_config_change(true);
    assert_eq!(rig.capacity(), SHRUNK / SECTOR);
    rig.expect_no_reply(
        QUIET,
        "block_resize returned before the frontend answered CONFIG_CHANGE_MSG",
    );
    rig.fe.answer_backend(&msg, 0);
    assert_eq!(rig.reply(TIMEOUT), json!({"return": {}}));

    assert_eq!(rig.capacity(), SHRUNK / SECTOR);
    assert_eq!(rig.image_len(), SHRUNK);
    // Inside the new size: what was written is there.
    let (status, back) = rig.fe.read_sectors(new_end - 2, 1024);
    assert_eq!(status, S_OK);
    assert!(back == kept, "data before the new end changed");
    rig.fe.roundtrip(new_end - 1, &data(512, 9));
    // Past the new end, and across it.
    assert_eq!(rig.fe.read_sectors(new_end, 512).0, S_IOERR);
    assert_eq!(rig.fe.read_sectors(new_end + 10, 512).0, S_IOERR);
    assert_eq!(rig.fe.write_sectors(new_end, &data(512, 10)), S_IOERR);
    assert_eq!(rig.fe.write_sectors(new_end - 1, &data(1024, 11)), S_IOERR);
    assert_eq!(rig.fe.read_sectors(new_end - 1, 1024).0, S_IOERR);
    // The failed writes did not grow the file.
    assert_eq!(rig.image_len(), SHRUNK);

    rig.expect_backend_quiet(QUIET);
    assert_eq!(rig.warnings(), 0, "{}", rig.d.stderr());
    rig.check_alive();
}

// ---- Frontends that do not answer as they should.

#[test]
fn frontend_that_does_not_answer_does_not_wedge_vubd() {
    let mut rig = Rig::start(Options {
        backend_req: true,
        backend_channel: true,
        ..Options::default()
    });
    rig.fe.roundtrip(0, &data(512, 12));

    let sent = rig.send_resize(GROWN);
    let _ignored = rig.expect_config_change(true);
    // No answer.  vubd gives up after its 5 s.
    let reply = rig.reply(ACK_TIMEOUT + Duration::from_secs(3));
    let took = sent.elapsed();
    assert_eq!(reply, json!({"return": {}}), "block_resize");
    assert!(
        took >= ACK_TIMEOUT - Duration::from_millis(500)
            && took < ACK_TIMEOUT + Duration::from_secs(1),
        "block_resize returned after {took:?}, expected about {ACK_TIMEOUT:?}\n{}",
        rig.d.describe()
    );
    assert!(
        poll_until(Duration::from_secs(2), || rig.warnings() == 1),
        "no warning logged for the unanswered CONFIG_CHANGE_MSG\n{}",
        rig.d.describe()
    );
    assert!(rig.d.stderr().contains("export 'e0'"), "{}", rig.d.stderr());

    // QMP, the config space and I/O keep working on the same connection.
    rig.check_alive();
    assert_eq!(rig.capacity(), GROWN / SECTOR);
    rig.fe.roundtrip(GROWN / SECTOR - 8, &data(4096, 13));
    rig.fe.roundtrip(0, &data(512, 14));

    // The channel still works for a frontend that now answers.
    rig.send_resize(GROWN + DISK);
    let msg = rig.expect_config_change(true);
    rig.expect_no_reply(
        QUIET,
        "second block_resize returned before the frontend answered",
    );
    rig.fe.answer_backend(&msg, 0);
    let answered = Instant::now();
    assert_eq!(rig.reply(TIMEOUT), json!({"return": {}}));
    assert!(answered.elapsed() < QUICK);
    assert_eq!(rig.capacity(), (GROWN + DISK) / SECTOR);
    assert_eq!(rig.warnings(), 1, "{}", rig.d.stderr());
    rig.check_alive();
}

#[test]
fn frontend_that_answers_after_the_timeout_does_not_confuse_the_next_resize() {
    let mut rig = Rig::start(Options {
        backend_req: true,
        backend_channel: true,
        ..Options::default()
    });
    let sent = rig.send_resize(GROWN);
    let late = rig.expect_config_change(true);
    assert_eq!(
        rig.reply(ACK_TIMEOUT + Duration::from_secs(3)),
        json!({"return": {}})
    );
    assert!(sent.elapsed() >= ACK_TIMEOUT - Duration::from_millis(500));
    assert!(poll_until(Duration::from_secs(2), || rig.warnings() == 1));
    // The answer comes after vubd gave up waiting for it.
    rig.fe.answer_backend(&late, 0);
    std::thread::sleep(QUIET);

    // The next resize is announced again; its block_resize must wait for
    // the answer to this message, not take the late one for it.
    rig.send_resize(GROWN + DISK);
    let msg = rig.expect_config_change(true);
    rig.expect_no_reply(
        Duration::from_millis(800),
        "block_resize returned before the frontend answered the second \
         CONFIG_CHANGE_MSG (the late answer to the first was taken for it)",
    );
    rig.fe.answer_backend(&msg, 0);
    assert_eq!(rig.reply(TIMEOUT), json!({"return": {}}));
    assert_eq!(rig.capacity(), (GROWN + DISK) / SECTOR);
    rig.check_alive();
}

#[test]
fn frontend_answering_failure_is_logged_and_the_resize_stands() {
    let mut rig = Rig::start(Options {
        backend_req: true,
        backend_channel: true,
        ..Options::default()
    });
    rig.send_resize(GROWN);
    let msg = rig.expect_config_change(true);
    rig.fe.answer_backend(&msg, 1);
    assert_eq!(rig.reply(TIMEOUT), json!({"return": {}}));
    assert!(
        poll_until(Duration::from_secs(2), || rig.warnings() == 1),
        "no warning for a failed CONFIG_CHANGE_MSG\n{}",
        rig.d.describe()
    );
    assert_eq!(rig.capacity(), GROWN / SECTOR);
    rig.fe.roundtrip(GROWN / SECTOR - 1, &data(512, 15));
    rig.check_alive();
}

#[test]
fn frontend_that_closed_its_channel_does_not_wedge_vubd() {
    let mut rig = Rig::start(Options {
        backend_req: true,
        backend_channel: true,
        ..Options::default()
    });
    rig.fe.close_backend_channel();
    rig.resize_quick(GROWN);
    assert!(
        poll_until(Duration::from_secs(2), || rig.warnings() == 1),
        "no warning for a closed backend channel\n{}",
        rig.d.describe()
    );
    assert_eq!(rig.capacity(), GROWN / SECTOR);
    rig.fe.roundtrip(GROWN / SECTOR - 1, &data(512, 16));
    // Again, on the same dead channel.
    rig.resize_quick(GROWN + DISK);
    assert_eq!(rig.capacity(), (GROWN + DISK) / SECTOR);
    rig.check_alive();
}

/// With oob enabled, a query run out of band is answered while the control
/// thread waits for the frontend, ahead of the in-band commands sent
/// before it; the in-band ones keep their order.
#[test]
fn out_of_band_query_overtakes_a_resize_waiting_for_the_frontend() {
    let mut rig = Rig::start(Options {
        backend_req: true,
        backend_channel: true,
        ..Options::default()
    });
    let (mut oob, _) = Qmp::connect(rig.d.qmp_socket());
    assert_eq!(
        oob.execute("qmp_capabilities", json!({"enable": ["oob"]})),
        json!({"return": {}})
    );
    oob.send_value(&json!({"execute": "block_resize", "id": "resize",
                           "arguments": {"node-name": "r0", "size": GROWN}}));
    let msg = rig.expect_config_change(true);
    // The control thread now waits for the answer.
    oob.send_value(&json!({"execute": "query-block-exports", "id": "in-band"}));
    oob.send_value(&json!({"exec-oob": "query-version", "id": "oob"}));
    let first = oob.read_reply(QUICK);
    assert_eq!(first["id"], "oob", "{first}");
    assert!(first["return"]["package"].is_string(), "{first}");
    rig.fe.answer_backend(&msg, 0);
    assert_eq!(
        oob.read_reply(TIMEOUT),
        json!({"return": {}, "id": "resize"})
    );
    assert_eq!(oob.read_reply(TIMEOUT)["id"], "in-band");
    assert_eq!(rig.capacity(), GROWN / SECTOR);
}

// ---- Frontends without a backend channel.

fn without_channel(opts: Options) {
    let mut rig = Rig::start(opts);
    rig.fe.roundtrip(0, &data(512, 17));
    rig.resize_quick(GROWN);
    assert!(
        !rig.fe.main_socket_has_data(QUIET),
        "vubd sent something unasked on the vhost-user socket"
    );
    assert_eq!(rig.capacity(), GROWN / SECTOR);
    rig.fe.roundtrip(GROWN / SECTOR - 8, &data(4096, 18));
    rig.resize_quick(SHRUNK);
    assert_eq!(rig.capacity(), SHRUNK / SECTOR);
    assert_eq!(rig.fe.read_sectors(SHRUNK / SECTOR, 512).0, S_IOERR);
    rig.fe.roundtrip(SHRUNK / SECTOR - 1, &data(512, 19));
    assert_eq!(rig.warnings(), 0, "{}", rig.d.stderr());
    rig.check_alive();
}

#[test]
fn frontend_without_backend_channel_gets_nothing() {
    // BACKEND_REQ not negotiated at all.
    without_channel(Options::default());
}

#[test]
fn frontend_with_backend_req_but_no_channel_gets_nothing() {
    // BACKEND_REQ negotiated, SET_BACKEND_REQ_FD never sent.
    without_channel(Options {
        backend_req: true,
        ..Options::default()
    });
}

#[test]
fn channel_of_a_previous_frontend_is_not_used() {
    let mut rig = Rig::start(Options {
        backend_req: true,
        backend_channel: true,
        ..Options::default()
    });
    // The first frontend goes away, keeping its end of the channel open;
    // a second one connects without a channel.
    rig.fe.disconnect();
    let mut second = TestFrontend::connect(&rig.socket(), Options::default());
    assert_eq!(second.capacity_sectors(), DISK / SECTOR);
    rig.resize_quick(GROWN);
    // Nothing on the old channel (vubd may have closed it).
    let old = rig.fe.backend_state(QUIET);
    assert_ne!(
        old,
        BackendState::Data,
        "the previous frontend's channel was told about the resize"
    );
    assert_eq!(second.capacity_sectors(), GROWN / SECTOR);
    second.roundtrip(GROWN / SECTOR - 1, &data(512, 20));
    assert_eq!(rig.warnings(), 0, "{}", rig.d.stderr());
    assert!(process_alive(rig.d.pid()), "{}", rig.d.describe());
}

// ---- Without REPLY_ACK.

#[test]
fn without_reply_ack_the_message_asks_for_no_answer_and_vubd_does_not_wait() {
    let mut rig = Rig::start(Options {
        reply_ack: false,
        backend_req: true,
        backend_channel: true,
        ..Options::default()
    });
    rig.fe.roundtrip(0, &data(512, 21));
    // The frontend does not even read the channel until block_resize has
    // returned.
    rig.resize_quick(GROWN);
    rig.expect_config_change(false);
    assert_eq!(rig.capacity(), GROWN / SECTOR);
    rig.fe.roundtrip(GROWN / SECTOR - 1, &data(512, 22));
    // Never answered; the next resize does not wait either.
    rig.resize_quick(SHRUNK);
    rig.expect_config_change(false);
    assert_eq!(rig.capacity(), SHRUNK / SECTOR);
    assert_eq!(rig.fe.read_sectors(SHRUNK / SECTOR, 512).0, S_IOERR);
    rig.fe.roundtrip(SHRUNK / SECTOR - 1, &data(512, 23));
    rig.expect_backend_quiet(QUIET);
    assert_eq!(rig.warnings(), 0, "{}", rig.d.stderr());
    rig.check_alive();
}
