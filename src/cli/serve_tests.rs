use std::path::PathBuf;

use serde_json::json;

use super::super::{parse_args, CliItem, Command, Invocation, OptionValue};
use super::{refusal, FormatGuessError};
use crate::block::driver::is_built;
use crate::qapi::BlockdevDriver;

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn run(list: &[&str]) -> Invocation {
    match parse_args(args(list)) {
        Ok(Command::Run(inv)) => inv,
        other => panic!("{list:?} gave {other:?}"),
    }
}

fn err(list: &[&str]) -> String {
    match parse_args(args(list)) {
        Err(e) => e.to_string(),
        Ok(c) => panic!("{list:?} gave {c:?}"),
    }
}

fn keyval(v: serde_json::Value) -> OptionValue {
    OptionValue::Keyval(v)
}

/// The definitions without their origins.
fn items(inv: &Invocation) -> Vec<CliItem> {
    inv.items.iter().map(|d| d.item.clone()).collect()
}

/// The first definition `pick` accepts.
fn find<'a, T>(inv: &'a Invocation, pick: impl Fn(&'a CliItem) -> Option<T>) -> T {
    inv.items
        .iter()
        .find_map(|d| pick(&d.item))
        .unwrap_or_else(|| panic!("not found in {inv:?}"))
}

#[test]
fn minimal_defaults_to_raw_and_writable() {
    let inv = run(&["serve", "disk.img", "--socket", "/run/vm.sock"]);
    assert_eq!(
        items(&inv),
        [
            CliItem::Blockdev(keyval(json!({
                "driver": "file", "node-name": "disk0-file", "filename": "disk.img"
            }))),
            // No --format: the image must not say it is in another one.
            CliItem::RefuseFormatted(PathBuf::from("disk.img")),
            CliItem::Blockdev(keyval(json!({
                "driver": "raw", "node-name": "disk0", "file": "disk0-file"
            }))),
            CliItem::Export(keyval(json!({
                "type": "vhost-user-blk", "id": "disk0", "node-name": "disk0",
                "addr": {"type": "unix", "path": "/run/vm.sock"}, "writable": "on"
            }))),
        ]
    );
    assert_eq!(inv.pidfile, None);
    assert!(!inv.daemonize);
}

#[test]
fn an_explicit_format_is_not_checked() {
    for format in ["raw", "qcow2"] {
        let inv = run(&["serve", "disk.img", "--socket", "/s", "--format", format]);
        assert!(
            !items(&inv)
                .iter()
                .any(|i| matches!(i, CliItem::RefuseFormatted(_))),
            "{inv:?}"
        );
    }
}

#[test]
fn origins_name_the_image_or_the_monitor_socket() {
    let inv = run(&[
        "serve",
        "a,b.img",
        "--socket",
        "/s",
        "--monitor-socket",
        "/m",
    ]);
    let origins: Vec<&str> = inv.items.iter().map(|d| d.origin.as_str()).collect();
    assert_eq!(
        origins,
        [
            "serve a,b.img",
            "serve a,b.img",
            "serve a,b.img",
            "serve a,b.img",
            "serve --monitor-socket /m",
            "serve --monitor-socket /m",
        ]
    );
}

#[test]
fn equals_the_long_form() {
    let short = run(&[
        "serve",
        "--format=qcow2",
        "a.qcow2",
        "--socket=/s",
        "--num-queues",
        "4",
        "--monitor-socket",
        "/m",
        "--pidfile",
        "/p",
        "--daemonize",
    ]);
    let long = run(&[
        "--blockdev",
        "driver=file,node-name=disk0-file,filename=a.qcow2",
        "--blockdev",
        "driver=qcow2,node-name=disk0,file=disk0-file",
        "--export",
        "type=vhost-user-blk,id=disk0,node-name=disk0,addr.type=unix,addr.path=/s,writable=on,num-queues=4",
        "--chardev",
        "socket,id=monitor0,path=/m,server=on,wait=off",
        "--monitor",
        "chardev=monitor0",
        "--pidfile",
        "/p",
        "--daemonize",
    ]);
    assert_eq!(items(&short), items(&long));
    assert_eq!(
        (short.pidfile, short.daemonize),
        (long.pidfile, long.daemonize)
    );
}

#[test]
fn readonly_opens_read_only_and_exports_unwritable() {
    let inv = run(&["serve", "x.img", "--readonly", "--socket", "/s"]);
    let values: Vec<&serde_json::Value> = inv
        .items
        .iter()
        .filter_map(|d| match &d.item {
            CliItem::Blockdev(v) | CliItem::Export(v) => Some(v.value()),
            _ => None,
        })
        .collect();
    assert_eq!(values[0]["read-only"], "on");
    assert_eq!(values[1]["read-only"], "on");
    assert_eq!(values[2]["writable"], "off");
}

