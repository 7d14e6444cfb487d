//! The allocator's settings for a process that runs for months.

/// Buffers this large or larger get pages of their own, given back when
/// freed.
const MMAP_THRESHOLD: libc::c_int = 256 * 1024;

/// Fixes glibc's mmap threshold. By default it grows to the size of the
/// largest buffer freed (up to 32 MiB): after the first tick, a reading's
/// buffers (half a kilobyte per listed connection) are carved from the heap
/// and what they leave stays in the process, so the agent's RSS depends on
/// the order buffers came and went rather than on what it holds
/// (`bench/open.sh`: 3.6 to 4.9 kB per open connection for the same build,
/// 3.15 kB with the threshold fixed).
pub fn for_a_daemon() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only changes a setting, under the allocator's lock.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
    }
}
