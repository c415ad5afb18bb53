//! vubd's command line: help and version, errors (exit status 1 and one
//! line naming the culprit), the JSON and keyval forms of `--blockdev`,
//! `size` versus `int` members, `--object`, and the `serve` short form.
//!
//! These tests run vubd itself (whatever `VUBD_TEST_BINARY` says); the
//! messages quoted as qsd's are what qemu-storage-daemon 10.0.2 printed
//! for the same command lines.  Where qemu-storage-daemon is installed,
//! the error tests also run it side by side with the same arguments.
//! The format refusal of `serve` and the lock tests need qemu-img and
//! qemu-io.  `--pidfile` and `--daemonize` are covered by
//! tests/qmp_protocol.rs.

mod common;

use std::io::Read;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::VhostBackend;

/// How long a command line that should fail may take to do so.
const EXIT_TIMEOUT: Duration = Duration::from_secs(5);
const MIB: u64 = 1 << 20;
/// virtio-blk feature bit of a read-only device.
const VIRTIO_BLK_F_RO: u64 = 1 << 5;

/// What a finished vubd run left behind.
struct Finished {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Finished {
    /// The single line vubd prints on stderr for a command-line error.
    fn error_line(&self) -> &str {
        let text = self.stderr.strip_suffix('\n').unwrap_or(&self.stderr);
        assert!(
            !text.is_empty() && !text.contains('\n'),
            "expected exactly one line on stderr, got {:?}",
            self.stderr
        );
        text
    }

    /// Checks exit status 1, no stdout and one line on stderr; returns it.
    fn assert_failed(&self) -> &str {
        assert_eq!(self.status.code(), Some(1), "exit status; {self:?}");
        assert_eq!(self.stdout, "", "nothing belongs on stdout");
        self.error_line()
    }
}

impl std::fmt::Debug for Finished {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "status {:?}\nstdout: {:?}\nstderr: {:?}",
            self.status, self.stdout, self.stderr
        )
    }
}

/// Runs vubd in `dir` with `args` (`{dir}` replaced) and waits for it to
/// exit; kills it and panics if it is still running after EXIT_TIMEOUT.
fn run_to_exit(dir: &Path, args: &[&str]) -> Finished {
    run_flavor_to_exit(Flavor::Vubd, dir, args)
}

/// [`run_to_exit`] with vubd or qemu-storage-daemon.
fn run_flavor_to_exit(flavor: Flavor, dir: &Path, args: &[&str]) -> Finished {
    let dir_text = dir.to_str().expect("temp dir path is UTF-8");
    let args: Vec<String> = args.iter().map(|a| a.replace("{dir}", dir_text)).collect();
    let mut child = Command::new(flavor.program())
        .args(&args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {flavor:?}: {e}"));
    let deadline = Instant::now() + EXIT_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{flavor:?} {args:?} still running after {EXIT_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    // The process is gone, so both pipes are at end of file.
    let mut stdout = String::new();
    let mut stderr = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut stdout)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    Finished {
        status,
        stdout,
        stderr,
    }
}

/// Pids of live processes whose command line mentions `dir`.
fn processes_mentioning(dir: &Path) -> Vec<u32> {
    let needle = dir.to_str().unwrap().as_bytes();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc") {
        let entry = entry.unwrap();
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if cmdline.windows(needle.len()).any(|w| w == needle) && process_alive(pid) {
            found.push(pid);
        }
    }
    found
}

/// A daemon started with `--pidfile`, so that it is ready when this
/// returns (vubd writes the pidfile once every socket accepts).
fn start_ready(args: &[&str], images: &[(&str, u64)]) -> Daemon {
    let builder = Daemon::with_flavor(Flavor::Vubd, args).pidfile();
    for (name, size) in images {
        qemu_img_create(&builder.dir().join(name), "raw", *size);
    }
    builder.start()
}

/// A negotiated QMP session on `<daemon dir>/qmp.sock`.
fn qmp_at(d: &Daemon) -> Qmp {
    let (mut qmp, _) = Qmp::connect(&d.dir().join("qmp.sock"));
    qmp.negotiate();
    qmp
}

/// query-named-block-nodes, by node name.
fn named_nodes(qmp: &mut Qmp) -> serde_json::Map<String, Value> {
    let reply = qmp.execute("query-named-block-nodes", Value::Null);
    assert_return(&reply)
        .as_array()
        .expect("a list")
        .iter()
        .map(|n| (n["node-name"].as_str().unwrap().to_string(), n.clone()))
        .collect()
}

/// What a vhost-user frontend learns from an export before using it.
struct DeviceView {
    features: u64,
    /// The first 24 bytes of the virtio-blk config space.
    config: Vec<u8>,
}

impl DeviceView {
    /// `capacity`, in 512-byte sectors.
    fn capacity(&self) -> u64 {
        u64::from_le_bytes(self.config[0..8].try_into().unwrap())
    }

    /// `blk_size`, the logical block size.
    fn blk_size(&self) -> u32 {
        u32::from_le_bytes(self.config[20..24].try_into().unwrap())
    }
}

