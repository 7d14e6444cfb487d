//! Container tags from the cgroup v2 id the tc program took from a local
//! socket (`probe-ebpf` `note_socket`): the id is the inode number of the
//! cgroup's directory in the unified hierarchy. A container's cgroup lives
//! as long as the container, so this names the container of a connection
//! whose socket and process were gone before a resolver pass saw them.
//!
//! The hierarchy is our own cgroup2 mount, or else PID 1's seen through
//! `/proc/1/root` (under `ip netns exec`, whose fresh `/sys` has no cgroup
//! mounts; `nsenter --net` keeps them).

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use flowtable::attrib::parse_cgroup;
use flowtable::Connection;

/// Tag key written here.
pub const CGROUP: &str = "cgroup";

/// Directories walked at most per lookup: bounds the cost on a host with
/// a very deep or wide hierarchy.
const MAX_DIRS: usize = 100_000;

#[derive(Default)]
pub struct CgroupIds {
    root: Option<Option<PathBuf>>,
    /// Every id looked up, found or not: cgroup ids are 64-bit and never
    /// reused, so one not found (removed, or out of sight) stays so, and
    /// the hierarchy is walked once per id, not at every report.
    paths: HashMap<u64, Option<String>>,
}

impl CgroupIds {
    /// Adds `cgroup` and the container tags of its path to every end that
    /// has a `cgroup_id` but no owning process.
    pub fn tag(&mut self, conns: &mut [Connection]) {
        for c in conns {
            for tags in [&mut c.src_tags, &mut c.dst_tags] {
                if tags.contains_key("pid") {
                    continue;
                }
                let socket = tags.socket();
                if socket.cookie == 0 {
                    continue;
                }
                let id = socket.cgroup;
                let Some(path) = self.path_of(id) else {
                    continue;
                };
                let info = parse_cgroup(&format!("0::{path}"));
                if let Some(v) = info.container {
                    tags.insert("container".to_owned(), v);
                }
                if let Some(v) = info.runtime {
                    tags.insert("runtime".to_owned(), v.to_owned());
                }
                if let Some(v) = info.pod {
                    tags.insert("pod".to_owned(), v);
                }
                if let Some(v) = info.qos {
                    tags.insert("qos".to_owned(), v.to_owned());
                }
                tags.insert(CGROUP.to_owned(), path);
            }
        }
    }

    /// Remembers `id`'s path without walking (tests).
    #[cfg(test)]
    pub fn insert(&mut self, id: u64, path: &str) {
        self.paths.insert(id, Some(path.to_owned()));
    }

    /// The cgroup's path in the unified hierarchy (`/a/b`), walking it for
    /// an id not seen before.
    pub fn path_of(&mut self, id: u64) -> Option<String> {
        if let Some(p) = self.paths.get(&id) {
            return p.clone();
        }
        let root = self.root.get_or_insert_with(unified_root).clone();
        let found = root.and_then(|r| find(&r, id));
        self.paths.insert(id, found.clone());
        found
    }
}

/// The directory under `root` whose inode is `id`, as a path from `root`.
fn find(root: &Path, id: u64) -> Option<String> {
    let mut stack = vec![root.to_path_buf()];
    let mut walked = 0;
    while let Some(dir) = stack.pop() {
        walked += 1;
        if walked > MAX_DIRS {
            return None;
        }
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(m) = e.metadata() else { continue };
            if !m.is_dir() {
                continue;
            }
            let p = e.path();
            if m.ino() == id {
                let rel = Path::new("/").join(p.strip_prefix(root).ok()?);
                return Some(rel.to_string_lossy().into_owned());
            }
            stack.push(p);
        }
    }
    None
}

/// The cgroup2 mount: ours, or PID 1's seen through `/proc/1/root`, or
/// the private one the eBPF source mounted for its programs.
fn unified_root() -> Option<PathBuf> {
    crate::os::cgroup2::visible_root().or_else(|| {
        let p = PathBuf::from(crate::os::cgroup2::PRIVATE);
        p.is_dir().then_some(p)
    })
}
