use super::*;
use serde_json::json;

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

/// The origins of the definitions.
fn origins(inv: &Invocation) -> Vec<&str> {
    inv.items.iter().map(|d| d.origin.as_str()).collect()
}

/// Whether two invocations set up the same things (wherever they came
/// from).
fn same_setup(a: &Invocation, b: &Invocation) -> bool {
    items(a) == items(b)
        && a.pidfile == b.pidfile
        && a.daemonize == b.daemonize
        && a.warnings == b.warnings
}

#[test]
fn no_arguments_is_an_empty_run() {
    assert_eq!(run(&[]), Invocation::default());
}

#[test]
fn blockdev_uses_implied_driver() {
    let inv = run(&["--blockdev", "file,node-name=f0,filename=a.img"]);
    assert_eq!(
        items(&inv),
        [CliItem::Blockdev(keyval(
            json!({"driver": "file", "node-name": "f0", "filename": "a.img"})
        ))]
    );
}

#[test]
fn export_uses_implied_type_and_object_implied_qom_type() {
    let inv = run(&[
        "--export",
        "vhost-user-blk,id=e,node-name=n,addr.type=unix,addr.path=/s",
        "--object",
        "iothread,id=io0",
    ]);
    assert_eq!(
        items(&inv),
        [
            CliItem::Export(keyval(json!({
                "type": "vhost-user-blk", "id": "e", "node-name": "n",
                "addr": {"type": "unix", "path": "/s"}
            }))),
            CliItem::Object(keyval(json!({"qom-type": "iothread", "id": "io0"}))),
        ]
    );
}

#[test]
fn json_arguments_are_kept_as_json() {
    let inv = run(&[
        "--blockdev",
        r#"{"driver": "null-co", "node-name": "n", "size": 4096}"#,
    ]);
    assert_eq!(
        items(&inv),
        [CliItem::Blockdev(OptionValue::Json(
            json!({"driver": "null-co", "node-name": "n", "size": 4096})
        ))]
    );
}

#[test]
fn equals_form_matches_separate_form() {
    let a = run(&[
        "--blockdev=file,node-name=f,filename=x=y",
        "--pidfile=/p",
        "--daemonize",
    ]);
    let b = run(&[
        "--blockdev",
        "file,node-name=f,filename=x=y",
        "--pidfile",
        "/p",
        "--daemonize",
    ]);
    assert!(same_setup(&a, &b), "{a:?} and {b:?}");
    assert_eq!(a.pidfile, Some(PathBuf::from("/p")));
    assert!(a.daemonize);
}

#[test]
fn items_keep_command_line_order() {
    let inv = run(&[
        "--chardev",
        "socket,id=c,path=/q,server=on,wait=off",
        "--blockdev",
        "file,node-name=f,filename=a",
        "--monitor",
        "c",
        "--object",
        "iothread,id=io",
        "--export",
        "vhost-user-blk,id=e",
        "--blockdev",
        "raw,node-name=r,file=f",
    ]);
    let kinds: Vec<&str> = inv
        .items
        .iter()
        .map(|d| match d.item {
            CliItem::Blockdev(_) => "blockdev",
            CliItem::Export(_) => "export",
            CliItem::Object(_) => "object",
            CliItem::Chardev(_) => "chardev",
            CliItem::Monitor(_) => "monitor",
            CliItem::RefuseFormatted(_) => "refuse-formatted",
        })
        .collect();
    assert_eq!(
        kinds,
        ["chardev", "blockdev", "monitor", "object", "export", "blockdev"]
    );
}

#[test]
fn chardev_and_monitor_items() {
    let inv = run(&[
        "--chardev",
        "socket,id=qmp,path=/run/q.sock,server=on,wait=off",
        "--monitor",
        "chardev=qmp,pretty=on",
    ]);
    assert_eq!(
        items(&inv),
        [
            CliItem::Chardev(ChardevSpec {
                id: "qmp".into(),
                path: "/run/q.sock".into(),
                server: true,
                wait: false,
            }),
            CliItem::Monitor(MonitorSpec {
                id: None,
                chardev: "qmp".into(),
                pretty: true,
            }),
        ]
    );
}

#[test]
fn option_prefixes_are_accepted_like_getopt_long() {
    let a = run(&["--block", "file,node-name=f,filename=a", "--daem"]);
    let b = run(&["--blockdev", "file,node-name=f,filename=a", "--daemonize"]);
    assert!(same_setup(&a, &b), "{a:?} and {b:?}");
}

