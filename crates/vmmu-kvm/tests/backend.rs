//! Behaviour of the KVM backend that the corpus does not show: failures name the step and never
//! become observations; requests reach KVM exactly as written. Each test passes (printing why)
//! when `/dev/kvm` is not usable.
mod common;

use common::kvm;
use vmmu_kvm::KvmBackend;
use vmmu_scenario::{parse, run_collect, Backend, BackendError, Observation, SlotResult, Start};

#[test]
fn access_beyond_the_buffer_is_a_failure_naming_the_step() {
    if !kvm() {
        return;
    }
    let s = parse(
        "mem small size=4K\nslot 1 gpa=0x10000000 size=64K mem=small\n\
         read 0 gpa=0x10000ff8 size=8\nread 0 gpa=0x10001000 size=8\nread 0 gpa=0x10000000 size=8\n",
    )
    .unwrap();
    let (partial, err) = run_collect(&KvmBackend, &s).unwrap_err();
    assert_eq!(partial.len(), 2, "the observations before the failure are kept: {partial:?}");
    let msg = err.to_string();
    assert!(msg.contains("step 4 (line 4, `read`)"), "{msg}");
    assert!(msg.contains("outside its buffer"), "{msg}");
}

/// An access through the part of a slot past its buffer fails even where another buffer lies
/// there (this one lands 1 GiB + 4 KiB past `a`, just beyond the backend's 1 GiB guard, where
/// the buffer made before it may start): it used to read that buffer (hunt 42h F1), where the
/// software machine, whose buffers lie elsewhere, failed or read another one.
#[test]
fn access_past_the_buffer_into_another_buffer_is_a_failure() {
    if !kvm() {
        return;
    }
    let s = parse(
        "mem b size=4K\nmem a size=4K\nslot 1 gpa=0x100000000 size=0x80000000 mem=a\n\
         host-write b size=8 value=0xbbbb\nread 0 gpa=0x100000000 size=8\n\
         read 0 gpa=0x140001000 size=8\n",
    )
    .unwrap();
    let (partial, err) = run_collect(&KvmBackend, &s).unwrap_err();
    assert_eq!(partial.len(), 2, "the slot and the read inside `a` are kept: {partial:?}");
    let msg = err.to_string();
    assert!(msg.contains("step 6") && msg.contains("outside its buffer"), "{msg}");
}

#[test]
fn slot_requests_reach_kvm_unchanged() {
    if !kvm() {
        return;
    }
    // An odd userspace address would be "fixed" by a wrapper that aligns it; KVM must refuse it.
    let s = parse(
        "mem b size=8K\nslot 1 gpa=0x10000000 size=4K mem=b+0x10\n\
         slot 1 gpa=0x10000000 size=4K mem=b+0x1000\nslot 1 gpa=0x10000000 size=4K mem=b\n",
    )
    .unwrap();
    let out = run_collect(&KvmBackend, &s).unwrap();
    let results: Vec<_> = out
        .iter()
        .map(|o| match o {
            Observation::Slot { result, .. } => result.clone(),
            o => panic!("{o:?}"),
        })
        .collect();
    assert_eq!(
        results,
        [SlotResult::Err("EINVAL".into()), SlotResult::Ok, SlotResult::Err("EINVAL".into())]
    );
}

#[test]
fn many_vcpus_each_run_their_own_access() {
    if !kvm() {
        return;
    }
    let mut text = String::from("vm vcpus=8\nmem b size=4K\nslot 1 gpa=0x10000000 size=4K mem=b\n");
    for v in 0..8 {
        text += &format!("write {v} gpa={:#x} size=8 value={v}\n", 0x1000_0000 + 8 * v);
    }
    for v in 0..8 {
        text += &format!("read {} gpa={:#x} size=8\n", 7 - v, 0x1000_0000 + 8 * v);
    }
    let out = run_collect(&KvmBackend, &parse(&text).unwrap()).unwrap();
    let reads: Vec<String> = out[9..].iter().map(ToString::to_string).collect();
    for (v, line) in reads.iter().enumerate() {
        assert!(line.ends_with(&format!("\"value\":\"{v:#x}\"}}")), "{line}");
    }
}

#[test]
fn start_reports_skip_or_runs() {
    if !kvm() {
        return;
    }
    let info = vmmu_kvm::probe().unwrap();
    let s = parse("vm address_spaces=2\n").unwrap();
    match KvmBackend.start(&s) {
        Ok(Start::Skip(reason)) => {
            assert!(info.address_spaces < 2);
            assert!(reason.contains("KVM_CAP_MULTI_ADDRESS_SPACE"), "{reason}");
        }
        Ok(Start::Run(_)) => assert!(info.address_spaces >= 2),
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn unavailable_is_distinguishable() {
    // Whatever the host, a failure to start is either Unavailable (no /dev/kvm) or a run.
    match KvmBackend.start(&parse("").unwrap()) {
        Ok(_) => assert!(vmmu_kvm::probe().is_ok()),
        Err(BackendError::Unavailable(why)) => assert!(why.starts_with("/dev/kvm not usable")),
        Err(e) => panic!("unexpected start error: {e}"),
    }
}