/// Connects to a vhost-user-blk socket, reads the device features and
/// the start of the config space, and disconnects.
fn probe_device(path: &Path) -> DeviceView {
    let stream = UnixStream::connect(path)
        .unwrap_or_else(|e| panic!("cannot connect to {}: {e}", path.display()));
    stream.set_read_timeout(Some(REPLY_TIMEOUT)).unwrap();
    stream.set_write_timeout(Some(REPLY_TIMEOUT)).unwrap();
    let mut frontend = Frontend::from_stream(stream, 1);
    let features = frontend.get_features().expect("GET_FEATURES");
    assert_ne!(
        features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(),
        0,
        "the export offers no protocol features"
    );
    let protocol = frontend
        .get_protocol_features()
        .expect("GET_PROTOCOL_FEATURES");
    assert!(
        protocol.contains(VhostUserProtocolFeatures::CONFIG),
        "the export cannot show its config: {protocol:?}"
    );
    frontend
        .set_protocol_features(VhostUserProtocolFeatures::CONFIG)
        .expect("SET_PROTOCOL_FEATURES");
    let (_, config) = frontend
        .get_config(0, 24, VhostUserConfigFlags::empty(), &[0u8; 24])
        .expect("GET_CONFIG");
    DeviceView { features, config }
}

// --- help and version ---------------------------------------------------

#[test]
fn help_exits_zero_and_mentions_every_option() {
    let dir = TempDir::new("vubd-cli");
    for flag in ["--help", "-h"] {
        let run = run_to_exit(dir.path(), &[flag]);
        assert_eq!(run.status.code(), Some(0), "{flag}: {run:?}");
        assert_eq!(run.stderr, "", "{flag} wrote to stderr");
        for option in [
            "--help",
            "-h",
            "--version",
            "-V",
            "--trace",
            "-T",
            "--pidfile",
            "--daemonize",
            "--blockdev",
            "--export",
            "--object",
            "--chardev",
            "--monitor",
            "vubd serve",
            "--socket",
            "--format",
            "--readonly",
            "--num-queues",
            "--monitor-socket",
        ] {
            assert!(
                run.stdout.contains(option),
                "{flag}: the help does not mention {option}"
            );
        }
    }
}

#[test]
fn version_prints_name_and_version() {
    let dir = TempDir::new("vubd-cli");
    let expected = format!("vubd {}\n", env!("CARGO_PKG_VERSION"));
    for flag in ["--version", "-V"] {
        let run = run_to_exit(dir.path(), &[flag]);
        assert_eq!(run.status.code(), Some(0), "{flag}: {run:?}");
        assert_eq!(run.stdout, expected, "{flag}");
        assert_eq!(run.stderr, "", "{flag} wrote to stderr");
    }
}

#[test]
fn help_subcommand_prints_the_help() {
    let dir = TempDir::new("vubd-cli");
    let general = run_to_exit(dir.path(), &["--help"]);
    let help = run_to_exit(dir.path(), &["help"]);
    assert_eq!(help.status.code(), Some(0), "{help:?}");
    assert_eq!(help.stderr, "");
    assert_eq!(help.stdout, general.stdout);
    assert!(help.stdout.contains("vubd help [serve]"), "{help:?}");
}

#[test]
fn serve_help_is_the_serve_form_s_own() {
    let dir = TempDir::new("vubd-cli");
    let general = run_to_exit(dir.path(), &["--help"]);
    let mut texts = Vec::new();
    for args in [
        &["serve", "--help"][..],
        &["serve", "-h"],
        &["serve", "disk.img", "--socket", "x.sock", "--help"],
        &["help", "serve"],
    ] {
        let run = run_to_exit(dir.path(), args);
        assert_eq!(run.status.code(), Some(0), "{args:?}: {run:?}");
        assert_eq!(run.stderr, "", "{args:?}");
        assert!(
            run.stdout
                .starts_with("Usage: vubd serve IMAGE --socket PATH"),
            "{args:?}: {run:?}"
        );
        assert_ne!(run.stdout, general.stdout, "{args:?}");
        for option in [
            "--socket",
            "--format",
            "--readonly",
            "--num-queues",
            "--monitor-socket",
            "--pidfile",
            "--daemonize",
            "--blockdev",
        ] {
            assert!(
                run.stdout.contains(option),
                "{args:?}: the serve help does not mention {option}"
            );
        }
        texts.push(run.stdout);
    }
    texts.dedup();
    assert_eq!(texts.len(), 1, "the serve help differs between spellings");
}

#[test]
fn help_on_an_unknown_topic_fails() {
    let dir = TempDir::new("vubd-cli");
    let run = run_to_exit(dir.path(), &["help", "blockdev"]);
    assert_eq!(
        run.assert_failed(),
        "vubd: help: no help on 'blockdev' (try 'vubd help' or 'vubd help serve')"
    );
}

// --- errors -------------------------------------------------------------

