//! The box cprd puts each VMM in (see `cpr_spawn::sandbox`): the VM's own uid and gid from the
//! `[sandbox]` range, and the group of `/dev/kvm` where the VMM opens the device itself.

use std::os::unix::fs::MetadataExt;

use cpr_spawn::{Sandbox, Writable};

/// `/dev/kvm`'s group, when that group may read and write it and is not root's: a VMM that opens
/// `/dev/kvm` itself (QEMU) needs it; cpr-vmm is handed the device instead.
fn kvm_group() -> Option<u32> {
    let meta = std::fs::metadata("/dev/kvm").ok()?;
    (meta.mode() & 0o060 == 0o060 && meta.gid() != 0).then_some(meta.gid())
}

/// Says once, in the journal, when boxed VMMs cannot weight a handoff's downtime themselves.
pub fn note_nice_limit() {
    static SAID: std::sync::Once = std::sync::Once::new();
    SAID.call_once(|| {
        let nice = cpr_spawn::sched::HANDOFF_NICE;
        if !cpr_spawn::sandbox::nice_limit_reachable(nice) {
            tracing::warn!(
                "boxed VMMs cannot raise their own weight at a handoff's pause: RLIMIT_NICE does not reach nice {nice} \
                 and cprd lacks CAP_SYS_RESOURCE to raise it (LimitNICE={nice} in the unit fixes it); handoffs run \
                 unweighted inside their downtime"
            );
        }
    });
}

/// The box of a VMM running as `uid` (its gid is the same number), with `writable` bound in.
pub fn vmm_box(uid: u32, writable: Vec<Writable>, opens_kvm: bool) -> Sandbox {
    note_nice_limit();
    let groups = if opens_kvm { kvm_group().into_iter().collect() } else { Vec::new() };
    Sandbox { uid, gid: uid, groups, writable, lowest_nice: Some(cpr_spawn::sched::HANDOFF_NICE) }
}