#[test]
fn escapes_commas_in_paths() {
    let inv = run(&[
        "serve",
        "a,b.img",
        "--socket",
        "/s,t",
        "--monitor-socket",
        "/m,n",
    ]);
    let file = find(&inv, |i| match i {
        CliItem::Blockdev(v) => Some(v),
        _ => None,
    });
    assert_eq!(file.value()["filename"], "a,b.img");
    let export = find(&inv, |i| match i {
        CliItem::Export(v) => Some(v),
        _ => None,
    });
    assert_eq!(export.value()["addr"]["path"], "/s,t");
    let chardev = find(&inv, |i| match i {
        CliItem::Chardev(c) => Some(c),
        _ => None,
    });
    assert_eq!(chardev.path, PathBuf::from("/m,n"));
    let checked = find(&inv, |i| match i {
        CliItem::RefuseFormatted(p) => Some(p),
        _ => None,
    });
    assert_eq!(checked, &PathBuf::from("a,b.img"));
}

#[test]
fn help() {
    assert_eq!(
        parse_args(args(&["serve", "--help"])),
        Ok(Command::ServeHelp)
    );
    assert_eq!(
        parse_args(args(&["serve", "x", "-h"])),
        Ok(Command::ServeHelp)
    );
}

#[test]
fn errors() {
    assert_eq!(err(&["serve"]), "serve: missing IMAGE argument");
    assert_eq!(
        err(&["serve", "x"]),
        "serve: option '--socket PATH' is required"
    );
    assert_eq!(
        err(&["serve", "x", "y", "--socket", "/s"]),
        "serve: unexpected argument 'y'"
    );
    assert_eq!(
        err(&["serve", "x", "--socket", "/s", "--format", "vmdk"]),
        "serve: unsupported format 'vmdk' (expected raw or qcow2)"
    );
    for bad in ["0", "-1", "x", "65536"] {
        assert_eq!(
            err(&["serve", "x", "--socket", "/s", "--num-queues", bad]),
            format!("serve: --num-queues expects an integer from 1 to 65535, got '{bad}'")
        );
    }
    assert_eq!(
        err(&["serve", "x", "--socket"]),
        "serve: option '--socket' requires an argument"
    );
    assert_eq!(
        err(&["serve", "x", "--socket", "/a", "--socket", "/b"]),
        "serve: option '--socket' given more than once"
    );
    assert_eq!(
        err(&["serve", "x", "--socket="]),
        "serve: option '--socket' needs a non-empty value"
    );
    assert_eq!(
        err(&["serve", "x", "--readonly=yes", "--socket", "/s"]),
        "serve: option '--readonly' doesn't allow an argument"
    );
    assert_eq!(
        err(&["serve", "x", "--blockdev", "y"]),
        "serve: unrecognized option '--blockdev'"
    );
}

#[test]
fn image_may_follow_double_dash() {
    let inv = run(&["serve", "--socket", "/s", "--", "-odd.img"]);
    let file = find(&inv, |i| match i {
        CliItem::Blockdev(v) => Some(v),
        _ => None,
    });
    assert_eq!(file.value()["filename"], "-odd.img");
}

#[test]
fn only_counts_as_first_argument() {
    assert_eq!(
        err(&["--daemonize", "serve"]),
        "unexpected argument 'serve'"
    );
}

#[test]
fn refusals_say_which_flag_to_pass() {
    // vmdk is not a --format choice, so only --format raw is offered.
    let vmdk = refusal(BlockdevDriver::Vmdk);
    assert_eq!(vmdk, FormatGuessError::Unservable("vmdk"));
    assert_eq!(
        vmdk.to_string(),
        "the file looks like a vmdk image, which vubd cannot read yet; \
         pass --format raw to export its bytes as they are"
    );
    // qcow2 is offered as soon as its driver is built.
    let qcow2 = refusal(BlockdevDriver::Qcow2);
    if is_built(BlockdevDriver::Qcow2) {
        assert_eq!(qcow2, FormatGuessError::Servable("qcow2"));
        assert_eq!(
            qcow2.to_string(),
            "the file looks like a qcow2 image; pass --format qcow2 to serve \
             the disk it holds, or --format raw to export its bytes as they are"
        );
    } else {
        assert_eq!(qcow2, FormatGuessError::Unservable("qcow2"));
    }
}
