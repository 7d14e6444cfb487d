//! Container id, Kubernetes pod UID and QoS class from `/proc/<pid>/cgroup`.
//!
//! Runtimes name a container's cgroup after its id, in one of two styles:
//! the cgroupfs driver nests plain directories (`/docker/<id>`,
//! `/kubepods/burstable/pod<uid>/<id>`), the systemd driver makes scope and
//! slice units (`docker-<id>.scope`, `cri-containerd-<id>.scope`,
//! `crio-<id>.scope`, `libpod-<id>.scope`, and for Kubernetes
//! `kubepods-burstable-pod<uid_with_underscores>.slice`, because a dash
//! separates levels in a systemd slice name). Every line of the file (one
//! per cgroup v1 hierarchy, `0::` for v2) is read, since a host may mix
//! both; the deepest match wins (a container in a container).

/// What a cgroup path says about the process.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CgroupInfo {
    /// Full container id (64 hex digits as the runtimes use).
    pub container: Option<String>,
    /// `docker`, `containerd`, `cri-o`, `podman`; None when the path shows
    /// an id but not whose.
    pub runtime: Option<&'static str>,
    /// Kubernetes pod UID, with dashes.
    pub pod: Option<String>,
    /// `guaranteed`, `burstable` or `besteffort` (Kubernetes only).
    pub qos: Option<&'static str>,
}

/// Unit-name prefixes of the systemd style, and the runtime each means.
/// The `conmon` scopes hold the runtime's monitor, not the container.
const SCOPE_PREFIXES: [(&str, &str); 5] = [
    ("docker-", "docker"),
    ("cri-containerd-", "containerd"),
    ("crio-", "cri-o"),
    ("libpod-", "podman"),
    ("containerd-", "containerd"),
];

/// Parses the whole `/proc/<pid>/cgroup` text.
pub fn parse(text: &str) -> CgroupInfo {
    let mut best = CgroupInfo::default();
    let mut best_depth = 0;
    for line in text.lines() {
        // hierarchy-ID:controller-list:path; the path may contain ':'.
        let Some(path) = line.splitn(3, ':').nth(2) else {
            continue;
        };
        let (info, depth) = parse_path(path);
        // A line that names a container beats one that does not; among
        // those that do, the one where it was found deepest.
        let better = match (&info.container, &best.container) {
            (Some(_), None) => true,
            (Some(_), Some(_)) => depth > best_depth,
            (None, None) => info.pod.is_some() && best.pod.is_none(),
            (None, Some(_)) => false,
        };
        if better {
            best = info;
            best_depth = depth;
        }
    }
    best
}

/// One cgroup path; also returns the depth of the container segment.
fn parse_path(path: &str) -> (CgroupInfo, usize) {
    let mut info = CgroupInfo::default();
    let mut depth = 0;
    let mut kubepods = false;
    let mut prev = "";
    for (i, seg) in path.split('/').enumerate() {
        if seg.is_empty() {
            continue;
        }
        if seg == "kubepods" || seg.starts_with("kubepods.") || seg.starts_with("kubepods-") {
            kubepods = true;
        }
        if kubepods {
            // The colon form's unit name comes before the first ':'.
            let unit = seg.split(':').next().unwrap_or(seg);
            if let Some(q) = qos_of(unit) {
                info.qos = Some(q);
            }
            if let Some(uid) = pod_of(unit) {
                info.pod = Some(uid);
            }
        }
        if let Some((id, runtime)) = container_of(seg, prev) {
            info.container = Some(id);
            info.runtime = runtime;
            depth = i;
        }
        prev = seg;
    }
    if kubepods && info.pod.is_some() && info.qos.is_none() {
        // The kubelet puts guaranteed pods directly under kubepods.
        info.qos = Some("guaranteed");
    }
    (info, depth)
}

fn is_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A container id in segment `seg` (whose parent segment is `prev`).
fn container_of(seg: &str, prev: &str) -> Option<(String, Option<&'static str>)> {
    // containerd's systemd driver on cgroup v1 writes
    // `kubepods-…-pod<uid>.slice:cri-containerd:<id>`.
    if let Some((_, rest)) = seg.split_once(':') {
        if let Some((prefix, id)) = rest.rsplit_once(':') {
            if is_id(id) {
                let runtime = SCOPE_PREFIXES
                    .iter()
                    .find(|(p, _)| p.trim_end_matches('-') == prefix)
                    .map(|(_, r)| *r);
                return Some((id.to_owned(), runtime));
            }
        }
    }
    if let Some(unit) = seg.strip_suffix(".scope") {
        for (prefix, runtime) in SCOPE_PREFIXES {
            if let Some(id) = unit.strip_prefix(prefix) {
                if is_id(id) {
                    return Some((id.to_owned(), Some(runtime)));
                }
            }
        }
        return None;
    }
    if is_id(seg) {
        let runtime = match prev {
            "docker" => Some("docker"),
            "libpod_parent" => Some("podman"),
            _ => None,
        };
        return Some((seg.to_owned(), runtime));
    }
    None
}

fn qos_of(seg: &str) -> Option<&'static str> {
    let s = seg.trim_end_matches(".slice");
    for q in ["burstable", "besteffort"] {
        let slice = format!("kubepods-{q}");
        if s == q || s == slice || s.starts_with(&format!("{slice}-")) {
            return Some(q);
        }
    }
    None
}

