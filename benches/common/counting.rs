//! A counting global allocator. The includer declares it:
//!
//! ```ignore
//! #[global_allocator]
//! static ALLOC: counting::Counting = counting::Counting;
//! ```
//!
//! Counts are per thread, so a test harness or another thread allocating at the same time
//! does not spoil them.
#![allow(dead_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use http::Response;
use tower::Service;

use super::{drive, request, Req};

pub struct Counting;

thread_local! {
    // `const` and without destructor: reading it never allocates.
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
    static REALLOCS: Cell<u64> = const { Cell::new(0) };
    static BYTES: Cell<u64> = const { Cell::new(0) };
}

fn bump(cell: &'static std::thread::LocalKey<Cell<u64>>, by: u64) {
    // `try_with`: the thread may be tearing down its locals.
    let _ = cell.try_with(|c| c.set(c.get() + by));
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        bump(&ALLOCS, 1);
        bump(&BYTES, layout.size() as u64);
        System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        bump(&ALLOCS, 1);
        bump(&BYTES, layout.size() as u64);
        System.alloc_zeroed(layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        bump(&REALLOCS, 1);
        bump(&BYTES, new_size.saturating_sub(layout.size()) as u64);
        System.realloc(ptr, layout, new_size)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Counts {
    /// Calls to `alloc`/`alloc_zeroed`.
    pub allocs: u64,
    /// Calls to `realloc`.
    pub reallocs: u64,
    /// Bytes asked for (growth only, for `realloc`).
    pub bytes: u64,
}

fn now() -> Counts {
    Counts {
        allocs: ALLOCS.with(Cell::get),
        reallocs: REALLOCS.with(Cell::get),
        bytes: BYTES.with(Cell::get),
    }
}

/// Per-request averages.
#[derive(Debug, Clone, Copy)]
pub struct PerRequest {
    pub allocs: f64,
    pub reallocs: f64,
    pub bytes: f64,
}

/// Sends `warm_up` requests, then counts what `n` more allocate on this thread, from
/// `poll_ready` to the response dropped. Building each request is not counted.
pub fn per_request<S, ResB>(svc: &mut S, warm_up: usize, n: usize) -> PerRequest
where
    S: Service<Req, Response = Response<ResB>>,
    S::Error: std::fmt::Debug,
{
    for _ in 0..warm_up {
        drop(drive(svc, request()));
    }
    let mut total = Counts::default();
    for _ in 0..n {
        let req = request();
        let before = now();
        drop(drive(svc, req));
        let after = now();
        total.allocs += after.allocs - before.allocs;
        total.reallocs += after.reallocs - before.reallocs;
        total.bytes += after.bytes - before.bytes;
    }
    let n = n as f64;
    PerRequest {
        allocs: total.allocs as f64 / n,
        reallocs: total.reallocs as f64 / n,
        bytes: total.bytes as f64 / n,
    }
}
