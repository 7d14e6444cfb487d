//! A client that is gone before any resolver pass is named by its cgroup
//! and by the owner its connect recorded; a server by the listener its
//! `listen(2)` recorded.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use super::container_id;
use crate::common::json_lines;
use crate::common::root::{enabled, python, tc_attached, veth_pair, wait_for, KillOnDrop, Netns};

/// A client that connects, writes and exits between two resolver passes
/// (the pass interval is set to a minute) has no process left to find; the
/// tc program took its socket's cgroup v2 id from the packets it sent, and
/// that names its container. Runs `flowprobe` with `nsenter --net`, which
/// keeps the cgroup2 mount (`ip netns exec` mounts a /sys without it).
#[test]
fn a_client_gone_before_any_pass_is_named_by_its_cgroup() {
    if !enabled("live_attrib") {
        return;
    }
    let Some(unified) = fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .find_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            (post.split_whitespace().next()? == "cgroup2")
                .then(|| pre.split_whitespace().nth(4).map(str::to_owned))?
        })
    else {
        panic!("no cgroup2 mount on this host: the cgroup id cannot name a container");
    };
    let dir = tempfile::tempdir().unwrap();
    let ns = Netns::create("fpc", "cgid");
    veth_pair(&ns, "fpc0", "fpc1", "10.81.0.1", "10.81.0.2", "24");
    let id = container_id(9);
    let parent = PathBuf::from(&unified).join(format!("flowprobe-test-{}", std::process::id()));
    let cg = parent.join(format!("docker-{id}.scope"));
    fs::create_dir_all(&cg).unwrap();
    struct Rm(PathBuf, PathBuf);
    impl Drop for Rm {
        fn drop(&mut self) {
            let _ = fs::remove_dir(&self.0);
            let _ = fs::remove_dir(&self.1);
        }
    }
    let _rm = Rm(cg.clone(), parent);

    let ready = dir.path().join("ready");
    let server = format!(
        "import socket\n\
         s = socket.create_server(('10.81.0.2', 7100))\n\
         open('{}', 'w').close()\n\
         c, _ = s.accept()\n\
         while c.recv(65536): pass\n",
        ready.display()
    );
    let mut server = KillOnDrop(python(&ns.b, &server).spawn().unwrap());
    wait_for("the server", || ready.exists());
    let netns = format!("--net=/run/netns/{}", ns.a);
    let probe = Command::new("nsenter")
        .args([
            &netns,
            env!("CARGO_BIN_EXE_flowprobe"),
            "run",
            "--backend",
            "tc",
        ])
        .args(["--iface", "fpc0", "--format", "json"])
        .env("FLOWPROBE_ATTRIB_INTERVAL_MS", "60000")
        .stdout(fs::File::create(dir.path().join("out.json")).unwrap())
        .stderr(fs::File::create(dir.path().join("out.err")).unwrap())
        .spawn()
        .unwrap();
    let mut probe = KillOnDrop(probe);
    wait_for("flowprobe to attach", || {
        tc_attached(&ns.a, "fpc0", "egress")
    });
    // The client moves itself into the container's cgroup, then runs.
    let client = format!(
        "echo $$ > {}/cgroup.procs && exec ip netns exec {} python3 -c \"\
import socket
c = socket.create_connection(('10.81.0.2', 7100)); c.sendall(b'x' * 5000); c.close()\"",
        cg.display(),
        ns.a
    );
    assert!(Command::new("sh")
        .args(["-c", &client])
        .status()
        .unwrap()
        .success());
    assert!(server.wait().unwrap().success());
    std::thread::sleep(Duration::from_millis(300));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(probe.id() as i32, libc::SIGINT) };
    assert!(probe.wait().unwrap().success());

    let out = fs::read_to_string(dir.path().join("out.json")).unwrap();
    let conns = json_lines(&out);
    let c = conns
        .iter()
        .find(|c| c["proto"] == "tcp" && c["dport"] == 7100)
        .unwrap_or_else(|| panic!("no connection to port 7100:\n{out}"));
    let t = &c["src_tags"];
    // No pass saw its socket; the owner its connect recorded names it
    // (`at_connect.rs` tests that at scale), the cgroup id its container.
    assert!(t.get("unattributed").is_none(), "{t}");
    assert_eq!(t["process"], "python3", "{t}");
    assert!(t["pid"].as_str().is_some(), "{t}");
    assert_eq!(t["container"], id.as_str(), "{t}");
    assert_eq!(t["runtime"], "docker", "{t}");
    let ino = fs::metadata(&cg).unwrap().ino();
    assert_eq!(t["cgroup_id"], ino.to_string(), "{t}");
    assert_eq!(c["sent"]["bytes"], 5000);
}

