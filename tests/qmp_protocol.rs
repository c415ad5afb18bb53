//! The QMP protocol as qemu-storage-daemon implements it, checked against
//! vubd.  Run with `VUBD_TEST_BINARY=qsd` to check the tests themselves
//! against the reference daemon.
//!
//! The expected texts below are what qemu-storage-daemon 10.0.2 answered
//! when each case was tried by hand; the comments quote its replies.

mod common;

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const NEGOTIATE_FIRST: &str = "Expecting capabilities negotiation with 'qmp_capabilities'";
const EXIT_TIMEOUT: Duration = Duration::from_secs(5);

/// A daemon with monitor `mon0` and a 64 MiB null-co node `null0`.
fn start() -> Daemon {
    Daemon::vubd(&["--blockdev", "null-co,node-name=null0,size=67108864"])
        .monitor()
        .start()
}

/// A connection to `d` that has not negotiated capabilities yet.
fn connect(d: &Daemon) -> Qmp {
    Qmp::connect(d.qmp_socket()).0
}

#[test]
fn greeting_has_version_and_capabilities() {
    let d = start();
    let (_qmp, greeting) = Qmp::connect(d.qmp_socket());
    // qsd: {"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10},
    //        "package": "Debian 1:10.0.2+ds-2+deb13u1~bpo12+1"},
    //        "capabilities": ["oob"]}}
    let qmp = &greeting["QMP"];
    for part in ["major", "minor", "micro"] {
        assert!(
            qmp["version"]["qemu"][part].is_u64(),
            "version.qemu.{part} in {greeting}"
        );
    }
    assert!(
        qmp["version"]["package"].is_string(),
        "version.package in {greeting}"
    );
    // qsd advertises ["oob"]; a daemon may offer fewer capabilities, but
    // the member is always a list of strings.
    let caps = qmp["capabilities"]
        .as_array()
        .expect("capabilities is a list");
    assert!(
        caps.iter().all(Value::is_string),
        "capabilities in {greeting}"
    );
    let mut bare = greeting.clone();
    bare["QMP"]["capabilities"] = json!([]);
    assert_eq!(
        shape(&bare),
        "{QMP:{capabilities:[],version:{package:str,qemu:{major:int,micro:int,minor:int}}}}"
    );
}

#[test]
fn command_before_capabilities_is_command_not_found() {
    let d = start();
    let mut qmp = connect(&d);
    // qsd: {"error": {"class": "CommandNotFound", "desc": "Expecting
    // capabilities negotiation with 'qmp_capabilities'"}}, for existing and
    // unknown commands alike; an id is echoed.
    let reply = qmp.execute("query-version", Value::Null);
    assert_error(&reply, "CommandNotFound", NEGOTIATE_FIRST);
    let reply = qmp.execute("nope", Value::Null);
    assert_error(&reply, "CommandNotFound", NEGOTIATE_FIRST);
    let reply = qmp.execute_with_id("query-version", Value::Null, json!("early"));
    assert_error(&reply, "CommandNotFound", NEGOTIATE_FIRST);
    assert_eq!(reply["id"], "early");
    // The session is still in negotiation mode afterwards.
    qmp.negotiate();
    assert_return(&qmp.execute("query-version", Value::Null));
}

#[test]
fn qmp_capabilities_twice_is_command_not_found() {
    let d = start();
    let mut qmp = connect(&d);
    qmp.negotiate();
    // qsd: {"error": {"class": "CommandNotFound",
    //        "desc": "Capabilities negotiation is already complete, command ignored"}}
    let reply = qmp.execute("qmp_capabilities", Value::Null);
    assert_error(
        &reply,
        "CommandNotFound",
        "Capabilities negotiation is already complete, command ignored",
    );
}

#[test]
fn unknown_command_is_command_not_found() {
    let d = start();
    let mut qmp = d.qmp();
    // qsd: {"error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}}
    let reply = qmp.execute("nope", Value::Null);
    assert_error(
        &reply,
        "CommandNotFound",
        "The command nope has not been found",
    );
}

#[test]
fn id_is_echoed_on_success_and_error() {
    let d = start();
    let mut qmp = connect(&d);
    // qsd echoes any JSON value as id, unchanged: strings, objects, numbers, null.
    let reply = qmp.execute_with_id("qmp_capabilities", Value::Null, json!({"x": [1]}));
    assert_eq!(reply, json!({"return": {}, "id": {"x": [1]}}));
    for id in [json!("a1"), json!({"x": 1, "y": "z"}), json!(3)] {
        let ok = qmp.execute_with_id("query-version", Value::Null, id.clone());
        assert_return(&ok);
        assert_eq!(ok["id"], id, "id not echoed on success: {ok}");
        let err = qmp.execute_with_id("nope", Value::Null, id.clone());
        assert_error(
            &err,
            "CommandNotFound",
            "The command nope has not been found",
        );
        assert_eq!(err["id"], id, "id not echoed on error: {err}");
    }
}