#[test]
fn unknown_option_fails_with_one_line_naming_it() {
    let dir = TempDir::new("vubd-cli");
    // The pidfile makes the temp dir part of the command line, so that a
    // daemon left behind would be found below.
    let run = run_to_exit(dir.path(), &["--pidfile", "{dir}/pid", "--frobnicate"]);
    // qsd: "qemu-storage-daemon: unrecognized option '--frobnicate'"
    let line = run.assert_failed();
    assert!(line.contains("--frobnicate"), "{line:?}");
    assert!(!dir.path().join("pid").exists(), "a pidfile was written");
    assert_eq!(processes_mentioning(dir.path()), Vec::<u32>::new());
}

#[test]
fn bad_blockdev_keyval_fails_with_one_line_naming_blockdev() {
    let dir = TempDir::new("vubd-cli");
    let run = run_to_exit(dir.path(), &["--blockdev", "driver=file,=x"]);
    // qsd: "qemu-storage-daemon: --blockdev driver=file,=x: Invalid parameter ''"
    let line = run.assert_failed();
    assert!(line.contains("--blockdev"), "{line:?}");
    assert!(line.ends_with("Invalid parameter ''"), "{line:?}");
}

#[test]
fn missing_image_fails_with_could_not_open() {
    let dir = TempDir::new("vubd-cli");
    let path = dir.path().join("missing.img");
    let run = run_to_exit(
        dir.path(),
        &["--blockdev", "file,node-name=f0,filename={dir}/missing.img"],
    );
    let line = run.assert_failed();
    assert!(line.contains("--blockdev"), "{line:?}");
    let want = format!(
        "Could not open '{}': No such file or directory",
        path.display()
    );
    assert!(line.ends_with(&want), "{line:?} does not end with {want:?}");
}

/// What the program printed on stderr after its name and ": ".
fn after_program_name(run: &Finished, program: &str) -> String {
    let prefix = format!("{program}: ");
    run.stderr
        .strip_prefix(&prefix)
        .unwrap_or_else(|| panic!("stderr does not start with {prefix:?}: {run:?}"))
        .to_string()
}

