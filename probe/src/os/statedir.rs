//! `run --state-dir DIR`: the directory a daemon keeps what a restarted
//! run needs to continue (docs/restart.md). One run at a time holds it: an
//! exclusive `flock` on `DIR/lock`, which the kernel drops when the
//! process dies, however it dies. Files in it are replaced whole (written
//! beside, synced, renamed), so a kill leaves the old one or the new one.

use std::fs;
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

const LOCK: &str = "lock";

/// The state directory, held.
pub struct StateDir {
    dir: PathBuf,
    /// Held open: the lock lives as long as this.
    _lock: fs::File,
}

impl StateDir {
    /// Creates `dir` if needed and takes its lock; another live run holding
    /// it is an error in one line.
    pub fn lock(dir: &Path) -> Result<StateDir> {
        fs::create_dir_all(dir).with_context(|| format!("--state-dir {}", dir.display()))?;
        let dir = dir
            .canonicalize()
            .with_context(|| format!("--state-dir {}", dir.display()))?;
        let path = dir.join(LOCK);
        let mut lock = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        // SAFETY: a valid fd.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let pid = fs::read_to_string(&path).unwrap_or_default();
            bail!(
                "--state-dir {}: another flowprobe run (pid {}) holds it",
                dir.display(),
                pid.trim()
            );
        }
        lock.set_len(0)?;
        write!(lock, "{}", std::process::id())?;
        Ok(StateDir { dir, _lock: lock })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// A file's bytes; `None` when there is none.
    pub fn read(&self, name: &str) -> Result<Option<Vec<u8>>> {
        match fs::read(self.path(name)) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", self.path(name).display())),
        }
    }

    /// Replaces `name` with `bytes`: written beside, synced, renamed over,
    /// the directory synced.
    pub fn write(&self, name: &str, bytes: &[u8]) -> io::Result<()> {
        let tmp = self.path(&format!("{name}.tmp"));
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, self.path(name))?;
        fs::File::open(&self.dir)?.sync_all()
    }

    pub fn remove(&self, name: &str) {
        let _ = fs::remove_file(self.path(name));
        let _ = fs::remove_file(self.path(&format!("{name}.tmp")));
    }

    /// A short name for this directory (FNV-1a of its canonical path), for
    /// the pins that belong to it.
    pub fn id(&self) -> String {
        format!("{:016x}", fnv1a(self.dir.as_os_str().as_encoded_bytes()))
    }

    /// A clean stop: the lock file goes too (the directory stays: it is
    /// the operator's).
    pub fn clear(&self) {
        let _ = fs::remove_file(self.path(LOCK));
    }
}

/// FNV-1a, 64 bits: a stable digest for names and fingerprints (not
/// against an adversary).
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_holder_at_a_time_and_whole_files() {
        let d = std::env::temp_dir().join(format!("flowprobe-statedir-{}", std::process::id()));
        let s = StateDir::lock(&d).unwrap();
        let e = StateDir::lock(&d).err().unwrap().to_string();
        assert!(e.contains("another flowprobe run"), "{e}");
        assert!(e.contains(&std::process::id().to_string()), "{e}");
        s.write("x", b"one").unwrap();
        s.write("x", b"two").unwrap();
        assert_eq!(s.read("x").unwrap().as_deref(), Some(&b"two"[..]));
        assert_eq!(s.read("y").unwrap(), None);
        s.remove("x");
        s.clear();
        drop(s);
        assert_eq!(fs::read_dir(&d).unwrap().count(), 0);
        // Free again.
        StateDir::lock(&d).unwrap().clear();
        fs::remove_dir(&d).unwrap();
    }
}