#[test]
fn broken_json_is_generic_error_and_connection_survives() {
    let d = start();
    let mut qmp = d.qmp();
    // qsd: {"error": {"class": "GenericError", "desc": "JSON parse error, expecting value"}}.
    // The text after the comma comes from QEMU's JSON parser and varies
    // with the fault: "invalid keyword 'foo'" for {"execute": foo},
    // "missing : in object pair" for {"execute" "x"}, "expecting value"
    // for {"a":1,} and for a lone }.  Only the prefix is required here.
    qmp.send_raw("{\"execute\": }\n");
    let reply = qmp.read_reply(REPLY_TIMEOUT);
    assert_error_class(&reply, "GenericError");
    let desc = error_desc(&reply);
    assert!(desc.starts_with("JSON parse error, "), "desc {desc:?}");
    // The stream resynchronises: the next command works.
    assert_return(&qmp.execute("query-version", Value::Null));
}

#[test]
fn non_object_message_is_generic_error() {
    let d = start();
    let mut qmp = d.qmp();
    // qsd: {"error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}}
    // (same for a string); no id is echoed since there is none to take.
    for input in ["[1]\n", "\"str\"\n"] {
        qmp.send_raw(input);
        let reply = qmp.read_reply(REPLY_TIMEOUT);
        assert_error(&reply, "GenericError", "QMP input must be a JSON object");
    }
    assert_return(&qmp.execute("query-version", Value::Null));
}

#[test]
fn execute_member_missing_or_not_string() {
    let d = start();
    let mut qmp = d.qmp();
    // qsd: "QMP input lacks member 'execute'" for {} and {"arguments": {}};
    // "QMP input member 'execute' must be a string" for {"execute": 1}.
    for input in ["{}\n", "{\"arguments\": {}}\n"] {
        qmp.send_raw(input);
        assert_error(
            &qmp.read_reply(REPLY_TIMEOUT),
            "GenericError",
            "QMP input lacks member 'execute'",
        );
    }
    qmp.send_raw("{\"execute\": 1}\n");
    let reply = qmp.read_reply(REPLY_TIMEOUT);
    assert_error(
        &reply,
        "GenericError",
        "QMP input member 'execute' must be a string",
    );
}

#[test]
fn arguments_not_an_object() {
    let d = start();
    let mut qmp = connect(&d);
    // qsd: {"error": {"class": "GenericError",
    //        "desc": "QMP input member 'arguments' must be an object"}};
    // checked before negotiation state and command lookup.
    const DESC: &str = "QMP input member 'arguments' must be an object";
    qmp.send_raw("{\"execute\": \"nope\", \"arguments\": 1}\n");
    assert_error(&qmp.read_reply(REPLY_TIMEOUT), "GenericError", DESC);
    qmp.negotiate();
    for input in [
        "{\"execute\": \"query-version\", \"arguments\": [1]}\n",
        "{\"execute\": \"query-version\", \"arguments\": 5}\n",
    ] {
        qmp.send_raw(input);
        assert_error(&qmp.read_reply(REPLY_TIMEOUT), "GenericError", DESC);
    }
}

#[test]
fn unknown_top_level_member() {
    let d = start();
    let mut qmp = connect(&d);
    // qsd: {"error": {"class": "GenericError", "desc": "QMP input member 'foo' is unexpected"}},
    // also before negotiation and for unknown commands.
    const DESC: &str = "QMP input member 'foo' is unexpected";
    qmp.send_raw("{\"execute\": \"nope\", \"foo\": 1}\n");
    assert_error(&qmp.read_reply(REPLY_TIMEOUT), "GenericError", DESC);
    qmp.negotiate();
    qmp.send_raw("{\"execute\": \"query-version\", \"foo\": 1}\n");
    assert_error(&qmp.read_reply(REPLY_TIMEOUT), "GenericError", DESC);
}

#[test]
fn missing_argument() {
    let d = start();
    let mut qmp = d.qmp();
    // qsd: {"error": {"class": "GenericError", "desc": "Parameter 'size' is missing"}}
    let reply = qmp.execute("block_resize", json!({"node-name": "null0"}));
    assert_error(&reply, "GenericError", "Parameter 'size' is missing");
}

