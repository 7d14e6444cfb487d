//! Where the cgroup v2 hierarchy is, for the socket-owner programs (they
//! attach to its root) and for turning a cgroup id into a path (the id is
//! the inode of the cgroup's directory).
//!
//! In order: a cgroup2 mount of our own mount namespace (`/sys/fs/cgroup`,
//! or `/sys/fs/cgroup/unified` on a hybrid host); PID 1's, seen through
//! `/proc/1/root` (under `ip netns exec`, whose fresh `/sys` has no cgroup
//! mounts); else one mounted for us at [`PRIVATE`], as Cilium does
//! (`/run/cilium/cgroupv2`). The root of every such mount is the same
//! hierarchy, unless a cgroup namespace narrows it.

use std::path::{Path, PathBuf};

/// Where a cgroup2 is mounted when none is visible.
pub const PRIVATE: &str = "/run/flowprobe/cgroup2";

/// The mount point of the first cgroup2 in `mountinfo` (a
/// `/proc/<pid>/mountinfo` text).
pub fn mount_in(mountinfo: &str) -> Option<String> {
    // ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS ... - FSTYPE SOURCE SUPER
    mountinfo.lines().find_map(|l| {
        let (pre, post) = l.split_once(" - ")?;
        (post.split_whitespace().next()? == "cgroup2")
            .then(|| pre.split_whitespace().nth(4).map(str::to_owned))?
    })
}

/// A cgroup2 root we can see, without mounting one.
pub fn visible_root() -> Option<PathBuf> {
    let read = |p: &str| std::fs::read_to_string(p).ok();
    if let Some(m) = read("/proc/self/mountinfo").as_deref().and_then(mount_in) {
        return Some(PathBuf::from(m));
    }
    let m = read("/proc/1/mountinfo").as_deref().and_then(mount_in)?;
    let p = Path::new("/proc/1/root").join(m.trim_start_matches('/'));
    p.is_dir().then_some(p)
}

/// A cgroup2 root: a visible one, or one mounted at [`PRIVATE`] (which
/// stays mounted for the next run, as Cilium's does).
pub fn root() -> std::io::Result<PathBuf> {
    if let Some(p) = visible_root() {
        return Ok(p);
    }
    std::fs::create_dir_all(PRIVATE)?;
    let (src, dst, fs) = (c"none", c"/run/flowprobe/cgroup2", c"cgroup2");
    // SAFETY: NUL-terminated strings that outlive the call; no data.
    let r = unsafe { libc::mount(src.as_ptr(), dst.as_ptr(), fs.as_ptr(), 0, std::ptr::null()) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(PathBuf::from(PRIVATE))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_unified_mount_of_a_hybrid_host() {
        let info = "\
25 30 0:22 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
26 25 0:23 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw
27 25 0:24 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu
";
        assert_eq!(mount_in(info).as_deref(), Some("/sys/fs/cgroup/unified"));
        assert_eq!(
            mount_in("27 25 0:24 / /x rw - cgroup cgroup rw,cpu\n"),
            None
        );
        assert_eq!(PRIVATE.as_bytes(), b"/run/flowprobe/cgroup2");
    }
}
