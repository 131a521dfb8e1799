//! The `keypool` binary's global allocator: mimalloc, called the way its C API is fastest.
//!
//! mimalloc because a request's memory is often freed by another worker thread than the one
//! that allocated it, and glibc's allocator then takes the other arena's lock; under load that
//! was a `futex` call for most requests (measured with `perf stat`, see the README's
//! performance section). mimalloc frees to the owning thread without a lock. Built without
//! transparent huge pages (`no_thp`): with them an idle gateway held ~18 MiB instead of ~10.
//!
//! Not the `mimalloc` crate's `MiMalloc`: that asks for every block through
//! `mi_malloc_aligned`, whose fast path covers blocks of at most 1 KiB; every larger one (a
//! request's boxed futures, hyper's buffers: about a third of a request's allocations) took
//! mimalloc's generic aligned path, some 120 instructions more per allocation (callgrind). Every
//! mimalloc block is aligned to at least a machine word, since its size classes are whole words,
//! so a layout aligned to a word or less needs nothing beyond plain `mi_malloc`; only larger
//! alignments (tokio's cache-padded task cells) go the aligned way.

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;

use libmimalloc_sys as mi;

/// The alignment every mimalloc block has whatever its size.
const WORD: usize = std::mem::size_of::<usize>();

/// mimalloc as the global allocator (see the module docs).
#[derive(Debug, Clone, Copy, Default)]
pub struct MiMalloc;

// SAFETY: every block handed out comes from mimalloc with at least the layout's size and
// alignment (plain calls only for alignments mimalloc gives every block, see `WORD`), and is
// given back to mimalloc (`mi_free` takes any block, aligned or not). mimalloc is thread-safe.
unsafe impl GlobalAlloc for MiMalloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: plain FFI calls; a null return is passed on as the allocation failure.
        unsafe {
            if layout.align() <= WORD {
                mi::mi_malloc(layout.size()).cast()
            } else {
                mi::mi_malloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as `alloc`.
        unsafe {
            if layout.align() <= WORD {
                mi::mi_zalloc(layout.size()).cast()
            } else {
                mi::mi_zalloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: the caller hands back a block this allocator returned.
        unsafe { mi::mi_free(ptr.cast::<c_void>()) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `ptr` is a block this allocator returned for `layout`; the moved block keeps
        // the alignment the same way a new one gets it.
        unsafe {
            if layout.align() <= WORD {
                mi::mi_realloc(ptr.cast::<c_void>(), new_size).cast()
            } else {
                mi::mi_realloc_aligned(ptr.cast::<c_void>(), new_size, layout.align()).cast()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::MiMalloc;
    use std::alloc::{GlobalAlloc, Layout};

    /// Blocks of every size class up to a few pages, at every alignment up to a page: aligned as
    /// asked, zeroed when asked, their contents kept through a realloc.
    #[test]
    fn blocks_are_aligned_zeroed_and_kept_through_realloc() {
        let a = MiMalloc;
        for align in [1, 2, 4, 8, 16, 32, 64, 128, 4096] {
            for size in [1, 3, 8, 13, 24, 40, 100, 1000, 1025, 5000, 70_000] {
                let layout = Layout::from_size_align(size, align).unwrap();
                // SAFETY (test): layouts of non-zero size; every block is freed once, below.
                unsafe {
                    let p = a.alloc(layout);
                    assert!(!p.is_null());
                    assert_eq!(p as usize % align, 0, "size {size} align {align}");
                    p.write_bytes(0xa5, size);
                    let z = a.alloc_zeroed(layout);
                    assert_eq!(z as usize % align, 0, "zeroed size {size} align {align}");
                    assert!(std::slice::from_raw_parts(z, size).iter().all(|&b| b == 0));
                    a.dealloc(z, layout);
                    let grown = a.realloc(p, layout, size * 3);
                    assert_eq!(grown as usize % align, 0, "realloc size {size} align {align}");
                    assert!(std::slice::from_raw_parts(grown, size).iter().all(|&b| b == 0xa5));
                    a.dealloc(grown, Layout::from_size_align(size * 3, align).unwrap());
                }
            }
        }
    }
}