#[test]
fn unexpected_argument() {
    let d = start();
    let mut qmp = d.qmp();
    // qsd: {"error": {"class": "GenericError", "desc": "Parameter 'x' is unexpected"}},
    // for commands with arguments and for those without any.
    let reply = qmp.execute(
        "block_resize",
        json!({"node-name": "null0", "size": 1, "x": 1}),
    );
    assert_error(&reply, "GenericError", "Parameter 'x' is unexpected");
    let reply = qmp.execute("query-version", json!({"x": 1}));
    assert_error(&reply, "GenericError", "Parameter 'x' is unexpected");
}

#[test]
fn wrong_argument_type() {
    let d = start();
    let mut qmp = d.qmp();
    // qsd: {"error": {"class": "GenericError",
    //        "desc": "Invalid parameter type for 'size', expected: integer"}}
    let reply = qmp.execute("block_resize", json!({"node-name": "null0", "size": "big"}));
    assert_error(
        &reply,
        "GenericError",
        "Invalid parameter type for 'size', expected: integer",
    );
}

#[test]
fn two_monitors_have_separate_sessions() {
    let d = Daemon::vubd(&[])
        .named_monitor("mon0")
        .named_monitor("mon1")
        .start();
    let (mut a, _) = Qmp::connect(&d.sockets()[0]);
    let (mut b, _) = Qmp::connect(&d.sockets()[1]);
    a.negotiate();
    // qsd: the second monitor still answers CommandNotFound "Expecting
    // capabilities negotiation with 'qmp_capabilities'".
    assert_error(
        &b.execute("query-version", Value::Null),
        "CommandNotFound",
        NEGOTIATE_FIRST,
    );
    assert_return(&a.execute("query-version", Value::Null));
    b.negotiate();
    assert_return(&b.execute("query-version", Value::Null));
    // Negotiating b did not disturb a.
    assert_error(
        &a.execute("qmp_capabilities", Value::Null),
        "CommandNotFound",
        "Capabilities negotiation is already complete, command ignored",
    );
}

#[test]
fn query_version_shape() {
    let d = start();
    let mut qmp = d.qmp();
    // qsd: {"return": {"qemu": {"micro": 2, "minor": 0, "major": 10},
    //        "package": "Debian 1:10.0.2+ds-2+deb13u1~bpo12+1"}}
    let reply = qmp.execute("query-version", Value::Null);
    assert_eq!(
        shape(&reply),
        "{return:{package:str,qemu:{major:int,micro:int,minor:int}}}"
    );
    // The version matches the greeting's.
    let (_, greeting) = {
        drop(qmp);
        Qmp::connect(d.qmp_socket())
    };
    assert_eq!(greeting["QMP"]["version"], reply["return"]);
}

#[test]
fn query_commands_lists_query_version_and_itself() {
    let d = start();
    let mut qmp = d.qmp();
    // qsd: {"return": [{"name": "object-del"}, ..., {"name": "query-commands"},
    //        {"name": "query-version"}, {"name": "qmp_capabilities"}, ...]}
    // (78 commands in 10.0.2; qmp_capabilities is listed too).
    let reply = qmp.execute("query-commands", Value::Null);
    let list = assert_return(&reply)
        .as_array()
        .expect("query-commands returns a list");
    let names: Vec<&str> = list
        .iter()
        .map(|c| c["name"].as_str().expect("name"))
        .collect();
    for want in [
        "query-version",
        "query-commands",
        "qmp_capabilities",
        "quit",
    ] {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }
    assert_eq!(shape(&list[0]), "{name:str}");
}

#[test]
fn quit_exits_cleanly() {
    let mut d = Daemon::vubd(&[]).monitor().pidfile().start();
    let mut qmp = d.qmp();
    // qsd: {"return": {}}, then EOF, exit status 0, socket and pidfile gone.
    assert_eq!(qmp.execute("quit", Value::Null), json!({"return": {}}));
    assert!(
        qmp.wait_eof(EXIT_TIMEOUT),
        "connection still open after quit"
    );
    let status = d
        .wait_exit(EXIT_TIMEOUT)
        .expect("daemon still running after quit");
    assert_eq!(status.code(), Some(0), "{}", d.describe());
    assert!(!d.qmp_socket().exists(), "monitor socket left behind");
    assert!(!d.pidfile().unwrap().exists(), "pidfile left behind");
}

