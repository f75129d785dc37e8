//! The key pool's synchronisation primitives: std's atomics and mutex and arc-swap's
//! `ArcSwap` in every normal build, loom's under `--cfg tkf_loom`, where `scripts/loom.sh`
//! model-checks the pool (`pool::loom_model`).
//!
//! In a normal build these are plain re-exports and a type alias: the pool's request path is
//! compiled from exactly the same types as without this module.
//!
//! `Arc` is not switched: it is std's in both builds. The pool's `Arc`s carry immutable data
//! (labels, fingerprints, a credential) and are shared with types outside the pool
//! (`KeyInUse`); loom's `Arc` would add leak checks and reference-count interleavings that
//! no invariant of the pool depends on, and it has no `Arc<str>`.

#[cfg(not(tkf_loom))]
pub(crate) use std::sync::{
    atomic::{AtomicU32, AtomicU64, AtomicUsize},
    Mutex, MutexGuard,
};

#[cfg(tkf_loom)]
pub(crate) use loom::sync::{
    atomic::{AtomicU32, AtomicU64, AtomicUsize},
    Mutex, MutexGuard,
};

/// A shared value that is read without a lock and replaced whole: `arc_swap::ArcSwap`.
#[cfg(not(tkf_loom))]
pub(crate) type ArcCell<T> = arc_swap::ArcSwap<T>;

/// What `ArcCell::load` returns: a cheap guard that derefs to the `Arc`.
#[cfg(not(tkf_loom))]
pub(crate) type ArcGuard<T> = arc_swap::Guard<std::sync::Arc<T>>;

/// The model's stand-in for `ArcSwap`: loom's `RwLock` around the `Arc`, so that loom sees
/// every load and store of the cell and explores their orders. A load is a read lock held for
/// a clone, as atomic as `ArcSwap::load`; a store a write lock.
#[cfg(tkf_loom)]
pub(crate) struct ArcCell<T>(loom::sync::RwLock<std::sync::Arc<T>>);

#[cfg(tkf_loom)]
pub(crate) type ArcGuard<T> = std::sync::Arc<T>;

#[cfg(tkf_loom)]
impl<T> ArcCell<T> {
    pub(crate) fn from_pointee(value: T) -> Self {
        ArcCell(loom::sync::RwLock::new(std::sync::Arc::new(value)))
    }

    pub(crate) fn load(&self) -> ArcGuard<T> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub(crate) fn store(&self, value: std::sync::Arc<T>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = value;
    }
}
