//! The driver: step numbering, which steps are observed, the current mmio-reply, skips, and
//! errors that name the step, shown with a toy backend.
use vmmu_scenario::*;

/// Reads come back as MMIO with the reply the driver passed; a read at `fail_at` fails.
struct Toy {
    skip: bool,
    fail_at: u64,
}

struct ToyMachine {
    fail_at: u64,
}

impl Backend for Toy {
    fn name(&self) -> &str {
        "toy"
    }
    fn start(&self, s: &Scenario) -> Result<Start, BackendError> {
        if self.skip {
            return Ok(Start::Skip(format!("{} vcpus", s.vm.vcpus)));
        }
        Ok(Start::Run(Box::new(ToyMachine { fail_at: self.fail_at })))
    }
}

impl Machine for ToyMachine {
    fn mem(&mut self, _: MemId, _: &MemDecl) -> Result<(), BackendError> {
        Ok(())
    }
    fn slot(&mut self, op: &SlotOp) -> Result<SlotResult, BackendError> {
        Ok(if op.id == 1 { SlotResult::Ok } else { SlotResult::Err("EINVAL".into()) })
    }
    fn read(&mut self, op: &ReadOp, reply: u64) -> Result<ReadExit, BackendError> {
        if op.gpa == self.fail_at {
            return Err(BackendError::Failed("guest stopped".into()));
        }
        let len = op.width.bytes();
        Ok(ReadExit::Mmio { gpa: op.gpa, len, value: reply & op.width.mask() })
    }
    fn write(&mut self, _: &WriteOp) -> Result<WriteExit, BackendError> {
        Ok(WriteExit::None)
    }
    fn host_write(&mut self, _: &HostWriteOp) -> Result<(), BackendError> {
        Ok(())
    }
    fn host_read(&mut self, op: &HostReadOp) -> Result<u64, BackendError> {
        Ok(op.at.offset)
    }
    fn dirty_log(&mut self, op: &DirtyLogOp) -> Result<DirtyLogResult, BackendError> {
        Ok(DirtyLogResult::Ok(vec![u64::from(op.id)]))
    }
    fn clear_dirty_log(&mut self, _: &ClearDirtyLogOp) -> Result<SlotResult, BackendError> {
        Ok(SlotResult::Err("EINVAL".into()))
    }
}

const TEXT: &str = "\
vm vcpus=3
# comment lines and blank lines hold no step

mem buf size=8K
slot 1 gpa=0x10000000 size=8K mem=buf
slot 2 gpa=0x10000000 size=8K mem=buf
read 2 gpa=0x20000000 size=2
mmio-reply value=0x123456789
host-write buf+8 size=8 value=1
read 0 gpa=0x20000000 size=4
write 1 gpa=0x10000000 size=8 value=5
host-read buf+0x10 size=8
dirty-log 7
clear-dirty-log 1 first=0 count=64
";

#[test]
fn driver_numbers_steps_and_passes_the_reply() {
    let s = parse(TEXT).unwrap();
    let out = run_collect(&Toy { skip: false, fail_at: 0 }, &s).unwrap();
    let text: String = out.iter().map(|o| format!("{o}\n")).collect();
    assert_eq!(
        text,
        r#"{"step":3,"op":"slot","result":"ok"}
{"step":4,"op":"slot","result":"EINVAL"}
{"step":5,"op":"read","exit":"mmio","gpa":"0x20000000","len":2,"value":"0x0"}
{"step":8,"op":"read","exit":"mmio","gpa":"0x20000000","len":4,"value":"0x23456789"}
{"step":9,"op":"write","exit":"none"}
{"step":10,"op":"host-read","value":"0x10"}
{"step":11,"op":"dirty-log","result":"ok","pages":["0x7"]}
{"step":12,"op":"clear-dirty-log","result":"EINVAL"}
"#
    );
}

#[test]
fn skip_is_the_only_observation() {
    let s = parse(TEXT).unwrap();
    let out = run_collect(&Toy { skip: true, fail_at: 0 }, &s).unwrap();
    assert_eq!(out, vec![Observation::Skipped { reason: "3 vcpus".into() }]);
    assert_eq!(out[0].to_string(), r#"{"skipped":"3 vcpus"}"#);
}

#[test]
fn failure_names_the_step_and_keeps_earlier_observations() {
    let s = parse(TEXT).unwrap();
    let (partial, err) = run_collect(&Toy { skip: false, fail_at: 0x2000_0000 }, &s).unwrap_err();
    assert_eq!(partial.len(), 2);
    assert_eq!(err.to_string(), "toy backend failed at step 5 (line 7, `read`): guest stopped");
}