#[test]
fn origins_are_the_options_as_typed() {
    // As qsd shows them: the option and its argument joined by a space,
    // or the single argument of the '=' and attached forms.
    let inv = run(&[
        "--blockdev",
        "null-co,node-name=a",
        "--blockdev=null-co,node-name=b",
        "--block",
        r#"{"driver": "null-co", "node-name": "c"}"#,
        "--chardev",
        "socket,id=m,path=/q,server=on,wait=off",
        "--monitor=m",
        "--object",
        "iothread,id=io0",
        "--export",
        "vhost-user-blk,id=e,node-name=a,addr.type=unix,addr.path=/s",
    ]);
    assert_eq!(
        origins(&inv),
        [
            "--blockdev null-co,node-name=a",
            "--blockdev=null-co,node-name=b",
            r#"--block {"driver": "null-co", "node-name": "c"}"#,
            "--chardev socket,id=m,path=/q,server=on,wait=off",
            "--monitor=m",
            "--object iothread,id=io0",
            "--export vhost-user-blk,id=e,node-name=a,addr.type=unix,addr.path=/s",
        ]
    );
}

#[test]
fn help_and_version() {
    assert_eq!(parse_args(args(&["-h"])), Ok(Command::Help));
    assert_eq!(parse_args(args(&["--help"])), Ok(Command::Help));
    assert_eq!(parse_args(args(&["-V"])), Ok(Command::Version));
    assert_eq!(parse_args(args(&["--version"])), Ok(Command::Version));
    assert_eq!(parse_args(args(&["-Vh"])), Ok(Command::Version));
}

#[test]
fn help_subcommand() {
    assert_eq!(parse_args(args(&["help"])), Ok(Command::Help));
    assert_eq!(parse_args(args(&["help", "serve"])), Ok(Command::ServeHelp));
    assert_eq!(
        err(&["help", "blockdev"]),
        "help: no help on 'blockdev' (try 'vubd help' or 'vubd help serve')"
    );
    assert_eq!(
        err(&["help", "serve", "more"]),
        "help: no help on 'serve' (try 'vubd help' or 'vubd help serve')"
    );
    // Only as the first argument.
    assert_eq!(err(&["--daemonize", "help"]), "unexpected argument 'help'");
}

#[test]
fn help_wins_over_later_and_argument_errors_but_not_earlier_option_errors() {
    // As in qsd, option arguments and positionals are checked after -h.
    assert_eq!(
        parse_args(args(&["--blockdev", "a,b", "-h"])),
        Ok(Command::Help)
    );
    assert_eq!(parse_args(args(&["stray", "--help"])), Ok(Command::Help));
    assert_eq!(parse_args(args(&["-h", "--bogus"])), Ok(Command::Help));
    assert_eq!(err(&["--bogus", "-h"]), "unrecognized option '--bogus'");
}

#[test]
fn trace_is_ignored_with_a_warning() {
    let inv = run(&["-T", "pat*", "--trace=enable=x", "-Tfoo"]);
    assert!(inv.items.is_empty());
    assert_eq!(
        inv.warnings,
        [
            "-T pat*: ignored, vubd has no trace events",
            "--trace=enable=x: ignored, vubd has no trace events",
            "-Tfoo: ignored, vubd has no trace events",
        ]
    );
}

#[test]
fn chardev_short_form_boolean_warnings_are_reported() {
    let inv = run(&["--chardev", "socket,id=c,path=/q,server,nowait"]);
    assert_eq!(inv.warnings.len(), 2);
    assert!(inv.warnings[0].starts_with(
        "--chardev socket,id=c,path=/q,server,nowait: short-form boolean option 'server'"
    ));
}

#[test]
fn last_pidfile_wins() {
    let inv = run(&["--pidfile", "/a", "--pidfile", "/b"]);
    assert_eq!(inv.pidfile, Some(PathBuf::from("/b")));
}

