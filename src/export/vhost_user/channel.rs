//! The backend channel (BACKEND_REQ): messages from vubd to the frontend.
//! vubd sends CONFIG_CHANGE_MSG there when a disk is resized, so a running
//! guest sees its new capacity.
//!
//! The `vhost` crate hands the channel to a backend only wrapped in a type
//! that cannot send this message, so vubd keeps its own copy of the socket:
//! before the message that carries it (SET_BACKEND_REQ_FD) is read, its
//! header is peeked, which duplicates the attached descriptor into vubd.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;
use vhost::vhost_user::message::{BackendReq, FrontendReq};

/// VHOST_USER_VERSION in the flags of every message.
const VERSION: u32 = 0x1;
/// The flag asking for a reply (REPLY_ACK).
const NEED_REPLY: u32 = 0x8;
/// How long the frontend may take to acknowledge.
const ACK_TIMEOUT: Duration = Duration::from_secs(5);

pub struct BackendChannel {
    sock: UnixStream,
    reply_ack: bool,
}

impl BackendChannel {
    /// Sends CONFIG_CHANGE_MSG and, when acknowledgements were negotiated,
    /// waits for the frontend's answer.
    pub fn config_changed(&mut self) -> std::io::Result<()> {
        self.discard_stale_replies()?;
        let flags = VERSION | if self.reply_ack { NEED_REPLY } else { 0 };
        // The header: request, flags, payload size (none), little-endian.
        let request: u32 = BackendReq::CONFIG_CHANGE_MSG.into();
        let mut hdr = [0u8; 12];
        hdr[0..4].copy_from_slice(&request.to_le_bytes());
        hdr[4..8].copy_from_slice(&flags.to_le_bytes());
        self.sock.write_all(&hdr)?;
        if !self.reply_ack {
            return Ok(());
        }
        self.sock.set_read_timeout(Some(ACK_TIMEOUT))?;
        let mut reply = [0u8; 12 + 8];
        self.sock
            .read_exact(&mut reply)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                    std::io::Error::other(format!(
                        "no acknowledgement within {} s",
                        ACK_TIMEOUT.as_secs()
                    ))
                }
                _ => e,
            })?;
        let status = u64::from_le_bytes([
            reply[12], reply[13], reply[14], reply[15], reply[16], reply[17], reply[18], reply[19],
        ]);
        if status == 0 {
            Ok(())
        } else {
            Err(std::io::Error::other(format!("frontend answered {status}")))
        }
    }
}

impl BackendChannel {
    /// Drops answers to earlier messages that came after their wait ended,
    /// so they are not taken for the answer to the next one.
    fn discard_stale_replies(&mut self) -> std::io::Result<()> {
        self.sock.set_nonblocking(true)?;
        let mut buf = [0u8; 256];
        let result = loop {
            match self.sock.read(&mut buf) {
                Ok(0) => break Err(std::io::Error::from(std::io::ErrorKind::BrokenPipe)),
                Ok(n) => log::debug!("backend channel: dropped {n} stale bytes"),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => break Err(e),
            }
        };
        self.sock.set_nonblocking(false)?;
        result
    }
}

/// Looks at the next message on `conn` without taking it; if it is
/// SET_BACKEND_REQ_FD, returns a duplicate of the socket it carries.
pub fn peek_backend_channel(conn: RawFd, reply_ack: bool) -> Option<BackendChannel> {
    let mut hdr = [0u8; 12];
    let mut iov = libc::iovec {
        iov_base: hdr.as_mut_ptr() as *mut libc::c_void,
        iov_len: hdr.len(),
    };
    // Room for a few descriptors; the message carries one.
    let mut cmsg_buf = [0u64; 16];
    // SAFETY: msghdr is plain data; zeroed is a valid empty value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg_buf.as_mut_ptr() as *mut libc::c_void;
    msg.msg_controllen = std::mem::size_of_val(&cmsg_buf);
    // SAFETY: every pointer in `msg` refers to live local buffers of the
    // stated sizes; MSG_PEEK leaves the message on the socket.
    let n = unsafe { libc::recvmsg(conn, &mut msg, libc::MSG_PEEK | libc::MSG_CMSG_CLOEXEC) };
    if n < 12 {
        return None;
    }
    let fds = received_fds(&msg);
    let request = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
    let wanted: u32 = FrontendReq::SET_BACKEND_REQ_FD.into();
    if request != wanted {
        // Peeking duplicated the message's descriptors; ours close here.
        return None;
    }
    let fd = fds.into_iter().next()?;
    Some(BackendChannel {
        sock: UnixStream::from(fd),
        reply_ack,
    })
}

/// The descriptors a received message carried, owned.
fn received_fds(msg: &libc::msghdr) -> Vec<OwnedFd> {
    let mut out = Vec::new();
    // SAFETY: CMSG_FIRSTHDR/CMSG_NXTHDR walk the control buffer that
    // recvmsg filled, within msg_controllen.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(msg) };
    while !cmsg.is_null() {
        // SAFETY: `cmsg` points at a complete header inside the buffer.
        let (level, kind, len) =
            unsafe { ((*cmsg).cmsg_level, (*cmsg).cmsg_type, (*cmsg).cmsg_len) };
        if level == libc::SOL_SOCKET && kind == libc::SCM_RIGHTS {
            // SAFETY: CMSG_LEN(0) is the header size, a constant.
            let header = unsafe { libc::CMSG_LEN(0) } as usize;
            let count = len.saturating_sub(header) / std::mem::size_of::<RawFd>();
            // SAFETY: CMSG_DATA points at `count` descriptors the kernel
            // installed in this process for us.
            let data = unsafe { libc::CMSG_DATA(cmsg) } as *const RawFd;
            for i in 0..count {
                // SAFETY: as above; each descriptor is new and ours to own.
                let fd = unsafe { std::ptr::read_unaligned(data.add(i)) };
                // SAFETY: `fd` was just installed for us and nothing else
                // refers to it.
                out.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
        // SAFETY: advancing within the same control buffer.
        cmsg = unsafe { libc::CMSG_NXTHDR(msg, cmsg) };
    }
    out
}

/// Whether `conn` has a message waiting within `timeout`.
pub fn readable(conn: &impl AsRawFd, timeout_ms: i32) -> bool {
    let mut pfd = libc::pollfd {
        fd: conn.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll on one valid pollfd.
    unsafe { libc::poll(&mut pfd, 1, timeout_ms) > 0 }
}
