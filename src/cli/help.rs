//! The usage texts printed by `vubd --help` (or `vubd help`) and by
//! `vubd serve --help` (or `vubd help serve`).

/// Usage text listing every option, each with an example.
#[must_use]
pub fn help_text() -> &'static str {
    USAGE
}

/// Usage text of the `serve` short form.
#[must_use]
pub fn serve_help_text() -> &'static str {
    SERVE_USAGE
}

const USAGE: &str = "\
Usage: vubd [options]
       vubd serve IMAGE --socket PATH [serve options]
       vubd help [serve]

vubd exports disk images to virtual machines over vhost-user-blk.  Its
command line follows qemu-storage-daemon's: definitions are processed in
the order given, so define things before referring to them.  Option
arguments use QEMU's key=value,... syntax (write ',,' for a comma inside a
value, 'a.b=...' for nested members) or a JSON object starting with '{'.
Long options may be written '--opt VALUE' or '--opt=VALUE'.

General options:
  -h, --help               show this text and exit
  -V, --version            show the version and exit
  -T, --trace PATTERN      accepted for compatibility; ignored with a warning
  --pidfile PATH           write the process id to PATH once start-up is
                           complete (before clients are accepted)
                             --pidfile /run/vubd.pid
  --daemonize              run in the background; the parent exits when
                           start-up has succeeded or failed
                             --daemonize

Definitions:
  --blockdev [driver=]DRIVER,node-name=NAME[,read-only=on|off][,...]
                           add a block node; the first word is the driver
                             --blockdev file,node-name=f0,filename=disk.qcow2
                             --blockdev qcow2,node-name=d0,file=f0
                             --blockdev driver=raw,node-name=r0,file.driver=file,file.filename=a.img
  --export [type=]vhost-user-blk,id=ID,node-name=NAME,addr.type=unix,
           addr.path=SOCKET[,writable=on|off][,num-queues=N]
           [,logical-block-size=BYTES]
                           serve a block node on a vhost-user socket
                             --export vhost-user-blk,id=e0,node-name=d0,addr.type=unix,addr.path=/run/vm0.sock,writable=on
  --object [qom-type=]TYPE,id=ID[,property=value...]
                           create an object, e.g. an I/O thread or a secret
                             --object iothread,id=io0
  --chardev socket,id=ID,path=PATH,server=on[,wait=off]
                           create a Unix socket for a monitor; only listening
                           sockets with a path are supported (wait=on, the
                           default, holds start-up until a client connects)
                             --chardev socket,id=qmp0,path=/run/vubd-qmp.sock,server=on,wait=off
  --monitor [chardev=]ID[,mode=control][,pretty=on|off]
                           serve QMP on the chardev ID
                             --monitor chardev=qmp0

Short form (details: vubd serve --help):
  vubd serve IMAGE --socket PATH [--format raw|qcow2] [--readonly]
             [--num-queues N] [--monitor-socket PATH]
             [--pidfile PATH] [--daemonize]
                           export one image; the format is raw unless
                           --format says otherwise (it is never guessed,
                           and an image whose header names another format
                           is refused without --format)
                             vubd serve disk.qcow2 --format qcow2 --socket /run/vm0.sock
                             vubd serve base.img --readonly --socket /run/vm1.sock --monitor-socket /run/vm1-qmp.sock
                           is the same as:
                             --blockdev driver=file,node-name=disk0-file,filename=IMAGE
                             --blockdev driver=FORMAT,node-name=disk0,file=disk0-file
                             --export type=vhost-user-blk,id=disk0,node-name=disk0,addr.type=unix,addr.path=PATH,writable=on
                             --chardev socket,id=monitor0,path=MPATH,server=on,wait=off
                             --monitor chardev=monitor0
                           (--readonly adds read-only=on to both nodes and
                           makes the export writable=off)

Example:
  vubd --blockdev file,node-name=f0,filename=disk.qcow2 \\
       --blockdev qcow2,node-name=d0,file=f0 \\
       --export vhost-user-blk,id=e0,node-name=d0,addr.type=unix,addr.path=/run/vm0.sock,writable=on \\
       --chardev socket,id=qmp0,path=/run/vubd-qmp.sock,server=on,wait=off \\
       --monitor qmp0
