//! The allocator's settings for a process that runs for months.

/// Buffers this large or larger get pages of their own, given back when
/// freed: the indexes a tick builds over the last reading (160 KiB at
/// 20 000 listed) too, which at 256 KiB left their room in the heap
/// (`bench/open.sh`: 275 → 234 B per open connection with the
/// resolver's buffers cut below it as well).
const MMAP_THRESHOLD: libc::c_int = 64 * 1024;

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
