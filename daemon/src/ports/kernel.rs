//! What the running kernel lets the daemon see, and what it hides: the hooks
//! that loaded (with the verifier's reason for those that did not), whether
//! sock_diag lists bound TCP sockets, and the blind spots that follow.
//!
//! A blind spot is a kind of socket that can hold a port without the map
//! knowing. Answers it could change are never given as certain.
use std::time::SystemTime;

use serde::Serialize;

use super::{map::Tables, model::Proto};

/// One hook as loaded on this kernel (see `ebpf.rs`); empty without eBPF.
#[cfg(feature = "ebpf")]
pub use super::ebpf::HookStatus;

#[cfg(not(feature = "ebpf"))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HookStatus {
    pub hook: &'static str,
    pub attached: bool,
}

/// The kernel, as far as the port map is concerned.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Kernel {
    /// `uname -r`.
    pub release: String,
    /// sock_diag lists TCP sockets that are bound but neither listening nor
    /// connected (Linux 6.5+, or a backport): probed at start.
    pub lists_bound_tcp: bool,
    /// Every hook tried, attached or not.
    pub hooks: Vec<HookStatus>,
}

impl Kernel {
    pub fn new(visible: Tables, hooks: Vec<HookStatus>) -> Self {
        Self { release: release(), lists_bound_tcp: visible.contains(Tables::BOUND), hooks }
    }

    pub fn attached(&self, hook: &str) -> bool {
        self.hooks.iter().any(|h| h.hook == hook && h.attached)
    }

    /// The blind spots of running on this kernel with these hooks, from
    /// `started` on.
    pub fn blind_spots(&self, started: SystemTime) -> Vec<BlindSpot> {
        if self.lists_bound_tcp {
            return Vec::new();
        }
        // Bound TCP sockets are known only from their bind events and leave
        // only through their release events: both hooks are needed.
        let binds_seen = ["post_bind4", "post_bind6", "sock_release"].iter().all(|h| self.attached(h));
        if binds_seen {
            vec![BlindSpot::BoundBeforeStart { since: started }]
        } else {
            vec![BlindSpot::BoundInactive]
        }
    }
}

/// A kind of socket this daemon cannot see on this kernel.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum BlindSpot {
    /// TCP sockets bound before the daemon started that have neither
    /// listened nor connected since (Linux < 6.5: sock_diag cannot list
    /// them, and their bind happened before the hooks were attached).
    BoundBeforeStart {
        #[serde(serialize_with = "crate::time::serialize_rfc3339")]
        since: SystemTime,
    },
    /// Every TCP socket that is bound but neither listening nor connected
    /// (Linux < 6.5 without the bind and release hooks).
    BoundInactive,
}

impl BlindSpot {
    /// Every kind's name, as serialised (for metrics).
    pub const KINDS: [&'static str; 2] = ["bound-before-start", "bound-inactive"];

    pub fn kind(&self) -> &'static str {
        match self {
            BlindSpot::BoundBeforeStart { .. } => Self::KINDS[0],
            BlindSpot::BoundInactive => Self::KINDS[1],
        }
    }

    /// Whether a socket of `proto` could hide in this blind spot.
    pub fn hides(&self, proto: Proto) -> bool {
        match self {
            BlindSpot::BoundBeforeStart { .. } | BlindSpot::BoundInactive => proto == Proto::Tcp,
        }
    }

    pub fn reason(&self) -> &'static str {
        match self {
            BlindSpot::BoundBeforeStart { .. } => {
                "this kernel (before Linux 6.5) cannot list TCP sockets that are bound but neither listening nor \
                 connected; those bound before the daemon started are invisible"
            }
            BlindSpot::BoundInactive => {
                "this kernel (before Linux 6.5) cannot list TCP sockets that are bound but neither listening nor \
                 connected, and the bind hooks are not running: any such socket is invisible"
            }
        }
    }
}

/// `uname -r`, or empty.
fn release() -> String {
    // SAFETY: uname writes only into the zeroed struct passed.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::uname(&mut u) } != 0 {
        return String::new();
    }
    let bytes: Vec<u8> = u.release.iter().take_while(|c| **c != 0).map(|c| *c as u8).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hook(name: &'static str, attached: bool) -> HookStatus {
        #[cfg(feature = "ebpf")]
        {
            let mut h = HookStatus::refused_for_test(name);
            h.attached = attached;
            h
        }
        #[cfg(not(feature = "ebpf"))]
        HookStatus { hook: name, attached }
    }

    #[test]
    fn blind_spots_follow_the_kernel_and_the_hooks() {
        let all_but_bound = Tables::LISTEN.union(Tables::UDP).union(Tables::CONNECTED);
        let t = SystemTime::UNIX_EPOCH;
        let hooks = |ok: bool| vec![hook("post_bind4", true), hook("post_bind6", true), hook("sock_release", ok)];
        assert!(Kernel::new(Tables::ALL, vec![]).blind_spots(t).is_empty(), "6.5+ lists bound sockets");
        assert_eq!(
            Kernel::new(all_but_bound, hooks(true)).blind_spots(t),
            vec![BlindSpot::BoundBeforeStart { since: t }]
        );
        assert_eq!(Kernel::new(all_but_bound, hooks(false)).blind_spots(t), vec![BlindSpot::BoundInactive]);
        assert_eq!(Kernel::new(all_but_bound, vec![]).blind_spots(t), vec![BlindSpot::BoundInactive]);
        assert!(BlindSpot::BoundInactive.hides(Proto::Tcp) && !BlindSpot::BoundInactive.hides(Proto::Udp));
    }
}
