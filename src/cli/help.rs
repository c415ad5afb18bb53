//! The usage text printed by `vubd --help`.

/// Usage text listing every option, each with an example.
#[must_use]
pub fn help_text() -> &'static str {
    USAGE
}

const USAGE: &str = "\
Usage: vubd [options]
       vubd serve IMAGE --socket PATH [serve options]

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

Short form:
  vubd serve IMAGE --socket PATH [--format raw|qcow2] [--readonly]
             [--num-queues N] [--monitor-socket PATH]
             [--pidfile PATH] [--daemonize]
                           export one image; the format is raw unless
                           --format says otherwise (it is never guessed)
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
