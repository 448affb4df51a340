//! A trace that uses every user slot id (KVM's 32764) and reaches above 4 GiB replays on the
//! shadow MMU: the replay's identity-mapped guest tables go to KVM's internal
//! identity-page-table slot, an id no trace can name (hunt 42h N1: the replay looked for a free
//! user id, found none and failed a valid trace).

use vmmu_sim::replay::{parse, replay, ReplayConfig};

#[test]
fn a_trace_using_every_user_slot_id_above_4_gib_replays_on_the_shadow_mmu() {
    let mut s = String::from("{\"vmmu_trace\":1,\"source\":\"synthetic; kvm.tdp_mmu=N\"}\n");
    for id in 0..32764u64 {
        s.push_str(&format!(
            "{{\"t\":0.000000,\"op\":\"slot\",\"as\":0,\"id\":{id},\"flags\":[],\"gpa\":\"{:#x}\",\
             \"size\":\"0x1000\",\"uaddr\":\"{:#x}\"}}\n",
            (1u64 << 32) + id * 0x2000,
            0x7f00_0000_0000u64 + id * 0x1000,
        ));
    }
    // An MMIO read in a hole between two slots, above 4 GiB.
    s.push_str(
        "{\"t\":0.000002,\"op\":\"mmio\",\"dir\":\"read\",\"gpa\":\"0x100001000\",\"len\":4,\
         \"value\":\"0x0\",\"exit\":\"user\"}\n",
    );
    let trace = parse(&s).expect("trace");
    let r = replay(&trace, &ReplayConfig::shadow(true)).expect("replay runs");
    assert!(r.passed(), "{:#?}", r.oracle);
    assert_eq!((r.slots.refused, r.mmio.misclassified), (0, 0));
    let guest = r.guest.as_deref().unwrap_or_default();
    assert!(guest.contains("internal identity-page-table slot (32766)"), "{guest}");
}