#[test]
fn errors_quote_the_failing_option_as_qsd_does() {
    // (arguments, the option as quoted, the message, whether qsd's message
    // is the same).  Every kind of option, keyval and JSON, the '=' and
    // abbreviated spellings, and errors found while parsing and while
    // setting up.
    let cases: &[(&[&str], &str, &str, bool)] = &[
        (
            &[
                "--blockdev",
                "driver=null-co,node-name=f0",
                "--blockdev",
                "driver=null-co,node-name=f1",
                "--blockdev",
                "driver=null-co,node-name=f0",
            ],
            "--blockdev driver=null-co,node-name=f0",
            "Duplicate nodes with node-name='f0'",
            true,
        ),
        (
            &[
                "--blockdev",
                r#"{"driver": "null-co", "node-name": "f0"}"#,
                "--blockdev",
                r#"{"driver": "null-co", "node-name": "f0"}"#,
            ],
            r#"--blockdev {"driver": "null-co", "node-name": "f0"}"#,
            "Duplicate nodes with node-name='f0'",
            true,
        ),
        (
            &[
                "--blockdev=null-co,node-name=f0",
                "--block",
                "null-co,node-name=f0",
            ],
            "--block null-co,node-name=f0",
            "Duplicate nodes with node-name='f0'",
            true,
        ),
        (
            &["--blockdev", "driver=file,=x"],
            "--blockdev driver=file,=x",
            "Invalid parameter ''",
            true,
        ),
        (
            &["--blockdev", "file,node-name=f,filename={dir}/missing.img"],
            "--blockdev file,node-name=f,filename={dir}/missing.img",
            "Could not open '{dir}/missing.img': No such file or directory",
            true,
        ),
        (
            &[
                "--export",
                "vhost-user-blk,id=e0,node-name=nope,addr.type=unix,addr.path={dir}/vu.sock",
            ],
            "--export vhost-user-blk,id=e0,node-name=nope,addr.type=unix,addr.path={dir}/vu.sock",
            "Cannot find device='' nor node-name='nope'",
            true,
        ),
        (
            &[
                "--export",
                r#"{"type": "vhost-user-blk", "id": "e0", "node-name": "nope", "addr": {"type": "unix", "path": "{dir}/vu.sock"}}"#,
            ],
            r#"--export {"type": "vhost-user-blk", "id": "e0", "node-name": "nope", "addr": {"type": "unix", "path": "{dir}/vu.sock"}}"#,
            "Cannot find device='' nor node-name='nope'",
            true,
        ),
        (
            &["--export=type=vhost-user-blk,=x"],
            "--export=type=vhost-user-blk,=x",
            "Invalid parameter ''",
            true,
        ),
        (
            &["--object", "iothread,id=io0", "--object", "iothread,id=io0"],
            "--object iothread,id=io0",
            "attempt to add duplicate property 'io0' to object (type 'container')",
            true,
        ),
        (
            &["--object", r#"{"qom-type": "frob", "id": "x"}"#],
            r#"--object {"qom-type": "frob", "id": "x"}"#,
            "Parameter 'qom-type' does not accept value 'frob'",
            true,
        ),
        (
            &["--chardev", "bogus,id=c"],
            "--chardev bogus,id=c",
            "'bogus' is not a valid char driver name",
            true,
        ),
        (
            // qsd: "duplicate yank instance".
            &[
                "--chardev",
                "socket,id=c0,path={dir}/a.sock,server=on,wait=off",
                "--chardev",
                "socket,id=c0,path={dir}/b.sock,server=on,wait=off",
            ],
            "--chardev socket,id=c0,path={dir}/b.sock,server=on,wait=off",
            "Chardev 'c0' already exists",
            false,
        ),
        (
            // Binding fails at the --chardev in both, though vubd binds
            // when it sets up the monitor.
            &[
                "--chardev",
                "socket,id=m,path={dir}/no/such/dir/m.sock,server=on,wait=off",
                "--monitor",
                "m",
            ],
            "--chardev socket,id=m,path={dir}/no/such/dir/m.sock,server=on,wait=off",
            "Failed to bind socket to {dir}/no/such/dir/m.sock: No such file or directory",
            true,
        ),
        (
            &["--monitor", "chardev=nope"],
            "--monitor chardev=nope",
            "chardev \"nope\" not found",
            true,
        ),
        (
            &["--monitor", r#"{"chardev": "nope"}"#],
            r#"--monitor {"chardev": "nope"}"#,
            "chardev \"nope\" not found",
            true,
        ),
        (
            &[
                "--chardev",
                "socket,id=c0,path={dir}/a.sock,server=on,wait=off",
                "--monitor",
                "c0",
                "--monitor",
                "c0",
            ],
            "--monitor c0",
            "chardev 'c0' is already in use",
            true,
        ),
        (
            // qsd checks the address first: "Parameter 'addr.host' is
            // missing".
            &["--nbd-server", "addr.type=inet"],
            "--nbd-server addr.type=inet",
            "not supported; vubd serves only vhost-user-blk exports",
            false,
        ),
    ];
    let with_qsd = qsd_available();
    if !with_qsd {
        eprintln!("qemu-storage-daemon is not on PATH: checking vubd's messages only");
    }
    for (args, origin, message, qsd_same) in cases {
        let dir = TempDir::new("vubd-cli");
        let dir_text = dir.path().to_str().unwrap();
        let want = format!("{origin}: {message}\n").replace("{dir}", dir_text);
        let vubd = run_to_exit(dir.path(), args);
        vubd.assert_failed();
        assert_eq!(after_program_name(&vubd, "vubd"), want, "{args:?}");
        if !with_qsd {
            continue;
        }
        let dir = TempDir::new("vubd-cli");
        let dir_text = dir.path().to_str().unwrap();
        let want = format!("{origin}: {message}\n").replace("{dir}", dir_text);
        let qsd = run_flavor_to_exit(Flavor::Qsd, dir.path(), args);
        assert_eq!(qsd.status.code(), Some(1), "qsd {args:?}: {qsd:?}");
        let qsd_text = after_program_name(&qsd, "qemu-storage-daemon");
        if *qsd_same {
            assert_eq!(qsd_text, want, "qsd {args:?}");
        } else {
            let quoted = format!("{origin}: ").replace("{dir}", dir_text);
            assert!(qsd_text.starts_with(&quoted), "qsd {args:?}: {qsd_text:?}");
        }
    }
}

#[test]
fn serve_errors_name_the_image_or_the_monitor_socket() {
    let dir = TempDir::new("vubd-cli");
    let run = run_to_exit(
        dir.path(),
        &["serve", "{dir}/missing.img", "--socket", "{dir}/vu.sock"],
    );
    let image = dir.path().join("missing.img");
    assert_eq!(
        run.assert_failed(),
        format!(
            "vubd: serve {0}: Could not open '{0}': No such file or directory",
            image.display()
        )
    );

    qemu_img_create(&dir.path().join("disk.img"), "raw", MIB);
    let run = run_to_exit(
        dir.path(),
        &[
            "serve",
            "{dir}/disk.img",
            "--socket",
            "{dir}/vu.sock",
            "--monitor-socket",
            "{dir}/none/qmp.sock",
        ],
    );
    let socket = dir.path().join("none/qmp.sock");
    assert_eq!(
        run.assert_failed(),
        format!(
            "vubd: serve --monitor-socket {0}: Failed to bind socket to {0}: \
             No such file or directory",
            socket.display()
        )
    );
}

// --- image locks --------------------------------------------------------

/// qemu-io keeping an image open read-write (as a qcow2 image, so that it
/// refuses to share writing) until dropped.
struct QemuIoHolder {
    child: std::process::Child,
}

impl QemuIoHolder {
    fn open_qcow2(path: &Path) -> QemuIoHolder {
        let mut child = Command::new("qemu-io")
            .args(["-f", "qcow2"])
            .arg(path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("cannot run qemu-io");
        // qemu-io opens the image, then prompts for commands.
        let mut stdout = child.stdout.take().unwrap();
        let mut seen = Vec::new();
        let mut byte = [0u8; 1];
        while !seen.ends_with(b"qemu-io> ") {
            match stdout.read(&mut byte) {
                Ok(1) => seen.push(byte[0]),
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("qemu-io did not open {}", path.display());
                }
            }
        }
        QemuIoHolder { child }
    }
}

impl Drop for QemuIoHolder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn lock_conflict_at_startup_asks_whether_another_process_uses_the_image() {
    let dir = TempDir::new("vubd-cli");
    let image = dir.path().join("disk.qcow2");
    qemu_img_create(&image, "qcow2", MIB);
    let _holder = QemuIoHolder::open_qcow2(&image);
    let hint = format!("Is another process using the image [{}]?", image.display());

    let export = "vhost-user-blk,id=e0,node-name=r0,addr.type=unix,\
                  addr.path={dir}/vu.sock,writable=on";
    let args = [
        "--blockdev",
        "file,node-name=f0,filename={dir}/disk.qcow2",
        "--blockdev",
        "raw,node-name=r0,file=f0",
        "--export",
        export,
    ];
    let quoted = format!("--export {export}").replace("{dir}", dir.path().to_str().unwrap());
    let first = format!("{quoted}: Failed to get \"write\" lock");
    let run = run_to_exit(dir.path(), &args);
    assert_eq!(run.status.code(), Some(1), "{run:?}");
    assert_eq!(run.stderr, format!("vubd: {first}\n{hint}\n"));
    if qsd_available() {
        // qsd words the error the same, but at --export it loses the
        // hint line (QEMU adds the hint after creating the error, and
        // qsd's --export makes every error fatal at creation); its
        // --blockdev of a format node, qemu-io and qemu-img print it.
        let qsd = run_flavor_to_exit(Flavor::Qsd, dir.path(), &args);
        assert_eq!(qsd.status.code(), Some(1), "{qsd:?}");
        assert_eq!(
            qsd.stderr.lines().next(),
            Some(format!("qemu-storage-daemon: {first}").as_str())
        );
    }

    // The short form, told to serve the file's bytes.
    let run = run_to_exit(
        dir.path(),
        &[
            "serve",
            "{dir}/disk.qcow2",
            "--format",
            "raw",
            "--socket",
            "{dir}/vu.sock",
        ],
    );
    assert_eq!(run.status.code(), Some(1), "{run:?}");
    assert_eq!(
        run.stderr,
        format!(
            "vubd: serve {}: Failed to get \"write\" lock\n{hint}\n",
            image.display()
        )
    );
    assert!(!dir.path().join("vu.sock").exists(), "socket left behind");
}

#[test]
fn lock_conflict_over_qmp_has_no_hint_as_in_qsd() {
    // QEMU never puts hints in QMP replies; the desc is the error alone.
    let flavors: &[Flavor] = if qsd_available() {
        &[Flavor::Vubd, Flavor::Qsd]
    } else {
        &[Flavor::Vubd]
    };
    for &flavor in flavors {
        let d = Daemon::with_flavor(flavor, &[]).monitor().start();
        let image = d.dir().join("disk.qcow2");
        qemu_img_create(&image, "qcow2", MIB);
        let _holder = QemuIoHolder::open_qcow2(&image);
        let mut qmp = d.qmp();
        for node in [
            json!({"driver": "file", "node-name": "f0", "filename": image}),
            json!({"driver": "raw", "node-name": "r0", "file": "f0"}),
        ] {
            assert_eq!(
                qmp.execute("blockdev-add", node),
                json!({"return": {}}),
                "{flavor:?}"
            );
        }
        let reply = qmp.execute(
            "block-export-add",
            json!({"type": "vhost-user-blk", "id": "e0", "node-name": "r0",
                   "writable": true,
                   "addr": {"type": "unix", "path": d.dir().join("vu.sock")}}),
        );
        assert_error(&reply, "GenericError", "Failed to get \"write\" lock");
    }
}

// --- option syntax ------------------------------------------------------

#[test]
fn blockdev_json_form_gives_the_same_nodes_as_keyval() {
    let d = start_ready(
        &[
            "--blockdev",
            "file,node-name=kf,filename={dir}/disk.img,read-only=on,\
             cache.no-flush=on,detect-zeroes=on,aio=threads",
            "--blockdev",
            r#"{"driver": "file", "node-name": "jf", "filename": "{dir}/disk.img",
                "read-only": true, "cache": {"no-flush": true},
                "detect-zeroes": "on", "aio": "threads"}"#,
            "--blockdev",
            "raw,node-name=kr,file=kf,offset=4096,size=65536,read-only=on",
            "--blockdev",
            r#"{"driver": "raw", "node-name": "jr", "file": "jf",
                "offset": 4096, "size": 65536, "read-only": true}"#,
            "--chardev",
            "socket,id=m,path={dir}/qmp.sock,server=on,wait=off",
            "--monitor",
            "chardev=m",
        ],
        &[("disk.img", MIB)],
    );
    let mut qmp = qmp_at(&d);
    let nodes = named_nodes(&mut qmp);
    let without_name = |name: &str| {
        let mut n = nodes
            .get(name)
            .unwrap_or_else(|| panic!("no node {name} in {nodes:?}"))
            .clone();
        n.as_object_mut().unwrap().remove("node-name");
        n
    };
    // The options took effect (so the comparison is not of two defaults).
    let kf = without_name("kf");
    assert_eq!(kf["ro"], true);
    assert_eq!(kf["cache"]["no-flush"], true);
    assert_eq!(kf["detect_zeroes"], "on");
    assert_eq!(without_name("kr")["image"]["virtual-size"], 65536);
    assert_eq!(kf, without_name("jf"));
    assert_eq!(without_name("kr"), without_name("jr"));
}