/// `pod<uid>` (cgroupfs) or `kubepods[-<qos>]-pod<uid>.slice` (systemd,
/// with the UID's dashes written as underscores).
fn pod_of(seg: &str) -> Option<String> {
    let s = seg.trim_end_matches(".slice");
    let at = s.rfind("pod")?;
    if at > 0 && !s[..at].ends_with('-') {
        return None;
    }
    let uid = s[at + 3..].replace('_', "-");
    let ok = uid.len() >= 32 && uid.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-');
    ok.then_some(uid)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "4f2d9b3c1a0e8f7d6c5b4a39281706f5e4d3c2b1a0998877665544332211aabb";
    const ID2: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    const UID: &str = "6a1c3f1e-2b7c-4e0a-9a4e-3c1d2e5f6a7b";
    const UID_: &str = "6a1c3f1e_2b7c_4e0a_9a4e_3c1d2e5f6a7b";

    fn check(
        text: &str,
        container: Option<&str>,
        runtime: Option<&str>,
        pod: Option<&str>,
        qos: Option<&str>,
    ) {
        let got = parse(text);
        assert_eq!(got.container.as_deref(), container, "container of {text}");
        assert_eq!(got.runtime, runtime, "runtime of {text}");
        assert_eq!(got.pod.as_deref(), pod, "pod of {text}");
        assert_eq!(got.qos, qos, "qos of {text}");
    }

    #[test]
    fn docker_cgroupfs_v1() {
        let text = format!(
            "12:pids:/docker/{ID}\n11:memory:/docker/{ID}\n1:name=systemd:/docker/{ID}\n0::/system.slice/containerd.service\n"
        );
        check(&text, Some(ID), Some("docker"), None, None);
    }

    #[test]
    fn docker_systemd_v2_and_v1() {
        check(
            &format!("0::/system.slice/docker-{ID}.scope\n"),
            Some(ID),
            Some("docker"),
            None,
            None,
        );
        check(
            &format!("4:pids:/system.slice/docker-{ID}.scope\n1:name=systemd:/system.slice/docker-{ID}.scope\n"),
            Some(ID),
            Some("docker"),
            None,
            None,
        );
    }

    #[test]
    fn kubernetes_containerd_systemd() {
        let text = format!(
            "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{ID}.scope\n"
        );
        check(
            &text,
            Some(ID),
            Some("containerd"),
            Some(UID),
            Some("burstable"),
        );
        let guaranteed =
            format!("0::/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{ID}.scope\n");
        check(
            &guaranteed,
            Some(ID),
            Some("containerd"),
            Some(UID),
            Some("guaranteed"),
        );
    }

    #[test]
    fn kubernetes_cgroupfs_v1() {
        let text = format!("11:memory:/kubepods/besteffort/pod{UID}/{ID}\n3:cpu,cpuacct:/kubepods/besteffort/pod{UID}/{ID}\n");
        check(&text, Some(ID), None, Some(UID), Some("besteffort"));
        let guaranteed = format!("0::/kubepods/pod{UID}/{ID}\n");
        check(&guaranteed, Some(ID), None, Some(UID), Some("guaranteed"));
    }

    #[test]
    fn kubernetes_containerd_systemd_on_v1_colon_form() {
        let text = format!("5:pids:/kubepods-besteffort-pod{UID_}.slice:cri-containerd:{ID}\n");
        check(
            &text,
            Some(ID),
            Some("containerd"),
            Some(UID),
            Some("besteffort"),
        );
    }

    #[test]
    fn crio_and_its_conmon() {
        let text = format!(
            "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/crio-{ID}.scope\n"
        );
        check(
            &text,
            Some(ID),
            Some("cri-o"),
            Some(UID),
            Some("besteffort"),
        );
        // conmon, the monitor beside the container: the pod, not a container.
        let conmon = format!(
            "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/crio-conmon-{ID}.scope\n"
        );
        check(&conmon, None, None, Some(UID), Some("besteffort"));
    }

    #[test]
    fn podman_rootful_and_rootless() {
        check(
            &format!("0::/machine.slice/libpod-{ID}.scope\n"),
            Some(ID),
            Some("podman"),
            None,
            None,
        );
        // Podman 4+ with a cgroup namespace moves the process one level down.
        check(
            &format!("0::/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{ID}.scope/container\n"),
            Some(ID),
            Some("podman"),
            None,
            None,
        );
        check(
            &format!("0::/libpod_parent/{ID}\n"),
            Some(ID),
            Some("podman"),
            None,
            None,
        );
    }

    #[test]
    fn nested_container_deepest_wins() {
        check(
            &format!("0::/docker/{ID}/docker/{ID2}\n"),
            Some(ID2),
            Some("docker"),
            None,
            None,
        );
    }

    #[test]
    fn host_processes_have_none() {
        check(
            "0::/user.slice/user-0.slice/session-3.scope\n",
            None,
            None,
            None,
            None,
        );
        check("0::/init.scope\n", None, None, None, None);
        check(
            "0::/system.slice/docker.service\n12:pids:/\n",
            None,
            None,
            None,
            None,
        );
        // A scope that merely looks similar.
        check(
            "0::/system.slice/docker-short.scope\n",
            None,
            None,
            None,
            None,
        );
        check("", None, None, None, None);
        check("garbage without colons\n", None, None, None, None);
    }
}
