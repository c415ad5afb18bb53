//! Per-thread state of drivers and clients: one value per type, kept in
//! the thread's [`super::IoContext`] and created on first use.
//!
//! This is how code running on an I/O thread keeps what belongs to that
//! thread alone (a driver's cache of metadata, a connection table of an
//! NBD server, a throttle group's local bucket) without a lock: whatever
//! holds the context (a node's `submit`, a task through
//! [`super::task::with_state`], an fd handler or closure through the
//! loop's `Ctx`) reaches it. A private type per user is the key, so two
//! drivers never see each other's entry. Nothing is looked up on the
//! request path unless a driver asks for it.

use std::any::{Any, TypeId};
use std::collections::HashMap;

#[derive(Default)]
pub struct StateMap {
    entries: HashMap<TypeId, Box<dyn Any>>,
}

impl StateMap {
    /// The thread's value of type `T`, created with `T::default()` the
    /// first time.
    pub fn get<T: Default + 'static>(&mut self) -> &mut T {
        let entry = self
            .entries
            .entry(TypeId::of::<T>())
            .or_insert_with(|| Box::new(T::default()));
        match entry.downcast_mut::<T>() {
            Some(v) => v,
            // The key is T's own TypeId, so the value is a T.
            None => unreachable!("per-thread state stored under another type's key"),
        }
    }

    /// Takes the thread's value of type `T` out, if there is one.
    pub fn remove<T: 'static>(&mut self) -> Option<T> {
        self.entries
            .remove(&TypeId::of::<T>())
            .and_then(|b| b.downcast::<T>().ok())
            .map(|b| *b)
    }
}