#[test]
fn keyval_double_comma_is_a_comma_in_a_filename() {
    let d = start_ready(
        &[
            "--blockdev",
            "file,node-name=f0,filename={dir}/a,,b.img",
            "--chardev",
            "socket,id=m,path={dir}/qmp.sock,server=on,wait=off",
            "--monitor",
            "chardev=m",
        ],
        &[("a,b.img", 3 * MIB)],
    );
    let path = d.dir().join("a,b.img");
    let mut qmp = qmp_at(&d);
    let nodes = named_nodes(&mut qmp);
    let f0 = &nodes["f0"];
    assert_eq!(f0["file"], path.to_str().unwrap());
    assert_eq!(f0["image"]["filename"], path.to_str().unwrap());
    assert_eq!(
        f0["image"]["virtual-size"],
        qemu_img_info(&path)["virtual-size"]
    );
}

#[test]
fn int_members_refuse_size_suffixes() {
    let dir = TempDir::new("vubd-cli");
    qemu_img_create(&dir.path().join("disk.img"), "raw", MIB);
    // null-co's size and raw's offset are 'int' in QEMU's schema, not
    // 'size'.  qsd: "--blockdev null-co,node-name=n0,size=1M: Parameter
    // 'size' expects integer".
    let cases: [(&[&str], &str); 2] = [
        (
            &["--blockdev", "null-co,node-name=n0,size=1M"],
            "Parameter 'size' expects integer",
        ),
        (
            &[
                "--blockdev",
                "file,node-name=f0,filename={dir}/disk.img",
                "--blockdev",
                "raw,node-name=r0,file=f0,offset=4K",
            ],
            "Parameter 'offset' expects integer",
        ),
    ];
    for (args, want) in cases {
        let run = run_to_exit(dir.path(), args);
        let line = run.assert_failed();
        assert!(line.contains("--blockdev"), "{line:?}");
        assert!(line.ends_with(want), "{line:?} does not end with {want:?}");
    }
}

