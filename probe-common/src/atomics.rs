//! The atomic operations shared state is updated with ([`Atomics`]), and
//! their userspace implementations: [`CoreAtomics`] (threads, and memory
//! shared with the kernel) and [`Plain`] (one thread). The eBPF program
//! implements the trait with BPF atomics. Depends on nothing else in the
//! crate.

/// The atomic operations the shared-state variants need. The eBPF program
/// implements them with BPF atomics; userspace with `core::sync::atomic`;
/// [`Plain`] with ordinary loads and stores (one thread only).
pub trait Atomics {
    /// `*p += v`, atomically.
    ///
    /// # Safety
    /// `p` must be valid and 8-byte aligned.
    unsafe fn add_u64(&self, p: *mut u64, v: u64);
    /// If `*p == old` then `*p = new`, atomically; returns the value `*p`
    /// had before (so the swap happened iff it equals `old`). A full
    /// barrier (it takes [`crate::update`]'s lock).
    ///
    /// # Safety
    /// `p` must be valid and 4-byte aligned.
    unsafe fn cas_u32(&self, p: *mut u32, old: u32, new: u32) -> u32;
    /// `*p = v`, atomically, returning the old value; a full barrier (it
    /// releases [`crate::update`]'s lock, so no store may move past it).
    ///
    /// # Safety
    /// `p` must be valid and 4-byte aligned.
    unsafe fn xchg_u32(&self, p: *mut u32, v: u32) -> u32;

    /// Releases the lock word `*p` (1 → 0) that [`Atomics::try_lock`] or
    /// [`Atomics::cas_u32`] took: every load and store before it happens
    /// before the next holder's. The default is [`Atomics::xchg_u32`], a
    /// full barrier; a release store is enough, and much cheaper.
    ///
    /// # Safety
    /// `p` must be valid and 4-byte aligned, and the lock held by the
    /// caller.
    #[inline(always)]
    unsafe fn unlock(&self, p: *mut u32) {
        // SAFETY: caller's contract.
        unsafe { self.xchg_u32(p, 0) };
    }

    /// `*p += v` (wrapping), atomically, with a full barrier. The default
    /// loops on [`Atomics::cas_u32`]; the eBPF program overrides it with one
    /// atomic add.
    ///
    /// # Safety
    /// `p` must be valid and 4-byte aligned.
    unsafe fn add_u32(&self, p: *mut u32, v: u32) {
        loop {
            // SAFETY: caller's contract.
            let cur = unsafe { core::ptr::read_volatile(p) };
            // SAFETY: as above.
            if unsafe { self.cas_u32(p, cur, cur.wrapping_add(v)) } == cur {
                return;
            }
        }
    }

    /// Takes the lock word `*p` (0 → 1) within `spins` tries; false if it
    /// stayed taken. The eBPF program overrides it with `bpf_loop`, whose
    /// body the verifier walks once instead of once per try.
    ///
    /// # Safety
    /// `p` must be valid and 4-byte aligned.
    #[inline(always)]
    unsafe fn try_lock(&self, p: *mut u32, spins: u32) -> bool {
        for _ in 0..spins {
            // SAFETY: caller's contract.
            if unsafe { self.cas_u32(p, 0, 1) } == 0 {
                return true;
            }
        }
        false
    }
}

/// [`Atomics`] over `core::sync::atomic`: userspace threads, and userspace
/// beside the kernel on memory they share (the mmapped connection table).
/// Not on the BPF target, whose `core` has no such atomics (the eBPF
/// program has its own implementation).
#[cfg(not(target_arch = "bpf"))]
pub struct CoreAtomics;

#[cfg(not(target_arch = "bpf"))]
impl Atomics for CoreAtomics {
    #[inline(always)]
    unsafe fn add_u64(&self, p: *mut u64, v: u64) {
        // SAFETY: caller's contract (valid, 8-byte aligned).
        unsafe { core::sync::atomic::AtomicU64::from_ptr(p) }
            .fetch_add(v, core::sync::atomic::Ordering::SeqCst);
    }
    #[inline(always)]
    unsafe fn cas_u32(&self, p: *mut u32, old: u32, new: u32) -> u32 {
        use core::sync::atomic::Ordering::SeqCst;
        // SAFETY: caller's contract (valid, 4-byte aligned).
        match unsafe { core::sync::atomic::AtomicU32::from_ptr(p) }
            .compare_exchange(old, new, SeqCst, SeqCst)
        {
            Ok(v) | Err(v) => v,
        }
    }
    #[inline(always)]
    unsafe fn xchg_u32(&self, p: *mut u32, v: u32) -> u32 {
        // SAFETY: as above.
        unsafe { core::sync::atomic::AtomicU32::from_ptr(p) }
            .swap(v, core::sync::atomic::Ordering::SeqCst)
    }
    #[inline(always)]
    unsafe fn unlock(&self, p: *mut u32) {
        // SAFETY: as above.
        unsafe { core::sync::atomic::AtomicU32::from_ptr(p) }
            .store(0, core::sync::atomic::Ordering::Release);
    }
    #[inline(always)]
    unsafe fn add_u32(&self, p: *mut u32, v: u32) {
        // SAFETY: as above.
        unsafe { core::sync::atomic::AtomicU32::from_ptr(p) }
            .fetch_add(v, core::sync::atomic::Ordering::SeqCst);
    }
}

/// [`Atomics`] for memory no one else touches (tests, single thread).
pub struct Plain;

impl Atomics for Plain {
    #[inline(always)]
    unsafe fn add_u64(&self, p: *mut u64, v: u64) {
        // SAFETY: caller's contract.
        unsafe { *p = (*p).wrapping_add(v) };
    }
    #[inline(always)]
    unsafe fn cas_u32(&self, p: *mut u32, old: u32, new: u32) -> u32 {
        // SAFETY: caller's contract.
        unsafe {
            let cur = *p;
            if cur == old {
                *p = new;
            }
            cur
        }
    }
    #[inline(always)]
    unsafe fn xchg_u32(&self, p: *mut u32, v: u32) -> u32 {
        // SAFETY: caller's contract.
        unsafe { core::mem::replace(&mut *p, v) }
    }
}