/// The accepting side: a server whose listening process is gone before
/// anything in userspace could read it (a child that calls `listen(2)`
/// and exits at once, well within the 10 ms between two drains of the
/// owner records; the parent accepts one connection and exits) left no
/// process or socket for any pass; `sock_ops` recorded the listener at
/// `listen(2)` (pid, `comm`, cgroup id) and the accepted socket once
/// established, and userspace joins them by namespace and port: the
/// listener's pid, its `comm`, the container from its cgroup id. On loopback, client and server in the
/// same namespace and cgroup: both ends named.
#[test]
fn a_server_gone_before_any_pass_is_named_by_its_listener() {
    if !enabled("live_attrib") {
        return;
    }
    let unified = fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .find_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            (post.split_whitespace().next()? == "cgroup2")
                .then(|| pre.split_whitespace().nth(4).map(str::to_owned))?
        })
        .expect("no cgroup2 mount on this host for the test's container cgroup");
    let dir = tempfile::tempdir().unwrap();
    let ns = Netns::create("fph", "lsn");
    let id = container_id(10);
    let parent = PathBuf::from(&unified).join(format!("flowprobe-test-lsn-{}", std::process::id()));
    let cg = parent.join(format!("docker-{id}.scope"));
    fs::create_dir_all(&cg).unwrap();
    struct Rm(PathBuf, PathBuf);
    impl Drop for Rm {
        fn drop(&mut self) {
            let _ = fs::remove_dir(&self.0);
            let _ = fs::remove_dir(&self.1);
        }
    }
    let _rm = Rm(cg.clone(), parent);
    let probe = Command::new("ip")
        .args(["netns", "exec", &ns.a, env!("CARGO_BIN_EXE_flowprobe")])
        .args([
            "run",
            "--backend",
            "tc",
            "--iface",
            "lo",
            "--format",
            "json",
        ])
        .env("FLOWPROBE_ATTRIB_INTERVAL_MS", "600000")
        .env("FLOWPROBE_ATTRIB_STATS", "1")
        .stdout(fs::File::create(dir.path().join("out.json")).unwrap())
        .stderr(fs::File::create(dir.path().join("out.err")).unwrap())
        .spawn()
        .unwrap();
    let mut probe = KillOnDrop(probe);
    // Loopback: ingress only, which sees every packet once.
    wait_for("flowprobe to attach", || {
        tc_attached(&ns.a, "lo", "ingress")
    });
    // The cgroup programs attach after tc.
    std::thread::sleep(Duration::from_millis(300));
    let server = format!(
        "echo $$ > {}/cgroup.procs && exec ip netns exec {} python3 -c '\
import ctypes, os, socket, threading
ctypes.CDLL(None).prctl(15, b\"fastsrv\", 0, 0, 0)
s = socket.socket()
s.bind((\"127.0.0.1\", 7301))
pid = os.fork()
if pid == 0:
    s.listen()
    os._exit(0)
os.waitpid(pid, 0)
open(\"{pid}\", \"w\").write(str(pid))
def client():
    c = socket.create_connection((\"127.0.0.1\", 7301)); c.sendall(b\"x\" * 3000); c.close()
threading.Thread(target=client).start()
a, _ = s.accept()
while a.recv(65536): pass
os._exit(0)'",
        cg.display(),
        ns.a,
        pid = dir.path().join("listener.pid").display(),
    );
    assert!(Command::new("sh")
        .args(["-c", &server])
        .status()
        .unwrap()
        .success());
    std::thread::sleep(Duration::from_millis(300));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(probe.id() as i32, libc::SIGINT) };
    assert!(probe.wait().unwrap().success());
    let out = fs::read_to_string(dir.path().join("out.json")).unwrap();
    let err = fs::read_to_string(dir.path().join("out.err")).unwrap();
    let conns = json_lines(&out);
    let c = conns
        .iter()
        .find(|c| c["proto"] == "tcp" && c["dport"] == 7301)
        .unwrap_or_else(|| panic!("no connection to port 7301:\n{out}"));
    eprintln!("{c}\n{err}");
    assert_eq!(c["sent"]["bytes"], 3000);
    for t in [&c["src_tags"], &c["dst_tags"]] {
        assert!(t.get("unattributed").is_none(), "{t}");
        assert_eq!(t["process"], "fastsrv", "{t}");
        assert_eq!(t["container"], id.as_str(), "{t}");
        assert_eq!(t["runtime"], "docker", "{t}");
        assert!(t["pid"].as_str().is_some(), "{t}");
    }
    let listener = fs::read_to_string(dir.path().join("listener.pid")).unwrap();
    assert_eq!(
        c["dst_tags"]["pid"],
        listener.as_str(),
        "the listener's pid"
    );
    assert!(
        err.contains("1 listeners recorded, 1 accepted sockets joined"),
        "{err}"
    );
}
