//! Without root or without the program, `run --backend tc` says in one line
//! what is missing.

/// Runs everywhere: without root, or with an object that is not there,
/// `run --backend tc` says in one line what is missing (and never touches
/// an interface; `auto` would count with AF_PACKET instead).
#[test]
fn run_explains_what_is_missing() {
    let out = crate::common::flowprobe(&[
        "run",
        "--backend",
        "tc",
        "--iface",
        "lo",
        "--duration",
        "0",
        "--ebpf-object",
        "/nonexistent/probe-ebpf",
    ]);
    assert!(!out.status.success());
    let err = crate::common::stderr(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    // SAFETY: no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        assert!(err.contains("reading /nonexistent/probe-ebpf"), "{err}");
    } else {
        assert!(err.contains("needs root"), "{err}");
    }
}
