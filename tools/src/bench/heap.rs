//! The tools' global allocator: mimalloc (as `lapse`), counting per thread the
//! bytes allocated minus the bytes freed, so a benchmark measures exactly the
//! heap a single-threaded step holds (`lapse-tools bench backtest`: the
//! replay's states), rather than resident pages, which the allocator's caching
//! of freed memory blurs.
//!
//! Requested sizes: the allocator's rounding to its size classes (up to 1/8
//! above 64 B, more below) is not in the count. A thread-local `Cell`, not an
//! atomic: a few cycles per allocation, so the speed figures are not changed.

use std::alloc::{GlobalAlloc, Layout};
use std::cell::Cell;

use mimalloc::MiMalloc;

thread_local! {
    static NET: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn count(delta: isize) {
    // `try_with`: never fails for a const-initialised Cell; harmless if it did.
    let _ = NET.try_with(|n| {
        let now = n.get().wrapping_add(delta);
        n.set(now);
        let _ = PEAK.try_with(|p| p.set(p.get().max(now)));
    });
}

/// Bytes this thread has allocated minus those it freed, since it started.
/// Meaningful as a difference over a stretch of single-threaded work.
pub fn thread_net_bytes() -> isize {
    NET.try_with(Cell::get).unwrap_or(0)
}

/// The highest [`thread_net_bytes`] since the last call (which starts a new
/// stretch at the current count).
pub fn thread_peak_bytes() -> isize {
    let now = thread_net_bytes();
    PEAK.try_with(|p| p.replace(now)).unwrap_or(now)
}

/// mimalloc with the per-thread count. Install with `#[global_allocator]`.
pub struct Counting;

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size() as isize);
        unsafe { MiMalloc.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count(layout.size() as isize);
        unsafe { MiMalloc.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        count(-(layout.size() as isize));
        unsafe { MiMalloc.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(new_size as isize - layout.size() as isize);
        unsafe { MiMalloc.realloc(ptr, layout, new_size) }
    }
}