#[test]
fn int_member_takes_a_plain_integer() {
    let d = start_ready(
        &[
            "--blockdev",
            "null-co,node-name=n0,size=1048576",
            "--chardev",
            "socket,id=m,path={dir}/qmp.sock,server=on,wait=off",
            "--monitor",
            "chardev=m",
        ],
        &[],
    );
    let mut qmp = qmp_at(&d);
    assert_eq!(named_nodes(&mut qmp)["n0"]["image"]["virtual-size"], MIB);
}

#[test]
fn size_member_takes_a_suffix() {
    // logical-block-size is a 'size': 4K means 4096, which the device
    // shows as its block size.
    let d = start_ready(
        &[
            "--blockdev",
            "null-co,node-name=n0,size=1048576",
            "--export",
            "vhost-user-blk,id=e0,node-name=n0,addr.type=unix,\
             addr.path={dir}/vu.sock,logical-block-size=4K",
        ],
        &[],
    );
    let device = probe_device(&d.dir().join("vu.sock"));
    assert_eq!(device.blk_size(), 4096);
    assert_eq!(device.capacity(), MIB / 512);
}

#[test]
fn size_member_with_a_bad_suffix_is_refused() {
    let dir = TempDir::new("vubd-cli");
    let run = run_to_exit(
        dir.path(),
        &[
            "--blockdev",
            "null-co,node-name=n0",
            "--export",
            "vhost-user-blk,id=e0,node-name=n0,addr.type=unix,\
             addr.path={dir}/vu.sock,logical-block-size=4X",
        ],
    );
    let line = run.assert_failed();
    assert!(line.contains("--export"), "{line:?}");
    assert!(line.contains("'logical-block-size'"), "{line:?}");
    assert!(!dir.path().join("vu.sock").exists(), "socket left behind");
}

#[test]
fn size_member_with_a_bad_suffix_is_refused_in_qemu_words() {
    let dir = TempDir::new("vubd-cli");
    let run = run_to_exit(
        dir.path(),
        &[
            "--blockdev",
            "null-co,node-name=n0",
            "--export",
            "vhost-user-blk,id=e0,node-name=n0,addr.type=unix,\
             addr.path={dir}/vu.sock,logical-block-size=4X",
        ],
    );
    // qsd: "--export vhost-user-blk,...,logical-block-size=4X: Parameter
    // 'logical-block-size' expects size" (QERR_INVALID_PARAMETER_VALUE
    // with "size", from qobject_input_type_size_keyval).
    let line = run.assert_failed();
    assert!(
        line.ends_with("Parameter 'logical-block-size' expects size"),
        "{line:?}"
    );
}

// --- objects ------------------------------------------------------------

