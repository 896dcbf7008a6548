//! A network namespace of the test's own, joined to the test's by a veth pair: a
//! daemon started inside it (`ip netns exec`) reaches the test's servers only over the
//! veth, whose host end the test takes down (a partition: packets vanish, no reset and
//! no error reaches either side) and brings up again. Needs root (`ip netns add`); the
//! namespace and both veth ends are gone when this is dropped.

use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

const PREFIX: &str = "pbcut";

pub struct NetNs {
    name: String,
    host_if: String,
    /// The host end's address: servers the namespace should reach listen here.
    pub host_addr: IpAddr,
}

impl NetNs {
    /// A namespace named after this process and a per-process sequence number, on a
    /// /30 of 198.18.0.0/15 (the range reserved for network tests, never routed)
    /// derived from both, with loopback up inside. Namespaces left by test processes
    /// that are gone (killed before their drop ran) are removed first.
    pub fn new() -> NetNs {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        remove_stale();
        let pid = std::process::id();
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let name = format!("{PREFIX}{pid}-{seq}");
        let host_if = format!("pbh{pid}x{seq}");
        let ns_if = format!("pbn{pid}x{seq}");
        let slot = (pid.wrapping_mul(8).wrapping_add(seq)) % (1 << 15);
        let base = u32::from(Ipv4Addr::new(198, 18, 0, 0)) + slot * 4;
        let host_addr = Ipv4Addr::from(base + 1);
        let ns_addr = Ipv4Addr::from(base + 2);
        // Left over by an earlier process with this pid: start clean.
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        let _ = Command::new("ip").args(["link", "del", &host_if]).output();
        let ns = NetNs {
            name,
            host_if,
            host_addr: IpAddr::V4(host_addr),
        };
        ns.ip(&["netns", "add", &ns.name]);
        ns.ip(&[
            "link",
            "add",
            &ns.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &ns_if,
        ]);
        ns.ip(&["link", "set", &ns_if, "netns", &ns.name]);
        ns.ip(&[
            "addr",
            "add",
            &format!("{host_addr}/30"),
            "dev",
            &ns.host_if,
        ]);
        ns.ip(&["link", "set", &ns.host_if, "up"]);
        let inside = |args: &[&str]| {
            let mut all = vec!["netns", "exec", &ns.name, "ip"];
            all.extend_from_slice(args);
            ns.ip(&all);
        };
        inside(&["addr", "add", &format!("{ns_addr}/30"), "dev", &ns_if]);
        inside(&["link", "set", &ns_if, "up"]);
        inside(&["link", "set", "lo", "up"]);
        ns
    }

    /// The clients servers must admit (the namespace's end of the veth), as CIDR.
    pub fn clients(&self) -> String {
        format!("{}/30", self.host_addr)
    }

    /// What runs a program inside the namespace (`Daemon::sibling_under`).
    pub fn launcher(&self) -> [&str; 4] {
        ["ip", "netns", "exec", &self.name]
    }

    /// Cuts the link: from now on nothing crosses it, in either direction.
    pub fn cut(&self) {
        self.ip(&["link", "set", &self.host_if, "down"]);
    }

    /// Brings the link back; connections that survived resume.
    pub fn heal(&self) {
        self.ip(&["link", "set", &self.host_if, "up"]);
    }

    fn ip(&self, args: &[&str]) {
        let out = Command::new("ip")
            .args(args)
            .output()
            .expect("iproute2's `ip` must be installed");
        assert!(
            out.status.success(),
            "ip {} failed (network namespaces need root): {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Deleting the namespace destroys its veth end, and with it the host's.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .output();
    }
}

/// Deletes the namespaces of this harness whose test process is gone, killing what
/// still runs inside them (a daemon has no parent-death signal).
fn remove_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(pid) = name
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split('-').next())
        else {
            continue;
        };
        if std::path::Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        if let Ok(pids) = Command::new("ip").args(["netns", "pids", name]).output() {
            for p in String::from_utf8_lossy(&pids.stdout).split_whitespace() {
                let _ = Command::new("kill").args(["-9", p]).status();
            }
        }
        let _ = Command::new("ip").args(["netns", "del", name]).output();
    }
}
