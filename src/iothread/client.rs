//! The built-in client of an I/O thread: the one source of requests whose
//! hooks the loop calls directly, on every round, with no call through a
//! pointer (the loop is generic over it). The vhost-user queues are that
//! client on vubd's threads; everything else a thread serves (sockets,
//! timers, closures, tasks) goes through the handlers of [`super::Ctx`],
//! which cost nothing until their descriptor fires.

use super::Ctx;
use crate::io::{Completion, IoContext};

/// What the loop asks of its built-in client. The hooks that run per
/// round or per spin of polling take only the I/O context and must be
/// cheap; those that may change what the loop watches take the whole
/// [`Ctx`].
pub trait Client: Default + 'static {
    /// Control messages other threads send it (through
    /// [`super::Thread::send`]).
    type Msg: Send + 'static;

    /// Handles one control message.
    fn message(&mut self, ctx: &mut Ctx, msg: Self::Msg);

    /// A descriptor it watches ([`Ctx::watch`]) under `token` became
    /// readable; true when that means new work (a kick).
    fn event(&mut self, token: u64) -> bool;

    /// Work is waiting to be taken at once (a kick or a batch left over).
    fn has_deferred(&self) -> bool;

    /// Something is held back and wants another look shortly (a drain).
    fn held(&self) -> bool;

    /// The loop woke up: what was held back is looked at again.
    fn release_held(&mut self);

    /// Polling's look for new work: a few loads from shared memory, no
    /// system call. True marks the work as to be taken.
    fn peek(&mut self) -> bool;

    /// Completions reaped while polling left answers to send out.
    fn wants_notify(&self) -> bool;

    /// The thread is about to sleep: turn notifications back on and look
    /// once more; true when work showed up meanwhile.
    fn arm(&mut self) -> bool;

    /// Takes the work found and starts its I/O on `io` (submitted by the
    /// loop afterwards).
    fn process(&mut self, io: &mut IoContext);

    /// One of its operations completed (tags with bit 61 clear are its).
    fn complete(&mut self, io: &mut IoContext, c: Completion);

    /// A round's completions were handled: send out answers, finish what
    /// was waiting for its requests to end.
    fn round_done(&mut self, ctx: &mut Ctx);
}

/// No built-in client: a thread that serves only handlers, closures and
/// tasks.
impl Client for () {
    type Msg = ();

    fn message(&mut self, _ctx: &mut Ctx, _msg: ()) {}

    fn event(&mut self, _token: u64) -> bool {
        false
    }

    fn has_deferred(&self) -> bool {
        false
    }

    fn held(&self) -> bool {
        false
    }

    fn release_held(&mut self) {}

    fn peek(&mut self) -> bool {
        false
    }

    fn wants_notify(&self) -> bool {
        false
    }

    fn arm(&mut self) -> bool {
        false
    }

    fn process(&mut self, _io: &mut IoContext) {}

    fn complete(&mut self, _io: &mut IoContext, c: Completion) {
        log::error!("completion {:#x} with no client to take it", c.tag);
    }

    fn round_done(&mut self, _ctx: &mut Ctx) {}
}