#[test]
fn option_argument_errors_quote_the_option() {
    assert_eq!(
        err(&["--blockdev", "file,x"]),
        "--blockdev file,x: Expected '=' after parameter 'x'"
    );
    assert_eq!(
        err(&["--blockdev=file,a.1=x"]),
        "--blockdev=file,a.1=x: Parameter 'a.0' missing"
    );
    assert_eq!(
        err(&["--export", "{bad"]).split(',').next(),
        Some("--export {bad: JSON parse error")
    );
    assert_eq!(
        err(&["--obj", "help"]),
        "--obj help: Help is not available for this option"
    );
    assert_eq!(
        err(&["--chardev", "socket,path=/x"]),
        "--chardev socket,path=/x: chardev: no id specified"
    );
    assert_eq!(
        err(&["--monitor", "nope"]),
        "--monitor nope: chardev \"nope\" not found"
    );
    assert_eq!(
        err(&["--monitor", r#"{"chardev": "nope"}"#]),
        r#"--monitor {"chardev": "nope"}: chardev "nope" not found"#
    );
}

#[test]
fn the_failing_one_of_several_options_is_quoted() {
    assert_eq!(
        err(&[
            "--blockdev",
            "null-co,node-name=a",
            "--blockdev",
            "null-co,node-name=b,x",
            "--blockdev",
            "null-co,node-name=c",
        ]),
        "--blockdev null-co,node-name=b,x: Expected '=' after parameter 'x'"
    );
}

#[test]
fn getopt_errors() {
    assert_eq!(err(&["--foo"]), "unrecognized option '--foo'");
    assert_eq!(err(&["--foo=1"]), "unrecognized option '--foo=1'");
    assert_eq!(
        err(&["--pidfile"]),
        "option '--pidfile' requires an argument"
    );
    assert_eq!(
        err(&["--blockdev"]),
        "option '--blockdev' requires an argument"
    );
    assert_eq!(
        err(&["--daemonize=yes"]),
        "option '--daemonize' doesn't allow an argument"
    );
    assert_eq!(err(&["-x"]), "invalid option -- 'x'");
    assert_eq!(err(&["-T"]), "option requires an argument -- 'T'");
}

#[test]
fn an_option_argument_may_start_with_a_dash() {
    let inv = run(&["--pidfile", "-odd"]);
    assert_eq!(inv.pidfile, Some(PathBuf::from("-odd")));
}

#[test]
fn positional_arguments_are_rejected() {
    assert_eq!(err(&["disk.img"]), "unexpected argument 'disk.img'");
    assert_eq!(err(&["-"]), "unexpected argument '-'");
    assert_eq!(
        err(&["--", "--daemonize"]),
        "unexpected argument '--daemonize'"
    );
}

#[test]
fn errors_are_reported_in_command_line_order() {
    assert_eq!(
        err(&["stray", "--blockdev", "file,x"]),
        "unexpected argument 'stray'"
    );
    assert_eq!(
        err(&["--blockdev", "file,x", "stray"]),
        "--blockdev file,x: Expected '=' after parameter 'x'"
    );
}

#[test]
fn monitor_needs_an_earlier_chardev() {
    assert_eq!(
        err(&[
            "--monitor",
            "c",
            "--chardev",
            "socket,id=c,path=/q,server=on"
        ]),
        "--monitor c: chardev \"c\" not found"
    );
}

#[test]
fn monitor_on_a_client_chardev_is_rejected() {
    assert_eq!(
        err(&["--chardev", "socket,id=c,path=/q", "--monitor", "c"]),
        "--monitor c: chardev 'c' is a client socket; vubd monitors only listen (use server=on)"
    );
}

#[test]
fn one_chardev_serves_one_monitor() {
    assert_eq!(
        err(&[
            "--chardev",
            "socket,id=c,path=/q,server=on,wait=off",
            "--monitor",
            "c",
            "--monitor",
            "c"
        ]),
        "--monitor c: chardev 'c' is already in use"
    );
}

#[test]
fn duplicate_chardev_ids_are_rejected() {
    assert_eq!(
        err(&[
            "--chardev",
            "socket,id=c,path=/a,server=on",
            "--chardev",
            "socket,id=c,path=/b,server=on"
        ]),
        "--chardev socket,id=c,path=/b,server=on: Chardev 'c' already exists"
    );
}

#[test]
fn nbd_server_and_empty_pidfile_are_rejected() {
    assert_eq!(
        err(&["--nbd-server", "addr.type=unix,addr.path=/n"]),
        "--nbd-server addr.type=unix,addr.path=/n: not supported; vubd serves only vhost-user-blk exports"
    );
    assert_eq!(
        err(&["--pidfile="]),
        "--pidfile: the path must not be empty"
    );
}

#[test]
fn lookup_long_finds_exact_names_and_prefixes() {
    assert_eq!(
        lookup_long("--export", "--export"),
        Ok(("--export", Opt::Export, true))
    );
    assert_eq!(
        lookup_long("--ex", "--ex"),
        Ok(("--export", Opt::Export, true))
    );
    assert_eq!(
        lookup_long("--", "--=x"),
        Err(CliError::UnrecognizedOption("--=x".into()))
    );
}