";

const SERVE_USAGE: &str = "\
Usage: vubd serve IMAGE --socket PATH [options]

Exports one disk image to virtual machines on a vhost-user-blk socket.  It
is a short form of vubd's long options (shown below) for the everyday case.

Options:
  --socket PATH            listen for the vhost-user frontend on the Unix
                           socket PATH (required)
  --format raw|qcow2       the image's format.  Without --format the image
                           is served as raw, except that a file whose header
                           says it is in another format (qcow2, qcow, luks,
                           vmdk, vhdx, vdi, vpc or qed) is refused: exporting
                           its bytes as a writable disk would let the guest
                           overwrite the image's metadata.  --format raw
                           exports such a file's bytes on purpose.
  --readonly               open the image read-only and export a read-only
                           disk
  --num-queues N           number of request queues, 1 to 65535 (default 1)
  --monitor-socket PATH    serve QMP on a Unix socket at PATH
  --pidfile PATH           write the process id to PATH once serving
  --daemonize              run in the background; the parent exits once
                           start-up has succeeded or failed
  -h, --help               show this text and exit

Examples:
  vubd serve disk.img --socket /run/vm0.sock
  vubd serve base.img --readonly --num-queues 4 --socket /run/vm1.sock \\
       --monitor-socket /run/vm1-qmp.sock

'vubd serve IMAGE --socket PATH --monitor-socket MPATH' is the same as:
  vubd --blockdev driver=file,node-name=disk0-file,filename=IMAGE \\
       --blockdev driver=raw,node-name=disk0,file=disk0-file \\
       --export type=vhost-user-blk,id=disk0,node-name=disk0,addr.type=unix,addr.path=PATH,writable=on \\
       --chardev socket,id=monitor0,path=MPATH,server=on,wait=off \\
       --monitor chardev=monitor0
with driver=FORMAT for --format FORMAT, and with --readonly, read-only=on
on both nodes and writable=off on the export.  Errors name the part of the
serve command line they concern, e.g. 'vubd: serve IMAGE: ...'.
";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn help_mentions_every_option_and_the_serve_form() {
        let text = help_text();
        for option in [
            "--help",
            "--version",
            "--trace",
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
            assert!(text.contains(option), "help lacks {option}");
        }
    }

    #[test]
    fn serve_help_mentions_every_serve_option() {
        let text = serve_help_text();
        for option in [
            "--socket",
            "--format",
            "--readonly",
            "--num-queues",
            "--monitor-socket",
            "--pidfile",
            "--daemonize",
            "--help",
        ] {
            assert!(text.contains(option), "serve help lacks {option}");
        }
    }

    #[test]
    fn serve_help_examples_parse() {
        for example in [
            "vubd serve disk.img --socket /run/vm0.sock",
            "vubd serve base.img --readonly --num-queues 4 --socket /run/vm1.sock \
             --monitor-socket /run/vm1-qmp.sock",
        ] {
            let args: Vec<String> = example
                .split_whitespace()
                .skip(1)
                .map(str::to_string)
                .collect();
            assert!(super::super::parse_args(args).is_ok(), "{example}");
        }
    }

    #[test]
    fn help_examples_parse() {
        // Every example line of the long form is accepted by the parser.
        let args: Vec<String> = [
            "--blockdev",
            "file,node-name=f0,filename=disk.qcow2",
            "--blockdev",
            "qcow2,node-name=d0,file=f0",
            "--export",
            "vhost-user-blk,id=e0,node-name=d0,addr.type=unix,addr.path=/run/vm0.sock,writable=on",
            "--object",
            "iothread,id=io0",
            "--chardev",
            "socket,id=qmp0,path=/run/vubd-qmp.sock,server=on,wait=off",
            "--monitor",
            "chardev=qmp0",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert!(super::super::parse_args(args).is_ok());
    }
}