#[test]
fn sigterm_exits_cleanly() {
    let mut d = Daemon::vubd(&[]).monitor().pidfile().start();
    let mut qmp = d.qmp();
    d.send_signal("TERM");
    // qsd: no event is sent, the connection is closed, exit status 0,
    // socket and pidfile removed.
    assert!(
        qmp.wait_eof(EXIT_TIMEOUT),
        "connection still open after SIGTERM"
    );
    let status = d
        .wait_exit(EXIT_TIMEOUT)
        .expect("daemon still running after SIGTERM");
    assert_eq!(status.code(), Some(0), "{}", d.describe());
    assert!(!d.qmp_socket().exists(), "monitor socket left behind");
    assert!(!d.pidfile().unwrap().exists(), "pidfile left behind");
}

#[test]
fn monitor_socket_is_owner_only() {
    let d = Daemon::vubd(&[]).monitor().start();
    let meta = std::fs::symlink_metadata(d.qmp_socket()).unwrap();
    assert!(meta.file_type().is_socket());
    let mode = meta.permissions().mode() & 0o7777;
    // Connecting to a Unix socket needs write permission on it, so only
    // its owner can connect when group and others lack the w bit.
    // qsd does not chmod its sockets: the mode comes from the umask,
    // srwxr-xr-x (0755) under umask 022, srwxr-x--- (0750) with
    // --daemonize (which sets umask 027).  A strict 0600 check would fail
    // against qsd; what it does guarantee under the usual umask is this:
    assert_eq!(mode & 0o022, 0, "socket mode {mode:o} lets others connect");
    let dir_owner = std::fs::metadata(d.dir()).unwrap().uid();
    assert_eq!(meta.uid(), dir_owner, "socket not owned by the test user");
}

#[test]
fn pidfile_written_before_connections_are_accepted() {
    let mut d = Daemon::vubd(&[]).monitor().pidfile().no_wait().start();
    let path = d.pidfile().unwrap().to_path_buf();
    // qsd documents that the pidfile is written after chardevs and exports
    // are created and that clients may connect once it exists.  The
    // converse does not hold in qsd 10.0.2: its QMP monitor runs in an I/O
    // thread that can accept and send the greeting while the main thread
    // has not written the pidfile yet (seen absent or empty ~0.3 ms after
    // the greeting), so the test follows the documented direction.
    let found = poll_until(Duration::from_secs(10), || {
        read_pidfile(&path).is_some() || !running(&mut d)
    });
    assert!(found && running(&mut d), "no pidfile\n{}", d.describe());
    assert_eq!(
        read_pidfile(&path),
        Some(d.pid()),
        "pidfile does not hold the daemon's pid"
    );
    // No retry: the socket must accept at once.
    let stream =
        UnixStream::connect(d.qmp_socket()).expect("pidfile exists but the socket refuses");
    let mut qmp = Qmp::from_stream(stream);
    let greeting = qmp.read_message(REPLY_TIMEOUT).expect("no greeting");
    assert!(greeting.get("QMP").is_some(), "{greeting}");
    // qsd writes "<pid>\n" with mode 0600.
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        format!("{}\n", d.pid())
    );
}

fn running(d: &mut Daemon) -> bool {
    d.wait_exit(Duration::ZERO).is_none()
}

#[test]
fn daemonize_returns_when_ready() {
    // start() waits for the foreground process to exit with status 0 and
    // then reads the pidfile once, without polling.
    let d = Daemon::vubd(&[]).monitor().daemonize().start();
    let pidfile = d.pidfile().unwrap();
    // qsd: when the foreground process returns, the pidfile holds the
    // daemon's pid and the socket accepts at once.
    let pid = read_pidfile(pidfile)
        .unwrap_or_else(|| panic!("no pidfile after --daemonize\n{}", d.describe()));
    // The pid is a live process running with our command line.
    assert!(
        process_alive(pid),
        "pid {pid} from the pidfile is not running"
    );
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let cmdline = String::from_utf8_lossy(&cmdline);
    assert!(
        cmdline.contains("--daemonize"),
        "pid {pid} runs {cmdline:?}"
    );
    let stream =
        UnixStream::connect(d.qmp_socket()).expect("socket refuses after --daemonize returned");
    let mut qmp = Qmp::from_stream(stream);
    assert!(qmp
        .read_message(REPLY_TIMEOUT)
        .expect("no greeting")
        .get("QMP")
        .is_some());
    // qsd 10.0.2 can drop or double the first exchange on a connection
    // made this early (see wait_ready in tests/common/daemon.rs), so the
    // session itself is only exercised against vubd.
    if d.flavor() != Flavor::Qsd {
        qmp.negotiate();
        assert_return(&qmp.execute("query-version", Value::Null));
    }
    d.send_signal("KILL");
    assert!(d.wait_gone(EXIT_TIMEOUT), "daemon {pid} survived SIGKILL");
}
