//! Storage for the futures of multi-step requests, recycled per thread.
//!
//! A task's future is written into a block taken from a free list of its
//! size class and the block goes back to the list when the task ends, so a
//! thread that has run a request of some shape once runs the next ones
//! without touching the allocator. Futures larger than the largest class
//! (or aligned beyond a cache line) get an allocation of their own.

use std::alloc::{alloc, dealloc, handle_alloc_error, Layout};
use std::future::Future;
use std::pin::Pin;
use std::ptr::NonNull;

/// Block sizes; a future takes the smallest that holds it.
const CLASSES: [usize; 6] = [128, 256, 512, 1024, 2048, 4096];
/// Alignment of every pooled block: a cache line.
const ALIGN: usize = 64;
/// Free blocks kept per class; more are returned to the allocator.
const KEEP: usize = 1024;

type Fut = dyn Future<Output = i32>;

/// A task's future in a pooled block (or an allocation of its own). It is
/// only ever dropped through [`TaskBox::drop_future`] and freed through
/// [`BoxPool::recycle`]; forgetting one leaks it.
pub(crate) struct TaskBox {
    ptr: NonNull<Fut>,
    /// The size class, or None for an allocation with `layout`.
    class: Option<usize>,
    layout: Layout,
    live: bool,
}

impl TaskBox {
    /// The future, pinned: its block does not move until recycled.
    pub(crate) fn as_mut(&mut self) -> Pin<&mut Fut> {
        // SAFETY: `ptr` points to a live future written by `BoxPool::store`
        // (or a leaked box), owned by this TaskBox alone; the memory is not
        // moved or freed before `recycle`, which consumes the TaskBox.
        unsafe { Pin::new_unchecked(self.ptr.as_mut()) }
    }

    /// Drops the future (once; later calls do nothing). The memory stays
    /// until [`BoxPool::recycle`].
    pub(crate) fn drop_future(&mut self) {
        if std::mem::take(&mut self.live) {
            // SAFETY: the block holds a live future written by `store`;
            // `live` makes this the only drop.
            unsafe { std::ptr::drop_in_place(self.ptr.as_ptr()) };
        }
    }
}

#[derive(Default)]
pub(crate) struct BoxPool {
    free: [Vec<NonNull<u8>>; CLASSES.len()],
    /// Blocks taken from the allocator so far (tests check reuse).
    allocated: usize,
}

fn layout(class: usize) -> Layout {
    // Every class is a power of two no smaller than the alignment.
    Layout::from_size_align(CLASSES[class], ALIGN).unwrap_or(Layout::new::<[u8; 64]>())
}

impl BoxPool {
    /// Moves `f` into a block of its class.
    pub(crate) fn store<F: Future<Output = i32> + 'static>(&mut self, f: F) -> TaskBox {
        let size = std::mem::size_of::<F>();
        let class = CLASSES
            .iter()
            .position(|&c| size <= c)
            .filter(|_| std::mem::align_of::<F>() <= ALIGN);
        let (block, layout) = match class.and_then(|c| self.free[c].pop().map(|b| (b, c))) {
            Some((b, c)) => (b, layout(c)),
            None => {
                let l = class.map_or(Layout::new::<F>(), layout);
                // A zero-sized future still gets a byte, to be freed alike.
                let l = if l.size() == 0 {
                    Layout::from_size_align(1, l.align()).unwrap_or(l)
                } else {
                    l
                };
                // SAFETY: the layout has a non-zero size.
                let p = unsafe { alloc(l) };
                self.allocated += 1;
                (NonNull::new(p).unwrap_or_else(|| handle_alloc_error(l)), l)
            }
        };
        let typed = block.as_ptr() as *mut F;
        // SAFETY: the block is at least `size` bytes, aligned for F (a
        // class block to ALIGN, which is at least F's alignment, or F's own
        // layout), and holds no live value.
        unsafe { typed.write(f) };
        let fat: *mut Fut = typed;
        TaskBox {
            // SAFETY: derived from a non-null block pointer.
            ptr: unsafe { NonNull::new_unchecked(fat) },
            class,
            layout,
            live: true,
        }
    }

    /// Drops the future if that was not done yet, and keeps its block for
    /// the next one.
    pub(crate) fn recycle(&mut self, mut t: TaskBox) {
        t.drop_future();
        let block = t.ptr.cast::<u8>();
        match t.class {
            Some(c) if self.free[c].len() < KEEP => self.free[c].push(block),
            // SAFETY: the block came from `alloc` with this layout.
            _ => unsafe { dealloc(block.as_ptr(), t.layout) },
        }
    }

    /// Blocks taken from the allocator since the pool was made.
    pub(crate) fn allocated(&self) -> usize {
        self.allocated
    }
}

impl Drop for BoxPool {
    fn drop(&mut self) {
        for (class, list) in self.free.iter_mut().enumerate() {
            for block in list.drain(..) {
                // SAFETY: every free block came from `alloc` with this
                // class's layout and holds no live value.
                unsafe { dealloc(block.as_ptr(), layout(class)) };
            }
        }
    }
}