#[test]
fn object_iothread_is_created() {
    let d = start_ready(
        &[
            "--object",
            "iothread,id=io0",
            "--chardev",
            "socket,id=m,path={dir}/qmp.sock,server=on,wait=off",
            "--monitor",
            "chardev=m",
        ],
        &[],
    );
    let mut qmp = qmp_at(&d);
    // The id is taken: adding it again fails as in QEMU.
    let reply = qmp.execute("object-add", json!({"qom-type": "iothread", "id": "io0"}));
    assert_error(
        &reply,
        "GenericError",
        "attempt to add duplicate property 'io0' to object (type 'container')",
    );
    assert_eq!(
        qmp.execute("object-del", json!({"id": "io0"})),
        json!({"return": {}})
    );
}

#[test]
fn object_iothread_takes_qemus_polling_properties() {
    let d = start_ready(
        &[
            "--object",
            "iothread,id=io0,poll-max-ns=100000,poll-grow=4,poll-shrink=2",
            "--object",
            "iothread,id=io1,poll-max-ns=0",
            "--chardev",
            "socket,id=m,path={dir}/qmp.sock,server=on,wait=off",
            "--monitor",
            "chardev=m",
        ],
        &[],
    );
    let mut qmp = qmp_at(&d);
    let reply = qmp.execute(
        "object-add",
        json!({"qom-type": "iothread", "id": "io2", "poll-max-ns": 50000, "poll-grow": 0, "poll-shrink": 0}),
    );
    assert_eq!(reply, json!({"return": {}}));
    // As in QEMU, a negative value is refused, naming the property.
    for name in ["poll-max-ns", "poll-grow", "poll-shrink"] {
        let reply = qmp.execute(
            "object-add",
            json!({"qom-type": "iothread", "id": "io3", name: -1}),
        );
        assert_error(
            &reply,
            "GenericError",
            &format!("{name} value must be in range [0, 9223372036854775807]"),
        );
    }
}

#[test]
fn object_iothread_with_a_negative_polling_property_is_refused() {
    // qsd: "--object iothread,id=io0,poll-grow=-2: poll-grow value must be
    // in range [0, 9223372036854775807]"
    let dir = TempDir::new("vubd-cli");
    let run = run_to_exit(dir.path(), &["--object", "iothread,id=io0,poll-grow=-2"]);
    let line = run.assert_failed();
    assert!(line.contains("--object"), "{line:?}");
    assert!(
        line.ends_with("poll-grow value must be in range [0, 9223372036854775807]"),
        "{line:?}"
    );
}

#[test]
fn object_throttle_group_with_a_bad_limit_is_refused_as_qsd_does() {
    let dir = TempDir::new("vubd-cli");
    let run = run_to_exit(
        dir.path(),
        &["--object", "throttle-group,id=t0,x-bps-total=-5"],
    );
    let line = run.assert_failed();
    assert!(
        line.ends_with(
            "--object throttle-group,id=t0,x-bps-total=-5: Property values cannot be negative"
        ),
        "{line:?}"
    );
}

// --- the serve short form -----------------------------------------------

/// `vubd serve disk.img --socket vu.sock --monitor-socket qmp.sock`
/// (plus `extra`), ready.
fn serve(extra: &[&str]) -> Daemon {
    let mut args = vec![
        "serve",
        "{dir}/disk.img",
        "--socket",
        "{dir}/vu.sock",
        "--monitor-socket",
        "{dir}/qmp.sock",
    ];
    args.extend_from_slice(extra);
    start_ready(&args, &[("disk.img", 2 * MIB)])
}

#[test]
fn serve_exports_a_raw_node_over_a_file_node() {
    let d = serve(&[]);
    let image = d.dir().join("disk.img");
    let socket = d.dir().join("vu.sock");
    let meta = std::fs::symlink_metadata(&socket).expect("no vhost-user socket");
    assert!(meta.file_type().is_socket());
    let mut qmp = qmp_at(&d);
    let nodes = named_nodes(&mut qmp);
    let mut names: Vec<&str> = nodes.keys().map(String::as_str).collect();
    names.sort_unstable();
    assert_eq!(names, ["disk0", "disk0-file"]);
    let (file, raw) = (&nodes["disk0-file"], &nodes["disk0"]);
    assert_eq!(file["drv"], "file");
    assert_eq!(raw["drv"], "raw");
    for n in [file, raw] {
        assert_eq!(n["file"], image.to_str().unwrap());
        assert_eq!(n["ro"], false);
        assert_eq!(n["image"]["virtual-size"], 2 * MIB);
    }
    let reply = qmp.execute("query-block-exports", Value::Null);
    assert_eq!(
        assert_return(&reply),
        &json!([{"id": "disk0", "type": "vhost-user-blk",
                 "node-name": "disk0", "shutting-down": false}])
    );
    let device = probe_device(&socket);
    assert_eq!(device.features & VIRTIO_BLK_F_RO, 0, "export is read-only");
    assert_eq!(device.capacity(), 2 * MIB / 512);
}

#[test]
fn serve_readonly_makes_nodes_and_export_read_only() {
    let d = serve(&["--readonly"]);
    let mut qmp = qmp_at(&d);
    let nodes = named_nodes(&mut qmp);
    assert_eq!(nodes["disk0-file"]["ro"], true);
    assert_eq!(nodes["disk0"]["ro"], true);
    let reply = qmp.execute("query-block-exports", Value::Null);
    assert_eq!(assert_return(&reply)[0]["node-name"], "disk0");
    let device = probe_device(&d.dir().join("vu.sock"));
    assert_ne!(
        device.features & VIRTIO_BLK_F_RO,
        0,
        "export is writable: features {:#x}",
        device.features
    );
}

/// Creates `name` in `dir` with `qemu-img create -f format [options]`.
fn qemu_img_create_with(dir: &Path, name: &str, format: &str, extra: &[&str]) -> PathBuf {
    let path = dir.join(name);
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", format])
        .args(extra)
        .arg(&path)
        .arg("1M")
        .output()
        .expect("cannot run qemu-img");
    assert!(
        out.status.success(),
        "qemu-img create -f {format} {extra:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    path
}

#[test]
fn serve_without_format_refuses_images_that_name_their_format() {
    let dir = TempDir::new("vubd-cli");
    // (file, format qemu-img writes, its options, the format named).
    let images: &[(&str, &str, &[&str], &str)] = &[
        ("a.qcow2", "qcow2", &[], "qcow2"),
        ("a.qcow", "qcow", &[], "qcow"),
        (
            "a.luks",
            "luks",
            &[
                "--object",
                "secret,id=sec0,data=secret",
                "-o",
                "key-secret=sec0,iter-time=10",
            ],
            "luks",
        ),
        ("sparse.vmdk", "vmdk", &[], "vmdk"),
        // A text descriptor with its data in a separate file.
        (
            "flat.vmdk",
            "vmdk",
            &["-o", "subformat=monolithicFlat"],
            "vmdk",
        ),
        ("a.vhdx", "vhdx", &[], "vhdx"),
        ("a.vdi", "vdi", &[], "vdi"),
        // A dynamic VHD starts with a copy of its footer; a fixed one
        // has it only at the end.
        ("dynamic.vhd", "vpc", &[], "vpc"),
        ("fixed.vhd", "vpc", &["-o", "subformat=fixed"], "vpc"),
        ("a.qed", "qed", &[], "qed"),
    ];
    for (name, format, extra, named) in images {
        let path = qemu_img_create_with(dir.path(), name, format, extra);
        let before = std::fs::read(&path).unwrap();
        let image = format!("{{dir}}/{name}");
        let run = run_to_exit(dir.path(), &["serve", &image, "--socket", "{dir}/vu.sock"]);
        let line = run.assert_failed();
        let want = format!(
            "vubd: serve {}: the file looks like a {named} image",
            path.display()
        );
        assert!(
            line.starts_with(&want),
            "{line:?} does not start with {want:?}"
        );
        assert!(
            line.ends_with("--format raw to export its bytes as they are"),
            "{line:?}"
        );
        assert!(
            !dir.path().join("vu.sock").exists(),
            "{name}: socket left behind"
        );
        assert_eq!(std::fs::read(&path).unwrap(), before, "{name} changed");
    }
}

#[test]
fn serve_format_raw_exports_a_formatted_file_s_bytes() {
    let builder = Daemon::with_flavor(
        Flavor::Vubd,
        &[
            "serve",
            "{dir}/disk.qcow2",
            "--format",
            "raw",
            "--socket",
            "{dir}/vu.sock",
            "--monitor-socket",
            "{dir}/qmp.sock",
        ],
    )
    .pidfile();
    let image = builder.dir().join("disk.qcow2");
    qemu_img_create(&image, "qcow2", MIB);
    let file_len = std::fs::metadata(&image).unwrap().len();
    let d = builder.start();
    let mut qmp = qmp_at(&d);
    let nodes = named_nodes(&mut qmp);
    assert_eq!(nodes["disk0"]["drv"], "raw");
    assert_eq!(nodes["disk0"]["image"]["virtual-size"], file_len);
    let device = probe_device(&d.dir().join("vu.sock"));
    assert_eq!(device.capacity(), file_len / 512);
}

#[test]
fn serve_format_qcow2_serves_the_disk_the_image_holds() {
    let builder = Daemon::with_flavor(
        Flavor::Vubd,
        &[
            "serve",
            "{dir}/disk.qcow2",
            "--format",
            "qcow2",
            "--socket",
            "{dir}/vu.sock",
            "--monitor-socket",
            "{dir}/qmp.sock",
        ],
    )
    .pidfile();
    qemu_img_create(&builder.dir().join("disk.qcow2"), "qcow2", 3 * MIB);
    let d = builder.start();
    let mut qmp = qmp_at(&d);
    let nodes = named_nodes(&mut qmp);
    assert_eq!(nodes["disk0"]["drv"], "qcow2");
    assert_eq!(nodes["disk0"]["image"]["virtual-size"], 3 * MIB);
    let device = probe_device(&d.dir().join("vu.sock"));
    // The guest sees the virtual disk, not the file's bytes.
    assert_eq!(device.capacity(), 3 * MIB / 512);
}
